"""etcd access: the only module that imports pyetcd or grpc.

Built on `pyetcd` (etcd-sdk-python, the maintained fork of python-etcd3) and its
`MultiEndpointEtcd3Client`. On top of it this module adds what the library needs:

* retries of transient failures only (UNAVAILABLE, DEADLINE_EXCEEDED, connection failures), with
  exponential backoff and full jitter; failed compares, auth and argument errors are not retried;
* one table (`_RULES`) that maps gRPC codes and pyetcd exceptions to our typed errors;
* endpoint failover that never gives up on the cluster while retries remain (pyetcd refuses to
  try when every endpoint failed recently; we try the one that failed longest ago instead);
* thread safety: one client is shared by every thread; endpoint switching is locked;
* watches that survive a member dying: re-created on another endpoint from the last revision
  they delivered, callbacks run on the watch's own thread;
* a last-known-good read cache served (flagged stale) when no endpoint answers;
* Prometheus metrics, health, leases and transactions.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, TypeVar

import grpc
import pyetcd
from prometheus_client import CollectorRegistry
from pyetcd import etcdrpc
from pyetcd import events as etcd_events
from pyetcd import exceptions as etcd_exc
from pyetcd import transactions as etcd_txn
from pyetcd import utils as etcd_utils

from ._errors import (
    ConflictError,
    NotFoundError,
    SettingsError,
    StoreAuthError,
    StoreError,
    StoreUnavailableError,
)
from ._settings import EtcdSettings
from ._store_types import (
    Compare,
    DeleteOp,
    GetOp,
    HealthReport,
    Lease,
    MemberHealth,
    PutOp,
    StoredValue,
    StoreMetrics,
    TxnResult,
    WatchEvent,
    backoff_delay,
)

__all__ = ["EtcdStore", "WatchHandle", "classify_error", "parse_endpoint"]

log = logging.getLogger("defender_config.store")

T = TypeVar("T")

# gRPC channel options. Reconnect backoff is short so a restarted member is used again within a
# second (gRPC's default grows to two minutes); keepalive pings detect a silently dead member
# under a watch stream (etcd accepts pings every 5 s or slower by default).
_GRPC_OPTIONS: Final = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
]

# A failed endpoint is avoided for this long when another one is available.
_ENDPOINT_QUARANTINE_SECONDS: Final = 2.0
_HEALTH_TIMEOUT_SECONDS: Final = 2.0


# --- error classification: the one table -------------------------------------------------------

_Kind = Literal["unavailable", "auth", "not_found", "compacted", "error"]


@dataclass(frozen=True, slots=True)
class ErrorRule:
    """How one failure is handled: which typed error, whether to retry, the metrics reason."""

    kind: _Kind
    transient: bool
    reason: str
    hint: str


_UNAVAILABLE = ErrorRule("unavailable", True, "unavailable", "no member answered")
_TIMEOUT = ErrorRule("unavailable", True, "deadline_exceeded", "the call timed out")

_RULES: Final[dict[type[BaseException] | grpc.StatusCode, ErrorRule]] = {
    # pyetcd turns some gRPC codes into its own exceptions (cause kept in __context__).
    etcd_exc.ConnectionFailedError: _UNAVAILABLE,
    etcd_exc.ConnectionTimeoutError: _TIMEOUT,
    etcd_exc.NoServerAvailableError: _UNAVAILABLE,
    etcd_exc.WatchTimedOut: _TIMEOUT,
    etcd_exc.InternalServerError: ErrorRule("error", False, "internal", "etcd internal error"),
    etcd_exc.PreconditionFailedError: ErrorRule(
        "error", False, "failed_precondition", "etcd refused the request"
    ),
    etcd_exc.RevisionCompactedError: ErrorRule(
        "compacted", False, "compacted", "the requested revision was compacted"
    ),
    # Raw gRPC codes pyetcd lets through.
    grpc.StatusCode.UNAVAILABLE: _UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: _TIMEOUT,
    grpc.StatusCode.UNAUTHENTICATED: ErrorRule(
        "auth", False, "unauthenticated", "etcd did not accept the credentials"
    ),
    grpc.StatusCode.PERMISSION_DENIED: ErrorRule(
        "auth", False, "permission_denied", "the etcd user lacks permission"
    ),
    grpc.StatusCode.NOT_FOUND: ErrorRule("not_found", False, "not_found", "not found"),
    grpc.StatusCode.OUT_OF_RANGE: ErrorRule(
        "compacted", False, "compacted", "the requested revision was compacted"
    ),
    grpc.StatusCode.INVALID_ARGUMENT: ErrorRule(
        "error", False, "invalid_argument", "etcd rejected the request"
    ),
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorRule(
        "error", False, "resource_exhausted", "message too large or etcd overloaded"
    ),
    grpc.StatusCode.FAILED_PRECONDITION: ErrorRule(
        "error", False, "failed_precondition", "etcd refused the request"
    ),
    grpc.StatusCode.INTERNAL: ErrorRule("error", False, "internal", "etcd internal error"),
    grpc.StatusCode.CANCELLED: ErrorRule("error", False, "cancelled", "the call was cancelled"),
    grpc.StatusCode.UNKNOWN: ErrorRule("error", False, "unknown", "etcd returned an error"),
}


def _grpc_cause(exc: BaseException) -> grpc.RpcError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, grpc.RpcError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _details(exc: BaseException) -> str:
    rpc = _grpc_cause(exc)
    if rpc is not None:
        code = getattr(rpc, "code", None)
        details = getattr(rpc, "details", None)
        try:
            code_name = code().name if callable(code) else "?"
            text = details() if callable(details) else ""
        except Exception:  # a bare RpcError without status: fall back to its type
            return type(rpc).__name__
        return f"{code_name}: {text}" if text else code_name
    return str(exc) or type(exc).__name__


def classify_error(exc: BaseException) -> ErrorRule | None:
    """Look up how to handle `exc`; None means "not an etcd failure" (a bug: re-raise as is)."""
    if isinstance(exc, grpc.RpcError):
        code = getattr(exc, "code", None)
        try:
            status = code() if callable(code) else None
        except Exception:
            status = None
        if status is None:
            return _UNAVAILABLE  # a stream that broke before any status arrived
        return _RULES.get(status, ErrorRule("error", False, "unknown", "etcd returned an error"))
    for cls in type(exc).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    return None


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
        """Create a watch; returns (the watcher stream it lives on, its id)."""
        watcher = self.watcher
        try:
            return watcher, watcher.add_callback(key, callback, **kwargs)
        except grpc.RpcError as exc:
            self._manage_grpc_errors(exc)
            raise
        except queue.Empty as exc:
            raise etcd_exc.WatchTimedOut() from exc

    def range(self, key: bytes, range_end: bytes | None, **kwargs: Any) -> Any:
        request = self._build_get_range_request(key, range_end=range_end, **kwargs)
        try:
            return self.kvstub.Range(
                request, self.timeout, credentials=self.call_credentials, metadata=self.metadata
            )
        except grpc.RpcError as exc:
            self._manage_grpc_errors(exc)
            raise


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
    return StoredValue(
        key=kv.key.decode("utf-8", "replace"),
        value=bytes(kv.value),
        mod_revision=kv.mod_revision,
        create_revision=kv.create_revision,
        version=kv.version,
        lease_id=kv.lease,
        stale=stale,
    )


class _Absent:
    """Cache marker: the key was read and did not exist."""


_ABSENT: Final = _Absent()


class _LastKnownGood:
    """Bounded LRU of the latest values read or written, for reads while etcd is unreachable."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._keys: OrderedDict[str, StoredValue | _Absent] = OrderedDict()
        self._lists: OrderedDict[str, tuple[StoredValue, ...]] = OrderedDict()

    def _remember(self, table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self._max:
            table.popitem(last=False)

    def set(self, key: str, value: StoredValue | _Absent) -> None:
        if self._max <= 0:
            return
        with self._lock:
            self._remember(self._keys, key, value)

    def set_list(self, prefix: str, values: Sequence[StoredValue]) -> None:
        if self._max <= 0:
            return
        with self._lock:
            self._remember(self._lists, prefix, tuple(values))
            for v in values[: self._max]:
                self._remember(self._keys, v.key, v)

    def get(self, key: str) -> StoredValue | _Absent | None:
        with self._lock:
            return self._keys.get(key)

    def get_list(self, prefix: str) -> tuple[StoredValue, ...] | None:
        with self._lock:
            return self._lists.get(prefix)


# --- the store ----------------------------------------------------------------------------------


class EtcdStore:
    """Thread-safe access to one etcd cluster. Create one per process and share it.

    Every method raises StoreError subclasses only: StoreUnavailableError once retries are
    exhausted, StoreAuthError for refused credentials, ConflictError when a compare lost.
    """

    def __init__(
        self,
        settings: EtcdSettings,
        *,
        registry: CollectorRegistry | None = None,
        cache_entries: int = 10_000,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = StoreMetrics(registry)
        self._rng = rng or random.Random()
        self._cache = _LastKnownGood(cache_entries)
        self._closed = False
        self._watches: set[WatchHandle] = set()
        self._watches_lock = threading.Lock()
        self._auth_lock = threading.Lock()
        self.endpoints: tuple[str, ...] = tuple(settings.endpoints)
        self._client = self._build_client()
        self._token_ready = settings.user is None
        if settings.user is not None:
            try:
                self._authenticate()
            except StoreUnavailableError as exc:
                # Start anyway, like without auth: the first call logs in once etcd answers.
                # Wrong credentials (StoreAuthError) still fail here, at start-up.
                log.warning("etcd login deferred: %s", exc)

    # --- construction ---------------------------------------------------------------------------

    def _credentials(self, secure: bool) -> grpc.ChannelCredentials | None:
        s = self.settings
        if not secure:
            return None

        def read(path: Any, what: str) -> bytes:
            try:
                with open(path, "rb") as fh:
                    return fh.read()
            except OSError as exc:
                raise SettingsError(
                    f"cannot read etcd {what} {str(path)!r}: {exc.strerror or exc}"
                ) from exc

        ca = read(s.ca_file, "ca_file") if s.ca_file else None
        key = read(s.key_file, "key_file") if s.key_file else None
        cert = read(s.cert_file, "cert_file") if s.cert_file else None
        return grpc.ssl_channel_credentials(ca, key, cert)

    def _build_client(self) -> _SharedClient:
        parsed = [parse_endpoint(e) for e in self.endpoints]
        tls = {secure for _, _, secure in parsed}
        if len(tls) > 1:
            raise SettingsError("etcd endpoints mix http:// and https://; use one scheme")
        secure = tls.pop() or self.settings.ca_file is not None
        creds = self._credentials(secure)
        endpoints = [
            pyetcd.Endpoint(
                host,
                port,
                secure=secure,
                creds=creds,
                time_retry=_ENDPOINT_QUARANTINE_SECONDS,
                opts=_GRPC_OPTIONS,
            )
            for host, port, _ in parsed
        ]
        return _SharedClient(
            endpoints=endpoints,
            timeout=self.settings.timeout_seconds,
            failover=True,
            on_failover=self.metrics.failovers.inc,
        )

    def _authenticate(self) -> None:
        s = self.settings
        assert s.user is not None and s.password is not None
        request = etcdrpc.AuthenticateRequest(name=s.user, password=s.password.get_secret_value())

        def call(c: _SharedClient) -> Any:
            try:
                return c.authstub.Authenticate(request, c.timeout)
            except grpc.RpcError as exc:
                c._manage_grpc_errors(exc)
                raise

        try:
            response = self._call("authenticate", call, renew_auth=False)
        except StoreAuthError:
            raise
        except StoreUnavailableError:
            raise
        except StoreError as exc:
            # etcd answers a wrong password with INVALID_ARGUMENT and a server without auth
            # with FAILED_PRECONDITION: both are credential problems for the caller.
            raise StoreAuthError(f"authentication as {s.user!r} failed ({exc})") from exc
        with self._client._ep_lock:
            # Only the token metadata: gRPC refuses call credentials on plaintext channels.
            self._client.metadata = (("token", response.token),)
            self._client.call_credentials = None
            # Watch streams carry the token they were opened with: reopen them.
            self._client._clear_old_stubs()
        self._token_ready = True

    # --- the retry loop -------------------------------------------------------------------------

    def _call(
        self,
        op: str,
        fn: Callable[[_SharedClient], T],
        *,
        path: str | None = None,
        retry: bool = True,
        renew_auth: bool = True,
    ) -> T:
        if self._closed:
            raise StoreError("the EtcdStore is closed; create a new one", path=path)
        if not self._token_ready and renew_auth:
            with self._auth_lock:
                if not self._token_ready:
                    self._authenticate()
        calls, latency = self.metrics.for_op(op)
        calls.inc()
        started = time.perf_counter()
        attempt = 0
        renewed = False
        try:
            while True:
                try:
                    return fn(self._client)
                except Exception as exc:
                    rule = classify_error(exc)
                    if rule is None:
                        raise
                    if (
                        rule.reason == "unauthenticated"
                        and renew_auth
                        and not renewed
                        and self.settings.user is not None
                    ):
                        # Simple tokens expire (5 min by default): log in again once.
                        renewed = True
                        with self._auth_lock:
                            self._authenticate()
                        continue
                    if rule.transient and retry and attempt < self.settings.retries:
                        delay = backoff_delay(
                            attempt,
                            self.settings.backoff_base_seconds,
                            self.settings.backoff_max_seconds,
                            self._rng,
                        )
                        attempt += 1
                        self.metrics.retries.labels(op).inc()
                        log.debug(
                            "etcd %s failed (%s), retry %d in %.3fs",
                            op,
                            rule.reason,
                            attempt,
                            delay,
                        )
                        time.sleep(delay)
                        continue
                    self.metrics.errors.labels(op, rule.reason).inc()
                    raise self._typed(rule, exc, path, attempt + 1) from exc
        finally:
            latency.observe(time.perf_counter() - started)

    def _typed(self, rule: ErrorRule, exc: BaseException, path: str | None, n: int) -> StoreError:
        detail = f"{rule.hint} ({_details(exc)})"
        if rule.kind == "unavailable":
            return StoreUnavailableError(self.endpoints, detail, attempts=n, path=path)
        if rule.kind == "auth":
            return StoreAuthError(detail, path=path)
        if rule.kind == "not_found":
            return NotFoundError(path or "?", detail=detail)
        where = f" at {path!r}" if path else ""
        return StoreError(f"etcd request failed{where}: {detail}", path=path)

    # --- reads ----------------------------------------------------------------------------------

    def get(self, path: str, *, revision: int | None = None) -> StoredValue | None:
        """The value at `path`, None if absent. When etcd is unreachable, the last value seen
        by this store (flagged `stale=True`); StoreUnavailableError if it never saw one.

        With `revision`, the value as it was at that revision (no cache; a compacted revision
        raises StoreError)."""
        if revision is not None:
            old = self._call(
                "get", lambda c: c.range(path.encode(), None, revision=revision), path=path
            )
            return _stored(old.kvs[0]) if old.kvs else None
        try:
            response = self._call("get", lambda c: c.range(path.encode(), None), path=path)
        except StoreUnavailableError:
            cached = self._cache.get(path)
            if cached is None:
                raise
            self.metrics.stale_reads.labels("get").inc()
            log.warning("etcd unreachable: serving cached value of %s", path)
            return None if isinstance(cached, _Absent) else replace(cached, stale=True)
        if not response.kvs:
            self._cache.set(path, _ABSENT)
            return None
        value = _stored(response.kvs[0])
        self._cache.set(path, value)
        return value

    def list_prefix(self, prefix: str) -> list[StoredValue]:
        """Every key under `prefix`, in key order. Served stale from cache like `get`."""
        values, _ = self._list(prefix)
        return values

    def _list(self, prefix: str) -> tuple[list[StoredValue], int]:
        key = prefix.encode()
        end = etcd_utils.prefix_range_end(key)
        try:
            response = self._call("list", lambda c: c.range(key, end), path=prefix)
        except StoreUnavailableError:
            cached = self._cache.get_list(prefix)
            if cached is None:
                raise
            self.metrics.stale_reads.labels("list").inc()
            log.warning("etcd unreachable: serving cached listing of %s", prefix)
            return [replace(v, stale=True) for v in cached], 0
        values = [_stored(kv) for kv in response.kvs]
        self._cache.set_list(prefix, values)
        return values, response.header.revision

    def current_revision(self, key: str = "/") -> int:
        """The cluster's current revision (a linearizable read). `key` is the key read to get
        it: with etcd auth, pick one the user may read."""
        response = self._call(
            "revision", lambda c: c.range(key.encode(), None, count_only=True), path=key
        )
        return int(response.header.revision)

    # --- writes ---------------------------------------------------------------------------------

    def put(self, path: str, value: bytes, *, lease: Lease | int | None = None) -> int:
        """Write `value`; returns the new revision."""
        lease_id = _lease_id(lease)
        response = self._call(
            "put", lambda c: c.put(path, value, lease=lease_id or None), path=path
        )
        revision = int(response.header.revision)
        self._cache.set(path, StoredValue(path, bytes(value), revision, 0, 0, lease_id=lease_id))
        return revision

    def delete(self, path: str) -> bool:
        """Delete one key; True if it existed."""
        deleted = self._call("delete", lambda c: c.delete(path), path=path)
        self._cache.set(path, _ABSENT)
        return bool(deleted)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix`; returns how many."""
        response = self._call("delete_prefix", lambda c: c.delete_prefix(prefix), path=prefix)
        return int(response.deleted)

    def put_if_absent(self, path: str, value: bytes, *, lease: Lease | int | None = None) -> bool:
        """Create `path` only if it does not exist; True if this call created it."""
        result = self._txn(
            "put_if_absent",
            [Compare.absent(path)],
            [PutOp(path, value, _lease_id(lease))],
            [],
            path=path,
        )
        return result.succeeded

    def compare_and_swap(
        self,
        path: str,
        expected_mod_revision: int,
        value: bytes,
        *,
        lease: Lease | int | None = None,
    ) -> int:
        """Write `value` only if the key's mod_revision is still `expected_mod_revision`
        (0 = the key must not exist). Returns the new revision; ConflictError otherwise."""
        result = self._txn(
            "compare_and_swap",
            [Compare.mod_revision_is(path, expected_mod_revision)],
            [PutOp(path, value, _lease_id(lease))],
            [GetOp(path)],
            path=path,
        )
        if not result.succeeded:
            found = result.gets[0][0].mod_revision if result.gets and result.gets[0] else 0
            raise ConflictError(path, expected=expected_mod_revision, found=found)
        return result.revision

    def txn(
        self,
        compares: Iterable[Compare],
        success: Iterable[PutOp | DeleteOp | GetOp],
        failure: Iterable[PutOp | DeleteOp | GetOp] = (),
    ) -> TxnResult:
        """One atomic etcd transaction: if every compare holds run `success`, else `failure`."""
        return self._txn("txn", list(compares), list(success), list(failure))

    def _txn(
        self,
        op: str,
        compares: list[Compare],
        success: list[PutOp | DeleteOp | GetOp],
        failure: list[PutOp | DeleteOp | GetOp],
        *,
        path: str | None = None,
    ) -> TxnResult:
        pb_compares = [_to_compare(c) for c in compares]
        pb_success = [_to_op(o) for o in success]
        pb_failure = [_to_op(o) for o in failure]
        response = self._call(
            op, lambda c: c.run_txn(pb_compares, pb_success, pb_failure), path=path
        )
        gets = tuple(
            tuple(_stored(kv) for kv in r.response_range.kvs)
            for r in response.responses
            if r.WhichOneof("response") == "response_range"
        )
        ran = success if response.succeeded else failure
        revision = int(response.header.revision)
        for o in ran:
            if isinstance(o, PutOp):
                self._cache.set(o.key, StoredValue(o.key, o.value, revision, 0, 0, o.lease_id))
            elif isinstance(o, DeleteOp) and not o.prefix and o.range_end is None:
                self._cache.set(o.key, _ABSENT)
        return TxnResult(succeeded=bool(response.succeeded), revision=revision, gets=gets)

    # --- leases ---------------------------------------------------------------------------------

    def grant_lease(self, ttl: int) -> Lease:
        """A new lease of `ttl` seconds (etcd may round it up to its minimum)."""
        if ttl < 1:
            raise ValueError("lease TTL must be at least 1 second")
        lease = self._call("lease_grant", lambda c: c.lease(int(ttl)))
        return Lease(id=int(lease.id), ttl=int(lease.ttl))

    def refresh_lease(self, lease: Lease | int) -> int:
        """Keep a lease alive once; returns its new TTL, 0 if it has already expired."""
        lease_id = _lease_id(lease)
        responses = self._call("lease_keepalive", lambda c: list(c.refresh_lease(lease_id)))
        return max((int(r.TTL) for r in responses), default=0)

    def revoke_lease(self, lease: Lease | int) -> None:
        """Revoke a lease (deleting its keys). An already expired lease is not an error."""
        lease_id = _lease_id(lease)
        with contextlib.suppress(NotFoundError):
            self._call("lease_revoke", lambda c: c.revoke_lease(lease_id))

    def lease_ttl(self, lease: Lease | int) -> int:
        """Seconds left on a lease, -1 if it does not exist (expired or revoked)."""
        lease_id = _lease_id(lease)
        info = self._call("lease_ttl", lambda c: c.get_lease_info(lease_id))
        return int(info.TTL)

    # --- watches --------------------------------------------------------------------------------

    def watch_prefix(
        self,
        prefix: str,
        callback: Callable[[WatchEvent], None],
        *,
        start_revision: int | None = None,
        on_error: Callable[[StoreError], None] | None = None,
        prev_kv: bool = False,
    ) -> WatchHandle:
        """Call `callback(event)` for every change under `prefix`, in revision order, from
        `start_revision` (default: changes after this call). The callback runs on the watch's
        own thread; exceptions it raises are logged and do not stop the watch. If the stream
        breaks (member down) the watch is re-created on another endpoint from the next revision,
        so no event is lost or repeated; `on_error` hears about each outage once."""
        return self._watch(prefix, True, callback, start_revision, on_error, prev_kv)

    def watch_key(
        self,
        key: str,
        callback: Callable[[WatchEvent], None],
        *,
        start_revision: int | None = None,
        on_error: Callable[[StoreError], None] | None = None,
        prev_kv: bool = False,
    ) -> WatchHandle:
        """Like `watch_prefix`, for exactly one key."""
        return self._watch(key, False, callback, start_revision, on_error, prev_kv)

    def _watch(
        self,
        key: str,
        prefix: bool,
        callback: Callable[[WatchEvent], None],
        start_revision: int | None,
        on_error: Callable[[StoreError], None] | None,
        prev_kv: bool,
    ) -> WatchHandle:
        if start_revision is None:
            start_revision = self.current_revision(key) + 1
        handle = WatchHandle(self, key, prefix, callback, start_revision, on_error, prev_kv)
        with self._watches_lock:
            self._watches.add(handle)
        handle._start()
        return handle

    def _forget(self, handle: WatchHandle) -> None:
        with self._watches_lock:
            self._watches.discard(handle)

    # --- health ---------------------------------------------------------------------------------

    def health(self) -> HealthReport:
        """Ask every endpoint for its status and a linearizable read (what `etcdctl endpoint
        health` does). Never raises for an unreachable member: it is reported unhealthy."""
        client = self._client
        timeout = min(self.settings.timeout_seconds, _HEALTH_TIMEOUT_SECONDS)
        names: dict[int, str] = {}
        cluster_size = len(self.endpoints)
        members: list[MemberHealth] = []
        for label, endpoint in client.endpoints.items():
            channel = endpoint.channel
            md = client.metadata
            try:
                status = etcdrpc.MaintenanceStub(channel).Status(
                    etcdrpc.StatusRequest(), timeout, metadata=md
                )
            except grpc.RpcError as exc:
                members.append(MemberHealth(endpoint=label, healthy=False, error=_details(exc)))
                continue
            if not names:
                try:
                    listing = etcdrpc.ClusterStub(channel).MemberList(
                        etcdrpc.MemberListRequest(), timeout, metadata=md
                    )
                    names = {m.ID: m.name for m in listing.members}
                    cluster_size = len(listing.members) or cluster_size
                except grpc.RpcError:
                    pass
            error: str | None = None
            try:
                etcdrpc.KVStub(channel).Range(
                    etcdrpc.RangeRequest(key=b"health", count_only=True), timeout, metadata=md
                )
                healthy = True
            except grpc.RpcError as exc:
                # A member that answers "permission denied" did the quorum read: healthy.
                healthy = _grpc_code(exc) == grpc.StatusCode.PERMISSION_DENIED
                error = None if healthy else _details(exc)
            member_id = int(status.header.member_id)
            # Older protos (etcd < 3.4) have no `errors` field.
            alarms = [str(e) for e in getattr(status, "errors", ())]
            members.append(
                MemberHealth(
                    endpoint=label,
                    healthy=healthy and not alarms,
                    member_id=member_id,
                    name=names.get(member_id),
                    is_leader=status.leader != 0 and status.leader == member_id,
                    raft_term=int(status.raftTerm),
                    raft_index=int(status.raftIndex),
                    db_size_bytes=int(status.dbSize),
                    version=str(status.version),
                    error=error or ("; ".join(alarms) or None),
                )
            )
        leaders = {m.member_id for m in members if m.healthy and m.is_leader}
        healthy_count = sum(1 for m in members if m.healthy)
        leader_id = next(iter(leaders)) if len(leaders) == 1 else None
        # A linearizable read only succeeds through a quorum, so one healthy member proves it.
        quorum = healthy_count > 0
        return HealthReport(
            members=tuple(members), cluster_size=cluster_size, leader_id=leader_id, quorum=quorum
        )

    def has_quorum(self) -> bool:
        """True if a linearizable read succeeds (with the usual retries). A "permission
        denied" answer counts as success, as in `etcdctl endpoint health`: the member is up
        and answering for the cluster."""
        try:
            self._call(
                "revision",
                lambda c: c.range(b"health", None, count_only=True),
                retry=True,
            )
        except StoreUnavailableError:
            return False
        except StoreAuthError:
            return True
        return True

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop every watch and close the channels. Idempotent."""
        if self._closed:
            return
        with self._watches_lock:
            watches = list(self._watches)
        for handle in watches:
            handle.cancel()
        self._closed = True
        self._client.close()

    def __enter__(self) -> EtcdStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EtcdStore(endpoints={list(self.endpoints)!r})"


def _grpc_code(exc: BaseException) -> grpc.StatusCode | None:
    rpc = _grpc_cause(exc)
    code = getattr(rpc, "code", None)
    try:
        return code() if callable(code) else None
    except Exception:
        return None


def _is_compacted(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, etcd_exc.RevisionCompactedError) or (
        cause is not None and _grpc_code(cause) == grpc.StatusCode.OUT_OF_RANGE
    )


def _lease_id(lease: Lease | int | None) -> int:
    if lease is None:
        return 0
    return lease.id if isinstance(lease, Lease) else int(lease)


# --- watches --------------------------------------------------------------------------------------

_Item = tuple[int, Any]  # (generation, pyetcd WatchResponse | exception | None | _STOP)
_STOP: Final = object()


class WatchHandle:
    """A running watch. Call `cancel()` (or the handle itself) to stop it."""

    def __init__(
        self,
        store: EtcdStore,
        key: str,
        prefix: bool,
        callback: Callable[[WatchEvent], None],
        start_revision: int,
        on_error: Callable[[StoreError], None] | None,
        prev_kv: bool,
    ) -> None:
        self._store = store
        self.key = key
        self._range_end = etcd_utils.prefix_range_end(key.encode()) if prefix else None
        self._callback = callback
        self._on_error = on_error
        self._prev_kv = prev_kv
        self.next_revision = start_revision
        self.restarts = 0
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._generation = 0
        self._watch_id: int | None = None
        self._watcher: Any = None
        self._stopped = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"defender-watch:{key}", daemon=True)

    def _start(self) -> None:
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def cancel(self) -> None:
        """Stop the watch; no callback runs after this returns (unless called from one)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._queue.put((self._generation, _STOP))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        self._store._forget(self)

    __call__ = cancel

    # The thread: (re)establish the watch, then dispatch what pyetcd's watcher thread queued.
    def _run(self) -> None:
        failures = 0
        reported = False
        store = self._store
        while not self._stopped.is_set():
            if self._watch_id is None:
                try:
                    self._establish()
                except StoreError as exc:
                    if _is_compacted(exc):
                        self._resync()
                        continue
                    if not reported and self._on_error is not None:
                        reported = True
                        _safe(self._on_error, exc)
                    delay = backoff_delay(
                        failures,
                        store.settings.backoff_base_seconds,
                        store.settings.backoff_max_seconds,
                        store._rng,
                    )
                    failures += 1
                    log.warning(
                        "watch on %s not established (%s); retry in %.2fs", self.key, exc, delay
                    )
                    self._stopped.wait(delay)
                    continue
                if reported or failures:
                    log.info(
                        "watch on %s re-established at revision %d", self.key, self.next_revision
                    )
                failures = 0
                reported = False
            generation, item = self._queue.get()
            if item is _STOP:
                break
            if generation != self._generation:
                continue  # leftovers of a stream that was already replaced
            if isinstance(item, etcd_exc.RevisionCompactedError):
                self._lost_stream(item)
                self._resync()
                continue
            if item is None or isinstance(item, BaseException):
                self._lost_stream(item)
                continue
            self._dispatch(item)
        self._cancel_server_watch()
        self._connected.clear()

    def _establish(self) -> None:
        self._generation += 1
        generation = self._generation

        def enqueue(response: Any) -> None:
            self._queue.put((generation, response))

        self._watcher, self._watch_id = self._store._call(
            "watch",
            lambda c: c.add_watch(
                self.key,
                enqueue,
                range_end=self._range_end,
                start_revision=self.next_revision,
                prev_kv=self._prev_kv,
            ),
            path=self.key,
            retry=False,
        )
        self._connected.set()

    def _cancel_server_watch(self) -> None:
        # Cancel on the stream the watch was created on: watch ids are per stream, so the same
        # id on a newer stream (after a failover) may belong to another watch.
        watcher, watch_id = self._watcher, self._watch_id
        self._watcher, self._watch_id = None, None
        if watcher is not None and watch_id is not None:
            try:
                watcher.cancel(watch_id)
            except Exception as exc:  # the stream may already be gone: nothing to cancel
                log.debug("watch cancel of %s: %s", self.key, exc)

    def _lost_stream(self, why: Any) -> None:
        self._watcher, self._watch_id = None, None
        self._connected.clear()
        self.restarts += 1
        self._store.metrics.watch_restarts.inc()
        log.info(
            "watch stream on %s ended (%s); resuming from revision %d",
            self.key,
            _details(why) if isinstance(why, BaseException) else "closed",
            self.next_revision,
        )

    def _resync(self) -> None:
        """The revision to resume from was compacted: hand out the current state instead."""
        try:
            if self._range_end is None:
                response = self._store._call(
                    "list", lambda c: c.range(self.key.encode(), None), path=self.key
                )
                values, revision = [_stored(kv) for kv in response.kvs], response.header.revision
            else:
                values, revision = self._store._list(self.key)
        except StoreError as exc:
            log.warning("watch resync of %s failed: %s", self.key, exc)
            self._stopped.wait(self._store.settings.backoff_base_seconds)
            return
        if not revision:
            # Served from the stale cache: no revision to resume from. Try again later.
            self._stopped.wait(self._store.settings.backoff_base_seconds)
            return
        self._watcher, self._watch_id = None, None
        for v in values:
            event = WatchEvent(
                kind="put",
                key=v.key,
                value=v.value,
                mod_revision=v.mod_revision,
                version=v.version,
                lease_id=v.lease_id,
                resync=True,
            )
            _safe(self._callback, event)
        self.next_revision = int(revision) + 1

    def _dispatch(self, response: Any) -> None:
        delivered = False
        for raw in response.events:
            if self._stopped.is_set():
                return
            event = _event(raw)
            if event.mod_revision < self.next_revision:
                continue  # already delivered before the stream was re-created
            self.next_revision = event.mod_revision + 1
            delivered = True
            _safe(self._callback, event)
        if not delivered and not response.events:
            # A progress notification: nothing changed up to the header revision.
            self.next_revision = max(self.next_revision, int(response.header.revision) + 1)


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


def _safe(fn: Callable[[Any], None], arg: Any) -> None:
    try:
        fn(arg)
    except Exception:
        log.exception("watch callback %r failed; the watch goes on", fn)
