"""A node leaves nothing behind: after `cluster-down`, and after a crash cleaned up by the next
run, no process, container, mount, network namespace, veth or iptables rule of it remains.

Each test runs its own second cluster next to the session's (its own netns and pod range), so
this also shows two nodes side by side.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_support import Kubectl, busybox_pod, wait_pod_ready

from defender_devcluster import (
    EtcdCluster,
    LocalCluster,
    node_alive,
    node_leftovers,
    recover_stale_nodes,
    stop_run_dir,
    tool,
    wait_for,
)
from defender_devcluster._nodenet import REGISTRY, holds, let_go, process_start_time


@pytest.fixture
def crashed_node(
    tmp_path: Path,
    defender_etcd: EtcdCluster,
    node_images: dict[str, tuple[str, Path]],
    busybox_image: str,
    node_cluster: LocalCluster,
) -> Iterator[tuple[Path, str, str]]:
    """A second cluster whose node ran a pod, then lost every node process to SIGKILL (as when
    the process that started it dies): containers and shims live on.

    Yields (run dir, netns, host interface); the control plane is stopped afterwards."""
    del node_cluster  # started first, so both nodes run at once
    cluster = LocalCluster(
        tmp_path / "run",
        etcd=defender_etcd,
        node=True,
        images=[archive for _, archive in node_images.values()],
        die_with_parent=True,
    )
    cluster.start()
    try:
        assert cluster.node is not None and cluster.node.network is not None
        net = cluster.node.network
        kubectl = Kubectl(cluster.kubeconfig)
        kubectl.apply(busybox_pod(busybox_image, "doomed", "default", "sleep 3600"))
        wait_pod_ready(kubectl, "default", "doomed")
        # The pod's traces exist before the crash: the check below can fail.
        assert node_leftovers(cluster.run_dir, net.netns, net.host_if)
        assert _containers(cluster.run_dir)
        for proc in cluster.node.processes():
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGKILL)
        wait_for("the node processes gone", lambda: not node_alive(cluster.run_dir), timeout=30)
        yield cluster.run_dir, net.netns, net.host_if
    finally:
        cluster.control_plane.stop()


def _containers(run_dir: Path) -> list[str]:
    root = run_dir / "node" / "runc" / "k8s.io"
    if not root.is_dir():
        return []
    out = subprocess.run(
        [str(tool("runc")), "--root", str(root), "list", "-q"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def _assert_nothing_left(run_dir: Path, netns: str, host_if: str) -> None:
    assert node_leftovers(run_dir, netns, host_if) == []
    assert _containers(run_dir) == []
    assert not node_alive(run_dir)


def test_cluster_down_after_a_crash_removes_everything_the_node_made(
    crashed_node: tuple[Path, str, str],
) -> None:
    run_dir, netns, host_if = crashed_node
    stop_run_dir(run_dir)
    _assert_nothing_left(run_dir, netns, host_if)


def _creator_dies(netns: str) -> None:
    """Make the registry say the node was created by a process that is gone, as when the
    pytest session or `up` that made it was killed (here the creator is this test process),
    and let go of its lock, as the kernel does for a killed process."""
    assert holds(netns)
    let_go(netns)
    record = REGISTRY / f"{netns}.json"
    data = json.loads(record.read_text())
    child = subprocess.Popen(["sleep", "30"])
    data["owner_pid"], data["owner_start"] = child.pid, process_start_time(child.pid)
    record.write_text(json.dumps(data))
    child.kill()
    child.wait()


def test_a_node_still_starting_is_not_taken_for_a_crashed_one(
    crashed_node: tuple[Path, str, str],
) -> None:
    run_dir, netns, _ = crashed_node
    # No node process runs, but its creator (this process) does and holds its lock: another
    # run leaves it alone.
    assert not node_alive(run_dir) and holds(netns)
    assert run_dir not in recover_stale_nodes(keep=None)
    assert (REGISTRY / f"{netns}.json").is_file()
    stop_run_dir(run_dir)


def test_the_next_run_recovers_a_crashed_node_of_another_run_dir(
    crashed_node: tuple[Path, str, str], node_cluster: LocalCluster
) -> None:
    run_dir, netns, host_if = crashed_node
    _creator_dies(netns)
    cleaned = recover_stale_nodes(keep=None)
    # Another session's node start may have recovered it first (it runs the same sweep).
    assert run_dir in cleaned or not (REGISTRY / f"{netns}.json").exists()
    _assert_nothing_left(run_dir, netns, host_if)
    # The live node of the session is not touched.
    assert node_cluster.node is not None and node_cluster.node.network is not None
    assert node_cluster.run_dir not in cleaned
    assert node_alive(node_cluster.run_dir)
