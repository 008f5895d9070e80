"""The chart installed for real on the harness's node: its etcd StatefulSet forms a 3-member
cluster in pods (peers found through the headless Service's DNS names, data on PVCs), the
operator runs in-cluster with the chart's ServiceAccount and RBAC, and the etcd NetworkPolicy
keeps pods without the client label off the client port (the node enforces NetworkPolicy).

Marked slow: the project image is a Debian root built with debootstrap (minutes, cached).
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
from journey_support import ChartEtcd, etcd_admits_only_its_clients
from node_support import Kubectl, build_images

from defender_devcluster import LocalCluster, tool, wait_for
from defender_devcluster._tools import REPO_ROOT

CHART = REPO_ROOT / "charts" / "ml-defender"
RELEASE = "ml-defender"
NAMESPACE = "ml-defender"

pytestmark = pytest.mark.slow


def _helm(cluster: LocalCluster, *args: str, timeout: float = 600) -> str:
    argv = [str(tool("helm")), f"--kubeconfig={cluster.kubeconfig}", *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"helm {' '.join(args)} exited {out.returncode}: {out.stderr}"
    return out.stdout


def _ready(pod: dict[str, Any]) -> bool:
    conds = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def test_helm_install_runs_the_etcd_members_and_the_operator_in_pods(
    node_cluster: LocalCluster, node_kubectl: Kubectl, node_namespace: str, busybox_image: str
) -> None:
    assert node_cluster.node is not None
    node_cluster.node.import_images(list(build_images(("etcd", "project")).values()))
    try:
        _helm(
            node_cluster,
            "upgrade", "--install", RELEASE, str(CHART),
            "--namespace", NAMESPACE, "--create-namespace",
        )  # fmt: skip

        def etcd_ready() -> list[str] | None:
            pods = node_kubectl.get(
                "-n", NAMESPACE, "pods", "-l", "app.kubernetes.io/component=etcd"
            )["items"]
            ready = [p["metadata"]["name"] for p in pods if _ready(p)]
            return ready if len(ready) == 3 else None

        members = wait_for("3 etcd pods Ready", etcd_ready, timeout=300, every=2.0)
        assert sorted(members) == [f"{RELEASE}-etcd-{i}" for i in range(3)]
        pvcs = node_kubectl.get("-n", NAMESPACE, "pvc")["items"]
        assert sorted(p["status"]["phase"] for p in pvcs) == ["Bound"] * 3

        def operator_running() -> dict[str, Any] | None:
            pods = node_kubectl.get(
                "-n", NAMESPACE, "pods", "-l", "app.kubernetes.io/component=operator"
            )["items"]
            running = [p for p in pods if p["status"].get("phase") == "Running" and _ready(p)]
            return running[0] if running else None

        pod = wait_for("the operator pod Running and Ready", operator_running, timeout=300)
        assert pod["spec"]["serviceAccountName"] == f"{RELEASE}-operator"
        # The member list, asked from inside a member (TLS and etcd auth are on by default):
        # three started members.
        out = ChartEtcd(node_kubectl).run(0, "member", "list", "-w", "simple", own=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count(", started, ") == 3, out.stdout
        etcd_admits_only_its_clients(node_kubectl, node_namespace, busybox_image)
        # The chart's own test pods (etcd health through the client Service, operator health).
        tested = _helm(node_cluster, "test", RELEASE, "--namespace", NAMESPACE, "--timeout", "5m")
        assert "Phase:          Succeeded" in tested and "Failed" not in tested, tested
    finally:
        subprocess.run(
            [str(tool("helm")), f"--kubeconfig={node_cluster.kubeconfig}", "uninstall", RELEASE,
             "--namespace", NAMESPACE, "--wait", "--timeout", "120s"],
            capture_output=True, check=False, timeout=180,
        )  # fmt: skip
        # helm keeps the etcd PVCs (docs/install.md): the next install on this session's node
        # (the journey) must start from an empty store, not from this test's members.
        node_kubectl.run("-n", NAMESPACE, "delete", "pvc", "-l", "app.kubernetes.io/component=etcd",
                         "--wait=false", check=False)  # fmt: skip
