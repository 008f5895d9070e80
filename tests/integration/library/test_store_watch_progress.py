"""Progress answers on a watch stream against the real 3-member etcd (`watch_prefix`'s
`progress_seconds`, `WatchHandle.silent_seconds`): an idle watch that asks keeps hearing from
its member, and a member frozen under it (SIGSTOP: its connection stays open, nothing
answers) shows as silence seconds before gRPC's keep-alive pings give the connection up, and
is replaced by a stream on another member once silent past the stall bound, losing nothing."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from defender_config import EtcdSettings
from defender_config.store import EtcdStore, WatchEvent, WatchHandle
from defender_devcluster import EtcdCluster, wait_for

pytestmark = pytest.mark.etcd

PROGRESS = 0.5


def _loudest_silence(silent: Callable[[], float | None], seconds: float) -> float:
    """The longest silence seen over `seconds`, sampled every 50 ms."""
    end, loudest = time.monotonic() + seconds, 0.0
    while time.monotonic() < end:
        now = silent()
        assert now is not None, "the watch left its stream"
        loudest = max(loudest, now)
        time.sleep(0.05)
    return loudest


def _vouched_watch(
    store: EtcdStore, prefix: str, callback: Callable[[WatchEvent], None], **kwargs: Any
) -> WatchHandle:
    """A watch asking for progress, on a stream that has answered since its creation."""
    handle = store.watch_prefix(prefix, callback, progress_seconds=PROGRESS, **kwargs)
    assert handle.wait_connected(10)
    # Vouched for once etcd answered the progress request sent at creation (it caught up).
    wait_for("the first progress answer", lambda: handle.silent_seconds() is not None)
    return handle


def test_an_idle_watch_that_asks_keeps_hearing_from_etcd(
    make_etcd_settings: Callable[..., EtcdSettings], etcd_prefix: str
) -> None:
    asking = EtcdStore(make_etcd_settings(), registry=CollectorRegistry())
    quiet = EtcdStore(make_etcd_settings(), registry=CollectorRegistry())
    try:
        events: list[WatchEvent] = []
        handle = _vouched_watch(asking, etcd_prefix, events.append)
        # The same idle prefix on a stream of its own, never asking: what the silence of an
        # idle stream is without progress answers.
        control = quiet.watch_prefix(etcd_prefix, lambda e: None)
        assert control.wait_connected(10)
        assert _loudest_silence(handle.silent_seconds, 4.0) < 3 * PROGRESS
        silent = control.silent_seconds()
        assert silent is not None and silent > 3.5
        # The answers move nothing the watch delivers: a put after them arrives, once.
        asking.put(etcd_prefix + "k", b"v")
        wait_for("the put", lambda: len(events) == 1, timeout=10)
        time.sleep(2 * PROGRESS)
        assert [e.key for e in events] == [etcd_prefix + "k"]
        handle.cancel()
        control.cancel()
    finally:
        asking.close()
        quiet.close()


def test_a_member_frozen_under_the_watch_shows_as_silence_before_keepalive_notices(
    members_restored: EtcdCluster,
    make_etcd_settings: Callable[..., EtcdSettings],
    etcd_prefix: str,
) -> None:
    cluster = members_restored
    store = EtcdStore(make_etcd_settings(), registry=CollectorRegistry())
    try:
        # A bound past the freeze: what a stalled stream looks like until it is replaced.
        handle = _vouched_watch(store, etcd_prefix, lambda e: None, stall_seconds=60)
        assert _loudest_silence(handle.silent_seconds, 1.5) < 3 * PROGRESS
        with cluster.frozen(cluster.member_at(handle._watcher.endpoint)):
            stopped = time.monotonic()

            def stalled() -> bool:
                silent = handle.silent_seconds()
                return silent is not None and silent > 3 * PROGRESS

            # gRPC's keep-alive pings (every 10 s, 5 s to answer) end the stream 5-15 s after
            # the stop; until then nothing but the unanswered progress requests tells.
            wait_for("the stream silent past three progress intervals", stalled, timeout=4)
            assert time.monotonic() - stopped < 4

        def heard() -> bool:
            silent = handle.silent_seconds()
            return silent is not None and silent < 3 * PROGRESS

        # Answered again, on that member's stream or (keep-alive gave it up) another's.
        wait_for("the stream heard again", heard, timeout=30)
        handle.cancel()
    finally:
        store.close()


def test_a_stream_stalled_on_a_frozen_member_is_replaced_on_another_and_loses_nothing(
    members_restored: EtcdCluster,
    make_etcd_settings: Callable[..., EtcdSettings],
    etcd_prefix: str,
) -> None:
    cluster = members_restored
    store = EtcdStore(make_etcd_settings(), registry=CollectorRegistry())
    writer: EtcdStore | None = None
    try:
        events: list[WatchEvent] = []
        handle = store.watch_prefix(etcd_prefix, events.append, progress_seconds=PROGRESS)
        assert handle.wait_connected(10)
        store.put(etcd_prefix + "before", b"0")
        wait_for("the first put", lambda: len(events) == 1, timeout=10)
        stalled = handle._watcher
        frozen = cluster.member_at(stalled.endpoint)
        # Writes go to the other two members (a quorum), so they land while the stream stalls.
        others = [e for i, e in enumerate(cluster.endpoints) if i != frozen]
        writer = quorum = EtcdStore(
            make_etcd_settings(endpoints=others), registry=CollectorRegistry()
        )
        with cluster.frozen(frozen):
            # Written while the stream stalls (the first ones may wait out an election, when
            # the frozen member led).
            writes = threading.Thread(
                target=lambda: [quorum.put(f"{etcd_prefix}k{i}", b"v") for i in range(3)]
            )
            writes.start()

            def replaced() -> bool:
                watcher = handle._watcher
                return handle.connected and watcher is not None and watcher is not stalled

            wait_for("the watch on a new stream", replaced, timeout=30)
            writes.join(30)
            # Given up as stalled (silent past 3 progress intervals), not ended by gRPC's
            # keep-alive pings (5-15 s after the stop), which count no stall.
            assert store.metrics.registry.get_sample_value("defender_etcd_watch_stalls_total") == 1
            assert cluster.member_at(handle._watcher.endpoint) != frozen
            wait_for("the writes made meanwhile", lambda: len(events) == 4, timeout=10)
            quorum.put(etcd_prefix + "after", b"v")
            wait_for("a write after the replacement", lambda: len(events) == 5, timeout=10)
        time.sleep(3 * PROGRESS)
        # Every write etcd applied arrives once, in order. A put retried past an election can
        # be applied twice (the frozen leader forwards the first attempt once it thaws), and
        # then it arrives twice, at two revisions: count what etcd holds, not what was sent.
        names = ["before", "k0", "k1", "k2", "after"]
        applied = {n: store.get(etcd_prefix + n).version for n in names}  # type: ignore[union-attr]
        wait_for("every applied write", lambda: len(events) >= sum(applied.values()), timeout=10)
        keys = [e.key[len(etcd_prefix) :] for e in events]
        revisions = [e.mod_revision for e in events]
        assert revisions == sorted(set(revisions))  # none twice, in order
        assert sorted(set(keys), key=keys.index) == names
        assert {n: keys.count(n) for n in names} == applied
        assert not any(e.resync for e in events)  # resumed from its revision, not re-read
        handle.cancel()
    finally:
        store.close()
        if writer is not None:
            writer.close()


def test_every_member_frozen_leaves_the_watch_unvouched_until_one_answers_and_loses_nothing(
    members_restored: EtcdCluster,
    make_etcd_settings: Callable[..., EtcdSettings],
    etcd_prefix: str,
) -> None:
    # No member to move to: the stream is given up, every re-creation waits on a frozen
    # member, and the watch is vouched for by nothing (`silent_seconds` None or past the
    # bound) for as long as that lasts. Once the members answer again the watch is proven
    # caught up, and a write made before and after the freeze each arrive once.
    cluster = members_restored
    store = EtcdStore(make_etcd_settings(), registry=CollectorRegistry())
    try:
        events: list[WatchEvent] = []
        handle = _vouched_watch(store, etcd_prefix, events.append)
        store.put(etcd_prefix + "before", b"0")
        wait_for("the first put", lambda: len(events) == 1, timeout=10)
        vouched: list[float | None] = []
        with contextlib.ExitStack() as frozen:
            for i in range(cluster.members):
                frozen.enter_context(cluster.frozen(i))
            end = time.monotonic() + 8 * PROGRESS
            while time.monotonic() < end:
                vouched.append(handle.silent_seconds())
                time.sleep(0.05)
            gave_up = store.metrics.registry.get_sample_value("defender_etcd_watch_stalls_total")
        # Once past the stall bound, never again a silence within it while frozen.
        late = vouched[len(vouched) // 2 :]
        assert all(s is None or s > 3 * PROGRESS for s in late), late
        assert gave_up == 1
        wait_for("vouched for again", lambda: handle.silent_seconds() is not None, timeout=60)
        store.put(etcd_prefix + "after", b"1")
        wait_for("the write after", lambda: len(events) >= 2, timeout=30)
        time.sleep(3 * PROGRESS)
        assert [e.key[len(etcd_prefix) :] for e in events] == ["before", "after"]
        assert not any(e.resync for e in events)
        handle.cancel()
    finally:
        store.close()
