"""Fixtures for the node tests: a LocalCluster with a real node (containerd, kubelet, kube-proxy,
CoreDNS), shared by the session, and helpers to run pods on it.

The node needs root (network namespace, mounts, iptables) and the node tools (`make tools`).
Missing either skips locally and fails under CI=true.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from defender_devcluster import (
    EtcdCluster,
    LocalCluster,
    ToolNotFoundError,
    tool,
    wait_for,
)
from defender_devcluster.pytest_plugin import in_ci, missing_tool

from ._images import ImageInputMissing, node_test_images


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker("node")
            item.add_marker("cluster")


def _need_root() -> None:
    if os.geteuid() != 0:
        msg = "the node needs root (network namespace, mounts, iptables)"
        if in_ci():
            pytest.fail(f"CI=true and {msg}", pytrace=False)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def node_images() -> dict[str, tuple[str, Path]]:
    """name -> (reference, OCI archive) of the pause and stand-in (busybox) images, written
    without Docker into the images cache that `make images` uses."""
    from defender_devcluster._images import default_cache_dir

    try:
        return node_test_images(default_cache_dir())
    except (ToolNotFoundError, ImageInputMissing) as exc:
        missing_tool(exc)


@pytest.fixture(scope="session")
def busybox_image(node_images: dict[str, tuple[str, Path]]) -> str:
    """Reference of an image with busybox's applets (sh, httpd, wget, nslookup, ...)."""
    return node_images["stand-in"][0]


@pytest.fixture(scope="session")
def node_cluster(
    tmp_path_factory: pytest.TempPathFactory,
    defender_etcd: EtcdCluster,
    node_images: dict[str, tuple[str, Path]],
) -> Iterator[LocalCluster]:
    """kube-apiserver, controller-manager, scheduler and a Ready node, with the pause and busybox
    images imported. The defender etcd is the session's."""
    _need_root()
    cluster = LocalCluster(
        tmp_path_factory.mktemp("node-cluster"),
        etcd=defender_etcd,
        node=True,
        images=[archive for _, archive in node_images.values()],
        die_with_parent=True,
    )
    try:
        cluster.start()
    except ToolNotFoundError as exc:
        missing_tool(exc)
    try:
        yield cluster
    finally:
        cluster.stop()


class Kubectl:
    """kubectl against one cluster, failing the test with stderr on a non-zero exit."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig

    def run(
        self, *args: str, stdin: str | None = None, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(tool("kubectl")), f"--kubeconfig={self.kubeconfig}", *args]
        out = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {out.returncode}: {out.stderr}")
        return out

    def __call__(self, *args: str, stdin: str | None = None, timeout: float = 60.0) -> str:
        return self.run(*args, stdin=stdin, timeout=timeout).stdout

    def apply(self, doc: dict[str, Any]) -> None:
        self("apply", "-f", "-", stdin=json.dumps(doc))

    def get(self, *args: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self("get", *args, "-o", "json"))
        return data


@pytest.fixture(scope="session")
def node_kubectl(node_cluster: LocalCluster) -> Kubectl:
    return Kubectl(node_cluster.kubeconfig)


@pytest.fixture
def node_namespace(request: pytest.FixtureRequest, node_kubectl: Kubectl) -> Iterator[str]:
    """A fresh namespace on the node cluster whose `default` ServiceAccount exists."""
    from defender_devcluster.pytest_plugin import namespace_name

    name = namespace_name(request.node.name)
    node_kubectl("create", "namespace", name)

    def has_default_sa() -> bool:
        return node_kubectl.run("-n", name, "get", "sa", "default", check=False).returncode == 0

    wait_for(f"ServiceAccount {name}/default", has_default_sa, timeout=60, every=0.3)
    try:
        yield name
    finally:
        node_kubectl.run("delete", "namespace", name, "--wait=false", check=False)


def busybox_pod(
    image: str, name: str, namespace: str, command: str, **extra: Any
) -> dict[str, Any]:
    """A pod running ``sh -c command`` in ``image``, never pulled (it was imported)."""
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": 1,
        "containers": [
            {
                "name": "main",
                "image": image,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", command],
                **extra.pop("container", {}),
            }
        ],
        **extra,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": spec,
    }


def wait_pod_ready(kubectl: Kubectl, namespace: str, name: str, timeout: float = 120.0) -> Any:
    """The pod's JSON once its Ready condition is True; the last status in the failure."""

    def ready() -> dict[str, Any] | None:
        pod = kubectl.get("-n", namespace, "pod", name)
        conds = pod.get("status", {}).get("conditions", [])
        if any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
            return pod
        return None

    return wait_for(f"pod {namespace}/{name} Ready", ready, timeout=timeout, every=0.5)
