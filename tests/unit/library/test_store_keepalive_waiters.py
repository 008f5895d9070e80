"""The pure bookkeeping of the shared keep-alive stream: which caller gets which answer, and how
a failed stream fails its callers (no cluster; the stream itself is tested against etcd in
tests/integration/library/test_store_keepalive.py)."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import grpc
import pytest

from defender_config import StoreError, StoreUnavailableError
from defender_config._store import _keepalive, classify_error
from defender_config._store._keepalive import (
    KeepAliveMux,
    KeepAliveStreamError,
    KeepAliveWaiters,
    _Closed,
    _Failure,
)


def test_answers_go_to_the_caller_of_that_lease() -> None:
    waiters = KeepAliveWaiters()
    a, b = waiters.add(1), waiters.add(2)
    assert waiters.answer(2, 20) and waiters.answer(1, 10)
    assert a.result(0) == 10 and b.result(0) == 20
    assert len(waiters) == 0


def test_callers_of_one_lease_are_answered_first_come_first_served() -> None:
    waiters = KeepAliveWaiters()
    first, other, second = waiters.add(7), waiters.add(8), waiters.add(7)
    assert waiters.answer(7, 30)
    assert first.result(0) == 30 and not second.done() and not other.done()
    assert waiters.answer(7, 0)  # the lease expired in between
    assert second.result(0) == 0 and not other.done()
    assert len(waiters) == 1


def test_an_answer_nobody_waits_for_is_dropped() -> None:
    waiters = KeepAliveWaiters()
    assert not waiters.answer(5, 30)
    w = waiters.add(5)
    assert waiters.answer(5, 30)
    assert not waiters.answer(5, 30)  # a second answer for one request: nobody left
    assert w.result(0) == 30


def test_fail_all_fails_waiting_and_later_callers_with_the_first_reason() -> None:
    waiters = KeepAliveWaiters()
    a, b = waiters.add(1), waiters.add(1)
    first, count = waiters.fail_all(_Failure(grpc.StatusCode.UNAVAILABLE, "member gone"))
    assert first and count == 2 and waiters.failed
    again, count = waiters.fail_all(_Closed())
    assert not again and count == 0
    late = waiters.add(3)
    assert late.done()
    errors = [w.exception(0) for w in (a, b, late)]
    assert all(isinstance(e, KeepAliveStreamError) for e in errors)
    assert len({id(e) for e in errors}) == 3, "each caller raises its own exception"
    assert all(e.code() == grpc.StatusCode.UNAVAILABLE for e in errors)  # type: ignore[union-attr]
    assert not waiters.answer(1, 30)


def test_closed_waiters_raise_store_error_which_the_retry_loop_does_not_retry() -> None:
    waiters = KeepAliveWaiters()
    w = waiters.add(1)
    waiters.fail_all(_Closed())
    exc = w.exception(0)
    assert isinstance(exc, StoreError) and not isinstance(exc, StoreUnavailableError)
    assert "closed" in str(exc)
    assert classify_error(exc) is None  # _call re-raises it as is


@pytest.mark.parametrize(
    ("code", "kind", "transient"),
    [
        (grpc.StatusCode.UNAVAILABLE, "unavailable", True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "unavailable", True),
        (grpc.StatusCode.UNAUTHENTICATED, "auth", False),
        (grpc.StatusCode.CANCELLED, "error", False),
    ],
)
def test_stream_errors_classify_like_the_grpc_code_they_carry(
    code: grpc.StatusCode, kind: str, transient: bool
) -> None:
    rule = classify_error(_Failure(code, "why").error())
    assert rule is not None and rule.kind == kind and rule.transient is transient


class _NoStatus(grpc.RpcError):  # type: ignore[misc]
    """What a stream raises when it broke before any status arrived."""

    def code(self) -> grpc.StatusCode:
        raise ValueError("no status yet")


def test_a_stream_error_without_status_counts_as_unavailable() -> None:
    cause = _NoStatus()
    failure = _Failure.from_exception(cause)
    assert failure.code == grpc.StatusCode.UNAVAILABLE
    exc = failure.error()
    assert exc.__cause__ is cause and "_NoStatus" in exc.details()


def test_concurrent_callers_each_get_their_own_answer() -> None:
    waiters = KeepAliveWaiters()
    futures = {}
    lock = threading.Lock()

    def add(n: int) -> None:
        for i in range(200):
            f = waiters.add(i % 10)
            with lock:
                futures[(n, i)] = f

    threads = [threading.Thread(target=add, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Per lease, answers numbered in order: every caller gets exactly one, none twice.
    for lease in range(10):
        for k in range(160):
            assert waiters.answer(lease, 1000 * lease + k)
    got = [f.result(0) for f in futures.values()]
    assert sorted(got) == sorted(1000 * lease + k for lease in range(10) for k in range(160))
    assert len(waiters) == 0


class _StalledStream:
    """A stream whose reset finds the caller's waiter already taken by another thread (an
    answer or a failure on its way, under `answer`/`fail_all`'s lock), so `fail` leaves it."""

    label = "127.0.0.1:1"
    alive = True

    def __init__(self, resolve_after: float | None) -> None:
        self.waiter: Future[int] = Future()
        self.resolve_after = resolve_after

    def send(self, lease_id: int) -> Future[int]:
        return self.waiter

    def fail(self, why: object) -> None:
        if self.resolve_after is not None:
            threading.Timer(self.resolve_after, self.waiter.set_result, (30,)).start()


class _Client:
    timeout = 0.05


def _mux_with(stream: _StalledStream, monkeypatch: pytest.MonkeyPatch) -> KeepAliveMux:
    mux = KeepAliveMux()
    monkeypatch.setattr(mux, "_stream_for", lambda client: stream)
    monkeypatch.setattr(_keepalive, "_SETTLE_SECONDS", 0.2)
    return mux


def test_a_reset_that_never_resolves_the_waiter_raises_a_grpc_coded_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Was a bare TimeoutError from `waiter.result(timeout=0)`, which nothing classified: the
    # heartbeater logged it as "unexpected".
    mux = _mux_with(_StalledStream(resolve_after=None), monkeypatch)
    with pytest.raises(KeepAliveStreamError) as caught:
        mux.refresh(_Client(), 7)  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no keep-alive answer" in caught.value.details()
    rule = classify_error(caught.value)
    assert rule is not None and rule.transient and rule.kind == "unavailable"


def test_an_answer_resolved_just_after_the_reset_is_returned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mux = _mux_with(_StalledStream(resolve_after=0.05), monkeypatch)
    assert mux.refresh(_Client(), 7) == 30  # type: ignore[arg-type]
