"""What a killed run left of its node (netns, veth, host iptables rules with the harness's
comment, mounts under its run dir) is removed by the next run's sweep and by `down`; what a live
run holds (its lock) is not, whoever holds it.

The leftovers are made here by hand, as a run killed half-way would leave them, under names of
their own (``dfnode-t<random>``); their rules match only TEST-NET-3 (203.0.113.0/24), which
nothing here uses. Everything is removed in a ``finally`` whatever the sweep did.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from defender_devcluster import recover_stale_nodes
from defender_devcluster.__main__ import main as devcluster_main
from defender_devcluster._mounts import mounts_under
from defender_devcluster._nodenet import (
    NETNS_DIR,
    REGISTRY,
    RULE_COMMENT,
    NodeNetwork,
    harness_rules,
    host_if_of,
    leftovers,
    lock_path,
)
from defender_devcluster.pytest_plugin import missing_part

NOWHERE = "203.0.113.77/32"


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


class Leftovers:
    """Makes node-network leftovers as a killed run leaves them; removes all it made."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.mounts: list[Path] = []

    def network(self, netns: str | None = None) -> str:
        netns = netns or f"dfnode-t{secrets.token_hex(4)}"
        host_if = host_if_of(netns)
        self.names.append(netns)
        _sh("ip", "netns", "add", netns)
        # A veth like the node's (host end dfh..., far end in the netns); no address, no route.
        _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "uplink0")
        _sh("ip", "link", "set", "uplink0", "netns", netns)
        comment = ["-m", "comment", "--comment", f"{RULE_COMMENT} {netns}"]
        ipt = ["iptables", "-w", "5"]
        # The rule that broke later runs, the FORWARD fences, and one in nat (every table).
        _sh(*ipt, "-A", "OUTPUT", "-d", NOWHERE, "!", "-o", host_if, *comment, "-j", "REJECT")
        for direction in ("-i", "-o"):
            _sh(*ipt, "-A", "FORWARD", direction, host_if, *comment, "-j", "DROP")
        _sh(*ipt, "-t", "nat", "-A", "OUTPUT", "-d", NOWHERE, *comment, "-j", "RETURN")
        assert len(harness_rules(netns)) == 4
        return netns

    def run_dir_network(self, run_dir: Path) -> str:
        """A node network of ``run_dir`` with a mount under its node dir (a pod volume)."""
        node = run_dir / "node"
        volume = node / "kubelet" / "pods" / "p" / "volumes" / "v"
        volume.mkdir(parents=True)
        (node / "containerd.toml").write_text("version = 2\n")
        _sh("mount", "-t", "tmpfs", "-o", "size=1m", "leftover", str(volume))
        self.mounts.append(volume)
        return self.network(NodeNetwork(run_dir, 0).netns)

    def cleanup(self) -> None:
        for netns in self.names:
            for rule in harness_rules(netns):
                subprocess.run(rule.delete_argv(), capture_output=True, check=False)
            if (NETNS_DIR / netns).exists():
                subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
            if Path(f"/sys/class/net/{host_if_of(netns)}").exists():
                argv = ["ip", "link", "del", host_if_of(netns)]
                subprocess.run(argv, capture_output=True, check=False)
            lock_path(netns).unlink(missing_ok=True)
            (REGISTRY / f"{netns}.json").unlink(missing_ok=True)
        for point in self.mounts:
            for _ in mounts_under(point):
                subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)


@pytest.fixture
def leftover() -> Iterator[Leftovers]:
    if os.geteuid() != 0:
        missing_part("node leftovers need root (network namespaces, mounts, iptables)")
    for binary in ("ip", "iptables", "mount", "flock"):
        if shutil.which(binary) is None:
            missing_part(f"{binary} not found on PATH")
    made = Leftovers()
    try:
        yield made
    finally:
        made.cleanup()


def _gone(netns: str) -> None:
    assert leftovers(netns, host_if_of(netns)) == []
    assert not lock_path(netns).exists()
    assert not (REGISTRY / f"{netns}.json").exists()


def test_the_next_run_sweeps_what_a_killed_run_left(leftover: Leftovers, tmp_path: Path) -> None:
    bare = leftover.network()
    run_dir = tmp_path / "killed-run"
    of_run_dir = leftover.run_dir_network(run_dir)
    assert mounts_under(run_dir / "node")

    cleaned = recover_stale_nodes(keep=None)

    _gone(bare)
    _gone(of_run_dir)
    assert run_dir in cleaned
    assert mounts_under(run_dir / "node") == []


def test_down_sweeps_what_a_killed_run_left(leftover: Leftovers, tmp_path: Path) -> None:
    netns = leftover.network()
    assert devcluster_main(["down", "--run-dir", str(tmp_path / "some-other-run")]) == 0
    _gone(netns)


def test_a_live_run_keeps_its_node_until_it_is_killed(leftover: Leftovers) -> None:
    netns = leftover.network()
    REGISTRY.mkdir(parents=True, exist_ok=True)
    # Another run, alive: a process of its own holds the lock of its node network (flock and
    # the sleep it starts share the lock; both are killed, as a killed run's processes are).
    holder = subprocess.Popen(
        ["flock", "-n", str(lock_path(netns)), "-c", "echo held; exec sleep 600"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        before = sorted(leftovers(netns, host_if_of(netns)))
        assert len(before) == 6  # netns, interface, 4 rules

        recover_stale_nodes(keep=None)
        assert sorted(leftovers(netns, host_if_of(netns))) == before
        assert devcluster_main(["down", "--run-dir", "/nonexistent/run"]) == 0
        assert sorted(leftovers(netns, host_if_of(netns))) == before

        _kill_group(holder)  # SIGKILL: the kernel drops the lock with its last holder
        recover_stale_nodes(keep=None)
        _gone(netns)
    finally:
        _kill_group(holder)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()
