"""A watch that asks for progress answers gives its stream up when it stays silent past the
stall bound (a wedged member, a proxy holding it open: no error ever comes), and is created
again from the revision after the last event it delivered: events written meanwhile arrive
once, none twice. Driven with a stand-in store and watch streams fed by the test (real pyetcd
event and response types)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from pyetcd import events as etcd_events
from pyetcd.etcdrpc import ResponseHeader, kv_pb2
from pyetcd.watch import WatchResponse
from watch_support import StandInStore

from defender_config._store._watch import WatchHandle
from defender_config.store import WatchEvent
from defender_devcluster import wait_for

PROGRESS = 0.1  # the default bound is three of these


class _Stream:
    """One pyetcd watch stream as `WatchHandle` uses it, fed by the test (`send`). It answers
    progress requests while `answers` is set; cleared, it has stalled: nothing comes."""

    def __init__(self, callback: Callable[[Any], None], start_revision: int) -> None:
        self.callback = callback
        self.start_revision = start_revision
        self.answers = True
        self.heard_at = time.monotonic()
        self.progress_at: float | None = None

    def request_progress(self) -> None:
        if self.answers:
            self.heard_at = self.progress_at = time.monotonic()

    def cancel(self, _watch_id: int) -> None:
        pass

    def send(self, *revisions: int) -> None:
        """One response with a put of /t/r<revision> at each revision."""
        self.heard_at = time.monotonic()
        events = [_put(r) for r in revisions]
        self.callback(WatchResponse(ResponseHeader(revision=max(revisions)), events))


def _put(revision: int) -> Any:
    key = f"/t/r{revision}".encode()
    kv = kv_pb2.KeyValue(key=key, value=b"v", mod_revision=revision, version=1)
    return etcd_events.PutEvent(kv_pb2.Event(type=kv_pb2.Event.PUT, kv=kv))


class _Client:
    def __init__(self) -> None:
        self.streams: list[_Stream] = []
        self.answering = True  # whether a new stream answers progress requests

    def add_watch(
        self, _key: str, callback: Callable[[Any], None], **kwargs: Any
    ) -> tuple[_Stream, int]:
        stream = _Stream(callback, kwargs["start_revision"])
        stream.answers = self.answering
        self.streams.append(stream)
        return stream, len(self.streams)


class _Store(StandInStore):
    client: _Client

    def __init__(self) -> None:
        super().__init__(_Client())


def _watch(store: _Store, seen: list[WatchEvent], **kwargs: Any) -> WatchHandle:
    lock = threading.Lock()

    def record(event: WatchEvent) -> None:
        with lock:
            seen.append(event)

    store_any: Any = store
    handle = WatchHandle(store_any, "/t/", True, record, 1, None, False, **kwargs)
    handle._start()
    assert handle.wait_connected(5)
    return handle


def _revisions(seen: list[WatchEvent]) -> list[int]:
    return [e.mod_revision for e in seen]


def _stall_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "silent for" in r.getMessage()
    ]


def test_a_stalled_stream_is_replaced_and_events_after_it_arrive_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = _Store()
    seen: list[WatchEvent] = []
    caplog.set_level(logging.INFO, logger="defender_config.store")
    handle = _watch(store, seen, progress_seconds=PROGRESS)
    try:
        (first,) = store.client.streams
        first.send(5)
        first.send(6)
        wait_for("the first events", lambda: len(seen) == 2, timeout=5)
        # Quiet is no stall: a stream that answers its progress requests stays.
        time.sleep(6 * PROGRESS)
        assert len(store.client.streams) == 1 and not store.dropped

        first.answers = False  # stalled: no error, no answer
        stalled_at = time.monotonic()
        wait_for("the stream replaced", lambda: len(store.client.streams) == 2, timeout=5)
        # Silent past three progress intervals, looked at once per interval.
        assert time.monotonic() - stalled_at < 10 * PROGRESS
        second = store.client.streams[1]
        assert store.dropped == [first]
        assert store.metrics.watch_stalls.value == 1
        assert store.metrics.watch_restarts.value == 1 and handle.restarts == 1
        # From the revision before the next one wanted (see `_establish`): 6 comes again.
        assert second.start_revision == 6
        assert handle.wait_connected(5)

        # What the old stream hands out late is not this watch's any more; the new stream
        # delivers it (from its start), and what was written meanwhile, once each.
        first.send(7)
        second.send(6)
        second.send(7, 8)
        second.send(9)
        wait_for("the events after the replacement", lambda: len(seen) == 5, timeout=5)
        time.sleep(3 * PROGRESS)
        assert _revisions(seen) == [5, 6, 7, 8, 9]
        assert len(_stall_warnings(caplog)) == 1
        # The new stream answers: it stays.
        time.sleep(6 * PROGRESS)
        assert len(store.client.streams) == 2 and store.metrics.watch_stalls.value == 1
    finally:
        handle.cancel()


def test_a_stream_another_watch_gave_up_already_is_only_left() -> None:
    # Watches share a stream: the first to find it stalled gives it up (one warning, one
    # count), the others only resume on the next one.
    store = _Store()
    seen: list[WatchEvent] = []
    handle = _watch(store, seen, progress_seconds=PROGRESS)
    try:
        (first,) = store.client.streams
        store.dropped.append(first)
        first.answers = False
        wait_for("the stream left", lambda: len(store.client.streams) == 2, timeout=5)
        assert store.metrics.watch_stalls.value == 0
        assert handle.restarts == 1
        store.client.streams[1].send(3)
        wait_for("an event on the new stream", lambda: _revisions(seen) == [3], timeout=5)
    finally:
        handle.cancel()


def test_the_bound_can_be_set_and_without_progress_requests_nothing_is_replaced() -> None:
    store = _Store()
    longer = _watch(store, [], progress_seconds=PROGRESS, stall_seconds=8 * PROGRESS)
    try:
        (stream,) = store.client.streams
        stream.answers = False
        time.sleep(5 * PROGRESS)
        assert len(store.client.streams) == 1  # past the default bound, not past this one
        wait_for("the stream replaced", lambda: len(store.client.streams) == 2, timeout=5)
    finally:
        longer.cancel()

    # Without progress requests an idle stream answers nothing however well it works:
    # its silence says nothing, and no bound applies.
    store = _Store()
    quiet = _watch(store, [], stall_seconds=PROGRESS)
    try:
        time.sleep(5 * PROGRESS)
        silent = quiet.silent_seconds()
        assert silent is not None and silent > PROGRESS
        assert len(store.client.streams) == 1 and not store.dropped
    finally:
        quiet.cancel()


def test_a_progress_answer_vouches_for_the_watch_only_once_what_came_before_was_handed_out() -> (
    None
):
    # etcd sends the answer after the events the watch was owed, and the stream's thread
    # queues those before it reads the answer; the watch's own thread hands them to the
    # callback a moment later. Until it has, the view the callback feeds still lacks them.
    store = _Store()
    store.client.answering = False  # the answer to the request sent at creation is not in yet
    seen: list[WatchEvent] = []
    gate = threading.Event()
    lock = threading.Lock()

    def slow(event: WatchEvent) -> None:
        gate.wait(5)
        with lock:
            seen.append(event)

    store_any: Any = store
    handle = WatchHandle(
        store_any, "/t/", True, slow, 1, None, False, progress_seconds=PROGRESS, stall_seconds=60
    )
    handle._start()
    try:
        assert handle.wait_connected(5)
        (stream,) = store.client.streams
        stream.send(5)
        stream.answers = True
        stream.request_progress()  # the answer, after event 5
        time.sleep(2 * PROGRESS)
        assert handle.silent_seconds() is None  # 5 is still with the callback
        gate.set()
        wait_for("vouched for", lambda: handle.silent_seconds() is not None, timeout=5)
        with lock:
            assert _revisions(seen) == [5]
    finally:
        gate.set()
        handle.cancel()
