"""pyetcd's multi-endpoint client made safe to share between threads, and conversions between
pyetcd/protobuf objects and our records."""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd import events as etcd_events
from pyetcd import exceptions as etcd_exc
from pyetcd import transactions as etcd_txn
from pyetcd import utils as etcd_utils
from pyetcd import watch as etcd_watch

from .._errors import SettingsError
from .._store_types import (
    Compare,
    DeleteOp,
    GetOp,
    PutOp,
    StoredValue,
    WatchEvent,
)

log = logging.getLogger("defender_config.store")

# gRPC channel options. Reconnect backoff is short so a restarted member is used again within a
# second (gRPC's default grows to two minutes); keepalive pings detect a silently dead member
# under a watch stream (etcd accepts pings every 5 s or slower by default).
_GRPC_OPTIONS: Final = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # A frozen member (paused VM, black-holed host) keeps its TCP connections open. gRPC's
    # other pings (flow-control probes) wait 60 s for an answer and hold keep-alive pings back
    # meanwhile: a watch stayed on a frozen member for 60 s. Every ping now gives up after 5 s.
    ("grpc.http2.ping_timeout_ms", 5_000),
    # gRPC stops pinging after 2 pings with no data sent in between, and an idle watch sends
    # none. etcd allows a ping every 5 s on a connection with an open stream, so pinging on
    # without a limit is within its policy.
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    # EtcdStore._call retries and fails over itself. gRPC's own retry machinery (on by default,
    # even without a retry policy) keeps a copy of every outgoing message and adds a retry
    # filter to every call: measured 8-13 µs per unary Range/Put, same member, interleaved.
    # Without it a call on a connection that breaks fails at once with UNAVAILABLE, which our
    # loop retries on another endpoint.
    ("grpc.enable_retries", 0),
]

# A failed endpoint is avoided for this long when another one is available.
_ENDPOINT_QUARANTINE_SECONDS: Final = 2.0
_HEALTH_TIMEOUT_SECONDS: Final = 2.0


# --- the pyetcd client, made safe to share ------------------------------------------------------


# The endpoint whose stub this thread fetched last, i.e. the one its current call goes to.
_call_endpoint = threading.local()


def _locked_stub(name: str, stub_class: Any) -> property:
    def get(self: _SharedClient) -> Any:
        with self._ep_lock:
            stub = self._stubs.get(name)
            if stub is None:
                stub = self._stubs[name] = stub_class(self.channel)
            # Cached stubs are dropped whenever the current endpoint changes, so a stub is
            # always bound to the current endpoint.
            _call_endpoint.label = self._current_endpoint_label
            return stub

    return property(get)


