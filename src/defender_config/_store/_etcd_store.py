"""EtcdStore: every etcd operation of the library, with retries, failover and metrics."""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pyetcd
from prometheus_client import CollectorRegistry
from pyetcd import etcdrpc
from pyetcd import utils as etcd_utils

from .._errors import (
    ConflictError,
    NotFoundError,
    SettingsError,
    StoreAuthError,
    StoreError,
    StoreNoSpaceError,
    StoreUnavailableError,
)
from .._settings import EtcdSettings
from .._store_types import (
    Compare,
    DeleteOp,
    GetOp,
    HealthReport,
    Lease,
    MemberHealth,
    PutOp,
    SnapshotFile,
    StoredValue,
    StoreMetrics,
    TxnResult,
    WatchEvent,
    backoff_delay,
)
from ._cache import _ABSENT, _Absent, _LastKnownGood
from ._keepalive import KeepAliveMux
from ._keeper import LeaseKeeper, OnLost, OnRenewed
from ._maintenance import (
    alarm_name,
    alarm_request,
    defragment,
    snapshot_hash_ok,
    snapshot_to,
    status_extras,
)
from ._pyetcd import (
    _ENDPOINT_QUARANTINE_SECONDS,
    _GRPC_OPTIONS,
    _HEALTH_TIMEOUT_SECONDS,
    _SharedClient,
    _stored,
    _to_compare,
    _to_op,
    parse_endpoint,
)
from ._rules import ErrorRule, _details, _grpc_code, classify_error
from ._watch import WatchHandle

log = logging.getLogger("defender_config.store")

# A simple token ("<random>.<raft index>", etcd's default; the chart's) is checked by a member
# only once its own raft log has reached the index in the token: until then the call waits, for
# as long as its deadline. A cluster restored from a snapshot starts a new log, far below the
# old one's, so every call carrying a token of the old cluster timed out (keep-alives, watches,
# reads) for minutes, until the new log caught up, instead of being refused and logged in again.
# A call that timed out therefore logs in again first, when the token is a simple one and no
# login happened in the last request timeout (a slow cluster is not asked for a login per call).


def _is_simple_token(token: str) -> bool:
    random_part, dot, index = token.rpartition(".")
    return bool(dot) and "." not in random_part and index.isdigit()


# A snapshot streams the whole database, a defrag rewrites it: both outlast a KV call's timeout.
_SNAPSHOT_TIMEOUT_SECONDS = 300.0
_DEFRAG_TIMEOUT_SECONDS = 120.0

