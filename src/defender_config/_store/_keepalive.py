"""Lease keep-alives multiplexed over one long-lived LeaseKeepAlive stream per store.

pyetcd's `refresh_lease` opens a new bidirectional stream for every keep-alive (~1.2 ms of client
CPU); with hundreds of heartbeaters in one process that alone falls behind. Here callers queue
their request on one shared stream and wait for the answer that carries their lease id; one
reader thread hands the answers out.

etcd's server answers the requests of one stream one by one, in order, each with the lease id it
was asked about (TTL 0 for an unknown or expired lease). Callers asking about the same lease are
therefore answered first come, first served.

Failures never hang a caller: a broken stream fails every caller waiting on it with a gRPC-coded
error, which `EtcdStore._call` classifies, counts and retries like any other call; the next call
opens a new stream on the endpoint the shared client picks then (its failover, not ours). A
caller that gets no answer within the request timeout resets the stream, because an answer that
arrives late could otherwise be handed to a later caller of the same lease.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any, Final

import grpc
from pyetcd import etcdrpc

from .._errors import StoreError
from ._pyetcd import _call_endpoint, _SharedClient

log = logging.getLogger("defender_config.store")

_END: Final = object()  # ends the request iterator (and with it gRPC's sender thread)
# How long a reset caller waits for another thread to finish resolving its waiter.
_SETTLE_SECONDS: Final = 1.0


class KeepAliveStreamError(grpc.RpcError):  # type: ignore[misc]
    """A keep-alive that failed on the shared stream, with the gRPC status code that explains
    why. Each waiting caller gets its own instance (the store's retry loop classifies it like
    any RpcError by `code()`)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _Failure:
    """Why a stream ended; turned into a fresh exception for each caller it fails."""

    def __init__(
        self, code: grpc.StatusCode, details: str, cause: BaseException | None = None
    ) -> None:
        self.code = code
        self.details = details
        self.cause = cause

    @classmethod
    def from_exception(cls, exc: BaseException) -> _Failure:
        code: grpc.StatusCode | None = None
        details = ""
        if isinstance(exc, grpc.RpcError):
            try:
                code = exc.code()
                details = exc.details() or ""
            except Exception:  # a stream that broke before any status arrived
                code = None
        # No status at all means the connection went away: the same as UNAVAILABLE.
        return cls(code or grpc.StatusCode.UNAVAILABLE, details or type(exc).__name__, exc)

    def error(self) -> KeepAliveStreamError:
        exc = KeepAliveStreamError(self.code, self.details)
        exc.__cause__ = self.cause
        return exc


class _Closed:
    """The store was closed while callers waited: they get a StoreError, never retried."""

    def error(self) -> Exception:
        return StoreError("the EtcdStore is closed; create a new one")


