"""The component change watch's pure parts: whether a monitor pass must read
(`_decisions.reads.must_read`, every branch), the per-component bookkeeping (`ChangeView`), and
the loop that keeps it trusted (`_loops.change_watch`) driven with the in-memory Backend."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from operator_core_support import until

from defender_config import StoreUnavailableError
from defender_operator import _loops
from defender_operator._changes import ChangeView
from defender_operator._decisions.reads import ChangeFacts, ReadReason, ViewRead, must_read
from defender_operator._keys import MutableKeyringSource
from defender_operator._memory_backend import MemoryBackend
from defender_operator._runtime import Runtime
from defender_operator._settings import OperatorSettings

T0 = datetime(2026, 1, 1, tzinfo=UTC)
S = timedelta(seconds=1)
BOUND = timedelta(seconds=60)
READ = ViewRead(at=T0, revision=100, own_writes=2)
QUIET = ChangeFacts(trusted=True, synced_at=50, changed_at=90, own_writes=2)


def facts(**over: object) -> ChangeFacts:
    return ChangeFacts(**{**QUIET.__dict__, **over})  # type: ignore[arg-type]


# --- the decision -----------------------------------------------------------------------


def test_a_view_nothing_changed_is_reused_until_the_bound() -> None:
    assert must_read(T0 + 59 * S, READ, QUIET, BOUND) is ReadReason.UNCHANGED
    assert must_read(T0, READ, QUIET, BOUND) is ReadReason.UNCHANGED
    # A change the view already holds (at or below its revision) is no reason to read.
    assert must_read(T0 + S, READ, facts(changed_at=100), BOUND) is ReadReason.UNCHANGED


def test_an_untrusted_watch_always_reads() -> None:
    assert must_read(T0 + S, READ, facts(trusted=False), BOUND) is ReadReason.UNTRUSTED
    assert must_read(T0 + S, None, facts(trusted=False), BOUND) is ReadReason.UNTRUSTED


def test_no_view_reads() -> None:
    assert must_read(T0, None, QUIET, BOUND) is ReadReason.NO_VIEW


def test_a_view_read_before_the_last_resync_reads() -> None:
    # Events between the read and the resync may have been lost (a compaction).
    assert must_read(T0 + S, READ, facts(synced_at=101), BOUND) is ReadReason.BEFORE_RESYNC
    assert must_read(T0 + S, READ, facts(synced_at=100), BOUND) is ReadReason.UNCHANGED


def test_a_change_after_the_read_reads() -> None:
    assert must_read(T0 + S, READ, facts(changed_at=101), BOUND) is ReadReason.CHANGED


def test_an_own_write_since_the_read_reads() -> None:
    assert must_read(T0 + S, READ, facts(own_writes=3), BOUND) is ReadReason.OWN_WRITE


def test_a_view_as_old_as_the_bound_or_from_the_future_reads() -> None:
    assert must_read(T0 + 60 * S, READ, QUIET, BOUND) is ReadReason.STALE
    assert must_read(T0 - S, READ, QUIET, BOUND) is ReadReason.STALE  # the clock went back
    # A bound of zero reads every pass.
    assert must_read(T0, READ, QUIET, timedelta(0)) is ReadReason.STALE


# --- the view ---------------------------------------------------------------------------


def synced(revision: int = 10) -> ChangeView:
    view = ChangeView()
    view.watching = True
    assert view.resync(view.begin_resync(), revision)
    return view


def test_the_view_is_trusted_only_while_watching_and_resynced() -> None:
    view = ChangeView()
    assert not view.trusted
    view.watching = True
    assert not view.trusted and not view.facts("sniffer").trusted
    assert view.resync(view.begin_resync(), 10)
    assert view.trusted and view.facts("sniffer") == ChangeFacts(True, 10, 0, 0)
    view.watch_failed()
    assert not view.trusted and view.resync_requested.is_set()
    view.watching = False
    assert view.resync(view.begin_resync(), 12)
    assert not view.trusted and not view.resync_requested.is_set()


def test_the_view_is_not_trusted_while_its_watch_stream_is_silent_past_the_limit() -> None:
    # A stream that stalled without an error delivers no change: a view trusted meanwhile
    # would be reused for up to monitor_full_read_seconds after etcd changed under it.
    view = synced()
    silent: list[float | None] = [0.0]
    view.listen(lambda: silent[0], 15.0)
    assert view.judge_stream() and view.trusted and view.facts("sniffer").trusted
    silent[0] = 15.0
    assert view.judge_stream() and view.trusted  # at the limit: waiting for its answer
    silent[0] = 15.5
    assert view.trusted  # judged on the event loop only: one answer per pass
    assert not view.judge_stream() and not view.trusted
    assert not view.facts("sniffer").trusted
    silent[0] = None  # the library gave the stream up: between streams
    assert not view.judge_stream() and not view.trusted
    # On the new stream, answered: trusted again without a resync (the watch resumed from
    # the revision after its last event, so it missed nothing).
    silent[0] = 0.1
    assert view.judge_stream() and view.trusted and view.synced_at == 10


def test_each_component_keeps_its_highest_change() -> None:
    view = synced()
    view.apply("sniffer", 15)
    view.apply("sniffer", 12)  # an older event cannot lower it
    view.apply("firewall", 20)
    assert view.facts("sniffer").changed_at == 15
    assert view.facts("firewall").changed_at == 20
    assert view.facts("rag").changed_at == 0
    assert view.trusted


def test_a_replayed_key_makes_the_view_untrusted_until_the_next_resync() -> None:
    # The watch resumed past a compaction: the current keys come again, the deletes in the gap
    # never will.
    view = synced()
    view.apply("sniffer", 30, replayed=True)
    assert not view.trusted and view.resync_requested.is_set()
    assert view.facts("sniffer").changed_at == 30
    assert view.resync(view.begin_resync(), 40)
    assert view.trusted and view.facts("sniffer").synced_at == 40


def test_a_failure_during_a_resync_keeps_the_view_untrusted() -> None:
    view = synced()
    view.watch_failed()
    since = view.begin_resync()
    view.watch_failed()  # while etcd's revision was being read
    assert not view.resync(since, 50)
    assert not view.trusted and view.resync_requested.is_set()
    assert view.facts("sniffer").synced_at == 10
    assert view.resync(view.begin_resync(), 51)
    assert view.trusted


def test_a_resync_forgets_changes_no_view_after_it_can_miss() -> None:
    view = synced()
    view.apply("sniffer", 15)
    view.apply("firewall", 25)
    assert view.resync(view.begin_resync(), 20)
    assert view.facts("sniffer").changed_at == 0  # any view read before 20 reads anyway
    assert view.facts("firewall").changed_at == 25
    # The resync revision never goes back.
    assert view.resync(view.begin_resync(), 5)
    assert view.facts("firewall").synced_at == 20


def test_own_writes_are_counted_per_component() -> None:
    view = synced()
    view.wrote("sniffer")
    view.wrote("sniffer")
    assert view.facts("sniffer").own_writes == 2
    assert view.facts("firewall").own_writes == 0


# --- the loop, with the in-memory Backend ---------------------------------------------------


def runtime(backend: MemoryBackend, **settings: float) -> Runtime:
    ours = OperatorSettings(etcd_health_interval_seconds=0.05, **settings)  # type: ignore[arg-type]
    return Runtime(ours, backend, None, None, MutableKeyringSource(None), "op-0")  # type: ignore[arg-type]


def test_the_loop_resyncs_at_start_and_after_every_outage_and_compaction() -> None:
    backend = MemoryBackend()
    backend.touch("sniffer")

    async def scenario() -> None:
        rt = runtime(backend)
        view = rt.changes
        task = asyncio.create_task(_loops.change_watch(rt))
        try:
            await until("first resync", lambda: view.trusted)
            assert view.facts("sniffer").synced_at == backend.revision() == 1
            # Someone else writes: the view hears of it, and stays trusted.
            changed = await asyncio.to_thread(backend.touch, "sniffer")
            await until("the change", lambda: view.facts("sniffer").changed_at == changed)
            assert view.trusted
            # An outage the watch reports: untrusted, and it stays so while disconnected
            # (changes made meanwhile arrive once it is back).
            backend.break_change_watch(StoreUnavailableError(["memory://"], "member down"))
            await until("untrusted", lambda: not view.trusted)
            during = await asyncio.to_thread(backend.touch, "firewall")
            await asyncio.sleep(0.3)
            assert not view.trusted and view.facts("firewall").changed_at == 0
            backend.reconnect_change_watch()
            await until("resync after the outage", lambda: view.trusted)
            assert view.facts("firewall").synced_at >= during
            # A compaction: the watch replays the current keys; trusted again after a resync.
            before = view.facts("sniffer").synced_at
            await asyncio.to_thread(backend.touch, "rag")
            backend.replay_changes()
            await until("resync after the replay", lambda: view.facts("rag").synced_at > before)
            assert view.trusted
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert not view.watching and all(w.cancelled for w in backend._change_watches)

    asyncio.run(scenario())


def test_the_loop_asks_for_progress_and_distrusts_a_silent_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = MemoryBackend()
    asked: list[tuple[float | None, float | None]] = []
    watch_changes = backend.watch_changes

    def recording(*args: Any, **kwargs: Any) -> Any:
        asked.append((kwargs.get("progress_seconds"), kwargs.get("stall_seconds")))
        return watch_changes(*args, **kwargs)

    backend.watch_changes = recording  # type: ignore[method-assign]

    def told(text: str) -> bool:
        return any(text in r.getMessage() for r in caplog.records)

    async def scenario() -> None:
        rt = runtime(backend, heartbeat_watch_progress_seconds=0.05)
        view = rt.changes
        task = asyncio.create_task(_loops.change_watch(rt))
        try:
            await until("first resync", lambda: view.trusted)
            assert asked == [(0.05, 0.2)]
            (watch,) = backend._change_watches
            watch.silent = 0.2  # over three progress intervals: stalled
            await until("the stall judged", lambda: not view.trusted)
            assert told("component change watch stream silent for 0s")
            watch.silent = None  # given up by the library: between streams
            await asyncio.sleep(0.2)
            assert not view.trusted
            watch.silent = 0.01  # on a new stream, answering
            await until("the answer judged", lambda: view.trusted)
            assert told("component change watch stream answers again")
            resyncs = backend.calls.count("revision")
            assert resyncs == 1  # resumed where it stopped: nothing to resync
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    with caplog.at_level(logging.INFO, logger="defender_operator"):
        asyncio.run(scenario())


def test_without_progress_requests_the_loop_judges_no_silence() -> None:
    backend = MemoryBackend()

    async def scenario() -> None:
        rt = runtime(backend, heartbeat_watch_progress_seconds=0)
        view = rt.changes
        task = asyncio.create_task(_loops.change_watch(rt))
        try:
            await until("first resync", lambda: view.trusted)
            (watch,) = backend._change_watches
            watch.silent = 3600.0  # an idle stream never asked answers nothing
            await asyncio.sleep(0.3)
            assert view.trusted and view.judge_stream()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def test_the_loop_retries_a_watch_or_a_resync_that_failed() -> None:
    backend = MemoryBackend()
    gone = StoreUnavailableError(["memory://"], "etcd unreachable")
    backend.fail("watch_changes", gone)
    backend.fail("revision", gone)

    async def scenario() -> None:
        rt = runtime(backend)
        task = asyncio.create_task(_loops.change_watch(rt))
        try:
            await until("trusted after two failures", lambda: rt.changes.trusted)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())
    assert backend.calls.count("watch_changes") == 2
    assert backend.calls.count("revision") == 2