T = TypeVar("T")


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
        defer_login: bool = True,
    ) -> None:
        """With `settings.user`, log in now. An etcd that does not answer is a warning and a
        login at the first call (a process may start before its etcd), unless `defer_login`
        is False: then StoreUnavailableError, for a one-shot command that would otherwise
        wait out the retries twice and report the same failure twice. Wrong credentials are
        StoreAuthError either way."""
        self.settings = settings
        self.metrics = StoreMetrics(registry)
        self._rng = rng or random.Random()
        self._cache = _LastKnownGood(cache_entries)
        self._closed = False
        self._watches: set[WatchHandle] = set()
        self._watches_lock = threading.Lock()
        self._auth_lock = threading.Lock()
        # Bumped by every login (under `_auth_lock`): a call that failed with an older token
        # than the current one just tries again, without logging in once more.
        self._token_generation = 0
        self._token_simple = False
        self._login_at = float("-inf")  # monotonic time of the last login attempt
        self.endpoints: tuple[str, ...] = tuple(settings.endpoints)
        # The cluster id in etcd's response headers, and how often it changed under this store.
        # A restore from a snapshot makes a new cluster (a new token, new member ids): readers
        # that remember versions per cluster (`ConfigStore`'s replay guard) start over then.
        self._cluster_id = 0
        self.cluster_changes = 0
        self._cluster_lock = threading.Lock()
        self._client = self._build_client()
        self._keepalive = KeepAliveMux()
        self._keeper = LeaseKeeper(self._keepalive, lambda: self._client, self.metrics)
        self._token_ready = settings.user is None
        if settings.user is not None:
            try:
                self._authenticate()
            except StoreUnavailableError as exc:
                if not defer_login:
                    self.close()
                    raise
                # Start anyway, like without auth: the first call logs in once etcd answers.
                # Wrong credentials (StoreAuthError) still fail here, at start-up.
                log.warning("etcd login deferred: %s", exc)
            except BaseException:
                # The caller never gets this store to close: its channels would stay open.
                self.close()
                raise

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

        self._login_at = time.monotonic()
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
            # Streams carry the token they were opened with: reopen them. The watch stream's
            # call is cancelled (`_Watcher.close`), so its watches resume on a stream of the
            # new token; a half-closed one stayed open on etcd, where no cancel could reach.
            self._client._clear_old_stubs()
        self._token_simple = _is_simple_token(str(response.token))
        self._token_generation += 1
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
        stats = self.metrics.for_op(op)
        stats.start()
        started = time.perf_counter()
        attempt = 0
        renewed = False
        try:
            while True:
                token = self._token_generation
                try:
                    result = fn(self._client)
                    header = getattr(result, "header", None)
                    if header is not None:
                        self.observe_cluster(header.cluster_id)
                    return result
                except Exception as exc:
                    rule = classify_error(exc)
                    if rule is None:
                        raise
                    if (
                        renew_auth
                        and not renewed
                        and self.settings.user is not None
                        and rule.reason in ("unauthenticated", "deadline_exceeded")
                        and self._login_again(rule, token)
                    ):
                        renewed = True
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
            stats.finish(time.perf_counter() - started)

    def _login_again(self, rule: ErrorRule, token: int) -> bool:
        """After a call failed with token generation `token`: whether to try it again with a
        new login. Refused: simple tokens expire (5 min by default), log in again. Timed out:
        a simple token of a cluster since restored makes every call wait out its deadline (see
        `_is_simple_token`), log in again unless a login was tried within the request timeout.
        Either way, a token already replaced by another thread is simply tried."""
        with self._auth_lock:
            if self._token_generation != token:
                relogged = True
            elif rule.reason == "unauthenticated":
                self._authenticate()
                relogged = True
            elif (
                not self._token_simple
                or time.monotonic() - self._login_at < self.settings.timeout_seconds
            ):
                return False
            else:
                try:
                    self._authenticate()
                except StoreUnavailableError as exc:
                    # No member answers a login either: an outage, not an old token.
                    log.debug("etcd login after a timeout failed: %s", exc)
                    return False
                log.info(
                    "etcd call timed out: logged in again (a token of a cluster since restored"
                    " waits out every deadline)",
                    extra={"event": "etcd_relogin_after_timeout"},
                )
                relogged = True
        return relogged

    @property
    def cluster_id(self) -> int | None:
        """The cluster id of the last response (None before any): only the members set it, so
        etcd write access cannot make a store see another cluster (the operator records it
        next to a component's registration to tell a restored snapshot from a replay)."""
        return self._cluster_id or None

    def observe_cluster(self, cluster_id: int) -> None:
        """Note the cluster id of a response; a different one than before counts as a change.
        Only the members can set it: write access to etcd cannot fake one."""
        if not cluster_id or cluster_id == self._cluster_id:
            return
        with self._cluster_lock:
            if cluster_id == self._cluster_id:
                return
            if self._cluster_id:
                self.cluster_changes += 1
                log.warning(
                    "etcd answers as another cluster (id %x, was %x): restored from a snapshot?"
                    " versions remembered from the old one are forgotten",
                    cluster_id,
                    self._cluster_id,
                    extra={"event": "etcd_cluster_changed"},
                )
            self._cluster_id = cluster_id

    def _typed(self, rule: ErrorRule, exc: BaseException, path: str | None, n: int) -> StoreError:
        detail = f"{rule.hint} ({_details(exc)})"
        if rule.kind == "unavailable":
            return StoreUnavailableError(self.endpoints, detail, attempts=n, path=path)
        if rule.kind == "auth":
            return StoreAuthError(
                detail, path=path, credentials_refused=rule.reason != "permission_denied"
            )
        if rule.kind == "not_found":
            return NotFoundError(path or "?", detail=detail)
        if rule.kind == "nospace":
            return StoreNoSpaceError(detail, path=path)
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
        kvs = response.kvs
        if not kvs:
            self._cache.set(path, _ABSENT)
            return None
        kv = kvs[0]
        # The key read is `path` itself: no need to decode it back from the response.
        value = StoredValue(
            path, kv.value, kv.mod_revision, kv.create_revision, kv.version, kv.lease
        )
        self._cache.set(path, value)
        return value

    def list_prefix(self, prefix: str, *, stale_ok: bool = True) -> list[StoredValue]:
        """Every key under `prefix`, in key order. Served stale from cache like `get`, unless
        `stale_ok` is False (StoreUnavailableError instead): for a reader that would take a
        listing from before an outage for the state after it."""
        values, _ = self._list(prefix, stale_ok=stale_ok)
        return values

    def _list(self, prefix: str, *, stale_ok: bool = True) -> tuple[list[StoredValue], int]:
        key = prefix.encode()
        end = etcd_utils.prefix_range_end(key)
        try:
            response = self._call("list", lambda c: c.range(key, end), path=prefix)
        except StoreUnavailableError:
            cached = self._cache.get_list(prefix)
            if cached is None or not stale_ok:
                raise
            self.metrics.stale_reads.labels("list").inc()
            log.warning("etcd unreachable: serving cached listing of %s", prefix)
            return [replace(v, stale=True) for v in cached], 0
        values = [_stored(kv) for kv in response.kvs]
        self._cache.set_list(prefix, values)
        return values, response.header.revision

    def count_prefix(self, prefix: str) -> int:
        """How many keys are under `prefix` (etcd counts; no value crosses the network). Not
        served from cache: StoreUnavailableError when etcd is unreachable."""
        key = prefix.encode()
        end = etcd_utils.prefix_range_end(key)
        response = self._call("count", lambda c: c.range(key, end, count_only=True), path=prefix)
        return int(response.count)

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
        key = path.encode()
        response = self._call("put", lambda c: c.put_value(key, value, lease_id), path=path)
        revision = int(response.header.revision)
        self._cache.set(path, StoredValue(path, bytes(value), revision, 0, 0, lease_id))
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
        """Keep a lease alive once; returns its new TTL, 0 if it has already expired.

        All keep-alives of this store share one LeaseKeepAlive stream (see `_keepalive`); a
        broken stream is retried like any call, on a new stream to the endpoint chosen then."""
        lease_id = _lease_id(lease)
        return self._call("lease_keepalive", lambda c: self._keepalive.refresh(c, lease_id))

    def keep_lease(
        self,
        lease: Lease | int,
        interval: float,
        *,
        on_renewed: OnRenewed,
        on_lost: OnLost,
    ) -> None:
        """Renew `lease` every `interval` seconds from this store's one keeper thread, on the
        shared keep-alive stream, until `stop_keeping` (see `_keeper`). The caller's thread is
        free meanwhile: `on_renewed(ttl)` is called for each answer (on the stream's reader
        thread: be quick), `on_lost(why)` once if the keeper gives the lease back (expired,
        stream failed or timed out, store closed); the caller then renews it on its own.
        StoreError if the store is closed."""
        self._keeper.keep(_lease_id(lease), interval, on_renewed, on_lost)

    def stop_keeping(self, lease: Lease | int) -> bool:
        """Stop renewing a lease given to `keep_lease`; False if it was not kept (or already
        handed back). No callback of it runs after this returns, except one already running."""
        return self._keeper.release(_lease_id(lease))

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
        progress_seconds: float | None = None,
        stall_seconds: float | None = None,
    ) -> WatchHandle:
        """Call `callback(event)` for every change under `prefix`, in revision order, from
        `start_revision` (default: changes after this call). The callback runs on the watch's
        own thread; exceptions it raises are logged and do not stop the watch. If the stream
        breaks (member down) the watch is re-created on another endpoint from the next revision,
        so no event is lost or repeated; `on_error` hears about each outage once. With
        `progress_seconds`, the watch asks etcd for a progress answer whenever nothing came for
        that long, so `WatchHandle.silent_seconds` tells a stalled stream from an idle one, and
        a stream silent for more than `stall_seconds` (default: 3 x `progress_seconds`) is
        given up and the watch re-created on another endpoint as after a broken one (a warning,
        `defender_etcd_watch_stalls_total`). Without `progress_seconds`, `stall_seconds` is
        ignored: silence then is no sign of a stall."""
        return self._watch(
            prefix,
            True,
            callback,
            start_revision,
            on_error,
            prev_kv,
            progress_seconds,
            stall_seconds,
        )

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
        progress_seconds: float | None = None,
        stall_seconds: float | None = None,
    ) -> WatchHandle:
        if start_revision is None:
            start_revision = self.current_revision(key) + 1
        handle = WatchHandle(
            self,
            key,
            prefix,
            callback,
            start_revision,
            on_error,
            prev_kv,
            progress_seconds,
            stall_seconds,
        )
        with self._watches_lock:
            self._watches.add(handle)
        handle._start()
        return handle

    def _forget(self, handle: WatchHandle) -> None:
        with self._watches_lock:
            self._watches.discard(handle)

    def _drop_stream(self, watcher: Any) -> bool:
        """Give up the watch stream `watcher` (it stalled): see `_SharedClient.drop_stream`."""
        return self._client.drop_stream(watcher)

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
            # Our stubs predate `errors` (the member's alarms) and its neighbours: read them from
            # the wire bytes the member sent.
            extras = status_extras(status.SerializeToString())
            # Each member lists the alarms of every member: one name each is enough here.
            alarms = list(dict.fromkeys(extras.alarms))
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
                    db_size_in_use_bytes=extras.db_size_in_use_bytes,
                    db_size_quota_bytes=extras.db_size_quota_bytes,
                    revision=int(status.header.revision),
                    is_learner=extras.is_learner,
                    alarms=tuple(alarms),
                    serving=healthy,
                )
            )
        # An alarm (NOSPACE) makes a member unhealthy but it still serves reads through the
        # quorum: the cluster keeps its leader and quorum, it refuses writes.
        leaders = {m.member_id for m in members if m.serving and m.is_leader}
        leader_id = next(iter(leaders)) if len(leaders) == 1 else None
        # A linearizable read only succeeds through a quorum, so one serving member proves it.
        quorum = any(m.serving for m in members)
        return HealthReport(
            members=tuple(members), cluster_size=cluster_size, leader_id=leader_id, quorum=quorum
        )

    # --- maintenance (one chosen member) --------------------------------------------------------

    def _member_channel(self, endpoint: str) -> Any:
        """The channel of the member `endpoint` names: a label as `health()` reports it
        (host:port) or a URL from the settings."""
        label = endpoint
        if "://" in endpoint or endpoint not in self._client.endpoints:
            host, port, _ = parse_endpoint(endpoint)
            label = f"{host}:{port}"
        found = self._client.endpoints.get(label)
        if found is None:
            raise SettingsError(
                f"{endpoint!r} is not one of this store's endpoints"
                f" ({', '.join(self._client.endpoints)})"
            )
        return found.channel

    def _maintenance(
        self, op: str, endpoint: str, fn: Callable[[Any, Any], T], *, retry: bool = True
    ) -> T:
        """One call to one member, never failed over elsewhere (the caller chose the member);
        retried on transient failures against that same member unless `retry` is False."""
        channel = self._member_channel(endpoint)

        def call(c: _SharedClient) -> T:
            return fn(channel, c.metadata)

        return self._call(op, call, path=endpoint, retry=retry)

    def snapshot(self, endpoint: str, dest: str) -> SnapshotFile:
        """Stream a snapshot of member `endpoint` into the file `dest` (never left partial) and
        check the SHA-256 etcd appends to it. Sealed values stay sealed: a snapshot holds the
        stored bytes, never a key."""
        path = Path(dest)
        timeout = max(self.settings.timeout_seconds, _SNAPSHOT_TIMEOUT_SECONDS)

        def take(channel: Any, md: Any) -> tuple[int, int]:
            # etcd leaves the stream's header empty: the member's revision just before the
            # stream starts is what the snapshot holds at least.
            before = etcdrpc.MaintenanceStub(channel).Status(
                etcdrpc.StatusRequest(), self.settings.timeout_seconds, metadata=md
            )
            size, revision = snapshot_to(channel, md, timeout, path)
            return size, revision or int(before.header.revision)

        size, revision = self._maintenance("snapshot", endpoint, take)
        return SnapshotFile(
            path=str(path),
            size_bytes=size,
            revision=revision,
            member=endpoint,
            hash_ok=snapshot_hash_ok(path),
        )

    def defragment(self, endpoint: str) -> None:
        """Defragment member `endpoint` (it blocks that member's reads and writes meanwhile:
        run it on one member at a time; `defender_config.defragment_cluster` does)."""
        timeout = max(self.settings.timeout_seconds, _DEFRAG_TIMEOUT_SECONDS)
        self._maintenance("defragment", endpoint, lambda ch, md: defragment(ch, md, timeout))

    def compact(self, revision: int) -> None:
        """Drop every key revision older than `revision` (physical: wait until it is done)."""
        request = etcdrpc.CompactionRequest(revision=revision, physical=True)

        def call(c: _SharedClient) -> Any:
            try:
                return c.kvstub.Compact(request, c.timeout, metadata=c.metadata)
            except grpc.RpcError as exc:
                c._manage_grpc_errors(exc)
                raise

        self._call("compact", call)

    def wait_compacted(self, endpoint: str, revision: int, timeout: float) -> None:
        """Return once member `endpoint` has physically applied every compaction up to
        `revision` that the cluster committed before this call.

        `compact` waits for the member that served it only; the others apply the compaction
        from the raft log whenever they get to it, and delete the old revisions afterwards in a
        background job. etcd answers a compaction to an already compacted revision with
        "compacted" only after that member's earlier compaction jobs are done (the request goes
        through the log after them and waits in the same queue), so this asks that member for
        one. Where nothing was compacted to `revision` yet, this compacts to it. Raises
        StoreUnavailableError when the member does not answer within `timeout`; never retried
        (the caller bounds the whole wait, `timeout` per call times the retries would not)."""
        request = etcdrpc.CompactionRequest(revision=revision, physical=True)

        def call(channel: Any, md: Any) -> None:
            try:
                etcdrpc.KVStub(channel).Compact(request, timeout, metadata=md)
            except grpc.RpcError as exc:
                if _grpc_code(exc) != grpc.StatusCode.OUT_OF_RANGE:
                    raise

        self._maintenance("wait_compacted", endpoint, call, retry=False)

    def alarms(self) -> list[tuple[int, str]]:
        """Every active alarm as (member id, alarm name), e.g. (0x8e9e..., "NOSPACE")."""

        def call(c: _SharedClient) -> Any:
            try:
                return c.maintenancestub.Alarm(alarm_request("GET"), c.timeout, metadata=c.metadata)
            except grpc.RpcError as exc:
                c._manage_grpc_errors(exc)
                raise

        response = self._call("alarms", call)
        return [(int(a.memberID), alarm_name(a.alarm)) for a in response.alarms]

    def disarm_alarm(self, member_id: int, alarm: str) -> None:
        """Clear one alarm (etcd raises NOSPACE again at once if the member is still over)."""

        def call(c: _SharedClient) -> Any:
            try:
                return c.maintenancestub.Alarm(
                    alarm_request("DEACTIVATE", member_id, alarm), c.timeout, metadata=c.metadata
                )
            except grpc.RpcError as exc:
                c._manage_grpc_errors(exc)
                raise

        self._call("disarm_alarm", call)

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
        """Stop every watch and the keep-alive stream, close the channels. Idempotent."""
        if self._closed:
            return
        with self._watches_lock:
            watches = list(self._watches)
        for handle in watches:
            handle.cancel()
        self._closed = True
        # Kept leases go back to their owners first, which then find the store closed.
        self._keeper.close()
        self._keepalive.close()
        self._client.close()

    def __enter__(self) -> EtcdStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EtcdStore(endpoints={list(self.endpoints)!r})"


def _lease_id(lease: Lease | int | None) -> int:
    if lease is None:
        return 0
    return lease.id if isinstance(lease, Lease) else int(lease)