class _SharedClient(pyetcd.MultiEndpointEtcd3Client):  # type: ignore[misc]
    """pyetcd's multi-endpoint client with endpoint selection under a lock.

    pyetcd swaps the current endpoint and its cached stubs without locking, and raises
    NoServerAvailableError without trying anything once every endpoint failed in the last
    `time_retry` seconds. Here switching is serialized, and when all endpoints are
    quarantined the one that failed longest ago is tried anyway: our retry loop decides when
    to give up, not a timer.
    """

    _current_endpoint_label: str  # pyetcd's property; its setter drops the cached stubs

    def __init__(self, *args: Any, on_failover: Callable[[], None], **kwargs: Any) -> None:
        self._ep_lock = threading.RLock()
        self._on_failover = on_failover
        self._kv: tuple[str, Any] | None = None
        super().__init__(*args, **kwargs)

    kvstub = _locked_stub("kvstub", etcdrpc.KVStub)
    leasestub = _locked_stub("leasestub", etcdrpc.LeaseStub)
    clusterstub = _locked_stub("clusterstub", etcdrpc.ClusterStub)
    maintenancestub = _locked_stub("maintenancestub", etcdrpc.MaintenanceStub)
    authstub = _locked_stub("authstub", etcdrpc.AuthStub)

    @property
    def watcher(self) -> Any:
        with self._ep_lock:
            watcher = self._stubs.get("watcher")
            if watcher is None:
                watcher = self._stubs["watcher"] = self.get_watcher()
            _call_endpoint.label = self._current_endpoint_label
            return watcher

    def get_watcher(self) -> _Watcher:
        with self._ep_lock:
            channel = self.channel  # may switch endpoints: read the label after it
            return _Watcher(
                etcdrpc.WatchStub(channel),
                endpoint=self._current_endpoint_label,
                timeout=self.timeout,
                call_credentials=self.call_credentials,
                metadata=self.metadata,
            )

    @property
    def channel(self) -> Any:
        with self._ep_lock:
            current = self.endpoints[self._current_endpoint_label]
            if not current.is_failed():
                return current.use()
            healthy = [lbl for lbl, ep in self.endpoints.items() if not ep.is_failed()]
            if healthy:
                label = random.choice(healthy)
            else:
                label = min(self.endpoints, key=lambda lbl: self.endpoints[lbl].last_failed)
                self.endpoints[label].last_failed = 0
            if label != self._current_endpoint_label:
                self._on_failover()
                log.info(
                    "etcd endpoint switch",
                    extra={"event": "failover", "from": self._current_endpoint_label, "to": label},
                )
            self._current_endpoint_label = label
            return self.endpoints[label].use()

    def _clear_old_stubs(self) -> None:
        # pyetcd calls this whenever the current endpoint changes (and we do after a failure or
        # a new token): the hot-path KV stub goes with the others.
        self._kv = None
        super()._clear_old_stubs()

    def _kv_stub(self) -> tuple[str, Any]:
        """(endpoint label, KV stub) of the current endpoint for get/put.

        Read without the lock: the pair is one attribute, replaced or dropped whole under the
        lock. A call that read it just before another thread failed over still goes to the
        endpoint named in the pair, and a failure marks that one, as with `kvstub`."""
        kv = self._kv
        if kv is None:
            with self._ep_lock:
                stub = self.kvstub  # picks the endpoint (and fails over) like every call
                kv = self._kv = (self._current_endpoint_label, stub)
        return kv

    def _manage_grpc_errors(self, exc: grpc.RpcError) -> Any:
        """pyetcd's handler marks the *current* endpoint failed; with many threads the call
        that failed may have gone to an endpoint another thread already switched away from.
        Mark the one this thread's call used, and drop the stubs (which closes the shared
        watch stream) only if that is still the current endpoint."""
        with self._ep_lock:
            code = exc.code()
            if code in _ENDPOINT_FAILURE_CODES:
                label = getattr(_call_endpoint, "label", None)
                if label not in self.endpoints:
                    label = self._current_endpoint_label
                self.endpoints[label].fail()
                if label == self._current_endpoint_label:
                    self._clear_old_stubs()
            mapped = _PYETCD_EXCEPTIONS.get(code)
        if mapped is None:
            raise exc
        raise mapped() from exc

    def run_txn(self, compare: list[Any], success: list[Any], failure: list[Any]) -> Any:
        """A Txn that returns the raw response (pyetcd's drops the header revision)."""
        request = etcdrpc.TxnRequest(
            compare=[c.build_message() for c in compare],
            success=self._ops_to_requests(success),
            failure=self._ops_to_requests(failure),
        )
        try:
            return self.kvstub.Txn(
                request, self.timeout, credentials=self.call_credentials, metadata=self.metadata
            )
        except grpc.RpcError as exc:
            self._manage_grpc_errors(exc)
            raise  # unreachable: _manage_grpc_errors always raises

    def add_watch(self, key: str, callback: Callable[[Any], None], **kwargs: Any) -> Any:
        """Create a watch; returns (the watcher stream it lives on, its id). WatchRefusedError
        when etcd refused it.

        A creation whose stream ended or was replaced before etcd answered it is sent again at
        once on the current stream; one that etcd did not answer in time gives the stream up
        (see `_watch_timed_out`)."""
        for _ in range(_WATCH_STREAM_ATTEMPTS):
            watcher = self.watcher
            try:
                watch_id = watcher.add_callback(key, callback, **kwargs)
            except _StreamGone:
                continue
            except grpc.RpcError as exc:
                self._manage_grpc_errors(exc)
                raise
            except (etcd_exc.WatchTimedOut, queue.Empty) as exc:
                self._watch_timed_out(watcher)
                raise etcd_exc.WatchTimedOut() from exc
            break
        else:
            # The stream kept being replaced under this creation: a failover in progress,
            # left to the caller's retry and backoff like any unavailable member.
            raise etcd_exc.ConnectionFailedError()
        if watch_id == _REFUSED_WATCH_ID:
            # etcd answers a watch it refuses (a token it does not know, a user without read
            # permission) with "created" and "canceled" at once, id -1; pyetcd hands that id out
            # as if the watch ran, and it would never deliver an event.
            with watcher._lock:
                watcher._callbacks.pop(watch_id, None)
            raise WatchRefusedError(key)
        return watcher, watch_id

    def _watch_timed_out(self, watcher: _Watcher) -> None:
        """A watch creation got no answer within the timeout: the stream's member is dead,
        frozen, not serving yet, or ignores our token (a cluster restored under a simple
        token). The stream cannot be used again either way (a late "created" would be taken
        as the answer to the next creation), so it is dropped, its member marked failed as for
        a unary call past its deadline, and the creations queued behind it go to a new stream
        at once instead of each waiting out a timeout of its own. Dropping it cancels its
        call (`_Watcher.close`): a watch etcd creates late goes with it instead of staying on
        the member, and the watches already on it resume on the new stream."""
        self.drop_stream(watcher)

    def drop_stream(self, watcher: _Watcher) -> bool:
        """Give up a watch stream whose member does not answer on it (a creation past its
        timeout, progress requests unanswered: `WatchHandle._replace_stalled`): its member is
        marked failed as for a unary call past its deadline (the next stream goes to another
        one), the stream is no longer handed out, and it is closed, so every watch on it gets
        its error and resumes on the next stream. False, and nothing done, when it was closed
        already (another watch on it gave it up first)."""
        with self._ep_lock:
            if watcher.closed:
                return False
            if watcher.endpoint in self.endpoints:
                self.endpoints[watcher.endpoint].fail()
            if self._stubs.get("watcher") is watcher:
                self._clear_old_stubs()
        watcher.close()
        return True

    def range(
        self,
        key: bytes,
        range_end: bytes | None,
        *,
        revision: int | None = None,
        count_only: bool = False,
    ) -> Any:
        """A linearizable Range. The request is built directly: pyetcd's builder sets every
        field and builds two lookup dicts per call, measurable on a 0.7 ms get."""
        request = etcdrpc.RangeRequest(key=key)
        if range_end is not None:
            request.range_end = range_end
        if revision is not None:
            request.revision = revision
        if count_only:
            request.count_only = True
        return self._kv_call("Range", request)

    def put_value(self, key: bytes, value: bytes, lease_id: int) -> Any:
        """A Put (pyetcd's `put` converts and checks each argument again and wraps the call)."""
        return self._kv_call("Put", etcdrpc.PutRequest(key=key, value=value, lease=lease_id))

    def _kv_call(self, method: str, request: Any) -> Any:
        """One unary KV call on the cached stub; a failure marks the endpoint it went to."""
        label, stub = self._kv_stub()
        try:
            return getattr(stub, method)(
                request, self.timeout, credentials=self.call_credentials, metadata=self.metadata
            )
        except grpc.RpcError as exc:
            _call_endpoint.label = label
            self._manage_grpc_errors(exc)
            raise


