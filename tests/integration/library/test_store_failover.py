"""Failover against the real cluster: members are SIGKILLed / stopped by PID, then restarted."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from defender_config import EtcdSettings, StoreUnavailableError
from defender_config.store import EtcdStore, WatchEvent
from defender_devcluster import EtcdCluster, etcd_watch_counts, wait_for

pytestmark = pytest.mark.etcd


def member_in_use(store: EtcdStore, cluster: EtcdCluster) -> int:
    """Index of the member the store's client talks to right now."""
    label = store._client._current_endpoint_label
    return [e.split("://")[-1] for e in cluster.endpoints].index(label)


def test_get_put_and_watch_survive_a_killed_member(
    members_restored: EtcdCluster, make_etcd_settings: Callable[..., EtcdSettings], etcd_prefix: str
) -> None:
    cluster = members_restored
    store = EtcdStore(make_etcd_settings(), registry=CollectorRegistry())
    # The writer uses its own client so the watch's stream is the only thing on `store`.
    writer = EtcdStore(make_etcd_settings(), registry=CollectorRegistry())
    try:
        events: list[WatchEvent] = []
        handle = store.watch_prefix(etcd_prefix, events.append)
        assert handle.wait_connected(10)
        store.put(etcd_prefix + "before", b"0")
        victim = member_in_use(store, cluster)
        cluster.kill_member(victim)

        for i in range(20):
            writer.put(f"{etcd_prefix}w{i:02d}", str(i).encode())
            store.put(f"{etcd_prefix}s{i:02d}", str(i).encode())
            got = store.get(f"{etcd_prefix}w{i:02d}")
            assert got is not None and got.value == str(i).encode() and not got.stale
        assert member_in_use(store, cluster) != victim

        wait_for("41 watch events after the kill", lambda: len(events) == 41)
        keys = [e.key.removeprefix(etcd_prefix) for e in events]
        assert keys[0] == "before"
        assert sorted(keys[1:]) == sorted(
            [f"w{i:02d}" for i in range(20)] + [f"s{i:02d}" for i in range(20)]
        )
        revisions = [e.mod_revision for e in events]
        assert revisions == sorted(set(revisions)), "events lost order or were repeated"
        assert handle.restarts >= 1
        assert store.metrics.registry.get_sample_value("defender_etcd_watch_restarts_total") >= 1

        report = store.health()
        assert report.quorum and report.healthy_count == 2
        dead = [m for m in report.members if not m.healthy]
        assert len(dead) == 1 and dead[0].endpoint in cluster.endpoints[victim]
        assert dead[0].error
        handle.cancel()
    finally:
        store.close()
        writer.close()


def test_watch_leaves_a_frozen_member(
    members_restored: EtcdCluster, make_etcd_settings: Callable[..., EtcdSettings], etcd_prefix: str
) -> None:
    # A paused VM or a black-holed member keeps its TCP connections open and answers nothing:
    # no error ever reaches the watch. gRPC keepalive pings (10 s, 5 s to answer) must close
    # the channel so the watch moves to another member instead of waiting forever.
    cluster = members_restored
    store = EtcdStore(make_etcd_settings(), registry=CollectorRegistry())
    try:
        events: list[WatchEvent] = []
        handle = store.watch_prefix(etcd_prefix, events.append)
        assert handle.wait_connected(10)
        victim = member_in_use(store, cluster)
        others = [e for i, e in enumerate(cluster.endpoints) if i != victim]
        writer = EtcdStore(make_etcd_settings(endpoints=others), registry=CollectorRegistry())
        pid = cluster.member_pids[victim]
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(5):
                writer.put(f"{etcd_prefix}f{i}", str(i).encode())
            started = time.monotonic()
            wait_for("5 watch events from another member", lambda: len(events) == 5, timeout=60)
            moved_after = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
            writer.close()
        assert [e.key.removeprefix(etcd_prefix) for e in events] == [f"f{i}" for i in range(5)]
        assert handle.restarts >= 1
        assert moved_after < 40, f"the watch took {moved_after:.0f}s to leave the frozen member"
        handle.cancel()
    finally:
        store.close()


