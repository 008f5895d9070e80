"""Run the chart's etcd members as local processes: exactly the ETCD_* settings the chart
renders, with host names and ports mapped to 127.0.0.1 (there is no cluster DNS here) and the
mounted Secrets laid out as directories. Shared by the chart's process tests."""

from __future__ import annotations

import base64
import os
import re
import subprocess
from collections.abc import Iterator
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
    container = sts["spec"]["template"]["spec"]["containers"][0]
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
