"""Fixtures for the node tests: a LocalCluster with a real node (containerd, kubelet, kube-proxy,
CoreDNS), shared by the session, and helpers to run pods on it.

The node needs root (network namespace, mounts, iptables) and the node tools (`make tools`).
Missing either skips locally and fails under CI=true.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from journey_support import Phases
from node_support import ImageInputMissing, Kubectl, node_test_images

from defender_devcluster import (
    EtcdCluster,
    LocalCluster,
    ToolNotFoundError,
    wait_for,
)
from defender_devcluster.pytest_plugin import missing_part, missing_tool


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker("node")
            item.add_marker("cluster")


_PHASES = pytest.StashKey[list[tuple[str, Phases]]]()


@pytest.fixture
def journey_phases(request: pytest.FixtureRequest) -> Phases:
    """Named phase durations of a journey test, repeated in the terminal summary."""
    phases = Phases()
    request.config.stash.setdefault(_PHASES, []).append((request.node.name, phases))
    return phases


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    for test, phases in config.stash.get(_PHASES, []):
        if phases.times:
            terminalreporter.write_line(f"journey phases of {test}:")
            for line in phases.lines():
                terminalreporter.write_line(line)


def _need_root() -> None:
    if os.geteuid() != 0:
        missing_part("the node needs root (network namespace, mounts, iptables)")


@pytest.fixture(scope="session")
def node_images() -> dict[str, tuple[str, Path]]:
    """name -> (reference, OCI archive) of the pause and stand-in (busybox) images, written
    without Docker into the images cache that `make images` uses."""
    from defender_devcluster._images import default_cache_dir

    try:
        return node_test_images(default_cache_dir())
    except ToolNotFoundError as exc:
        missing_tool(exc)
    except ImageInputMissing as exc:
        missing_part(f"an image input is missing: {exc}")


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
