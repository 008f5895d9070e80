"""The user's journey on the harness's node, as `make up NODE=1` sets it up (_journey.py): the
chart installed with the local images and `agent.components` for the samples' namespace, the
four sample DefenderComponents, and one workload per component (the stand-in as the main
container, the `defender-agent` sidecar rendered by the chart's own agent helper through
charts/ml-defender/examples/agent-sidecar). Each component must become Ready with its one
instance alive and heartbeating; a config edit must reach the running process; a deleted pod
must come back, register, and the component be Ready again.

Marked slow: the project image is a Debian root built with debootstrap (minutes, cached), and
the journey takes minutes. Phase times are printed (run with -s); no time is asserted.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from node_support import Kubectl, build_images

from defender_devcluster import LocalCluster, wait_for
from defender_devcluster._journey import SAMPLES_NAMESPACE, Journey

pytestmark = pytest.mark.slow


def _phase(name: str, started: float) -> float:
    now = time.monotonic()
    print(f"[journey] {name}: {now - started:.1f}s", flush=True)
    return now


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _stand_in_versions(kubectl: Kubectl, component: str) -> list[str]:
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


def _pods(kubectl: Kubectl, component: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/name={component}"
    items: list[dict[str, Any]] = kubectl.get("-n", SAMPLES_NAMESPACE, "pods", "-l", selector)[
        "items"
    ]
    return items


def test_samples_with_workloads_become_ready_reload_and_recover(
    node_cluster: LocalCluster, node_kubectl: Kubectl, busybox_image: str
) -> None:
    assert node_cluster.node is not None
    kubectl = node_kubectl
    t = time.monotonic()
    node_cluster.node.import_images(list(build_images(("etcd", "project")).values()))
    t = _phase("images built/found and imported", t)
    journey = Journey(node_cluster.kubeconfig, busybox_image)
    try:
        journey.install()
        t = _phase("helm install + samples + workloads applied", t)
        journey.wait_ready(timeout=600)
        t = _phase("all four components Ready 1/1, fresh heartbeat (cold)", t)
        print(journey.summary(), flush=True)

        # A config edit reaches the running process: the operator publishes it, the agent
        # writes it to the shared volume and SIGHUPs the stand-in, which logs the version.
        assert _stand_in_versions(kubectl, "sniffer")[-1:] == ["1.0.0"]
        patch = {"spec": {"config": {"version": "1.0.1"}}}
        kubectl("-n", SAMPLES_NAMESPACE, "patch", "dfc", "sniffer", "--type=merge",
                "-p", json.dumps(patch))  # fmt: skip
        wait_for(
            "the sniffer's stand-in logs config version 1.0.1",
            lambda: _stand_in_versions(kubectl, "sniffer")[-1:] == ["1.0.1"],
            timeout=180,
            every=1.0,
        )
        t = _phase("spec.config edit -> stand-in loaded the new version", t)

        # A deleted pod: its ReplicaSet recreates it, the new agent registers and beats.
        (old,) = (p["metadata"]["name"] for p in _pods(kubectl, "firewall"))
        kubectl("-n", SAMPLES_NAMESPACE, "delete", "pod", old, "--wait=false")

        def replaced_and_gone() -> bool:
            names = [p["metadata"]["name"] for p in _pods(kubectl, "firewall")]
            return old not in names and len(names) == 1

        wait_for(f"{old} gone and one new firewall pod", replaced_and_gone, timeout=180)
        gone = datetime.now(UTC)
        # Only the new pod's agent can beat after the old pod is gone.
        journey.wait_ready(
            timeout=300,
            names=["firewall"],
            also=lambda d: _time(d["status"]["lastHeartbeatTime"]) > gone,
        )
        t = _phase("pod deleted -> recreated, registered, Ready again (warm)", t)
        print(journey.summary(), flush=True)
    finally:
        journey.uninstall()