@pytest.mark.parametrize("member", ["killed", "frozen"])
def test_watches_created_together_on_a_lost_stream_resume_together(
    members_restored: EtcdCluster,
    make_etcd_settings: Callable[..., EtcdSettings],
    etcd_prefix: str,
    member: str,
) -> None:
    # pyetcd keeps one watch creation outstanding per stream; the others wait their turn. When
    # the member under the stream stopped answering (frozen: the pending creation times out)
    # or died (killed: the stream fails), each waiting creation was then sent on that dead
    # stream and waited out a timeout of its own: after a restore an agent's 4 watches came
    # back one timeout apart. All of them must move to a live member together: only the first
    # creation on a frozen member waits out a timeout, so two bound all 6 (one each before).
    cluster = members_restored
    # Well below the time keep-alive pings take to give a frozen member up (5-15 s): only
    # dropping the stream that left a creation unanswered moves the others in time.
    settings = make_etcd_settings(timeout_seconds=2.0)
    bound = 2 * settings.timeout_seconds
    store = EtcdStore(settings, registry=CollectorRegistry())
    victim = member_in_use(store, cluster)
    others = [e for i, e in enumerate(cluster.endpoints) if i != victim]
    writer = EtcdStore(make_etcd_settings(endpoints=others), registry=CollectorRegistry())
    prefixes = [f"{etcd_prefix}w{n}/" for n in range(6)]
    # Written first, so a watch delivers its put as soon as it runs, whatever the election.
    start = writer.current_revision() + 1
    for prefix in prefixes:
        writer.put(prefix + "k", b"v")
    pid = cluster.member_pids[victim]
    assert pid is not None
    # A stream open on the member before it stops answering, as under a restore.
    first = store.watch_prefix(etcd_prefix + "first/", lambda e: None)
    assert first.wait_connected(10)
    os.kill(pid, signal.SIGSTOP)
    stopped = True
    delivered: dict[str, float] = {}
    try:
        started = time.monotonic()
        for prefix in prefixes:
            store.watch_prefix(
                prefix,
                lambda e, p=prefix: delivered.setdefault(p, time.monotonic() - started),
                start_revision=start,
            )
        if member == "killed":
            # The stream dies under the creation it left unanswered, the others queued behind.
            time.sleep(settings.timeout_seconds / 4)
            cluster.kill_member(victim)
            stopped = False
        end = started + 3 * bound
        while len(delivered) < len(prefixes) and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        store.close()
        writer.close()
    late = {p.removeprefix(etcd_prefix): round(t, 1) for p, t in delivered.items() if t > bound}
    missing = [p.removeprefix(etcd_prefix) for p in prefixes if p not in delivered]
    assert not late and not missing, f"resumed after more than {bound}s: {late}, not: {missing}"


def test_a_stream_given_up_for_an_unanswered_creation_ends_on_its_member(
    members_restored: EtcdCluster,
    make_etcd_settings: Callable[..., EtcdSettings],
    etcd_prefix: str,
) -> None:
    # A creation left unanswered gives its stream up. The member then wakes and answers it
    # late: etcd kept the stream open (the client only half-closed it), with the watch it had
    # and the one created late, which no client would ever cancel; watches cancelled later
    # could not reach it either. The stream must end on the member, its watches with it.
    cluster = members_restored
    settings = make_etcd_settings(timeout_seconds=2.0)
    store = EtcdStore(settings, registry=CollectorRegistry())
    victim = member_in_use(store, cluster)
    others = [e for i, e in enumerate(cluster.endpoints) if i != victim]
    writer = EtcdStore(make_etcd_settings(endpoints=others), registry=CollectorRegistry())
    pid = cluster.member_pids[victim]
    assert pid is not None
    baseline = etcd_watch_counts(cluster.endpoints[victim])
    events: list[str] = []
    try:
        start = writer.current_revision() + 1
        first = store.watch_prefix(etcd_prefix + "first/", lambda e: events.append(e.key))
        assert first.wait_connected(10)
        os.kill(pid, signal.SIGSTOP)
        try:
            late = store.watch_prefix(
                etcd_prefix + "late/", lambda e: events.append(e.key), start_revision=start
            )
            # Given up on the frozen member after one timeout, created on another one.
            assert late.wait_connected(3 * settings.timeout_seconds)
        finally:
            # Well before keep-alive pings (10 s, 5 s to answer) would close the connection.
            os.kill(pid, signal.SIGCONT)
        assert store._client._current_endpoint_label not in cluster.endpoints[victim]

        def released() -> bool:
            return etcd_watch_counts(cluster.endpoints[victim]) == baseline

        wait_for("the victim holds none of the store's watches", released, timeout=10)
        writer.put(etcd_prefix + "first/k", b"1")
        writer.put(etcd_prefix + "late/k", b"1")
        wait_for("both watches deliver", lambda: len(events) == 2, timeout=15)
        assert sorted(events) == [etcd_prefix + "first/k", etcd_prefix + "late/k"]
        time.sleep(0.5)  # nothing delivered twice
        assert len(events) == 2
        first.cancel()
        late.cancel()
    finally:
        store.close()
        writer.close()


