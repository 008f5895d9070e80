"""The defender etcd of the harness is a real 3-member cluster that survives losing a member."""

from __future__ import annotations

import json
import subprocess
import threading
import time

from defender_devcluster import EtcdCluster, tool


def etcdctl(endpoint: str, *args: str) -> str:
    argv = [str(tool("etcdctl")), f"--endpoints={endpoint}", "--command-timeout=10s", *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"{argv[2:]} failed: {out.stderr}"
    return out.stdout


def test_three_voting_members(defender_etcd: EtcdCluster) -> None:
    listing = json.loads(etcdctl(defender_etcd.endpoints[0], "member", "list", "-w", "json"))
    members = listing["members"]
    assert len(members) == 3
    assert not any(m.get("isLearner", False) for m in members)
    advertised = sorted(url for m in members for url in m["clientURLs"])
    assert advertised == sorted(defender_etcd.endpoints)


def test_write_after_killing_a_member_reads_back_elsewhere(
    defender_etcd: EtcdCluster, etcd_prefix: str
) -> None:
    # Kill the leader when we can find it: the harder case (forces an election).
    leader = defender_etcd.leader_endpoint()
    victim = defender_etcd.endpoints.index(leader) if leader else 0
    pid = defender_etcd.kill_member(victim)
    try:
        assert defender_etcd.member_pids[victim] is None
        survivors = [ep for i, ep in enumerate(defender_etcd.endpoints) if i != victim]
        key = f"{etcd_prefix}after-kill"
        # Killing the leader starts an election; the two survivors still form a quorum.
        assert defender_etcd.wait_for_leader(timeout=30) in survivors
        etcdctl(survivors[0], "put", key, f"written-after-killing-pid-{pid}")
        got = etcdctl(survivors[1], "get", key, "--print-value-only", "--consistency=l")
        assert got.strip() == f"written-after-killing-pid-{pid}"
    finally:
        defender_etcd.restart_member(victim)
    # The restarted member rejoins with its old data and catches up on what it missed.
    got = etcdctl(defender_etcd.endpoints[victim], "get", key, "--print-value-only")
    assert got.strip() == f"written-after-killing-pid-{pid}"


def test_stopped_member_catches_up_after_restart(
    defender_etcd: EtcdCluster, etcd_prefix: str
) -> None:
    old_pid = defender_etcd.member_pids[2]
    defender_etcd.stop_member(2)
    try:
        assert defender_etcd.member_pids[2] is None
        defender_etcd.wait_for_leader(timeout=30)
        etcdctl(defender_etcd.endpoints[0], "put", f"{etcd_prefix}while-down", "v1")
    finally:
        defender_etcd.restart_member(2)
    assert defender_etcd.member_pids[2] not in (None, old_pid)
    got = etcdctl(
        defender_etcd.endpoints[2], "get", f"{etcd_prefix}while-down", "--print-value-only"
    )
    assert got.strip() == "v1"


def test_quorum_loss_recovered_by_restarting_members_together(
    defender_etcd: EtcdCluster, etcd_prefix: str
) -> None:
    etcdctl(defender_etcd.endpoints[0], "put", f"{etcd_prefix}before", "kept")
    defender_etcd.kill_member(1)
    defender_etcd.kill_member(2)
    try:
        # One member of three has no quorum: a linearizable read must fail, not answer stale.
        argv = [str(tool("etcdctl")), f"--endpoints={defender_etcd.endpoints[0]}"]
        argv += ["--command-timeout=3s", "get", f"{etcd_prefix}before"]
        no_quorum = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert no_quorum.returncode != 0
    finally:
        # From a thread that ends right away: the restarted members must outlive it.
        t = threading.Thread(target=defender_etcd.restart_members)
        t.start()
        t.join()
    assert all(pid is not None for pid in defender_etcd.member_pids)
    time.sleep(1.0)
    assert all(pid is not None for pid in defender_etcd.member_pids), "members died with thread"
    defender_etcd.wait_for_leader(timeout=30)
    got = etcdctl(defender_etcd.endpoints[2], "get", f"{etcd_prefix}before", "--print-value-only")
    assert got.strip() == "kept"
