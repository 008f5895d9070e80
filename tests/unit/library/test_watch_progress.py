"""A watch with `progress_seconds` asks etcd for a progress answer whenever nothing came for
that long, and `WatchHandle.silent_seconds` says how long its stream has answered nothing: an
idle stream that answers stays near zero, one stalled without an error (a wedged member, a
proxy holding it open) grows. Driven with a stand-in store and watch stream."""

from __future__ import annotations

import itertools
import time
from types import SimpleNamespace
from typing import Any

import pytest
from pyetcd import exceptions as etcd_exc
from watch_support import StandInStore

from defender_config import StoreError
from defender_config._store import _watch
from defender_config._store._watch import WatchHandle, proof_retry_seconds
from defender_devcluster import wait_for


class _Stream:
    """A pyetcd watch stream as `WatchHandle` uses it: `heard_at`, `progress_at`,
    `request_progress`, `cancel`. With `answers`, a progress request is answered at once."""

    def __init__(self, answers: bool) -> None:
        self.answers = answers
        self.asked = 0
        self.heard_at = time.monotonic()
        self.progress_at: float | None = None

    def request_progress(self) -> None:
        self.asked += 1
        if self.answers:
            self.heard_at = self.progress_at = time.monotonic()

    def event(self) -> None:
        """Another watch's event on the stream: heard, but no progress answer."""
        self.heard_at = time.monotonic()

    def cancel(self, _watch_id: int) -> None:
        pass


class _Store(StandInStore):
    """Records the arguments each watch was created with."""

    def __init__(self, stream: _Stream) -> None:
        self.created: list[dict[str, Any]] = []

        def add_watch(_key: str, _callback: Any, **kwargs: Any) -> tuple[_Stream, int]:
            self.created.append(kwargs)
            return stream, 1

        super().__init__(SimpleNamespace(add_watch=add_watch))


def _handle(
    stream: _Stream, progress_seconds: float | None, stall_seconds: float | None = None
) -> WatchHandle:
    store: Any = _Store(stream)
    handle = WatchHandle(
        store,
        "/t/",
        True,
        lambda _: None,
        1,
        None,
        False,
        progress_seconds=progress_seconds,
        stall_seconds=stall_seconds,
    )
    handle._start()
    assert handle.wait_connected(5)
    return handle


@pytest.mark.parametrize("answers", [True, False])
def test_an_idle_watch_asks_for_progress_and_its_silence_says_whether_it_came(
    answers: bool,
) -> None:
    stream = _Stream(answers=True)
    # A bound past the test: what a stalled stream looks like before it is replaced
    # (test_watch_stall.py).
    handle = _handle(stream, progress_seconds=0.1, stall_seconds=60)
    try:
        wait_for("the stream's first answer", lambda: handle.silent_seconds() is not None)
        stream.answers = answers
        asked = stream.asked
        wait_for("three progress requests", lambda: stream.asked >= asked + 3, timeout=5)
        silent = handle.silent_seconds()
        assert silent is not None
        if answers:
            assert silent < 0.25
        else:
            assert silent >= 0.25  # stalled: asked three times, nothing heard
    finally:
        handle.cancel()


def test_a_watch_is_vouched_for_only_once_a_progress_answer_came_after_its_creation() -> None:
    # A watch created (again) on a stream first catches up on what was written meanwhile, and
    # etcd answers progress only after that: until an answer comes, the stream's silence
    # vouches for nothing, however recently it was heard (another watch's events) or proven
    # before this watch was on it.
    stream = _Stream(answers=False)
    stream.progress_at = time.monotonic()  # an answer to whoever was on the stream before
    # A progress interval past the test: the asks below are the unproven watch's own.
    handle = _handle(stream, progress_seconds=60, stall_seconds=600)
    try:
        # etcd answers nothing while it still catches the new watch up, and never later:
        # asked again every 0.1 s, however busy the stream is with other watches' events.
        for _ in range(50):
            stream.event()
            time.sleep(0.01)
        assert 3 <= stream.asked <= 7
        assert handle.silent_seconds() is None
        stream.answers = True
        wait_for("the answer", lambda: handle.silent_seconds() is not None, timeout=5)
        silent = handle.silent_seconds()
        assert silent is not None and silent < 0.25
    finally:
        handle.cancel()


def test_without_progress_seconds_nothing_is_asked() -> None:
    stream = _Stream(answers=True)
    handle = _handle(stream, progress_seconds=None)
    try:
        time.sleep(0.3)
        assert stream.asked == 0
        silent = handle.silent_seconds()
        assert silent is not None and silent >= 0.3
    finally:
        handle.cancel()
    assert handle.silent_seconds() is None  # on no stream once cancelled


def test_a_watch_starts_on_etcd_at_a_revision_it_has_reached() -> None:
    # etcd answers no progress request on a stream while a watch on it starts past its
    # current revision: created at the next revision wanted (past it until anything is
    # written), a watch would leave its stream silent however well it works. It starts one
    # before (that revision's events are dropped: delivered already).
    stream = _Stream(answers=True)
    store = _Store(stream)
    store_any: Any = store
    handle = WatchHandle(store_any, "/t/", True, lambda _: None, 42, None, False)
    handle._start()
    try:
        assert handle.wait_connected(5)
        assert [c["start_revision"] for c in store.created] == [41]
        assert handle.next_revision == 42
    finally:
        handle.cancel()


