"""The user's journey on the harness's node: the chart installed with the local images, the four
sample DefenderComponents applied, and one workload per component (the stand-in as the main
container, the `defender-agent` sidecar rendered by the chart's own agent helper through
charts/ml-defender/examples/agent-sidecar). Each component must become Ready with its one
instance alive and heartbeating; a config edit must reach the running process; a deleted pod
must come back and register.

Marked slow: the project image is a Debian root built with debootstrap (minutes, cached), and
the whole journey takes minutes on this machine. Phase times are printed (run with -s).
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from node_support import Kubectl, build_images

from defender_devcluster import LocalCluster, tool, wait_for
from defender_devcluster._tools import REPO_ROOT

CHART = REPO_ROOT / "charts" / "ml-defender"
WORKLOAD_CHART = CHART / "examples" / "agent-sidecar"
SAMPLES = REPO_ROOT / "manifests" / "samples"
RELEASE = "ml-defender"
NAMESPACE = "ml-defender"
SAMPLES_NAMESPACE = "defender-samples"
COMPONENTS = {
    "sniffer": "sniffer",
    "ml-detector": "ml-detector",
    "firewall": "firewall",
    "rag": "rag",
}
SHARED_PATH = "/var/run/ml-defender/config"

pytestmark = pytest.mark.slow


def _helm(cluster: LocalCluster, *args: str, timeout: float = 600) -> str:
    argv = [str(tool("helm")), f"--kubeconfig={cluster.kubeconfig}", *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"helm {' '.join(args)} exited {out.returncode}: {out.stderr}"
    return out.stdout


def _phase(name: str, started: float) -> float:
    now = time.monotonic()
    print(f"[journey] {name}: {now - started:.1f}s", flush=True)
    return now


def _ready_component(dfc: dict[str, Any], max_age: float) -> bool:
    status = dfc.get("status", {})
    ready = [c for c in status.get("conditions", []) if c.get("type") == "Ready"]
    if not ready or ready[0].get("status") != "True":
        return False
    if status.get("instanceSummary") != "1/1":
        return False
    beat = status.get("lastHeartbeatTime")
    if not beat:
        return False
    age = (datetime.now(UTC) - datetime.fromisoformat(beat.replace("Z", "+00:00"))).total_seconds()
    return age <= max_age


def _summary(kubectl: Kubectl) -> str:
    return kubectl("-n", SAMPLES_NAMESPACE, "get", "dfc", "-o", "wide")


def _wait_all_ready(kubectl: Kubectl, names: list[str], timeout: float) -> None:
    # A heartbeat is fresh within two intervals of the agent (10 s) plus the operator's status
    # refresh; the samples publish 30 s intervals, so 90 s is "within the lease".
    def all_ready() -> bool:
        items = kubectl.get("-n", SAMPLES_NAMESPACE, "dfc")["items"]
        ok = {i["metadata"]["name"] for i in items if _ready_component(i, max_age=90)}
        return set(names) <= ok

    try:
        wait_for(f"{names} Ready 1/1 with a fresh heartbeat", all_ready, timeout=timeout, every=2.0)
    except Exception as exc:
        pods = kubectl("-n", SAMPLES_NAMESPACE, "get", "pods", "-o", "wide")
        raise AssertionError(f"{exc}\n{_summary(kubectl)}\n{pods}") from exc


def _stand_in_versions(kubectl: Kubectl, component: str) -> list[str]:
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


def _install_workload(
    cluster: LocalCluster, component: str, component_type: str, image: str
) -> None:
    _helm(
        cluster,
        "upgrade", "--install", component, str(WORKLOAD_CHART),
        "--namespace", SAMPLES_NAMESPACE,
        "--set", f"component={component}",
        "--set", f"componentType={component_type}",
        "--set", "replicaCount=1",
        "--set", f"componentImage={image}",
        "--set-json", f"componentArgs={json.dumps([f'{SHARED_PATH}/{component}.json'])}",
        "--set", "componentProcess=stand-in",
    )  # fmt: skip


def test_samples_with_workloads_become_ready_reload_and_recover(
    node_cluster: LocalCluster, node_kubectl: Kubectl, busybox_image: str
) -> None:
    assert node_cluster.node is not None
    kubectl = node_kubectl
    t0 = time.monotonic()
    node_cluster.node.import_images(list(build_images(("etcd", "project")).values()))
    t = _phase("images built/found and imported", t0)
    kubectl.run("create", "namespace", SAMPLES_NAMESPACE, check=False)
    components_set = []
    for i, name in enumerate(COMPONENTS):
        components_set += [
            "--set", f"agent.components[{i}].name={name}",
            "--set", f"agent.components[{i}].namespace={SAMPLES_NAMESPACE}",
        ]  # fmt: skip
    try:
        _helm(
            node_cluster,
            "upgrade", "--install", RELEASE, str(CHART),
            "--namespace", NAMESPACE, "--create-namespace", *components_set,
        )  # fmt: skip
        kubectl("-n", SAMPLES_NAMESPACE, "apply", "-f", str(SAMPLES))
        for name, ctype in COMPONENTS.items():
            _install_workload(node_cluster, name, ctype, busybox_image)
        t = _phase("helm install + samples + workloads applied", t)
        _wait_all_ready(kubectl, list(COMPONENTS), timeout=600)
        t = _phase("all four components Ready 1/1 (cold)", t)
        print(_summary(kubectl), flush=True)

        # A config edit reaches the running process (agent writes it, SIGHUPs the stand-in).
        versions = _stand_in_versions(kubectl, "sniffer")
        assert versions and versions[-1] == "1.0.0", versions
        kubectl(
            "-n", SAMPLES_NAMESPACE, "patch", "dfc", "sniffer", "--type=merge",
            "-p", json.dumps({"spec": {"config": {"version": "1.0.1"}}}),
        )  # fmt: skip
        wait_for(
            "the stand-in logs config version 1.0.1",
            lambda: _stand_in_versions(kubectl, "sniffer")[-1:] == ["1.0.1"],
            timeout=180,
            every=1.0,
        )
        t = _phase("spec.config edit -> stand-in loaded the new version", t)

        # A deleted pod is recreated by its ReplicaSet, registers, and the component is Ready.
        pods = kubectl.get(
            "-n", SAMPLES_NAMESPACE, "pods", "-l", "app.kubernetes.io/name=firewall"
        )["items"]
        assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
        old = pods[0]["metadata"]["name"]
        kubectl("-n", SAMPLES_NAMESPACE, "delete", "pod", old, "--wait=false")

        def replacement() -> dict[str, Any] | None:
            now = kubectl.get(
                "-n", SAMPLES_NAMESPACE, "pods", "-l", "app.kubernetes.io/name=firewall"
            )["items"]
            fresh = [p for p in now if p["metadata"]["name"] != old]
            return fresh[0] if fresh else None

        new_pod = wait_for("a new firewall pod", replacement, timeout=120, every=1.0)
        created = datetime.fromisoformat(
            new_pod["metadata"]["creationTimestamp"].replace("Z", "+00:00")
        )

        def registered_new() -> bool:
            # The old pod's lease may outlive it; Ready 1/1 with a heartbeat newer than the new
            # pod means the new instance registered and beats.
            dfc = kubectl.get("-n", SAMPLES_NAMESPACE, "dfc", "firewall")
            beat = dfc.get("status", {}).get("lastHeartbeatTime")
            if not beat or datetime.fromisoformat(beat.replace("Z", "+00:00")) <= created:
                return False
            return _ready_component(dfc, max_age=90)

        try:
            wait_for("firewall Ready with its new pod", registered_new, timeout=300, every=2.0)
        except Exception as exc:
            raise AssertionError(f"{exc}\n{_summary(kubectl)}") from exc
        t = _phase("pod deleted -> recreated, registered, Ready (warm)", t)
        print(_summary(kubectl), flush=True)
    finally:
        for name in COMPONENTS:
            subprocess.run(
                [str(tool("helm")), f"--kubeconfig={node_cluster.kubeconfig}", "uninstall", name,
                 "--namespace", SAMPLES_NAMESPACE, "--wait", "--timeout", "60s"],
                capture_output=True, check=False, timeout=120,
            )  # fmt: skip
        kubectl.run("-n", SAMPLES_NAMESPACE, "delete", "dfc", "--all", "--wait=false", check=False)
        subprocess.run(
            [str(tool("helm")), f"--kubeconfig={node_cluster.kubeconfig}", "uninstall", RELEASE,
             "--namespace", NAMESPACE, "--wait", "--timeout", "120s"],
            capture_output=True, check=False, timeout=180,
        )  # fmt: skip
        kubectl.run("delete", "namespace", SAMPLES_NAMESPACE, "--wait=false", check=False)