def test_many_threads_keep_working_through_a_kill(
    members_restored: EtcdCluster, make_etcd_settings: Callable[..., EtcdSettings], etcd_prefix: str
) -> None:
    cluster = members_restored
    store = EtcdStore(make_etcd_settings(), registry=CollectorRegistry())
    errors: list[BaseException] = []
    done = threading.Event()
    counts = [0] * 8

    def worker(n: int) -> None:
        i = 0
        try:
            while not done.is_set():
                store.put(f"{etcd_prefix}{n}/{i}", b"x")
                assert store.get(f"{etcd_prefix}{n}/{i}") is not None
                i += 1
                counts[n] = i
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    try:
        for t in threads:
            t.start()
        wait_for("workers running", lambda: min(counts) >= 5)
        cluster.kill_member(member_in_use(store, cluster))
        before = sum(counts)
        wait_for("progress after the kill", lambda: sum(counts) >= before + 80)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
        store.close()
    assert errors == []


def test_stale_reads_when_every_member_is_down(
    members_restored: EtcdCluster,
    restart_members: Callable[[], None],
    make_etcd_settings: Callable[..., EtcdSettings],
    etcd_prefix: str,
) -> None:
    cluster = members_restored
    registry = CollectorRegistry()
    # Few, short retries: the point is what happens once they are exhausted.
    store = EtcdStore(
        make_etcd_settings(retries=2, timeout_seconds=1.0, backoff_base_seconds=0.02),
        registry=registry,
    )
    try:
        store.put(etcd_prefix + "cfg", b"known-good")
        assert store.get(etcd_prefix + "absent") is None
        listed = store.list_prefix(etcd_prefix)
        assert [v.key for v in listed] == [etcd_prefix + "cfg"]
        for i in range(cluster.members):
            cluster.stop_member(i)

        got = store.get(etcd_prefix + "cfg")
        assert got is not None and got.value == b"known-good" and got.stale is True
        assert store.get(etcd_prefix + "absent") is None  # absence is cached too
        assert all(v.stale for v in store.list_prefix(etcd_prefix))
        # A reader that would trust a listing as the state now asks for a fresh one.
        with pytest.raises(StoreUnavailableError):
            store.list_prefix(etcd_prefix, stale_ok=False)
        with pytest.raises(StoreUnavailableError) as info:
            store.get(etcd_prefix + "never-read")
        assert info.value.attempts == 3
        with pytest.raises(StoreUnavailableError):
            store.put(etcd_prefix + "cfg", b"new")
        # A count is never served from cache: it says so rather than guess.
        with pytest.raises(StoreUnavailableError):
            store.count_prefix(etcd_prefix)
        assert not store.has_quorum()
        report = store.health()
        assert not report.quorum and report.healthy_count == 0

        def sample(name: str, **labels: str) -> float:
            return registry.get_sample_value(name, labels) or 0.0

        assert sample("defender_etcd_stale_reads_total", op="get") == 2
        assert sample("defender_etcd_stale_reads_total", op="list") == 1
        assert sample("defender_etcd_errors_total", op="put", reason="unavailable") == 1
        assert sample("defender_etcd_retries_total", op="put") == 2

        restart_members()
        fresh = store.get(etcd_prefix + "cfg")
        assert fresh is not None and fresh.stale is False
    finally:
        store.close()


def test_heartbeater_stop_with_etcd_down_logs_and_returns(
    members_restored: EtcdCluster,
    make_etcd_settings: Callable[..., EtcdSettings],
    etcd_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The revoke fails, so this instance's key may still be there: stop() decides from a
    # listing without its own key (served from cache), cannot write the status, logs both
    # and returns; the lease expires on its own.
    import logging

    from defender_config import DefenderClient, Heartbeater, Keyring, LibrarySettings

    settings = LibrarySettings(
        etcd=make_etcd_settings(retries=1, timeout_seconds=1.0, backoff_base_seconds=0.02),
        prefix=etcd_prefix.rstrip("/"),
        keyring_path=None,
    )
    client = DefenderClient(settings, Keyring.generate(), registry=CollectorRegistry())
    try:
        beat = Heartbeater(client, "fw", "fw-0", interval_seconds=30, allowed_misses=3).start()
        client.store.list_prefix(client.layout.instances_dir("fw"))  # cached for the outage
        for i in range(members_restored.members):
            members_restored.stop_member(i)
        with caplog.at_level(logging.WARNING, logger="defender_config"):
            beat.stop()
        assert "lease revoke failed" in caplog.text
        assert "could not write STOPPED" in caplog.text
    finally:
        client.close()
