"""Watch creations on one pyetcd watch stream (`_store/_pyetcd._Watcher`), with fake streams
instead of a member: a creation waiting its turn behind another must never be sent on a stream
that is gone, nor wait out a timeout there (docs/library.md, "Watches")."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc

from defender_config._store import _pyetcd
from defender_config._store._pyetcd import _SharedClient, _StreamGone, _Watcher

# Long enough that a creation waiting it out fails the join below.
TIMEOUT = 30.0
PROMPT = 3.0


class _Broken(grpc.RpcError):  # type: ignore[misc]
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "member gone"


class _Cancelled(grpc.RpcError):  # type: ignore[misc]
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return "Locally cancelled by application!"


class _Call:
    """A streaming gRPC call: iterates a stream's responses until it is cancelled, then fails
    with CANCELLED as grpc's does (whatever the stream was waiting for)."""

    def __init__(self, responses: Iterator[Any]) -> None:
        self.cancelled = threading.Event()
        self._out: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._pump, args=(responses,), daemon=True).start()

    def _pump(self, responses: Iterator[Any]) -> None:
        try:
            for response in responses:
                self._out.put(response)
        except BaseException as exc:
            self._out.put(exc)
            return
        self._out.put(StopIteration())

    def __iter__(self) -> _Call:
        return self

    def __next__(self) -> Any:
        item = self._out.get()
        if isinstance(item, StopIteration):
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> bool:
        self.cancelled.set()
        self._out.put(_Cancelled())
        return True


class _Streams:
    """A WatchStub: each Watch() call is one stream, told what to do by `plan`, one entry per
    stream: "silent" takes requests and never answers (a frozen member, or one that ignores
    our token), "break" fails after its first request (a killed member), "answer" answers
    every creation with "created" and a new id, and every progress request as etcd does (a
    header-only response, watch id -1); "stall" answers creations only (a wedged member, a
    proxy holding the stream open)."""

    def __init__(self, *plan: str) -> None:
        self.plan = list(plan)
        self.requests: list[tuple[int, Any]] = []
        self.streams = 0
        self.calls: list[_Call] = []
        self.release = threading.Event()
        self.got_request = threading.Condition()

    def Watch(self, requests: Iterator[Any], credentials: Any = None, metadata: Any = None) -> Any:
        n = self.streams
        self.streams += 1
        kind = self.plan[n] if n < len(self.plan) else "answer"
        self.calls.append(_Call(self._responses(n, kind, requests)))
        return self.calls[-1]

    def _responses(self, n: int, kind: str, requests: Iterator[Any]) -> Iterator[Any]:
        for i, request in enumerate(requests):
            with self.got_request:
                self.requests.append((n, request))
                self.got_request.notify_all()
            if kind == "break":
                raise _Broken()
            if kind in ("answer", "stall") and request.HasField("create_request"):
                yield etcdrpc.WatchResponse(created=True, watch_id=100 * n + i)
            if kind == "answer" and request.HasField("progress_request"):
                yield etcdrpc.WatchResponse(
                    header=etcdrpc.ResponseHeader(revision=7), watch_id=_pyetcd._REFUSED_WATCH_ID
                )
        self.release.wait()  # a half-closed stream stays open on the member's side (etcd's)

    def wait_requests(self, count: int) -> None:
        with self.got_request:
            assert self.got_request.wait_for(lambda: len(self.requests) >= count, PROMPT)


