"""`ReadAgain`, the one rule both config watches follow to read a change again until etcd
answers: backoff, report once, stop, end, and what a read raising a bug does."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterator

import pytest

from defender_config import StoreUnavailableError
from defender_config._errors import StoreError
from defender_config._read_again import ReadAgain
from defender_devcluster import wait_for


class Ceiling(random.Random):
    """Always the top of the jitter range, so the backoff's ceilings show."""

    def uniform(self, a: float, b: float) -> float:
        return b


def _down(n: int = 0) -> StoreUnavailableError:
    return StoreUnavailableError([f"http://127.0.0.1:{2379 + n}"], "connection refused")


class Run:
    """A `ReadAgain` on the caller's thread whose reads answer from `outcomes` (True: etcd
    answered, False: the cache did, an exception: raised) and whose waits are recorded."""

    def __init__(self, outcomes: list[bool | Exception], *, stop_after: int | None = None) -> None:
        self.outcomes: Iterator[bool | Exception] = iter(outcomes)
        self.reads = 0
        self.delays: list[float] = []
        self.reported: list[StoreError] = []
        self.stop_after = stop_after
        self.during_read: Callable[[], None] | None = None
        self.again = ReadAgain(
            self.read,
            wait=self.wait,
            report=self.reported.append,
            base=0.1,
            cap=0.5,
            name="test",
            own_thread=False,
            rng=Ceiling(),
        )

    def read(self) -> bool:
        self.reads += 1
        if self.during_read is not None:
            during, self.during_read = self.during_read, None
            during()
        outcome = next(self.outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def wait(self, delay: float) -> bool:
        self.delays.append(delay)
        return self.stop_after is not None and len(self.delays) > self.stop_after


def test_backs_off_exponentially_up_to_the_cap() -> None:
    run = Run([_down(), _down(), False, _down(), _down(), True])
    run.again.missed(_down())
    assert run.delays == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5, 0.5])


def test_ends_when_a_read_is_answered_by_etcd() -> None:
    run = Run([_down(), False, True, True])
    run.again.missed(_down())
    assert run.reads == 3


def test_reports_the_failure_that_begins_a_run_once() -> None:
    run = Run([_down(1), _down(2), _down(3), True])
    first = _down()
    run.again.missed(first)
    assert run.reported == [first]  # not the reads' own failures


def test_a_miss_while_a_run_is_under_way_is_not_reported_and_is_read_again() -> None:
    # An event whose read failed while the run's last read was going: that read may be older
    # than the event's change, so the run reads once more instead of ending.
    run = Run([True, True])
    run.during_read = lambda: run.again.missed(_down(9))
    first = _down()
    run.again.missed(first)
    assert run.reported == [first]
    assert run.reads == 2


def test_a_read_the_cache_answered_begins_a_run_without_a_report() -> None:
    run = Run([False, True])
    run.again.missed(None)
    assert run.reported == []
    assert run.reads == 2


def test_the_next_miss_after_a_run_begins_another_and_is_reported() -> None:
    run = Run([True, True])
    one, two = _down(1), _down(2)
    run.again.missed(one)
    run.again.missed(two)
    assert run.reported == [one, two]
    assert run.delays == pytest.approx([0.1, 0.1])  # the backoff starts again


def test_stops_when_the_watch_is_stopped() -> None:
    run = Run([_down()] * 10, stop_after=3)
    run.again.missed(_down())
    assert run.reads == 3
    # Stopped is not answered: a later miss begins a run again (a run is not left "going").
    run.stop_after = 0
    run.delays.clear()
    run.again.missed(_down())
    assert run.delays == pytest.approx([0.1])


def test_a_read_raising_a_bug_ends_the_run_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = Run([_down(), RuntimeError("bug in the read"), True, True])
    with caplog.at_level(logging.ERROR, logger="defender_config.read_again"):
        run.again.missed(_down())  # not raised: nobody on a watch's thread to hand it to
    assert run.reads == 2  # not read again: waiting does not mend a bug
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
    # Nor is the run left "going": the next miss begins one (and is reported).
    run.again.missed(_down(5))
    assert len(run.reported) == 2
    assert run.reads == 3


def test_on_its_own_thread_missed_returns_at_once_and_a_stop_ends_the_run() -> None:
    stopped = threading.Event()
    answer = threading.Event()
    reads: list[str] = []
    caller = threading.current_thread()

    def read() -> bool:
        reads.append(threading.current_thread().name)
        if not answer.is_set():
            raise _down()
        return True

    again = ReadAgain(
        read,
        wait=stopped.wait,
        report=lambda _e: None,
        base=0.01,
        cap=0.02,
        name="own",
        own_thread=True,
    )
    again.missed(_down())  # returns while the run goes on
    wait_for("reads again", lambda: len(reads) >= 3, timeout=5)
    assert caller.name not in reads
    stopped.set()
    threading.Event().wait(0.1)  # a read that was going when the stop came ends
    count = len(reads)
    threading.Event().wait(0.2)
    assert len(reads) == count


def test_on_its_own_thread_one_run_at_a_time() -> None:
    stopped = threading.Event()
    answer = threading.Event()
    threads: set[int] = set()
    reported: list[StoreError] = []

    def read() -> bool:
        threads.add(threading.get_ident())
        return answer.is_set()

    again = ReadAgain(
        read,
        wait=stopped.wait,
        report=reported.append,
        base=0.01,
        cap=0.02,
        name="own",
        own_thread=True,
    )
    try:
        for n in range(5):
            again.missed(_down(n))
        wait_for("reads again", lambda: len(threads) >= 1, timeout=5)
        threading.Event().wait(0.1)
        assert len(threads) == 1
        assert len(reported) == 1
        answer.set()
        # Answered, the run ends; a miss after it is a new outage, reported.
        wait_for("the run ended", lambda: _begins_a_run(again, reported), timeout=5)
    finally:
        stopped.set()


def _begins_a_run(again: ReadAgain, reported: list[StoreError]) -> bool:
    before = len(reported)
    again.missed(_down())
    return len(reported) > before
