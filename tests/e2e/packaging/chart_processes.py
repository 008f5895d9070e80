"""Run the chart's etcd members as local processes: exactly the ETCD_* settings the chart
renders, with host names and ports mapped to 127.0.0.1 (there is no cluster DNS here) and the
mounted Secrets laid out as directories. Shared by the chart's process tests."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from packaging_chart import find

PORT_NAMES = {"2379": "client", "2380": "peer", "2381": "metrics"}


def expand(value: str, env: dict[str, str]) -> str:
    # Kubernetes' $(VAR) expansion of earlier variables.
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def mounted(value: str, root: Path) -> str:
    # The Secrets the etcd pods mount under /etc/etcd/tls/ are directories under root/tls/ here.
    return value.replace("/etc/etcd/tls/", f"{root}/tls/")


def write_secret(secret: dict[str, Any], directory: Path) -> None:
    """A rendered Secret as its volume: one file per data key."""
    directory.mkdir(parents=True, exist_ok=True)
    for key, value in secret.get("data", {}).items():
        (directory / key).write_bytes(base64.b64decode(value))


def write_member_tls(rendered: list[dict[str, Any]], root: Path) -> None:
    """The StatefulSet's TLS volumes (client, peer) from the Secrets in the render."""
    pod = find(rendered, "StatefulSet")["spec"]["template"]["spec"]
    for volume in pod.get("volumes", []):
        if volume["name"].startswith("tls-"):
            secret = find(rendered, "Secret", volume["secret"]["secretName"])
            write_secret(secret, root / "tls" / volume["name"].removeprefix("tls-"))


def client_urls(members: list[dict[str, Any]], scheme: str) -> list[str]:
    return [f"{scheme}://127.0.0.1:{m['ports']['client']}" for m in members]