# The id etcd gives a watch it refused on creation (clientv3.InvalidWatchID).
_REFUSED_WATCH_ID: Final = -1
# How often one creation is sent again because its stream went away before etcd answered.
_WATCH_STREAM_ATTEMPTS: Final = 5
# A progress request for every watch on a stream (etcd answers with watch id -1).
_PROGRESS_REQUEST: Final = etcdrpc.WatchRequest(progress_request=etcdrpc.WatchProgressRequest())


class _StreamGone(Exception):
    """The watch stream ended or was dropped before etcd answered a creation on it."""


class _Watcher(etcd_watch.Watcher):  # type: ignore[misc]
    """pyetcd's watch stream, where a watch creation never waits on a stream that is gone.

    etcd's "created" answer does not say which request it answers, so pyetcd keeps one
    creation outstanding per stream and the others wait their turn inside `add_callback`.
    pyetcd checks whether the stream has ended only *before* that wait: a creation queued
    behind one whose stream then died (or that the client dropped: a failed endpoint, a new
    login) was put on a stream nobody sends or reads, and waited out its whole timeout, then
    the next one behind it: after a restore an agent's watches came back one timeout apart.
    Here the check follows the wait, and a closed stream fails its pending and queued
    creations at once (`_StreamGone`), for `_SharedClient.add_watch` to send on the current
    stream.

    Closing also cancels the stream's gRPC call. pyetcd's `close` only ends the requests
    (a half-close), and etcd keeps a half-closed watch stream open with every watch on it,
    for as long as the connection lives (measured on etcd 3.6: the watcher and stream counts
    stay up until the channel closes). A watch cancelled after that could not reach etcd
    any more, and a creation etcd answered after we gave it up ("created" arriving late) was
    a watch nobody would ever cancel: both stayed on the member, sending events we drop.
    Cancelled, the stream ends on both sides, etcd lets go of its watches, and each watch
    on it gets the CANCELLED error and resumes on the current stream (`WatchHandle`), with
    the current token after a new login."""

    # pyetcd's, set in its __init__ and guarded by _lock.
    _new_watch: Any
    _stopping: bool
    _callback_thread: threading.Thread | None
    _request_queue: queue.Queue[Any]

    def __init__(self, watchstub: Any, *args: Any, endpoint: str, **kwargs: Any) -> None:
        super().__init__(_CallKeepingStub(watchstub, self._opened), *args, **kwargs)
        self.endpoint = endpoint
        self._closed = False
        self._call: Any = None  # the gRPC call of the stream running now, if any
        # When the stream last answered anything (time.monotonic): an event of any watch on
        # it, a creation, a progress answer (`request_progress`). Its creation until then.
        # Written by the stream's thread, read by any: one float, replaced whole.
        self.heard_at = time.monotonic()
        # When the stream last answered a progress request (None: not yet). etcd sends that
        # answer only once every watch on the stream has been sent everything up to its
        # revision, so it is what proves a watch created on the stream has caught up.
        self.progress_at: float | None = None

    @property
    def closed(self) -> bool:
        """Whether the client dropped this stream (`close`)."""
        return self._closed

    def _handle_response(self, rs: Any) -> None:
        # Before pyetcd's handling, which drops a progress answer for the whole stream (its
        # watch id is -1, which no callback has): that answer is all an idle stream sends.
        now = time.monotonic()
        self.heard_at = now
        if not (rs.created or rs.canceled or rs.events or rs.compact_revision):
            self.progress_at = now
        super()._handle_response(rs)

    def request_progress(self) -> None:
        """Ask etcd for a progress answer on this stream: a header-only response at its current
        revision, sent once every watch on the stream has been sent everything up to it. An
        idle stream that gets none is stalled: the member or a proxy on the way holds it open
        and delivers nothing, which no gRPC keep-alive ping notices (the connection answers).
        Nothing is sent on a stream that is not running or whose request queue is full (a
        burst of creations and cancels: their answers prove the stream as well)."""
        with self._lock:
            if self._closed or self._stopping or self._callback_thread is None:
                return
            with contextlib.suppress(queue.Full):
                self._request_queue.put_nowait(_PROGRESS_REQUEST)

    def _opened(self, call: Any) -> None:
        """pyetcd's stream thread opened a stream: keep its call to cancel on close."""
        with self._lock:
            self._call = call
            closed = self._closed
        if closed:
            call.cancel()  # closed while the stream thread was starting

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending = self._new_watch
            if pending is not None and pending.id is None and pending.err is None:
                pending.err = _StreamGone()
            self._new_watch_cond.notify_all()
            call = self._call
            if self._callback_thread is not None and not self._stopping:
                # End the requests, so gRPC's sending thread lets go of the iterator. pyetcd
                # blocks here, under the lock, when the queue (10) is full: never needed, the
                # cancel below ends the stream and that thread with it.
                with contextlib.suppress(queue.Full):
                    self._request_queue.put_nowait(None)
        if call is not None:
            call.cancel()

    def _cancel_no_lock(self, watch_id: int) -> None:
        # A closed stream sends no more requests (its request iterator ended), and its queue
        # holds 10: an 11th cancel queued there would block for good, under the watcher's
        # lock. Nothing is lost: the stream's call is cancelled, which ends all its watches.
        if not self._closed:
            super()._cancel_no_lock(watch_id)

    def add_callback(
        self,
        key: str,
        callback: Callable[[Any], None],
        range_end: Any = None,
        start_revision: int | None = None,
        progress_notify: bool = False,
        filters: Any = None,
        prev_kv: bool = False,
    ) -> int:
        request = self._create_watch_request(
            key,
            range_end=range_end,
            start_revision=start_revision,
            progress_notify=progress_notify,
            filters=filters,
            prev_kv=prev_kv,
        )
        with self._lock:
            while self._new_watch is not None and not self._closed:
                self._new_watch_cond.wait()
            if self._closed:
                raise _StreamGone()
            if self._stopping:
                # The stream ended (its reader has let go of the lock for good): start another.
                if self._callback_thread is not None:
                    self._callback_thread.join()
                self._callback_thread = None
                self._stopping = False
            if self._callback_thread is None:
                self._callback_thread = threading.Thread(
                    name=f"pyetcd_watch_{id(self):x}", target=self._run, daemon=True
                )
                self._callback_thread.start()
            new_watch = etcd_watch._NewWatch(callback)
            self._request_queue.put(request)
            self._new_watch = new_watch
            try:
                deadline = None if self.timeout is None else time.monotonic() + self.timeout
                while new_watch.id is None and new_watch.err is None and not self._stopping:
                    if deadline is None:
                        self._new_watch_cond.wait()
                        continue
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._new_watch_cond.wait(remaining)
                if new_watch.id is not None:
                    return int(new_watch.id)
                if self._closed:
                    # Dropped by the client: its cancel may have replaced our error with the
                    # stream's CANCELLED by now.
                    raise _StreamGone()
                if new_watch.err is not None:
                    raise new_watch.err
                if self._stopping:
                    raise _StreamGone()  # the stream ended without an error
                raise etcd_exc.WatchTimedOut()
            finally:
                self._new_watch = None
                self._new_watch_cond.notify_all()