class KeepAliveWaiters:
    """Callers waiting for keep-alive answers, by lease id, first come first served.

    Pure bookkeeping (no I/O), safe to use from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[int, deque[Future[int]]] = {}
        self._failed: _Failure | _Closed | None = None

    def add(self, lease_id: int) -> Future[int]:
        """A waiter for the next answer about `lease_id`; already failed if these waiters
        were failed before (the stream it would have waited on is gone)."""
        waiter: Future[int] = Future()
        with self._lock:
            if self._failed is not None:
                waiter.set_exception(self._failed.error())
                return waiter
            self._by_id.setdefault(lease_id, deque()).append(waiter)
        return waiter

    def answer(self, lease_id: int, ttl: int) -> bool:
        """Hand `ttl` to the oldest waiter of `lease_id`; False if nobody waits for it."""
        with self._lock:
            waiting = self._by_id.get(lease_id)
            if not waiting:
                return False
            waiter = waiting.popleft()
            if not waiting:
                del self._by_id[lease_id]
        waiter.set_result(ttl)
        return True

    def fail_all(self, why: _Failure | _Closed) -> tuple[bool, int]:
        """Fail every waiter now and every one added later. Only the first reason counts:
        returns (whether this call was the first, how many were waiting)."""
        with self._lock:
            first = self._failed is None
            if first:
                self._failed = why
            waiting = [w for ws in self._by_id.values() for w in ws]
            self._by_id.clear()
            reason = self._failed
        assert reason is not None
        for waiter in waiting:
            waiter.set_exception(reason.error())
        return first, len(waiting)

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def __len__(self) -> int:
        with self._lock:
            return sum(len(ws) for ws in self._by_id.values())


def _requests(pending: queue.SimpleQueue[Any]) -> Iterator[Any]:
    while True:
        item = pending.get()
        if item is _END:
            return
        yield item


class _Stream:
    """One LeaseKeepAlive call to one endpoint, its waiters and its reader thread."""

    def __init__(self, client: _SharedClient, generation: int) -> None:
        self.client = client
        self.waiters = KeepAliveWaiters()
        self._pending: queue.SimpleQueue[Any] = queue.SimpleQueue()
        stub = client.leasestub  # picks the endpoint (and fails over) like every other call
        self.label: str = _call_endpoint.label
        # The login token travels once, when the stream opens: a new login needs a new stream.
        self.metadata = client.metadata
        # No deadline: the stream lives as long as the store; each caller bounds its own wait.
        self.call = stub.LeaseKeepAlive(
            _requests(self._pending),
            None,
            credentials=client.call_credentials,
            metadata=client.metadata,
        )
        self.thread = threading.Thread(
            target=self._read, name=f"defender-keepalive-{generation}", daemon=True
        )
        self.thread.start()

    @property
    def alive(self) -> bool:
        return not self.waiters.failed

    def send(self, lease_id: int) -> Future[int]:
        # The waiter exists before the request leaves, so its answer always finds it.
        waiter = self.waiters.add(lease_id)
        if not waiter.done():
            self._pending.put(etcdrpc.LeaseKeepAliveRequest(ID=lease_id))
        return waiter

    def _read(self) -> None:
        try:
            for response in self.call:
                if not self.waiters.answer(int(response.ID), int(response.TTL)):
                    log.debug("keep-alive answer for lease %x that nobody waits for", response.ID)
            # etcd ends the stream with OK only after our own half-close (`fail`); anything
            # else ending it without a status is a lost member.
            why = _Failure(grpc.StatusCode.UNAVAILABLE, "the member closed the keep-alive stream")
        except grpc.RpcError as exc:
            why = _Failure.from_exception(exc)
        self.fail(why)

    def fail(self, why: _Failure | _Closed) -> None:
        """End the stream: fail its waiters, stop the call and gRPC's sender thread. Only
        the first failure marks the endpoint as failed (the shared client's rules)."""
        first, failed = self.waiters.fail_all(why)
        if not first:
            return
        self._pending.put(_END)
        self.call.cancel()
        if isinstance(why, _Failure):
            log.info(
                "keep-alive stream to %s ended (%s: %s) with %d callers waiting",
                self.label,
                why.code.name,
                why.details,
                failed,
                extra={"event": "keepalive_stream_ended", "endpoint": self.label},
            )
            self._mark_endpoint(why)

    def _mark_endpoint(self, why: _Failure) -> None:
        # The shared client marks endpoints failed from the thread-local "endpoint this call
        # used"; point it at this stream's endpoint, then let it apply its usual rules.
        _call_endpoint.label = self.label
        # It always raises (the mapped error): that is the callers' business, not ours.
        with contextlib.suppress(Exception):
            self.client._manage_grpc_errors(why.error())


class KeepAliveMux:
    """Lease keep-alives of one store over one shared LeaseKeepAlive stream, opened on first
    use and after a failure, closed by `close()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stream: _Stream | None = None
        self._generation = 0
        self._closed = False

    def refresh(self, client: _SharedClient, lease_id: int) -> int:
        """One keep-alive of `lease_id`; its TTL (0 = expired). Raises KeepAliveStreamError
        (gRPC-coded, for the store's retry loop) or StoreError once closed."""
        stream = self._stream_for(client)
        waiter = stream.send(lease_id)
        try:
            return waiter.result(timeout=client.timeout)
        except TimeoutError:
            pass
        self.reset(
            stream,
            _Failure(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no keep-alive answer within {client.timeout:g}s from {stream.label}; "
                "stream reset",
            ),
        )
        # Answered just before the reset, or failed by it. Either may still be on its way:
        # `answer` and `fail_all` take the waiter out under their lock and resolve it just
        # after, so a reset that finds it gone waits for that other thread a moment.
        try:
            return waiter.result(timeout=_SETTLE_SECONDS)
        except TimeoutError:
            # Never a bare TimeoutError for the caller: a gRPC-coded timeout, which the
            # store's retry loop classifies (transient) and finally raises as a StoreError.
            raise KeepAliveStreamError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no keep-alive answer within {client.timeout:g}s from {stream.label}, "
                "and none after the stream reset",
            ) from None

    def stream(self, client: _SharedClient) -> _Stream:
        """The shared stream, opened now if there is none or it failed (for callers that send
        without waiting, the keeper); StoreError once closed."""
        return self._stream_for(client)

    def reset(self, stream: _Stream, why: _Failure) -> None:
        """End `stream` (its waiters fail with `why`); the next call opens a new one. A stream
        that is no longer the current one is failed all the same (idempotent)."""
        with self._lock:
            if self._stream is stream:
                self._stream = None
        stream.fail(why)

    def _stream_for(self, client: _SharedClient) -> _Stream:
        replaced: _Stream | None = None
        with self._lock:
            if self._closed:
                raise StoreError("the EtcdStore is closed; create a new one")
            stream = self._stream
            if stream is not None and stream.alive and stream.metadata != client.metadata:
                # Opened with a token since replaced (a new login): after a restore from a
                # snapshot that old token makes etcd hold every request until its deadline.
                replaced, stream = stream, None
            if stream is None or not stream.alive:
                self._generation += 1
                stream = self._stream = _Stream(client, self._generation)
        if replaced is not None:
            # Outside the lock: failing it runs the keeper's callbacks on this thread. Its
            # callers get UNAUTHENTICATED and try again with the new token (`EtcdStore._call`).
            replaced.fail(
                _Failure(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "the stream carried a token replaced by a new login; reopened",
                )
            )
        return stream

    def close(self, timeout: float = 10.0) -> None:
        """Fail waiting callers with StoreError, end the stream and its reader thread."""
        with self._lock:
            self._closed = True
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.fail(_Closed())
            if threading.current_thread() is not stream.thread:
                stream.thread.join(timeout)

    @property
    def reader(self) -> threading.Thread | None:
        """The current stream's reader thread (None when no stream is open)."""
        stream = self._stream
        return stream.thread if stream is not None and stream.alive else None