@contextmanager
def start_members(
    etcd: Path, rendered: list[dict[str, Any]], root: Path, ports: list[int]
) -> Iterator[list[dict[str, Any]]]:
    """Start one etcd process per member of the rendered StatefulSet (3 ports each from
    `ports`); yields [{name, proc, ports, log}], stops them (by PID) afterwards."""
    sts = find(rendered, "StatefulSet")
    config = find(rendered, "ConfigMap", f"{sts['metadata']['name']}-env")["data"]
    pod = sts["spec"]["template"]["spec"]
    # The ETCD_* variables live on the `member` init container, which turns them into etcd's
    # config file in a pod; here they go to the etcd process directly.
    member = [c for c in pod.get("initContainers", []) if c["name"] == "member"]
    container = member[0] if member else pod["containers"][0]
    names = [f"{sts['metadata']['name']}-{i}" for i in range(int(sts["spec"]["replicas"]))]
    picked = iter(ports)
    member_ports = [
        {"client": next(picked), "peer": next(picked), "metrics": next(picked)} for _ in names
    ]

    def localize(value: str, i: int) -> str:
        # <member>.<headless>.<ns>.svc.<domain>:<port> -> 127.0.0.1:<that member's port>
        for j, name in enumerate(names):
            value = re.sub(
                rf"{name}\.[a-z0-9.-]+:(\d+)",
                lambda m, j=j: f"127.0.0.1:{member_ports[j][PORT_NAMES[m.group(1)]]}",
                value,
            )
        return re.sub(
            r"0\.0\.0\.0:(\d+)",
            lambda m: f"127.0.0.1:{member_ports[i][PORT_NAMES[m.group(1)]]}",
            value,
        )

    procs: list[dict[str, Any]] = []
    try:
        for i, name in enumerate(names):
            env = {"PATH": os.environ.get("PATH", "")}
            for key, value in config.items():
                env[key] = mounted(localize(value, i), root)
            for var in container["env"]:
                if "valueFrom" in var:
                    assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
                    env[var["name"]] = name
                else:
                    env[var["name"]] = localize(expand(var["value"], env), i)
            # The data dir is the chart's path under this member's own directory.
            env["ETCD_DATA_DIR"] = str(root / name / config["ETCD_DATA_DIR"].lstrip("/"))
            log = root / f"{name}.log"
            with log.open("w") as out:
                proc = subprocess.Popen(
                    [str(etcd)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=root
                )
            procs.append({"name": name, "proc": proc, "ports": member_ports[i], "log": log})
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


# ------------------------------------------------------------------------ the operator pod's view


def operator_pod(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(find(rendered, "Deployment")["spec"]["template"]["spec"])


def _config_data(rendered: list[dict[str, Any]]) -> dict[str, str]:
    volumes = {v["name"]: v for v in operator_pod(rendered)["volumes"]}
    return dict(find(rendered, "ConfigMap", volumes["config"]["configMap"]["name"])["data"])


def write_operator_mounts(rendered: list[dict[str, Any]], root: Path) -> None:
    """The operator pod's Secret volumes under root: `ca/` (the CA-only view of the members'
    client Secret) and `auth/` (the etcd passwords, mounted in the init container only)."""
    volumes = {v["name"]: v for v in operator_pod(rendered)["volumes"]}
    ca_secret = find(rendered, "Secret", volumes["etcd-tls"]["secret"]["secretName"])
    items = {i["key"] for i in volumes["etcd-tls"]["secret"]["items"]}
    write_secret({"data": {k: v for k, v in ca_secret["data"].items() if k in items}}, root / "ca")
    write_secret(
        find(rendered, "Secret", volumes["etcd-auth"]["secret"]["secretName"]), root / "auth"
    )


def operator_settings(
    rendered: list[dict[str, Any]], root: Path, members: list[dict[str, Any]]
) -> dict[str, Any]:
    """The rendered defender.json with this machine's endpoints and mount paths."""
    settings = json.loads(_config_data(rendered)["defender.json"])
    assert all(e.startswith("https://") for e in settings["etcd"]["endpoints"])
    assert "cert_file" not in settings["etcd"], "clients get the CA only"
    settings["etcd"]["endpoints"] = client_urls(members, "https")
    settings["etcd"]["ca_file"] = str(root / "ca" / "ca.crt")
    return dict(settings)


def secret_value(rendered: list[dict[str, Any]], ref: dict[str, str]) -> str:
    """What a secretKeyRef resolves to in the render."""
    return base64.b64decode(find(rendered, "Secret", ref["name"])["data"][ref["key"]]).decode()


def wait_members_ready(members: list[dict[str, Any]], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    for m in members:
        url = f"http://127.0.0.1:{m['ports']['metrics']}/readyz"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert m["proc"].poll() is None, m["log"].read_text()[-2000:]
            assert time.monotonic() < deadline, m["log"].read_text()[-2000:]
            time.sleep(0.3)


def run_init_container(
    rendered: list[dict[str, Any]],
    root: Path,
    members: list[dict[str, Any]],
    plan_edit: Callable[[dict[str, Any]], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """The operator pod's init container exactly as rendered, its mounts mapped under root;
    `plan_edit` may change the rendered plan first."""
    [init] = operator_pod(rendered)["initContainers"]
    assert init["command"][:3] == ["python", "-m", "defender_operator.etcd_access"]
    text = _config_data(rendered)["etcd-access.json"]
    plan = json.loads(text.replace("/etc/ml-defender/etcd-auth", str(root / "auth")))
    if plan_edit is not None:
        plan_edit(plan)
    plan_file = root / f"plan-{uuid.uuid4().hex[:8]}.json"
    plan_file.write_text(json.dumps(plan))
    settings = operator_settings(rendered, root, members)
    settings["etcd"].update(timeout_seconds=5, retries=2)
    (root / "settings.json").write_text(json.dumps(settings))
    args = [
        a.replace("/etc/ml-defender/config/etcd-access.json", str(plan_file)).replace(
            "/etc/ml-defender/config/defender.json", str(root / "settings.json")
        )
        for a in init["args"]
    ]
    return subprocess.run(
        [sys.executable, *init["command"][1:], *args, "--wait-seconds", "60"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )


def lock_down(rendered: list[dict[str, Any]], root: Path, members: list[dict[str, Any]]) -> None:
    """What the operator pod's first start does to a new etcd: wait for it, apply the plan."""
    wait_members_ready(members)
    proc = run_init_container(rendered, root, members)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for password in (root / "auth").iterdir():
        assert password.read_text() not in proc.stderr, "a password reached the log"