class _CallKeepingStub:
    """The WatchStub pyetcd's stream thread opens its streams with (`Watcher._run`): hands each
    call to `opened` before the thread reads from it."""

    def __init__(self, stub: Any, opened: Callable[[Any], None]) -> None:
        self._stub = stub
        self._opened = opened

    def Watch(self, requests: Any, **kwargs: Any) -> Any:
        call = self._stub.Watch(requests, **kwargs)
        self._opened(call)
        return call


class WatchRefusedError(grpc.RpcError):  # type: ignore[misc]
    """etcd refused to create a watch. Its reason does not reach us (pyetcd drops it); with
    authentication on it is a token etcd does not accept or a user who may not read the key,
    hence UNAUTHENTICATED: the store logs in again once, then reports an auth error."""

    def __init__(self, key: str) -> None:
        self._details = (
            f"etcd refused the watch on {key} (a token it does not accept, or no read permission)"
        )
        super().__init__(self._details)

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAUTHENTICATED

    def details(self) -> str:
        return self._details


# pyetcd's own choices (client.py): which codes fail an endpoint, which become its exceptions.
_ENDPOINT_FAILURE_CODES: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL}
)
_PYETCD_EXCEPTIONS: Final = {
    grpc.StatusCode.INTERNAL: etcd_exc.InternalServerError,
    grpc.StatusCode.UNAVAILABLE: etcd_exc.ConnectionFailedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: etcd_exc.ConnectionTimeoutError,
    grpc.StatusCode.FAILED_PRECONDITION: etcd_exc.PreconditionFailedError,
}

