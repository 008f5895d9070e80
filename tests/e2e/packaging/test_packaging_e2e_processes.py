"""The chart's process configuration, run for real: three etcd members started from exactly the
ETCD_* settings the chart renders (only host names and ports mapped to 127.0.0.1, since there is
no cluster DNS here), the readiness path the probes use, and the `helm test` commands."""

from __future__ import annotations

import http.server
import ipaddress
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chart_processes import mounted, start_members, write_member_tls
from packaging_chart import KEEP_PLAIN_VALUES, find, render_chart

from defender_devcluster import ToolNotFoundError, free_ports, tool
from defender_devcluster.pytest_plugin import missing_tool

MEMBERS = 3
# The values that keep a pre-lockdown install as it was (docs/install.md, upgrading).
KEEP_PLAIN = KEEP_PLAIN_VALUES


def _tool(name: str) -> Path:
    try:
        return tool(name)
    except ToolNotFoundError as exc:
        missing_tool(exc)


TLS_VALUES = (
    "etcd.tls.client.enabled=true,etcd.tls.client.secretName=etcd-tls,"
    "etcd.tls.client.clientCertAuth=true,etcd.tls.peer.enabled=true,etcd.tls.peer.secretName=etcd-tls"
)


def _write_tls(directory: Path) -> None:
    """A CA and one certificate for 127.0.0.1 usable as server and client (etcd peers are both),
    laid out like a kubernetes.io/tls Secret with ca.crt."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("chart-test-ca"))
        .issuer_name(name("chart-test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("etcd"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True)
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca.public_bytes(pem))
    (directory / "tls.crt").write_bytes(cert.public_bytes(pem))
    (directory / "tls.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@pytest.fixture(scope="module", params=["plain", "tls", "defaults"])
def variant(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The rendered chart and where its mounted files live here (TLS Secrets as directories):
    the pre-lockdown plain settings, your own TLS Secrets, and the defaults (certificates the
    chart generates, etcd authentication on)."""
    root = tmp_path_factory.mktemp(f"chart-etcd-{request.param}")
    helm = _tool("helm")
    if request.param == "plain":
        objects = render_chart(helm, "--values", str(KEEP_PLAIN))
        return {"objects": objects, "root": root, "scheme": "http", "client_tls": []}
    if request.param == "tls":
        for secret in ("client", "peer"):
            _write_tls(root / "tls" / secret)
        objects = render_chart(helm, "--values", str(KEEP_PLAIN), "--set", TLS_VALUES)
        client_tls = [
            f"--{flag}={root}/tls/client/{f}"
            for flag, f in (("cacert", "ca.crt"), ("cert", "tls.crt"), ("key", "tls.key"))
        ]
        return {"objects": objects, "root": root, "scheme": "https", "client_tls": client_tls}
    objects = render_chart(helm)
    write_member_tls(objects, root)
    return {
        "objects": objects,
        "root": root,
        "scheme": "https",
        "client_tls": [f"--cacert={root}/tls/client/ca.crt"],
    }


def _files(value: str, root: Path) -> str:
    return mounted(value, root)


@pytest.fixture(scope="module")
def rendered(variant: dict[str, Any]) -> list[dict[str, Any]]:
    return variant["objects"]


@pytest.fixture(scope="module")
def members(
    variant: dict[str, Any], rendered: list[dict[str, Any]]
) -> Iterator[list[dict[str, Any]]]:
    # All ports picked at once: one at a time, the kernel may hand the same port out twice.
    ports = free_ports(3 * MEMBERS)
    with start_members(_tool("etcd"), rendered, variant["root"], ports) as procs:
        yield procs


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return int(answer.status)
    except OSError:
        return 0


def test_members_form_a_cluster_from_the_chart_settings(
    variant: dict[str, Any], members: list[dict[str, Any]]
) -> None:
    deadline = time.monotonic() + 60
    for m in members:
        # The readiness and startup probes' path on the metrics port.
        while _get(f"http://127.0.0.1:{m['ports']['metrics']}/readyz") != 200:
            assert m["proc"].poll() is None, m["log"].read_text()[-2000:]
            assert time.monotonic() < deadline, m["log"].read_text()[-2000:]
            time.sleep(0.2)
        assert _get(f"http://127.0.0.1:{m['ports']['metrics']}/livez") == 200
    for m in members:
        log = m["log"].read_text()
        # etcd names settings it does not know; a typo in the chart would show here.
        assert "unrecognized environment variable" not in log, log[-2000:]
    # One cluster of three, named after the pods (what ETCD_INITIAL_CLUSTER promised).
    tls = variant["client_tls"]
    listed = subprocess.run(
        [
            str(_tool("etcdctl")),
            f"--endpoints={variant['scheme']}://127.0.0.1:{members[0]['ports']['client']}",
            *tls,
            "member",
            "list",
            "-w",
            "simple",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert sorted(line.split(", ")[2] for line in listed.splitlines()) == [
        m["name"] for m in members
    ]


def test_helm_test_etcdctl_command_succeeds(
    variant: dict[str, Any], rendered: list[dict[str, Any]], members: list[dict[str, Any]]
) -> None:
    test_members_form_a_cluster_from_the_chart_settings(variant, members)
    pod = find(rendered, "Pod", "rel-ml-defender-test-etcd")
    container = pod["spec"]["containers"][0]
    scheme = variant["scheme"]
    local = ",".join(f"{scheme}://127.0.0.1:{m['ports']['client']}" for m in members)
    args = [
        _files(re.sub(r"^--endpoints=.*$", f"--endpoints={local}", a), variant["root"])
        for a in container["args"]
    ]
    assert args != container["args"], "the test pod names the endpoints"
    # Right after start-up a member may still be catching up on the first proposal; the chart's
    # test pod runs after readiness, which this loop stands in for.
    deadline = time.monotonic() + 30
    while True:
        proc = subprocess.run(
            [str(_tool("etcdctl")), *args], capture_output=True, text=True, timeout=60, check=False
        )
        if proc.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count("is healthy") + proc.stdout.count("is healthy") == MEMBERS

    members[0]["proc"].terminate()
    members[0]["proc"].wait(timeout=10)
    failed = subprocess.run(
        [str(_tool("etcdctl")), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert failed.returncode != 0, "helm test must fail when a member is down"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize(("status", "exit_ok"), [(200, True), (500, False)])
def test_helm_test_operator_probe_script(
    rendered: list[dict[str, Any]], status: int, exit_ok: bool
) -> None:
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        pod = find(rendered, "Pod", "rel-ml-defender-test-operator")
        command = pod["spec"]["containers"][0]["command"]
        assert command[0] == "python" and command[-1].endswith("/healthz")
        url = f"http://127.0.0.1:{server.server_address[1]}/healthz"
        proc = subprocess.run(
            [sys.executable, *command[1:-1], url],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert (proc.returncode == 0) is exit_ok, proc.stderr
    finally:
        server.shutdown()
        server.server_close()
