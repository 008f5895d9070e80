"""Helpers of the journey test: the chart's etcd reached through `kubectl exec` of its own
etcdctl, the heartbeat records it holds, the agent process of a pod on the node, and the phase
timings the test reports.

The chart's etcd runs with TLS and etcd auth in pods whose image has no shell, so every call is
one `kubectl exec <member> -- etcdctl ...` with the root user of the chart's auth Secret.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from node_support import Kubectl, busybox_pod, tcp_connects, wait_pod_ready

from defender_devcluster import wait_for
from defender_devcluster._journey import NAMESPACE, RELEASE, SAMPLES_NAMESPACE

ETCD = f"{RELEASE}-etcd"
# The chart's default prefix (config.prefix / agent.prefix).
PREFIX = "/ml-defender"


class EtcdctlError(AssertionError):
    """etcdctl in a member exited non-zero; the message carries its stderr. Polls ignore it:
    under heavy load the bcrypt of etcd auth alone can outlast a deadline."""


@dataclass
class ChartEtcd:
    """etcdctl inside the chart's etcd members, as the chart's root user."""

    kubectl: Kubectl
    _password: str | None = None

    def password(self) -> str:
        if self._password is None:
            secret = self.kubectl.get("-n", NAMESPACE, "secret", f"{ETCD}-auth")
            self._password = base64.b64decode(secret["data"]["root"]).decode()
        return self._password

    def run(
        self, member: int, *args: str, own: bool = False, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """etcdctl in member ``member``; ``own``: against that member alone (its own data),
        otherwise against every member (any one answers)."""
        if own:
            endpoints = "https://127.0.0.1:2379"
        else:
            endpoints = ",".join(
                f"https://{ETCD}-{i}.{ETCD}-headless.{NAMESPACE}.svc.cluster.local:2379"
                for i in range(3)
            )
        argv = (
            "-n", NAMESPACE, "exec", f"{ETCD}-{member}", "-c", "etcd", "--",
            "etcdctl", f"--endpoints={endpoints}", "--cacert=/etc/etcd/tls/client/ca.crt",
            f"--user=root:{self.password()}", "--command-timeout=20s", *args,
        )  # fmt: skip
        # A read is retried when a deadline passed (a loaded machine); a write is the caller's
        # to judge: only an acknowledged one counts.
        attempts = 1 if args[0] == "put" else 3
        for _ in range(attempts):
            out = self.kubectl.run(*argv, timeout=timeout, check=False)
            if out.returncode == 0 or "deadline exceeded" not in out.stderr:
                break
        return out

    def get_prefix(self, member: int, prefix: str, own: bool = False) -> dict[str, str]:
        """key -> value under ``prefix``; AssertionError with etcdctl's stderr on failure."""
        out = self.run(member, "get", "--prefix", prefix, "-w", "json", own=own)
        if out.returncode != 0:
            raise EtcdctlError(f"etcdctl get {prefix} on member {member}: {out.stderr}")
        kvs = json.loads(out.stdout).get("kvs") or []
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in kvs
        }

    def heartbeats(self, component: str) -> dict[str, dict[str, Any]]:
        """instance -> heartbeat record of ``component`` (plaintext JSON: fingerprints, never
        keys)."""
        prefix = f"{PREFIX}/components/{component}/instances/"
        return {
            key.removeprefix(prefix): json.loads(value)
            for key, value in self.get_prefix(0, prefix).items()
        }


def parse_time(value: str) -> datetime:
    """An RFC 3339 time as Kubernetes and the heartbeat records write it."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def stand_in_versions(kubectl: Kubectl, component: str) -> list[str]:
    """Config versions the component's stand-in logged as loaded, oldest first."""
    out = kubectl.run(
        "-n", SAMPLES_NAMESPACE, "logs", f"deploy/{component}", "-c", component, check=False
    )  # fmt: skip
    versions = []
    for line in out.stdout.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "loaded":
            versions.append(str(event["version"]))
    return versions


def remove_release_leftovers(kubectl: Kubectl, components: list[str]) -> None:
    """After `Journey.uninstall()`: what the release keeps goes too, so the next install on this
    node starts from an empty store. The operator is gone, so nothing would remove the
    components' finalizer; `helm uninstall` keeps the etcd PVCs and, with them (resource-policy
    keep), the release's Secrets."""
    for name in components:
        kubectl.run("-n", SAMPLES_NAMESPACE, "patch", "dfc", name, "--type=merge",
                    "-p", '{"metadata":{"finalizers":null}}', check=False)  # fmt: skip
    kubectl.run("-n", NAMESPACE, "delete", "pvc", "-l", "app.kubernetes.io/component=etcd",
                "--wait=false", check=False)  # fmt: skip
    kubectl.run("-n", NAMESPACE, "delete", "secret", "-l",
                f"app.kubernetes.io/instance={RELEASE}", "--wait=false", check=False)  # fmt: skip


def etcd_admits_only_its_clients(kubectl: Kubectl, ns: str, image: str) -> None:
    """docs/security.md, "A NetworkPolicy": the client port only from labelled pods (any
    namespace) and the chart's own; the metrics port from anyone."""
    client = busybox_pod(image, "etcd-client", ns, "sleep 3600")
    client["metadata"]["labels"]["mldefender.io/etcd-client"] = "true"
    kubectl.apply(client)
    kubectl.apply(busybox_pod(image, "stranger", ns, "sleep 3600"))
    wait_pod_ready(kubectl, ns, "etcd-client")
    wait_pod_ready(kubectl, ns, "stranger")
    member = kubectl.get("-n", NAMESPACE, "pod", f"{ETCD}-0")["status"]["podIP"]
    service = kubectl.get("-n", NAMESPACE, "service", ETCD)["spec"]["clusterIP"]
    for ip in (member, service):
        # The firewall admits a new pod once its sync has put the pod's IP in the policy's
        # set (soon after the pod starts); a pod it does not know is refused at once.
        wait_for(
            f"the labelled pod admitted to {ip}:2379",
            partial(tcp_connects, kubectl, ns, "etcd-client", ip, 2379),
            timeout=60,
            every=1.0,
        )
        assert not tcp_connects(kubectl, ns, "stranger", ip, 2379), ip
    # The stranger reaches the member itself: the refusal above is the policy's.
    assert tcp_connects(kubectl, ns, "stranger", member, 2381)
    assert not tcp_connects(kubectl, ns, "stranger", member, 2380)


def agent_pid(pod: str) -> int:
    """Host PID of the defender-agent process of ``pod``: the node shares this machine's PID
    namespace view through /proc (the harness runs as root)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if b"defender-agent" not in cmdline:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"POD_NAME={pod}".encode() in environ:
            found.append(int(entry.name))
    if len(found) != 1:
        raise AssertionError(f"expected one defender-agent process of pod {pod}, found {found}")
    return found[0]


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@dataclass
class Phases:
    """Named durations of the journey, printed as they happen and kept for the summary."""

    times: dict[str, float] = field(default_factory=dict)
    _started: float = field(default_factory=time.monotonic)

    def mark(self, name: str) -> float:
        now = time.monotonic()
        self.times[name] = now - self._started
        print(f"[journey] {name}: {self.times[name]:.1f}s", flush=True)
        self._started = now
        return self.times[name]

    def restart(self) -> None:
        self._started = time.monotonic()

    def lines(self) -> Iterator[str]:
        for name, secs in self.times.items():
            yield f"  {name}: {secs:.1f}s"