_OPS_TO_PB: Final = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}
_TARGETS: Final = {
    "version": etcd_txn.Version,
    "mod": etcd_txn.Mod,
    "create": etcd_txn.Create,
    "value": etcd_txn.Value,
}


def _to_compare(c: Compare) -> Any:
    compare = _TARGETS[c.target](c.key)
    compare.op = getattr(etcdrpc.Compare, _OPS_TO_PB[c.op])
    compare.value = c.value
    return compare


def _to_op(op: PutOp | DeleteOp | GetOp) -> Any:
    if isinstance(op, PutOp):
        return etcd_txn.Put(op.key, op.value, lease=op.lease_id or None)
    end = etcd_utils.prefix_range_end(op.key.encode()) if op.prefix else None
    if isinstance(op, DeleteOp):
        if op.range_end is not None:
            end = op.range_end.encode()
        return etcd_txn.Delete(op.key, range_end=end)
    return etcd_txn.Get(op.key, range_end=end)


def _stored(kv: Any, stale: bool = False) -> StoredValue:
    # protobuf hands out `value` as a new bytes object already: no copy needed.
    return StoredValue(
        kv.key.decode("utf-8", "replace"),
        kv.value,
        kv.mod_revision,
        kv.create_revision,
        kv.version,
        kv.lease,
        stale,
    )


def _event(raw: Any) -> WatchEvent:
    pb = raw._event
    kv = pb.kv
    prev = bytes(pb.prev_kv.value) if pb.HasField("prev_kv") else None
    return WatchEvent(
        kind="delete" if isinstance(raw, etcd_events.DeleteEvent) else "put",
        key=kv.key.decode("utf-8", "replace"),
        value=bytes(kv.value),
        mod_revision=int(kv.mod_revision),
        version=int(kv.version),
        lease_id=int(kv.lease),
        prev_value=prev,
    )


def parse_endpoint(endpoint: str) -> tuple[str, int, bool]:
    """'https://host:2379' -> ('host', 2379, True); no scheme means plain http."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "http", endpoint
    if scheme not in ("http", "https"):
        raise SettingsError(f"endpoint {endpoint!r} must use http:// or https://")
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise SettingsError(f"endpoint {endpoint!r} must look like [scheme://]host:port")
    return host, int(port), scheme == "https"
