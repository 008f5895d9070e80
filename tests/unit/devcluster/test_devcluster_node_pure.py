"""Pure parts of the node: names and addresses of a run's network, mountinfo parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from defender_devcluster import _node
from defender_devcluster._errors import NodeSetupError
from defender_devcluster._mounts import _unescape, mounts_under
from defender_devcluster._nodenet import NodeNetwork, run_dir_hash


def test_a_run_dir_gets_names_that_fit_linux_interface_names_and_differ_per_run() -> None:
    a = NodeNetwork(Path("/tmp/run-a"), 7)
    b = NodeNetwork(Path("/tmp/run-b"), 8)
    assert len(a.host_if) <= 15  # IFNAMSIZ - 1
    assert a.netns != b.netns and a.host_if != b.host_if
    assert a.netns == f"dfnode-{run_dir_hash(Path('/tmp/run-a'))}"


def test_the_slot_picks_the_link_and_the_pod_range() -> None:
    net = NodeNetwork(Path("/tmp/run"), 7)
    assert (net.host_ip, net.node_ip) == ("10.253.7.1", "10.253.7.2")
    assert (net.pod_cidr, net.pod_gateway) == ("10.244.7.0/24", "10.244.7.1")


def test_commands_enter_only_the_network_namespace() -> None:
    net = NodeNetwork(Path("/tmp/run"), 1)
    argv = net.in_netns(["kubelet", "--v=1"])
    assert argv[:2] == ["nsenter", f"--net=/run/netns/{net.netns}"]
    assert argv[-2:] == ["kubelet", "--v=1"]
    # No --mount: kubelet's volume mounts must be seen by containerd.
    assert not any(a.startswith("--mount") for a in argv)


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ("/a/plain", "/a/plain"),
        ("/with\\040space", "/with space"),
        ("/tab\\011and\\134backslash", "/tab\tand\\backslash"),
        ("/trailing\\04", "/trailing\\04"),
    ],
)
def test_mountinfo_escapes_are_read_back(raw: str, path: str) -> None:
    assert _unescape(raw) == path


def test_mounts_under_a_directory_nothing_mounted_is_empty(tmp_path: Path) -> None:
    assert mounts_under(tmp_path) == []


def test_mounts_under_root_lists_deepest_first() -> None:
    points = mounts_under(Path("/"))
    assert points, "/proc/self/mountinfo lists at least /"
    depths = [len(p.parts) for p in points]
    assert depths == sorted(depths, reverse=True)


def test_a_process_is_named_by_pid_and_start_time_even_after_it_exits() -> None:
    import os
    import subprocess

    from defender_devcluster._nodenet import process_start_time

    assert process_start_time(os.getpid()) is not None
    child = subprocess.Popen(["sleep", "30"])
    assert process_start_time(child.pid) is not None
    child.kill()
    child.wait()
    assert process_start_time(child.pid) is None


def _volumes_of_an_earlier_run(tmp_path: Path) -> Path:
    volumes = tmp_path / "node" / "volumes"
    member = volumes / "pv-0" / "member" / "snap"
    member.mkdir(parents=True)
    (member / "db").write_bytes(b"an earlier run's etcd member")
    return volumes


def test_a_start_clears_what_an_earlier_runs_volumes_held(tmp_path: Path) -> None:
    # A claim of the new run bound to pv-0 and its etcd member panicked on the old raft log.
    volumes = _volumes_of_an_earlier_run(tmp_path)
    _node.clear_volumes(volumes)
    assert not volumes.exists()
    _node.clear_volumes(volumes)  # nothing there: nothing to do


def test_volumes_with_a_mount_left_under_them_are_not_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    volumes = _volumes_of_an_earlier_run(tmp_path)
    monkeypatch.setattr(_node, "mounts_under", lambda d: [d / "pv-0"])
    with pytest.raises(NodeSetupError, match=r"still mounted there: .*pv-0"):
        _node.clear_volumes(volumes)
    assert (volumes / "pv-0" / "member" / "snap" / "db").exists()
