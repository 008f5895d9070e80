"""EtcdStore against the real 3-member etcd: CRUD, CAS, transactions, leases, watches, threads."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from defender_config import ConflictError, EtcdSettings, NotFoundError
from defender_config.store import Compare, DeleteOp, EtcdStore, GetOp, PutOp, WatchEvent
from defender_devcluster import EtcdCluster, etcd_client_settings, tool, wait_for

pytestmark = pytest.mark.etcd


def test_put_get_list_delete(store: EtcdStore, etcd_prefix: str) -> None:
    rev = store.put(etcd_prefix + "a", b"1")
    store.put(etcd_prefix + "b", b"2")
    got = store.get(etcd_prefix + "a")
    assert got is not None and got.value == b"1" and got.mod_revision == rev
    assert got.stale is False
    assert store.get(etcd_prefix + "missing") is None
    assert [v.key for v in store.list_prefix(etcd_prefix)] == [etcd_prefix + "a", etcd_prefix + "b"]
    assert store.count_prefix(etcd_prefix) == 2
    assert store.count_prefix(etcd_prefix + "a") == 1
    assert store.count_prefix(etcd_prefix + "none/") == 0
    assert store.delete(etcd_prefix + "a") is True
    assert store.delete(etcd_prefix + "a") is False
    assert store.delete_prefix(etcd_prefix) == 1
    assert store.list_prefix(etcd_prefix) == []


def test_historical_get_reads_old_revision(store: EtcdStore, etcd_prefix: str) -> None:
    key = etcd_prefix + "k"
    first = store.put(key, b"old")
    store.put(key, b"new")
    old = store.get(key, revision=first)
    assert old is not None and old.value == b"old"


def test_compare_and_swap_conflict(store: EtcdStore, etcd_prefix: str) -> None:
    key = etcd_prefix + "cas"
    created = store.compare_and_swap(key, 0, b"v1")  # 0: must not exist yet
    second = store.compare_and_swap(key, created, b"v2")
    with pytest.raises(ConflictError) as info:
        store.compare_and_swap(key, created, b"v3")
    assert info.value.expected == created and info.value.found == second
    got = store.get(key)
    assert got is not None and got.value == b"v2"


def test_put_if_absent_creates_once(store: EtcdStore, etcd_prefix: str) -> None:
    key = etcd_prefix + "once"
    assert store.put_if_absent(key, b"first") is True
    assert store.put_if_absent(key, b"second") is False
    got = store.get(key)
    assert got is not None and got.value == b"first" and got.version == 1


def test_txn_runs_one_branch_atomically(store: EtcdStore, etcd_prefix: str) -> None:
    a, b = etcd_prefix + "a", etcd_prefix + "b"
    store.put(a, b"x")
    result = store.txn(
        [Compare(a, "value", "==", b"x")],
        [PutOp(b, b"from-success"), DeleteOp(a), GetOp(b)],
        [PutOp(b, b"from-failure")],
    )
    assert result.succeeded
    assert result.gets[0][0].value == b"from-success"
    assert store.get(a) is None
    result = store.txn([Compare.present(a)], [PutOp(b, b"nope")], [GetOp(b)])
    assert not result.succeeded and result.gets[0][0].value == b"from-success"


def test_range_delete_in_txn(store: EtcdStore, etcd_prefix: str) -> None:
    for i in range(5):
        store.put(f"{etcd_prefix}h/{i}", b"x")
    store.txn([], [DeleteOp(etcd_prefix + "h/0", range_end=etcd_prefix + "h/3")])
    assert [v.key[-1] for v in store.list_prefix(etcd_prefix + "h/")] == ["3", "4"]


def test_sixteen_threads_share_one_client(store: EtcdStore, etcd_prefix: str) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def worker(n: int) -> None:
        try:
            start.wait()
            for i in range(40):
                key = f"{etcd_prefix}t{n}/{i}"
                store.put(key, f"{n}:{i}".encode())
                got = store.get(key)
                assert got is not None and got.value == f"{n}:{i}".encode()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert len(store.list_prefix(etcd_prefix)) == 16 * 40


def test_lease_keepalive_revoke_and_expiry(store: EtcdStore, etcd_prefix: str) -> None:
    lease = store.grant_lease(30)
    store.put(etcd_prefix + "leased", b"x", lease=lease)
    assert store.refresh_lease(lease) == 30
    assert 0 < store.lease_ttl(lease) <= 30
    store.revoke_lease(lease)
    assert store.get(etcd_prefix + "leased") is None
    assert store.refresh_lease(lease) == 0  # expired/revoked lease: 0, not an error
    assert store.lease_ttl(lease) == -1
    store.revoke_lease(lease)  # idempotent
    with pytest.raises(NotFoundError):
        store.put(etcd_prefix + "late", b"x", lease=lease)


def test_lease_expiry_is_a_delete_event(store: EtcdStore, etcd_prefix: str) -> None:
    events: list[WatchEvent] = []
    handle = store.watch_prefix(etcd_prefix, events.append)
    lease = store.grant_lease(2)
    store.put(etcd_prefix + "ephemeral", b"x", lease=lease)
    wait_for("lease expiry", lambda: any(e.kind == "delete" for e in events), timeout=20)
    handle.cancel()
    assert [e.kind for e in events] == ["put", "delete"]
    assert store.get(etcd_prefix + "ephemeral") is None


def test_watch_delivers_in_order_with_prev_value(store: EtcdStore, etcd_prefix: str) -> None:
    events: list[WatchEvent] = []
    handle = store.watch_prefix(etcd_prefix, events.append, prev_kv=True)
    store.put(etcd_prefix + "k", b"1")
    store.put(etcd_prefix + "k", b"2")
    store.delete(etcd_prefix + "k")
    store.put(etcd_prefix.rstrip("/") + "-sibling", b"not under the prefix")
    wait_for("put, put, delete events", lambda: len(events) >= 3, timeout=15)
    handle.cancel()
    assert [(e.kind, e.value, e.prev_value) for e in events] == [
        ("put", b"1", None),
        ("put", b"2", b"1"),
        ("delete", b"", b"2"),
    ]
    assert not handle.connected


def test_watch_callback_errors_do_not_stop_the_watch(store: EtcdStore, etcd_prefix: str) -> None:
    seen: list[bytes] = []

    def callback(event: WatchEvent) -> None:
        seen.append(event.value)
        if event.value == b"boom":
            raise RuntimeError("callback bug")

    handle = store.watch_prefix(etcd_prefix, callback)
    store.put(etcd_prefix + "k", b"boom")
    store.put(etcd_prefix + "k", b"after")
    wait_for("both values at the callback", lambda: len(seen) == 2, timeout=15)
    handle.cancel()
    assert seen == [b"boom", b"after"]


@pytest.mark.parametrize(
    ("start_at", "expected"),
    [
        # Revisions the watch needs are gone: it hands out what etcd holds now, as a resync.
        pytest.param(
            "first put",
            [("a", b"2", True), ("b", b"3", True), ("c", b"4", False)],
            id="from-a-compacted-revision-resyncs",
        ),
        # A watch is created on etcd one revision before the next it wants (progress answers
        # need it); when that one revision is all compaction took, nothing the watch needs is
        # gone.
        pytest.param(
            "compaction",
            [("b", b"3", False), ("c", b"4", False)],
            id="from-the-compaction-revision-itself-is-no-resync",
        ),
    ],
)
def test_a_watch_started_at_or_before_a_compaction(
    store: EtcdStore,
    etcd_prefix: str,
    defender_etcd: EtcdCluster,
    start_at: str,
    expected: list[tuple[str, bytes, bool]],
) -> None:
    first = store.put(etcd_prefix + "a", b"1")
    store.put(etcd_prefix + "a", b"2")
    compacted_at = store.put(etcd_prefix + "b", b"3")
    subprocess.run(
        [
            str(tool("etcdctl")),
            f"--endpoints={defender_etcd.endpoints[0]}",
            "compaction",
            str(compacted_at),
        ],
        check=True,
        capture_output=True,
    )
    events: list[WatchEvent] = []
    start = {"first put": first, "compaction": compacted_at}[start_at]
    handle = store.watch_prefix(etcd_prefix, events.append, start_revision=start)
    wait_for("the events before the next put", lambda: len(events) >= len(expected) - 1, timeout=15)
    store.put(etcd_prefix + "c", b"4")
    wait_for("the next put", lambda: len(events) >= len(expected), timeout=15)
    handle.cancel()
    assert [(e.key[-1], e.value, e.resync) for e in events] == expected


def test_a_key_deleted_while_a_watch_was_cut_off_and_compacted_is_handed_out_as_deleted(
    store: EtcdStore, etcd_prefix: str, members_restored: EtcdCluster
) -> None:
    # The watching store talks to member 0 only: stopped, its watch cannot resume elsewhere
    # before the delete and the compaction happen on the other two.
    cluster = members_restored
    one = EtcdStore(
        EtcdSettings.model_validate({**etcd_client_settings(cluster.endpoints[:1]), "retries": 1}),
        registry=CollectorRegistry(),
    )
    events: list[WatchEvent] = []
    try:
        handle = one.watch_prefix(etcd_prefix, events.append)
        store.put(etcd_prefix + "a", b"1")
        store.put(etcd_prefix + "b", b"2")
        wait_for("both puts delivered", lambda: len(events) == 2, timeout=15)
        cluster.stop_member(0)
        store.delete(etcd_prefix + "b")
        now = store.put(etcd_prefix + "c", b"3")
        subprocess.run(
            [str(tool("etcdctl")), f"--endpoints={cluster.endpoints[1]}", "compaction", str(now)],
            check=True,
            capture_output=True,
        )
        cluster.restart_member(0)
        wait_for("the resync", lambda: len(events) >= 5, timeout=60)
        handle.cancel()
    finally:
        one.close()
    assert [(e.kind, e.key[-1], e.resync) for e in events] == [
        ("put", "a", False),
        ("put", "b", False),
        ("delete", "b", True),
        ("put", "a", True),
        ("put", "c", True),
    ]


def test_health_reports_members_leader_and_quorum(store: EtcdStore) -> None:
    report = store.health()
    assert report.cluster_size == 3
    assert report.quorum and report.healthy_count == 3
    assert report.leader is not None and report.leader_id == report.leader.member_id
    assert all(m.name and m.version for m in report.members)
    assert store.has_quorum()


def test_metrics_count_calls_by_op(
    make_etcd_settings: Callable[..., EtcdSettings], etcd_prefix: str
) -> None:
    registry = CollectorRegistry()
    with EtcdStore(make_etcd_settings(), registry=registry) as s:
        s.put(etcd_prefix + "m", b"x")
        s.get(etcd_prefix + "m")
        s.get(etcd_prefix + "m")
        with pytest.raises(ConflictError):
            s.compare_and_swap(etcd_prefix + "m", 1, b"y")

    def value(name: str, **labels: str) -> float:
        got = registry.get_sample_value(name, labels)
        return got if got is not None else 0.0

    assert value("defender_etcd_calls_total", op="get") == 2
    assert value("defender_etcd_calls_total", op="put") == 1
    assert value("defender_etcd_calls_total", op="compare_and_swap") == 1
    assert value("defender_etcd_call_duration_seconds_count", op="get") == 2
    # A lost compare is an answer, not an etcd failure.
    assert value("defender_etcd_errors_total", op="compare_and_swap", reason="unavailable") == 0