def test_a_watch_whose_revision_before_was_compacted_starts_at_the_next_one() -> None:
    # Compacted up to exactly the next revision wanted: starting one before is refused, and
    # nothing the watch needs is gone, so it is created at the next one, not re-read whole.
    stream = _Stream(answers=True)
    store = _Store(stream)
    starts: list[int] = []

    def add_watch(_key: str, _callback: Any, **kwargs: Any) -> tuple[_Stream, int]:
        starts.append(kwargs["start_revision"])
        if kwargs["start_revision"] < 42:
            raise StoreError("compacted") from etcd_exc.RevisionCompactedError(42)
        return stream, 1

    store.client = SimpleNamespace(add_watch=add_watch)
    store_any: Any = store
    handle = WatchHandle(store_any, "/t/", True, lambda _: None, 42, None, False)
    handle._start()
    try:
        assert handle.wait_connected(5)
        assert starts == [41, 42]
    finally:
        handle.cancel()


class _Clock:
    """The watch's `time.monotonic`, moved on by the test only."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class _SilentStream:
    """A stream that never answers a progress request (etcd, while a watch on it starts past
    its current revision and nothing is written) and records when each was sent."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock
        self.heard_at = clock.now
        self.progress_at: float | None = None
        self.asks: list[float] = []

    def request_progress(self) -> None:
        self.asks.append(self.clock.now)

    def cancel(self, _watch_id: int) -> None:
        pass


def _on_clock(monkeypatch: pytest.MonkeyPatch, clock: _Clock, stream: _SilentStream) -> WatchHandle:
    """A watch created on `stream` at the clock's time, its thread not started: the test runs
    the loop's steps itself (`_wait_seconds`, `_idle`, `_ask_progress`) on a clock it moves."""
    monkeypatch.setattr(_watch, "time", clock)
    silent: Any = stream
    store: Any = _Store(silent)
    handle = WatchHandle(
        store, "/t/", True, lambda _: None, 1, None, False, progress_seconds=5, stall_seconds=600
    )
    handle._establish()
    return handle


def _idle_for(handle: WatchHandle, clock: _Clock, seconds: float) -> None:
    """The loop on an idle stream: wait what it says, then do what a timeout does."""
    end = clock.now + seconds
    while True:
        wait = handle._wait_seconds()
        assert wait is not None
        if clock.now + wait > end:
            clock.now = end
            return
        clock.now += wait
        handle._idle()


def _busy_for(handle: WatchHandle, clock: _Clock, stream: _SilentStream, seconds: float) -> None:
    """The loop on a stream busy with other watches' events, one every 10 ms: heard, never
    idle long enough to time out, and each event handled is followed by an ask if due."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now += 0.01
        stream.heard_at = clock.now
        handle._ask_progress()


def _gaps(start: float, asks: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise([start, *asks])]


# A never-answered watch at progress_seconds=5: ten asks 0.1 s apart, then doubling up to 5 s.
_BACKED_OFF = [0.1] * 10 + [0.2, 0.4, 0.8, 1.6, 3.2] + [5.0] * 10


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_a_never_answered_watch_asks_fast_at_first_then_ever_less_often(
    monkeypatch: pytest.MonkeyPatch, busy: bool
) -> None:
    # etcd answers no progress request while a watch on the stream starts past its current
    # revision, until something is written: asked every 0.1 s for good, such a watch cost ten
    # messages a second for nothing. Its first second of asks stays fast (a new watch is
    # answered within a few hundred ms), then they back off to one per progress interval.
    clock = _Clock()
    stream = _SilentStream(clock)
    handle = _on_clock(monkeypatch, clock, stream)
    start = clock.now
    if busy:
        _busy_for(handle, clock, stream, 60)
    else:
        _idle_for(handle, clock, 60)
    assert _gaps(start, stream.asks) == pytest.approx(_BACKED_OFF, abs=0.011)
    assert handle.silent_seconds() is None


def test_a_watch_created_again_asks_fast_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # A watch re-created (after a stall, an outage) is caught up afresh: the first answer is
    # a few hundred ms away again, not one progress interval.
    clock = _Clock()
    stream = _SilentStream(clock)
    handle = _on_clock(monkeypatch, clock, stream)
    start = clock.now
    _idle_for(handle, clock, 30)
    assert _gaps(start, stream.asks)[-2:] == pytest.approx([5.0, 5.0])  # backed off
    handle._leave_stream()
    handle._establish()
    again, asked = clock.now, len(stream.asks)
    _idle_for(handle, clock, 1.05)
    assert _gaps(again, stream.asks[asked:]) == pytest.approx([0.1] * 10)


def test_the_proof_schedule_doubles_from_a_tenth_of_a_second_up_to_the_interval() -> None:
    assert [proof_retry_seconds(n, 5) for n in range(17)] == pytest.approx(_BACKED_OFF[:17])
    # A progress interval under the first step does not ask more often than it.
    assert proof_retry_seconds(20, 0.05) == pytest.approx(0.1)
    # Asked unanswered for ever: the doubling stops before a float would overflow.
    assert proof_retry_seconds(10**6, 1e12) == pytest.approx(0.1 * 2**30)
