"""Maintenance decisions without a cluster: which member to snapshot, the defrag order, which
snapshots go, the restore steps, the status fields read from the wire, NOSPACE as a type."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest

from defender_config import (
    MaintenanceError,
    over_quota,
    plan_defrag,
    restore_plan,
    short_of_room,
    snapshot_member,
    snapshots_to_prune,
)
from defender_config._maintenance import RESTORE_REVISION_BUMP, snapshot_name
from defender_config._store import classify_error
from defender_config._store._maintenance import status_extras
from defender_config.store import HealthReport, MemberHealth


def member(
    i: int, *, leader: bool = False, serving: bool = True, index: int = 10, **kw: object
) -> MemberHealth:
    return MemberHealth(
        endpoint=f"m{i}:2379",
        healthy=serving,
        member_id=i,
        name=f"etcd-{i}",
        is_leader=leader,
        raft_index=index,
        serving=serving,
        **kw,  # type: ignore[arg-type]
    )


def report(*members: MemberHealth, size: int = 3) -> HealthReport:
    return HealthReport(members=members, cluster_size=size, leader_id=None, quorum=True)


# --- snapshot member -----------------------------------------------------------------------------


def test_the_snapshot_comes_from_the_most_caught_up_follower() -> None:
    r = report(member(0, leader=True, index=30), member(1, index=20), member(2, index=29))
    assert snapshot_member(r).endpoint == "m2:2379"  # type: ignore[union-attr]


def test_the_leader_is_snapshotted_when_no_follower_serves() -> None:
    r = report(member(0, leader=True), member(1, serving=False), member(2, serving=False))
    assert snapshot_member(r).endpoint == "m0:2379"  # type: ignore[union-attr]


def test_no_snapshot_member_when_nothing_serves_or_only_a_learner() -> None:
    assert snapshot_member(report(member(0, serving=False))) is None
    assert snapshot_member(report(member(0, is_learner=True))) is None


# --- defrag plan ---------------------------------------------------------------------------------


def test_defrag_takes_followers_first_and_the_leader_last() -> None:
    plan = plan_defrag(report(member(2), member(0, leader=True), member(1)))
    assert plan.refused is None
    assert plan.order == ("m1:2379", "m2:2379", "m0:2379")


def test_defrag_is_refused_while_a_member_is_down() -> None:
    plan = plan_defrag(report(member(0, leader=True), member(1), member(2, serving=False)))
    assert plan.order == () and plan.refused is not None and "m2:2379" in plan.refused


def test_defrag_is_refused_when_a_member_is_missing_from_the_endpoints() -> None:
    plan = plan_defrag(report(member(0, leader=True), member(1), size=3))
    # Said on its own: "1 member(s) not in the endpoints not serving" read as nonsense.
    assert plan.order == ()
    assert plan.refused == "cluster not healthy, skipped: 1 member(s) not in the endpoints"


def test_defrag_refusal_names_the_down_member_and_the_missing_one_apart() -> None:
    plan = plan_defrag(report(member(0, leader=True), member(1, serving=False), size=3))
    assert plan.refused == (
        "cluster not healthy, skipped: m1:2379 not serving; 1 member(s) not in the endpoints"
    )


def test_defrag_refusal_says_what_the_down_member_answered() -> None:
    # Seen on `make up`: "127.0.0.1:23792 not serving" for a member that was healthy a moment
    # later, with nothing to tell a timed-out health check (try again) from a dead member.
    down = member(2, serving=False, error="DEADLINE_EXCEEDED: Deadline Exceeded")
    plan = plan_defrag(report(member(0, leader=True), member(1, serving=False), down))
    assert plan.refused == (
        "cluster not healthy, skipped: m1:2379 not serving,"
        " m2:2379 not serving (DEADLINE_EXCEEDED: Deadline Exceeded)"
    )


def test_defrag_is_refused_without_a_single_leader() -> None:
    assert plan_defrag(report(member(0), member(1), member(2))).refused is not None


def test_defrag_runs_despite_nospace_it_is_the_cure() -> None:
    alarms = ("NOSPACE",)
    r = report(
        member(0, leader=True, alarms=alarms), member(1, alarms=alarms), member(2, alarms=alarms)
    )
    assert plan_defrag(r).order[-1] == "m0:2379"


# --- over quota after a defrag -------------------------------------------------------------------


def test_a_member_at_or_over_its_quota_is_over_whatever_it_uses_inside() -> None:
    # etcd judges the quota by the file's size: free pages inside it do not help.
    r = report(
        member(0, leader=True, db_size_bytes=100, db_size_quota_bytes=100, db_size_in_use_bytes=5),
        member(1, db_size_bytes=150, db_size_quota_bytes=100),
        member(2, db_size_bytes=99, db_size_quota_bytes=100),
    )
    assert [(m.endpoint, m.db_size_bytes, m.quota_bytes) for m in over_quota(r)] == [
        ("m0:2379", 100, 100),
        ("m1:2379", 150, 100),
    ]


def test_another_defrag_helps_only_a_member_using_less_than_its_quota() -> None:
    r = report(
        member(0, leader=True, db_size_bytes=150, db_size_quota_bytes=100, db_size_in_use_bytes=9),
        member(1, db_size_bytes=150, db_size_quota_bytes=100, db_size_in_use_bytes=120),
        member(2, db_size_bytes=150, db_size_quota_bytes=100),
    )
    assert [m.defrag_would_help for m in over_quota(r)] == [True, False, True]


def test_a_member_without_a_reported_quota_or_size_is_not_judged() -> None:
    r = report(
        member(0, leader=True, db_size_bytes=10**9),
        member(1, db_size_bytes=10**9, db_size_quota_bytes=0),
        member(2, db_size_quota_bytes=100),
    )
    assert over_quota(r) == ()


def test_a_member_is_short_of_room_when_the_largest_write_would_take_it_over_its_quota() -> None:
    r = report(
        member(0, leader=True, db_size_bytes=60, db_size_quota_bytes=100),
        member(1, db_size_bytes=59, db_size_quota_bytes=100),
        member(2, db_size_bytes=100, db_size_quota_bytes=100),
    )
    # etcd takes a write while size + cost < quota: 60 + 40 is refused, 59 + 40 taken. A member
    # at its quota is over_quota's.
    assert [m.endpoint for m in short_of_room(r, 40)] == ["m0:2379"]
    assert short_of_room(r, 0) == ()
    assert short_of_room(report(member(0, db_size_bytes=99)), 10**6) == ()  # no quota reported


# --- retention -----------------------------------------------------------------------------------


def test_only_our_snapshots_beyond_keep_are_pruned_oldest_first() -> None:
    t = [datetime(2026, 1, d, tzinfo=UTC) for d in (1, 2, 3)]
    names = [snapshot_name(t[0], 5), snapshot_name(t[2], 9), snapshot_name(t[1], 7)]
    names += ["notes.txt", "defender-etcd-garbage.db", snapshot_name(t[0], 1) + "\n"]
    assert snapshots_to_prune(names, 2) == [snapshot_name(t[0], 5)]
    assert snapshots_to_prune(names, 5) == []


def test_keep_must_be_at_least_one() -> None:
    with pytest.raises(ValueError):
        snapshots_to_prune([], 0)


# --- restore plan --------------------------------------------------------------------------------


def test_restore_plan_gives_every_member_the_same_cluster_and_its_own_dir() -> None:
    steps = restore_plan(
        "/b/s.db",
        [("a", "http://a:2380"), ("b", "http://b:2380")],
        data_dir="/data/{name}",
        token="t1",
    )
    assert [s.data_dir for s in steps] == ["/data/a", "/data/b"]
    assert steps[1].argv[:4] == ("etcdutl", "snapshot", "restore", "/b/s.db")
    assert "--initial-cluster=a=http://a:2380,b=http://b:2380" in steps[0].argv
    assert "--initial-advertise-peer-urls=http://b:2380" in steps[1].argv
    assert "--initial-cluster-token=t1" in steps[0].argv
    # Every member bumps alike, past the revisions clients saw, so their watches reload.
    for step in steps:
        assert f"--bump-revision={RESTORE_REVISION_BUMP}" in step.argv
        assert "--mark-compacted" in step.argv


def test_restore_plan_on_own_volumes_keeps_one_path_for_every_member() -> None:
    # The chart's members each read /var/lib/etcd/data on their own PVC.
    steps = restore_plan(
        "/b/s.db",
        [("a", "http://a:2380"), ("b", "http://b:2380")],
        data_dir="/var/lib/etcd/data",
        token="t1",
        own_volumes=True,
    )
    assert [s.data_dir for s in steps] == ["/var/lib/etcd/data", "/var/lib/etcd/data"]
    assert "--name=b" in steps[1].argv


@pytest.mark.parametrize(
    ("members", "data_dir", "message"),
    [
        ([], "/d/{name}", "at least one member"),
        ([("a", "http://a"), ("b", "http://b")], "/d/same", "must contain {name}"),
        ([("a", "http://a"), ("a", "http://b")], "/d/{name}", "repeat"),
    ],
)
def test_restore_plan_refuses_what_cannot_form_a_cluster(
    members: list[tuple[str, str]], data_dir: str, message: str
) -> None:
    with pytest.raises(MaintenanceError, match=message):
        restore_plan("/s.db", members, data_dir=data_dir, token="t")


# --- status fields from the wire -----------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def test_status_extras_reads_alarms_in_use_learner_and_quota() -> None:
    raw = (
        _field(2, b"3.6.16")
        + _field(3, 20480)
        + _field(8, b"memberID:123 alarm:NOSPACE ")
        + _field(9, 16384)
        + _field(10, 1)
        + _field(11, b"3.6.0")
        + _field(12, 2 * 1024 * 1024)
    )
    extras = status_extras(raw)
    assert extras.alarms == ("NOSPACE",)
    assert extras.db_size_in_use_bytes == 16384
    assert extras.is_learner is True
    assert extras.db_size_quota_bytes == 2 * 1024 * 1024


def test_status_extras_of_a_malformed_message_are_the_defaults() -> None:
    assert status_extras(b"\x42\xff") == status_extras(b"")


# --- NOSPACE is its own error --------------------------------------------------------------------


class _Rpc(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_database_space_exceeded_is_nospace_and_never_retried() -> None:
    rule = classify_error(
        _Rpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded")
    )
    assert rule is not None and rule.kind == "nospace" and not rule.transient
    busy = classify_error(_Rpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests"))
    assert busy is not None and busy.transient
