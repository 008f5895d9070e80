"""The chart's process configuration, run for real: three etcd members started from exactly the
ETCD_* settings the chart renders (only host names and ports mapped to 127.0.0.1, since there is
no cluster DNS here), the readiness path the probes use, and the `helm test` commands."""

from __future__ import annotations

import http.server
import ipaddress
import os
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
from packaging_chart import find, render_chart

from defender_devcluster import ToolNotFoundError, free_ports, tool
from defender_devcluster.pytest_plugin import missing_tool

MEMBERS = 3


def _tool(name: str) -> Path:
    try:
        return tool(name)
    except ToolNotFoundError as exc:
        missing_tool(exc)


def _expand(value: str, env: dict[str, str]) -> str:
    # Kubernetes' $(VAR) expansion of earlier variables.
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


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


@pytest.fixture(scope="module", params=["plain", "tls"])
def variant(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The rendered chart and where its mounted files live here (TLS Secrets as directories)."""
    root = tmp_path_factory.mktemp(f"chart-etcd-{request.param}")
    if request.param == "plain":
        return {"objects": render_chart(_tool("helm")), "root": root, "scheme": "http"}
    for secret in ("client", "peer"):
        _write_tls(root / "tls" / secret)
    return {
        "objects": render_chart(_tool("helm"), "--set", TLS_VALUES),
        "root": root,
        "scheme": "https",
    }


def _files(value: str, root: Path) -> str:
    # The Secrets the pods mount under /etc/etcd/tls/ are directories under root/tls/ here.
    return value.replace("/etc/etcd/tls/", f"{root}/tls/")


@pytest.fixture(scope="module")
def rendered(variant: dict[str, Any]) -> list[dict[str, Any]]:
    return variant["objects"]


@pytest.fixture(scope="module")
def members(
    variant: dict[str, Any], rendered: list[dict[str, Any]]
) -> Iterator[list[dict[str, Any]]]:
    etcd = _tool("etcd")
    config = find(rendered, "ConfigMap", "rel-ml-defender-etcd-env")["data"]
    sts = find(rendered, "StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    names = [f"{sts['metadata']['name']}-{i}" for i in range(MEMBERS)]
    # All ports picked at once: one at a time, the kernel may hand the same port out twice.
    picked = iter(free_ports(3 * len(names)))
    ports = [{"client": next(picked), "peer": next(picked), "metrics": next(picked)} for _ in names]
    port_of = {"2379": "client", "2380": "peer", "2381": "metrics"}

    def localize(value: str, i: int) -> str:
        # <member>.<headless>.<ns>.svc.<domain>:<port> -> 127.0.0.1:<that member's port>
        for j, name in enumerate(names):
            value = re.sub(
                rf"{name}\.[a-z0-9.-]+:(\d+)",
                lambda m, j=j: f"127.0.0.1:{ports[j][port_of[m.group(1)]]}",
                value,
            )
        return re.sub(
            r"0\.0\.0\.0:(\d+)", lambda m: f"127.0.0.1:{ports[i][port_of[m.group(1)]]}", value
        )

    procs: list[dict[str, Any]] = []
    root = variant["root"]
    try:
        for i, name in enumerate(names):
            env = {"PATH": os.environ.get("PATH", "")}
            for key, value in config.items():
                env[key] = _files(localize(value, i), root)
            for var in container["env"]:
                if "valueFrom" in var:
                    assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
                    env[var["name"]] = name
                else:
                    env[var["name"]] = localize(_expand(var["value"], env), i)
            # The data dir is the chart's path under this member's own directory.
            env["ETCD_DATA_DIR"] = str(root / name / config["ETCD_DATA_DIR"].lstrip("/"))
            log = (root / f"{name}.log").open("w")
            proc = subprocess.Popen(
                [str(etcd)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root
            )
            procs.append(
                {"name": name, "proc": proc, "ports": ports[i], "log": root / f"{name}.log"}
            )
        yield procs
    finally:
        for p in procs:
            p["proc"].terminate()
        for p in procs:
            try:
                p["proc"].wait(timeout=10)
            except subprocess.TimeoutExpired:
                p["proc"].kill()
                p["proc"].wait()


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
    tls = (
        [
            f"--{flag}={variant['root']}/tls/client/{f}"
            for flag, f in (("cacert", "ca.crt"), ("cert", "tls.crt"), ("key", "tls.key"))
        ]
        if variant["scheme"] == "https"
        else []
    )
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