def _create(watcher: Any, key: str, results: queue.Queue[tuple[str, Any]]) -> threading.Thread:
    def run() -> None:
        try:
            results.put((key, watcher.add_callback(key, lambda _: None)))
        except BaseException as exc:
            results.put((key, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _waiting(watcher: Any, thread: threading.Thread) -> None:
    """Wait until `thread` waits: for an answer to its creation, or its turn behind another."""
    deadline = threading.Event()
    for _ in range(100):
        if thread.is_alive() and watcher._new_watch is not None:
            deadline.wait(0.05)  # give it the time to reach the wait
            return
        deadline.wait(0.02)
    raise AssertionError("no creation pending")


@pytest.fixture
def streams() -> Iterator[Callable[..., _Streams]]:
    made: list[_Streams] = []

    def make(*plan: str) -> _Streams:
        made.append(_Streams(*plan))
        return made[-1]

    yield make
    for s in made:
        s.release.set()


def test_a_closed_stream_fails_its_pending_and_queued_creations_at_once(
    streams: Callable[..., _Streams],
) -> None:
    # The client drops a stream (failed endpoint, new login) while one creation waits for
    # etcd's answer on it and another waits its turn: both go elsewhere now, not in 30 s.
    stub = streams("silent")
    watcher = _Watcher(stub, endpoint="a:1", timeout=TIMEOUT)
    results: queue.Queue[tuple[str, Any]] = queue.Queue()
    first = _create(watcher, "/a", results)
    stub.wait_requests(1)
    second = _create(watcher, "/b", results)
    _waiting(watcher, second)

    watcher.close()

    for t in (first, second):
        t.join(PROMPT)
        assert not t.is_alive(), "a creation waited on a closed stream"
    outcomes = dict(results.get_nowait() for _ in range(2))
    assert isinstance(outcomes["/a"], _StreamGone)
    assert isinstance(outcomes["/b"], _StreamGone)
    assert len(stub.requests) == 1  # nothing was sent on the closed stream


def test_a_creation_queued_behind_one_whose_stream_broke_starts_a_new_stream(
    streams: Callable[..., _Streams],
) -> None:
    # The first creation's stream breaks (a killed member): the one waiting behind it used to
    # be put on the broken stream's queue, read by nobody, and wait out its timeout.
    stub = streams("break", "answer")
    gate = threading.Event()
    original = stub._responses

    def held(n: int, kind: str, requests: Iterator[Any]) -> Iterator[Any]:
        if n == 0:
            gate.wait(PROMPT)  # the stream breaks only once the second creation is queued
        return original(n, kind, requests)

    stub._responses = held  # type: ignore[method-assign]
    watcher = _Watcher(stub, endpoint="a:1", timeout=TIMEOUT)
    results: queue.Queue[tuple[str, Any]] = queue.Queue()
    first = _create(watcher, "/a", results)
    _waiting(watcher, first)
    second = _create(watcher, "/b", results)
    _waiting(watcher, second)
    gate.set()

    for t in (first, second):
        t.join(PROMPT)
        assert not t.is_alive(), "a creation waited out its timeout"
    outcomes = dict(results.get_nowait() for _ in range(2))
    assert isinstance(outcomes["/a"], _Broken)
    assert outcomes["/b"] == 100  # created on the second stream
    assert [n for n, _ in stub.requests] == [0, 1]


def test_watches_of_a_closed_stream_are_cancelled_without_blocking(
    streams: Callable[..., _Streams],
) -> None:
    # Watches of a stream the client dropped are cancelled (a watch handle stopping) while
    # the stream ends: their cancels must not fill the request queue of a stream that sends
    # nothing any more (it holds 10).
    watcher = _Watcher(streams("answer"), endpoint="a:1", timeout=TIMEOUT)
    ids = [watcher.add_callback(f"/k{i}", lambda _: None) for i in range(12)]
    watcher.close()
    done = threading.Event()

    def cancel_all() -> None:
        for watch_id in ids:
            watcher.cancel(watch_id)
        done.set()

    threading.Thread(target=cancel_all, daemon=True).start()
    assert done.wait(PROMPT), "cancelling the watches of a closed stream blocked"


def test_closing_a_stream_ends_its_call_and_tells_its_watches(
    streams: Callable[..., _Streams],
) -> None:
    # pyetcd's close only ends the requests, and etcd keeps a half-closed watch stream open
    # with all its watches: the client could never cancel them, nor one created late. The
    # call is cancelled instead, and each watch learns that its stream is gone (to resume on
    # the current one).
    stub = streams("answer")
    watcher = _Watcher(stub, endpoint="a:1", timeout=TIMEOUT)
    told: queue.Queue[tuple[str, Any]] = queue.Queue()
    for key in ("/a", "/b"):
        watcher.add_callback(key, lambda response, key=key: told.put((key, response)))

    watcher.close()

    assert stub.calls[0].cancelled.is_set()
    outcomes = dict(told.get(timeout=PROMPT) for _ in range(2))
    for key in ("/a", "/b"):
        assert isinstance(outcomes[key], grpc.RpcError), outcomes[key]
        assert outcomes[key].code() == grpc.StatusCode.CANCELLED
    with pytest.raises(_StreamGone):
        watcher.add_callback("/c", lambda _: None)
    assert len(stub.calls) == 1  # no stream opened after the close


def test_a_creation_pending_on_a_dropped_stream_goes_elsewhere_though_the_stream_failed(
    streams: Callable[..., _Streams],
) -> None:
    # Closing cancels the call, and pyetcd's stream thread then hands the stream's CANCELLED
    # to the pending creation. That must not become the creation's error (CANCELLED is not
    # retried): it is _StreamGone, which sends it on the current stream. The creation here
    # wakes only once the stream thread has done so.
    stub = streams("silent")
    watcher = _Watcher(stub, endpoint="a:1", timeout=TIMEOUT)
    cond = watcher._new_watch_cond
    plain_wait = cond.wait

    def wait_for_the_stream_thread(timeout: float | None = None) -> bool:
        woke = plain_wait(timeout)
        thread = watcher._callback_thread
        if watcher._closed and thread is not None:
            watcher._lock.release()
            thread.join(PROMPT)
            watcher._lock.acquire()
        return woke

    cond.wait = wait_for_the_stream_thread  # type: ignore[method-assign]
    results: queue.Queue[tuple[str, Any]] = queue.Queue()
    first = _create(watcher, "/a", results)
    stub.wait_requests(1)
    _waiting(watcher, first)

    watcher.close()

    first.join(2 * PROMPT)
    assert not first.is_alive()
    key, outcome = results.get_nowait()
    assert key == "/a"
    assert isinstance(outcome, _StreamGone), outcome


def test_a_stream_opened_as_it_is_closed_is_cancelled_at_once(
    streams: Callable[..., _Streams],
) -> None:
    # pyetcd's stream thread may open the call just after close() looked for one.
    stub = streams("answer")
    watcher = _Watcher(stub, endpoint="a:1", timeout=TIMEOUT)
    watcher.close()
    call = watcher._watch_stub.Watch(iter(()))
    assert call.cancelled.is_set()


def test_a_progress_answer_is_heard_and_a_stalled_stream_is_not(
    streams: Callable[..., _Streams],
) -> None:
    # etcd answers a progress request for the whole stream with watch id -1, which pyetcd
    # drops (no callback has that id): `heard_at` is all that tells an idle stream that works
    # from one that stalled without an error.
    for kind, answers in (("answer", True), ("stall", False)):
        stub = streams(kind)
        watcher = _Watcher(stub, endpoint="a:1", timeout=TIMEOUT)
        got: list[Any] = []
        watcher.add_callback("/k", got.append)
        created = watcher.heard_at
        # A creation is heard, and proves no watch on the stream caught up.
        assert watcher.progress_at is None
        time.sleep(0.05)
        watcher.request_progress()
        stub.wait_requests(2)
        assert stub.requests[1][1].HasField("progress_request")
        time.sleep(0.2)
        assert (watcher.heard_at > created + 0.04) is answers, kind
        assert (watcher.progress_at == watcher.heard_at) is answers, kind
        assert got == []  # no callback sees a progress answer for the whole stream
        watcher.close()
    # A closed stream sends nothing more.
    before = len(stub.requests)
    watcher.request_progress()
    time.sleep(0.05)
    assert len(stub.requests) == before


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch, streams: Callable[..., _Streams]) -> Iterator[Any]:
    stub = streams("silent")
    monkeypatch.setattr(_pyetcd.etcdrpc, "WatchStub", lambda channel: stub)
    endpoints = [_pyetcd.pyetcd.Endpoint("127.0.0.1", p, secure=False) for p in (1, 2)]
    c = _SharedClient(endpoints=endpoints, timeout=0.5, failover=True, on_failover=lambda: None)
    c.stub = stub
    yield c
    c.close()


def test_an_unanswered_creation_gives_its_stream_and_member_up(client: Any) -> None:
    # Nothing answers on the first stream: its creation times out once, and the stream (which
    # would take a late "created" for the answer to the next creation) is not used again.
    first_watcher = client.watcher
    label = first_watcher.endpoint
    with pytest.raises(etcd_exc.WatchTimedOut):
        client.add_watch("/a", lambda _: None)
    assert client.endpoints[label].is_failed()
    assert client._stubs.get("watcher") is not first_watcher

    watcher, watch_id = client.add_watch("/b", lambda _: None)  # a new stream answers
    assert watcher is not first_watcher and watch_id == 100
    assert watcher.endpoint != label


def test_a_creation_queued_behind_an_unanswered_one_moves_on_without_its_own_timeout(
    client: Any,
) -> None:
    results: queue.Queue[tuple[str, Any]] = queue.Queue()

    def create(key: str) -> threading.Thread:
        def run() -> None:
            try:
                results.put((key, client.add_watch(key, lambda _: None)))
            except BaseException as exc:
                results.put((key, exc))

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    stuck = client.watcher
    first = create("/a")
    client.stub.wait_requests(1)
    second = create("/b")
    _waiting(stuck, second)
    first.join(PROMPT)
    second.join(client.timeout / 2)  # not a second timeout: it moved on with the first
    assert not second.is_alive()
    outcomes = dict(results.get_nowait() for _ in range(2))
    assert isinstance(outcomes["/a"], etcd_exc.WatchTimedOut)
    watcher, watch_id = outcomes["/b"]
    assert watcher is not stuck and watch_id == 100


def test_a_stalled_stream_given_up_moves_its_watches_to_another_member_once(
    monkeypatch: pytest.MonkeyPatch, streams: Callable[..., _Streams]
) -> None:
    # A stream that answers creations, then nothing (no progress answer): the watch that finds
    # it stalled gives it up (`WatchHandle._replace_stalled`). Its member is avoided, the
    # watches on it are told (to resume), and another watch on it finding it given up already
    # does nothing again (one warning, one count per stream).
    stub = streams("stall")
    monkeypatch.setattr(_pyetcd.etcdrpc, "WatchStub", lambda channel: stub)
    endpoints = [_pyetcd.pyetcd.Endpoint("127.0.0.1", p, secure=False) for p in (1, 2)]
    c = _SharedClient(endpoints=endpoints, timeout=0.5, failover=True, on_failover=lambda: None)
    try:
        told: queue.Queue[Any] = queue.Queue()
        stalled, _ = c.add_watch("/a", told.put)
        label = stalled.endpoint

        assert c.drop_stream(stalled)

        assert c.endpoints[label].is_failed()
        assert stub.calls[0].cancelled.is_set()
        assert isinstance(told.get(timeout=PROMPT), grpc.RpcError)
        assert not c.drop_stream(stalled)
        watcher, watch_id = c.add_watch("/a", lambda _: None)  # a new stream answers
        assert watcher is not stalled and watcher.endpoint != label and watch_id == 100
    finally:
        c.close()
