"""Component registry: registration (MASTER create-only), status, lease-bound heartbeats.

A heartbeat is `components/<name>/instances/<instance>`, a plaintext JSON record put with a lease
of TTL = interval * allowed misses and kept alive by a background thread. When an instance dies
its lease expires and etcd deletes the key: watchers see a delete event, nobody polls.

A beat in steady state is one lease keep-alive: that is what proves the instance alive. The
record is written only when its content changes (status, config version/digest, key
fingerprints, codec, error, cadence) or the key moves to a new lease; its `time` is when it was
written. How long ago an instance last beat is read from its lease (`Registry.last_seen`).

Steady keep-alives are sent by the store's one keeper thread for every heartbeater of the
process (`EtcdStore.keep_lease`): a heartbeater's own thread sleeps until something needs it (a
record change, a cadence push, a lease the keeper gave back, stop), so a steady beat wakes no
thread of its own. At a hundred heartbeaters per process those wake-ups cost more CPU than the
keep-alive itself.

With a keyring the record is signed like the other control records (`_records`), over its etcd
path and the lease it is bound to (the `lease` field, hex): write access to etcd alone can
neither forge an instance's record nor put back one from another of its leases. A reader with a
keyring marks each record it reads `verified` or not (`Heartbeat.verified`, and why not); the
operator acts only on verified ones.

The interval and misses come from the component's published cadence (`_cadence`, written by the
operator from `spec.heartbeat`), pushed to the heartbeaters by one watch per component per client
(`_cadence_feed`); the instance's own setting is only the fallback while no readable cadence is
published.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from ._cadence import MIN_ALLOWED_MISSES, Cadence, lease_ttl, read_cadence
from ._cadence_feed import cadence_feed
from ._client import DefenderClient
from ._configs import (
    ActiveConfig,
    ConfigMetadata,
    ConfigStore,
    SeedResult,
    _first_error,
    _parse_metadata,
)
from ._errors import (
    DefenderConfigError,
    KeyringError,
    NotFoundError,
    RecordAuthError,
    SettingsError,
    StoreError,
)
from ._instance_guard import instance_guard, overwritten
from ._keyring import Keyring
from ._models import ComponentType
from ._records import verify_record, without_auth
from ._store import WatchHandle
from ._store_types import Lease, WatchEvent, backoff_delay

__all__ = [
    "ComponentStatus",
    "ComponentSummary",
    "ErrorInfo",
    "Heartbeat",
    "HeartbeatGate",
    "Heartbeater",
    "InstanceEvent",
    "Registration",
    "Registry",
    "StatusRecord",
]

log = logging.getLogger("defender_config.registry")


def _now() -> datetime:
    return datetime.now(UTC)


class ComponentStatus(enum.StrEnum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"


class ErrorInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    reason: str
    detail: str = Field(max_length=2000)


class Heartbeat(BaseModel):
    """The instance record (CONTRACT.md). Plaintext: it holds fingerprints, never keys."""

    model_config = ConfigDict(extra="allow")

    component: str
    instance: str
    pod: str | None = None
    node_id: str | None = None
    status: ComponentStatus
    time: datetime
    config_version: int | None = None
    config_digest: str | None = None
    key_fingerprint: str | None = None
    key_fingerprints: list[str] = Field(default_factory=list)
    codec: str | None = None
    last_error: ErrorInfo | None = None
    capabilities: list[str] = Field(default_factory=list)
    software_version: str | None = None
    lease_ttl_seconds: int | None = None
    interval_seconds: float | None = None
    # The lease the writer bound the record to (hex), covered by the MAC: a record put back
    # under another lease does not verify.
    lease: str | None = None
    # Who wrote it (random per heartbeater) and its count of its writes, covered by the MAC:
    # of two records of one writer the lower count was put back, whatever the clocks say.
    writer: str | None = None
    seq: int | None = None

    # The lease the key is bound to, as read from etcd (not part of the stored JSON).
    _lease_id: int = PrivateAttr(default=0)
    # Whether the reader checked the record's MAC and lease (False without a keyring).
    _verified: bool = PrivateAttr(default=False)
    _unverified: str | None = PrivateAttr(default=None)

    @property
    def lease_id(self) -> int:
        return self._lease_id

    @property
    def verified(self) -> bool:
        """True when the reader holds a keyring and the record's MAC verifies over its etcd path
        and the lease etcd binds the key to: a key holder wrote it for this key and lease."""
        return self._verified

    @property
    def unverified(self) -> str | None:
        """Why a reader with a keyring did not verify the record (None: verified, or the
        reader holds no keyring). Names what is wrong, never key bytes."""
        return self._unverified


class StatusRecord(BaseModel):
    """`components/<name>/status`: the latest status any instance reported."""

    model_config = ConfigDict(extra="allow")

    status: ComponentStatus
    time: datetime
    instance: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class InstanceEvent:
    """An instance key changed. `kind="delete"` with heartbeat None: the instance stopped or
    its lease expired (it missed `allowed_misses` heartbeats)."""

    kind: Literal["put", "delete"]
    component: str
    instance: str
    heartbeat: Heartbeat | None
    revision: int


@dataclass(frozen=True, slots=True)
class ComponentSummary:
    name: str
    type: str | None
    status: ComponentStatus | None
    active_version: int | None
    last_modified: datetime | None
    modified_by: str | None
    instances: tuple[Heartbeat, ...] = field(default=())
    # `config_digest` of ACTIVE (the metadata's): an instance reporting it runs ACTIVE even
    # with an older version number (a new version of the same config is not delivered again).
    active_digest: str | None = None


# What a gate says when the instance must not renew its lease: the reason shown as last_error.
HeartbeatGate = Callable[[], ErrorInfo | None]


class Heartbeater:
    """Keeps one instance key alive. Thread-safe; `update()` changes the record's mutable fields
    (config version/digest, key fingerprints, codec, last_error) and pushes them at once.

    A beat is one lease keep-alive; the record is put only when its content (anything but
    `time`) differs from what was last written, or on a new lease. Transient etcd errors are
    logged and retried sooner than the interval; if the lease expired meanwhile (etcd was
    unreachable for longer than the TTL) a new lease is granted and the key written again.

    With `follow_cadence` (the default) the component's published cadence is read at start and
    then pushed by the client's cadence watch; a change wakes the loop: the next wait uses its
    interval, and a new TTL takes a new lease at once (one extra beat moves the key to it and
    revokes the old lease). `interval_seconds`/`allowed_misses` are the fallback while none is
    published or it is unreadable.

    `gate` is asked before every renewal after the first: while it returns an error the lease
    is not renewed (it expires after its TTL and whoever watches the instance acts), and the
    record says why in `last_error`, written once without renewing.

    Steady beats without a gate are sent by the store's keeper thread (one per store, on a
    shared tick: a beat is at most half a tick off its grid, at most an eighth of the interval
    and never more than 125 ms, unless the process is starved); this thread wakes only for a
    change, a cadence push, stop, or a lease the keeper gave back (expired: regranted and
    rewritten; the stream failed or timed out: renewed here through the store's retries,
    counted in `failures` and retried with backoff if that fails too). A heartbeater with a
    gate renews from its own thread, one wake-up per beat: the gate is the caller's code (the
    agent's runs a health check), and asking it on the keeper's thread would let one slow gate
    delay every other instance's renewals.
    """

    _MUTABLE = frozenset(
        {
            "config_version",
            "config_digest",
            "key_fingerprint",
            "key_fingerprints",
            "codec",
            "last_error",
            "pod",
            "node_id",
            "capabilities",
            "software_version",
        }
    )

    def __init__(
        self,
        client: DefenderClient,
        component: str,
        instance: str,
        *,
        interval_seconds: float | None = None,
        allowed_misses: int | None = None,
        follow_cadence: bool = True,
        gate: HeartbeatGate | None = None,
        **fields: Any,
    ) -> None:
        s = client.settings
        if allowed_misses is not None and allowed_misses < MIN_ALLOWED_MISSES:
            raise SettingsError(
                f"heartbeat allowed_misses is {allowed_misses}; at least {MIN_ALLOWED_MISSES}: a"
                " lease of one interval expires whenever a beat is late at all"
            )
        self.client = client
        self.component = component
        self.instance = instance
        self.local_interval = interval_seconds or s.heartbeat_interval_seconds
        self.local_misses = allowed_misses or s.heartbeat_allowed_misses
        self.interval = self.local_interval
        self.ttl = lease_ttl(self.interval, self.local_misses)
        self.follow_cadence = follow_cadence
        # The published cadence in use; None while the local setting is.
        self.cadence: Cadence | None = None
        self._gate = gate
        self._held: ErrorInfo | None = None
        self.key = client.layout.instance(component, instance)
        unknown = set(fields) - self._MUTABLE
        if unknown:
            raise TypeError(f"unknown heartbeat fields: {sorted(unknown)}")
        self._lock = threading.Lock()
        self._codec: str | None = str(fields["codec"]) if fields.get("codec") else None
        self._record = Heartbeat(
            component=component,
            instance=instance,
            status=ComponentStatus.STARTING,
            time=_now(),
            lease_ttl_seconds=self.ttl,
            interval_seconds=self.interval,
            **{**self._key_fields(), **fields},
        )
        self._lease: Lease | None = None
        # The TTL the current lease was granted for (etcd may round the granted one up).
        self._lease_ttl = self.ttl
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        # The record's content (without `time`) as last put; None: nothing written yet.
        self._written: dict[str, Any] | None = None
        # Records written by this heartbeater (each carries its number: `Heartbeat.seq`) and
        # who it is (`Heartbeat.writer`: a new one per heartbeater, so its numbers are ordered).
        self._seq = 0
        self._writer = secrets.token_hex(8)
        # The record object `_written` was last compared with and found equal (records are
        # immutable and replaced on every change, so the same object needs no new compare).
        self._same_as_written: Heartbeat | None = None
        # A cadence pushed by the feed, applied by the beat thread: (cadence,) or None.
        self._pushed: tuple[Cadence | None] | None = None
        self._feed_token: int | None = None
        # Someone else's writes to this key (`_instance_guard`): the revision of this
        # heartbeater's last acknowledged put, the bytes of the put under way, whether a change
        # not its own came since (the next beat writes again), and whether it is watched.
        self._written_revision = 0
        self._written_cluster = client.store.cluster_changes
        self._in_flight: bytes | None = None
        self._overwritten = False
        self._guarded = False
        # The lease the store's keeper renews for this heartbeater (None: this thread renews).
        self._kept: Lease | None = None
        self.beats = 0
        self.writes = 0
        self.failures = 0
        self.regrants = 0
        self.held_beats = 0
        self.overwrites = 0

    def _key_fields(self) -> dict[str, Any]:
        # A codec the component reported (how its ACTIVE is really stored) wins over the
        # store-wide default, also after a key rotation re-reads the other fields.
        codec = self._codec or self.client.envelope.codec_label()
        keyring = self.client.envelope.keyring()
        if keyring is None:
            return {"codec": codec}
        return {
            "key_fingerprint": keyring.primary_fingerprint,
            "key_fingerprints": sorted(keyring.fingerprint(k) for k in keyring.key_ids),
            "codec": codec,
        }

    @property
    def record(self) -> Heartbeat:
        with self._lock:
            return self._record

    @property
    def lease(self) -> Lease | None:
        return self._lease

    @property
    def held(self) -> ErrorInfo | None:
        """Why renewals are held back now (the gate's last answer), None while they go on."""
        return self._held

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Heartbeater:
        """Grant the lease and write the record now (raises if etcd is unreachable), then keep
        it alive in the background."""
        self._beat(initial=True)
        self._thread = threading.Thread(
            target=self._run,
            name=f"defender-heartbeat:{self.component}/{self.instance}",
            daemon=True,
        )
        self._thread.start()
        return self

    def update(self, **fields: Any) -> None:
        """Change mutable record fields; pushed to etcd right away by the background thread."""
        unknown = set(fields) - self._MUTABLE
        if unknown:
            raise TypeError(f"unknown heartbeat fields: {sorted(unknown)}")
        if fields.get("codec"):
            self._codec = str(fields["codec"])
        if isinstance(fields.get("last_error"), DefenderConfigError):
            err = fields["last_error"]
            fields["last_error"] = ErrorInfo(reason=err.reason, detail=str(err)[:2000])
        with self._lock:
            before, self._record = self._record, self._record.model_copy(update=fields)
            same = _content(self._record) == _content(before)
        if not same:
            # An update that changes nothing is no news: waking the thread would cost a lease
            # renewal (an etcd request) for each, and a caller may repeat one often (the agent
            # reports the same error at every check).
            self._wake.set()

    def refresh_key_fields(self) -> None:
        """Re-read fingerprints and codec from the client's keyring (after a rotation)."""
        self.update(**self._key_fields())

    def set_status(self, status: ComponentStatus | str, detail: str | None = None) -> None:
        """Set this instance's status and the component's status key."""
        st = ComponentStatus(status)
        with self._lock:
            self._record = self._record.model_copy(update={"status": st})
        record = StatusRecord(status=st, time=_now(), instance=self.instance, detail=detail)
        self.client.put_json(
            self.client.layout.status(self.component), record.model_dump(mode="json")
        )
        self._wake.set()

    def stop(self, *, status: ComponentStatus = ComponentStatus.STOPPED) -> None:
        """Mark STOPPED (component status key), stop the thread, revoke the lease (etcd deletes
        the instance key at once). Idempotent; etcd errors are logged, not raised: the lease
        expires on its own anyway."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        # Off the keeper before anything else, so no keep-alive of it races the revoke below.
        self._take_back()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.client.settings.etcd.timeout_seconds * 2 + 5)
        self._take_back()  # in case the thread handed it over again before it saw the stop
        if self._feed_token is not None:
            cadence_feed(self.client).unsubscribe(self.component, self._feed_token)
            self._feed_token = None
        if self._guarded:
            instance_guard(self.client).unsubscribe(self.component, self.key)
            self._guarded = False
        with self._lock:
            self._record = self._record.model_copy(update={"status": ComponentStatus(status)})
        lease = self._lease
        own_key_gone = lease is None
        if lease is not None:
            try:
                self.client.store.revoke_lease(lease)
                own_key_gone = True
            except StoreError as exc:
                log.warning(
                    "heartbeat %s: lease revoke failed (expires in %ss): %s",
                    self.key,
                    self.ttl,
                    exc,
                )
        self._lease = None
        # The component's status key speaks for every instance: one replica stopping must not
        # mark a component STOPPED while its other replicas still heartbeat.
        try:
            instances = self.client.layout.instances_dir(self.component)
            if own_key_gone:
                # Any key left is another instance. A count, not a listing: a thousand
                # replicas stopping at once must not cost a thousand listings of a thousand.
                others = self.client.store.count_prefix(instances)
            else:
                others = sum(
                    1 for sv in self.client.store.list_prefix(instances) if sv.key != self.key
                )
            if not others:
                self.set_status(status)
        except StoreError as exc:
            log.warning("heartbeat %s: could not write %s: %s", self.key, status, exc)

    # --- the loop -------------------------------------------------------------------------------

    def _adopt(self, published: Cadence | None) -> None:
        """Follow the published cadence (None: the local setting) from the next wait on; a new
        TTL wakes the loop for a beat at once, which moves the key to a lease of that TTL."""
        if published is not None:
            interval, misses = published.interval_seconds, published.allowed_misses
        else:
            interval, misses = self.local_interval, self.local_misses
        if published != self.cadence:
            self.cadence = published
        ttl = lease_ttl(interval, misses)
        if (interval, ttl) == (self.interval, self.ttl):
            return
        log.info(
            "heartbeat %s: cadence %ss x %s (lease %ss) from the %s",
            self.key,
            interval,
            misses,
            ttl,
            "published cadence" if published is not None else "local setting",
        )
        self.interval, self.ttl = interval, ttl
        with self._lock:
            self._record = self._record.model_copy(
                update={"interval_seconds": interval, "lease_ttl_seconds": ttl}
            )
        if self._lease is not None and self._lease_ttl != ttl:
            # Beat again at once, on a lease of the new TTL: waiting a longer new interval
            # under the old, shorter lease would let the key expire.
            self._wake.set()

    def _pushed_cadence(self, published: Cadence | None) -> None:
        """From the cadence watch's thread: hand the change to the beat thread."""
        with self._lock:
            self._pushed = (published,)
        self._wake.set()

    def _on_own_key(self, event: WatchEvent) -> None:
        """From the guard's watch thread: a change of this heartbeater's key. One that is not
        its own (a record put back or forged, the key deleted) wakes the beat thread to write
        the record again, so what readers see is this heartbeater's newest word."""
        with self._lock:
            if not overwritten(
                event, self._written_revision, self._in_flight, self._stopped.is_set()
            ):
                return
            self._overwritten = True
            self.overwrites += 1
            count = self.overwrites
        if count == 1 or count % 100 == 0:
            log.warning(
                "heartbeat %s: %s by someone else at revision %s (%s time(s)); written again",
                self.key,
                "deleted" if event.kind == "delete" else "written",
                event.mod_revision,
                count,
            )
        self._wake.set()

    def _hold(self, reason: ErrorInfo) -> None:
        """The gate failed: say why in the record, but do not renew the lease."""
        self.held_beats += 1
        first = self._held != reason or self._overwritten
        self._held = reason
        lease = self._lease
        if not first or lease is None:
            return
        with self._lock:
            held = self._record.model_copy(update={"last_error": reason, "time": _now()})
        # A put does not extend the lease: the key still expires on time. A lease already
        # expired means the key is gone, which says enough.
        with contextlib.suppress(NotFoundError):
            self._write(held, lease)

    def _changed(self, record: Heartbeat) -> bool:
        """Whether `record` says something the last put did not (its time aside). A steady
        beat compares nothing: the record is the very object last found equal."""
        if record is self._same_as_written:
            return False
        if self._written != _content(record):
            return True
        self._same_as_written = record
        return False

    def _write(self, record: Heartbeat, lease: Lease) -> None:
        self._seq += 1
        bound = record.model_dump(mode="json")
        bound["lease"] = f"{lease.id:x}"
        bound["writer"] = self._writer
        bound["seq"] = self._seq
        blob = self.client.encode_record(self.key, bound)
        with self._lock:
            # What came before this put is answered by it; what comes after is not.
            self._overwritten = False
            self._in_flight = blob
        revision = 0
        try:
            revision = self.client.store.put(self.key, blob, lease=lease)
        finally:
            with self._lock:
                changes = self.client.store.cluster_changes
                if changes != self._written_cluster:
                    # A restored cluster numbers its revisions anew: the old mark means nothing.
                    self._written_cluster = changes
                    self._written_revision = revision
                else:
                    self._written_revision = max(self._written_revision, revision)
                self._in_flight = None
        self._written = _content(record)
        self._same_as_written = record
        self.writes += 1

    def _beat(self, *, initial: bool = False) -> None:
        store = self.client.store
        if self.follow_cadence and initial:
            if self._feed_token is None:
                # Subscribed before the read: a change in between arrives as a push.
                self._feed_token = cadence_feed(self.client).subscribe(
                    self.component, self._pushed_cadence
                )
            # The first lease already gets the published TTL.
            self._adopt(read_cadence(self.client, self.component))
        if initial and not self._guarded:
            # Watched before the first write: a change in between is seen.
            instance_guard(self.client).subscribe(self.component, self.key, self._on_own_key)
            self._guarded = True
        with self._lock:
            pushed, self._pushed = self._pushed, None
        if pushed is not None:
            self._adopt(pushed[0])
        if self._gate is not None and not initial:
            reason = self._gate()
            if reason is not None:
                self._hold(reason)
                return
            self._held = None
        with self._lock:
            record = self._record
        lease = self._lease
        if lease is not None and not initial and self._lease_ttl != self.ttl:
            # A new cadence: the key moves to a lease of the new TTL, then the old one goes.
            old, lease = lease, store.grant_lease(self.ttl)
            self._lease, self._lease_ttl = lease, self.ttl
            self._write(self._stamped(), lease)
            try:
                store.revoke_lease(old)
            except StoreError as exc:
                log.warning("heartbeat %s: old lease not revoked (it expires): %s", self.key, exc)
            self._count_beat()
            return
        must_write = initial or self._overwritten or self._changed(record)
        if lease is not None and not initial and store.refresh_lease(lease) <= 0:
            log.warning("heartbeat %s: lease expired, granting a new one", self.key)
            self.regrants += 1
            lease = None
        if lease is None:
            lease = store.grant_lease(self.ttl)
            self._lease, self._lease_ttl = lease, self.ttl
            must_write = True
        if must_write:
            try:
                self._write(self._stamped(), lease)
            except NotFoundError:
                # The lease died between grant/refresh and this put (a loaded etcd or a
                # stalled process, or a start() retried after its first put failed): take a
                # fresh one.
                log.warning(
                    "heartbeat %s: lease gone before the write, granting a new one", self.key
                )
                self.regrants += 1
                lease = store.grant_lease(self.ttl)
                self._lease, self._lease_ttl = lease, self.ttl
                self._write(self._stamped(), lease)
        self._count_beat()

    def _count_beat(self) -> None:
        """A beat completed: the lease renewed (here or by the keeper) or the key written."""
        self.beats += 1

    def _stamped(self) -> Heartbeat:
        with self._lock:
            self._record = self._record.model_copy(update={"time": _now()})
            return self._record

    # --- the keeper's side ----------------------------------------------------------------------

    def _hand_over(self) -> bool:
        """Give the steady beats to the store's keeper; False if this thread keeps them (a gate
        to ask, no lease, or the store refuses because it is closed)."""
        lease = self._lease
        if self._gate is not None or lease is None or self._stopped.is_set():
            return False
        try:
            self.client.store.keep_lease(
                lease, self.interval, on_renewed=self._kept_renewed, on_lost=self._kept_lost
            )
        except StoreError as exc:
            log.debug("heartbeat %s: beats stay on this thread: %s", self.key, exc)
            return False
        self._kept = lease
        return True

    def _take_back(self) -> None:
        """Renew from this thread again (before it beats, or before stop revokes)."""
        kept, self._kept = self._kept, None
        if kept is not None:
            self.client.store.stop_keeping(kept)

    def _kept_renewed(self, ttl: int) -> None:
        """The keeper renewed the lease (on the keep-alive stream's reader thread)."""
        self._count_beat()

    def _kept_lost(self, why: str) -> None:
        """The keeper gave the lease back (expired, stream failed or timed out, store closed):
        this thread wakes and renews it as it would without a keeper."""
        log.debug("heartbeat %s: the keeper gave the lease back (%s)", self.key, why)
        self._wake.set()

    # --- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        s = self.client.settings.etcd
        began = time.monotonic()  # when the last beat began (`start`'s, just before)
        while not self._stopped.is_set():
            delay: float | None
            if failures:
                delay = min(
                    self.interval,
                    backoff_delay(failures - 1, s.backoff_base_seconds, s.backoff_max_seconds),
                )
            elif self._hand_over():
                delay = None  # the keeper beats; sleep until something needs this thread
            else:
                # One interval from the last beat's start, not its end: the lease lasts
                # interval x misses, and a gate's health check (or a slow renewal) inside each
                # beat must not stretch every period past the interval the lease is counted in.
                delay = max(0.0, self.interval - (time.monotonic() - began))
            self._wake.wait(delay)
            self._wake.clear()
            self._take_back()
            if self._stopped.is_set():
                break
            if self.client.store.closed:
                log.warning("heartbeat %s: the store was closed; heartbeats end", self.key)
                break
            began = time.monotonic()
            try:
                self._beat()
                failures = 0
            except StoreError as exc:
                failures += 1
                self.failures += 1
                log.warning("heartbeat %s failed (%s); retrying", self.key, exc)
            except Exception:
                failures += 1
                self.failures += 1
                log.exception("heartbeat %s: unexpected error; retrying", self.key)


def _content(record: Heartbeat) -> dict[str, Any]:
    """What a reader learns from a record besides when it was written."""
    return record.model_dump(exclude={"time"})


@dataclass
class Registration:
    """What `register` did: whether this call wrote MASTER, the ACTIVE config to run with, and
    the started heartbeater (call `.heartbeater.set_status(RUNNING)` once serving)."""

    component: str
    instance: str
    seed: SeedResult
    active: ActiveConfig
    heartbeater: Heartbeater

    @property
    def created_master(self) -> bool:
        return self.seed.created


class Registry:
    """Registration, status and instances of components."""

    def __init__(self, client: DefenderClient, configs: ConfigStore | None = None) -> None:
        self.client = client
        self.layout = client.layout
        self.configs = configs or ConfigStore(client)
        # lease id -> (monotonic time until which it is certainly alive, last seen then)
        self._sightings: dict[int, tuple[float, datetime]] = {}
        self._sightings_lock = threading.Lock()
        self._sightings_pruned_at = 1024

    def register(
        self,
        component: str,
        instance: str,
        config: Mapping[str, Any],
        component_type: ComponentType | str,
        *,
        json_schema: Mapping[str, Any] | None = None,
        pod: str | None = None,
        node_id: str | None = None,
        capabilities: Iterable[str] = (),
        software_version: str | None = None,
        interval_seconds: float | None = None,
        allowed_misses: int | None = None,
        gate: HeartbeatGate | None = None,
    ) -> Registration:
        """Register an instance: seed MASTER/ACTIVE v1 create-only (exactly one of concurrent
        registrations wins; the others adopt what it wrote), set status STARTING and start the
        lease-bound heartbeat. Returns the ACTIVE config the instance should run."""
        seed = self.configs.seed(
            component, config, component_type, by=f"{component}/{instance}", json_schema=json_schema
        )
        active = self.configs.get_active(component)
        beat = Heartbeater(
            self.client,
            component,
            instance,
            interval_seconds=interval_seconds,
            allowed_misses=allowed_misses,
            gate=gate,
            pod=pod,
            node_id=node_id,
            capabilities=list(capabilities),
            software_version=software_version,
            config_version=active.version,
            config_digest=active.digest,
        )
        beat.start()
        try:
            beat.set_status(ComponentStatus.STARTING)
        except BaseException:
            beat.stop()  # no orphan heartbeat thread for a registration that failed
            raise
        if not seed.matches_master:
            self.client.alerter.event(
                "ConfigDrift",
                component,
                f"instance {instance!r} registered with a config that differs from MASTER; "
                f"it runs ACTIVE version {active.version} instead",
                instance=instance,
            )
        return Registration(component, instance, seed, active, beat)

    def set_status(
        self, component: str, status: ComponentStatus | str, *, detail: str | None = None
    ) -> None:
        """Write the component's status key (without a heartbeater, e.g. from the operator)."""
        record = StatusRecord(status=ComponentStatus(status), time=_now(), detail=detail)
        self.client.put_json(self.layout.status(component), record.model_dump(mode="json"))

    def get_status(self, component: str) -> StatusRecord | None:
        """The status record, None when absent. StoreError when it is not one (not JSON, an
        unknown status: written by hand), UnexpectedEnvelopeError (alerted) when sealed."""
        path = self.layout.status(component)
        try:
            got = self.client.get_json(path)
            return StatusRecord.model_validate(got[0]) if got is not None else None
        except ValidationError as exc:
            problem = f"{exc.error_count()} problems: {_first_error(exc)}"
        except ValueError as exc:  # not JSON, not UTF-8, nested too deeply: no input quoted
            problem = f"not JSON: {exc}"
        # Not chained: pydantic's error quotes the record's values.
        raise StoreError(
            f"status at {path!r} is not a valid record ({problem}); it was edited by hand: the"
            " next status an instance reports replaces it, or delete it",
            path=path,
        ) from None

    def list_instances(self, component: str) -> list[Heartbeat]:
        """The live instances of `component` (expired leases are already gone)."""
        out: list[Heartbeat] = []
        for sv in self.client.store.list_prefix(self.layout.instances_dir(component)):
            hb = self._heartbeat(sv.key, sv.value, sv.lease_id)
            if hb is not None:
                out.append(hb)
        return out

    def last_seen(self, heartbeat: Heartbeat) -> datetime:
        """When the instance last beat, from its lease: a beat is a keep-alive, which does
        not rewrite the record, so the record's `time` is only when its content last changed.

        etcd reports the seconds left in whole seconds (rounded down), so this is up to a second
        early: while the lease exists, last seen + TTL is never before now (a live instance is
        not judged stale), and once it expired, the last value read + TTL is no later than the
        expiry. A lease already gone leaves the record's time, unless the instance has moved
        to a new lease meanwhile (a verified record only: see `lease_last_seen`)."""
        # The names in an unverified record are anyone's: they lead to no other record.
        instance = (heartbeat.component, heartbeat.instance) if heartbeat.verified else None
        return self.lease_last_seen(
            heartbeat.lease_id, heartbeat.lease_ttl_seconds, heartbeat.time, instance=instance
        )

    def lease_last_seen(
        self,
        lease_id: int,
        granted: int | None,
        written: datetime,
        *,
        reuse: bool = False,
        instance: tuple[str, str] | None = None,
    ) -> datetime:
        """`last_seen` from its parts: the lease, the TTL it was granted for, the record's
        time. One LeaseTimeToLive request.

        With `reuse`, an earlier answer for the same lease is returned instead while the lease
        is certainly alive (the seconds it had left, at most `granted`, have not run out): no
        request. The time is then older than the newest beat, never newer, and last seen +
        `granted` is still never before now, so a caller that waits at least `granted` after
        the last beat judges no live instance stale; once those seconds ran out the lease is
        asked again. For callers that judge many instances often (the operator).

        `instance` is (component, instance) of the record the lease came from. A heartbeater
        moves its key to a new lease when its cadence changes (or after its lease expired)
        and revokes the old one, so a record read just before that names a lease that is
        gone while the instance beats on. When the lease is gone, the instance's record is
        read again (once): if it now verifies (a keyring is held, its MAC checks over the key
        and the lease etcd binds it to) and is bound to another lease, the answer is that
        lease's (its TTL left, the TTL the new record was granted, its time). A record gone,
        on the same lease, unverified or read from the cache while etcd is unreachable leaves
        the old record's time. A caller judging that answer goes by the cadence it expects
        (the operator: at least its spec's threshold), not by the old record's TTL alone: a
        move to a longer lease is a move to a slower cadence."""
        known = self.lease_sighting(lease_id, granted, written, reuse=reuse)
        if known is not None:
            return known
        assert granted  # a record without a lease was answered above
        asked = time.monotonic()
        left = self.client.store.lease_ttl(lease_id)
        if left < 0:
            with self._sightings_lock:
                self._sightings.pop(lease_id, None)
            moved = self._moved(instance, lease_id) if instance is not None else None
            if moved is None:
                return written
            # Asked here, not through `lease_last_seen`: at most one record read per call.
            lease_id, granted = moved.lease_id, moved.lease_ttl_seconds
            written = max(written, moved.time)
            if not granted:
                return written
            asked = time.monotonic()
            left = self.client.store.lease_ttl(lease_id)
            if left < 0:
                # Gone in between too: the new record still says the instance lived then.
                return written
        seen = max(written, _now() - timedelta(seconds=max(0, granted - left)))
        if reuse:
            # Not past `granted` either: a lease etcd keeps longer than it was asked for (its
            # minimum TTL, a leader change) would otherwise hold an old sighting past the
            # deadline a caller computes from `granted`.
            self._remember(lease_id, asked + min(left, granted), seen)
        return seen

    def _moved(self, instance: tuple[str, str], gone: int) -> Heartbeat | None:
        """The instance's record as etcd holds it now when it verifies and is bound to a lease
        other than `gone`; None otherwise (absent, unverified, stale, on `gone` still)."""
        try:
            key = self.layout.instance(*instance)
        except ValueError:
            return None  # names no key could hold: no record to read
        stored = self.client.store.get(key)
        if stored is None or stored.stale or stored.lease_id in (0, gone):
            return None
        hb = self._heartbeat(key, stored.value, stored.lease_id)
        if hb is None or not hb.verified:
            return None
        return hb

    def lease_sighting(
        self, lease_id: int, granted: int | None, written: datetime, *, reuse: bool = False
    ) -> datetime | None:
        """What `lease_last_seen` answers without a request (no lease: the record's time; with
        `reuse`, an earlier answer still certain), or None when it would have to ask etcd:
        lets a caller on an event loop skip a thread for the answer."""
        if not lease_id or not granted:
            return written
        if not reuse:
            return None
        with self._sightings_lock:
            sighting = self._sightings.get(lease_id)
        if sighting is not None and time.monotonic() < sighting[0]:
            return max(written, sighting[1])
        return None

    def _remember(self, lease_id: int, alive_until: float, seen: datetime) -> None:
        with self._sightings_lock:
            self._sightings[lease_id] = (alive_until, seen)
            if len(self._sightings) > self._sightings_pruned_at:
                # Leases of instances that went away are never asked again: drop the run-out.
                now = time.monotonic()
                self._sightings = {k: v for k, v in self._sightings.items() if v[0] > now}
                self._sightings_pruned_at = max(1024, 2 * len(self._sightings))

    def list_components(self, *, fresh: bool = False) -> list[ComponentSummary]:
        """Every registered component with type, status, ACTIVE version and live instances, from
        one range read. `fresh`: never from the cache of an earlier read (StoreUnavailableError
        while etcd is unreachable)."""
        meta: dict[str, ConfigMetadata] = {}
        status: dict[str, ComponentStatus] = {}
        instances: dict[str, list[Heartbeat]] = {}
        names: set[str] = set()
        for sv in self.client.store.list_prefix(self.layout.components_dir, stale_ok=not fresh):
            parsed = self.layout.parse(sv.key)
            if parsed is None:
                continue
            names.add(parsed.component)
            try:
                if parsed.kind == "metadata":
                    # Shown only: a record failing its MAC, or not a metadata record (possible
                    # without a keyring, which takes any JSON unverified), is skipped here and
                    # alerted by the readers that would act on it.
                    meta[parsed.component] = _parse_metadata(
                        sv.key, self.client.decode_record(sv.key, sv.value, report=False)
                    )
                elif parsed.kind == "status":
                    status[parsed.component] = StatusRecord.model_validate(
                        self.client.decode_json(sv.key, sv.value)
                    ).status
                elif parsed.kind == "instance":
                    hb = self._heartbeat(sv.key, sv.value, sv.lease_id)
                    if hb is not None:
                        instances.setdefault(parsed.component, []).append(hb)
            except (DefenderConfigError, ValidationError, ValueError) as exc:
                log.warning("skipping unreadable %s: %s", sv.key, exc)
        out = []
        for name in sorted(names):
            m = meta.get(name)
            out.append(
                ComponentSummary(
                    name=name,
                    type=m.type if m is not None else None,
                    status=status.get(name),
                    active_version=m.version if m is not None else None,
                    last_modified=m.last_modified if m is not None else None,
                    modified_by=m.modified_by if m is not None else None,
                    instances=tuple(instances.get(name, [])),
                    active_digest=m.digest if m is not None else None,
                )
            )
        return out

    def watch_instances(
        self,
        callback: Callable[[InstanceEvent], None],
        *,
        component: str | None = None,
        on_error: Callable[[StoreError], None] | None = None,
        progress_seconds: float | None = None,
        stall_seconds: float | None = None,
    ) -> WatchHandle:
        """Call `callback` for every instance put/delete (all components, or one). A lease
        expiry arrives as a delete. `progress_seconds`, `stall_seconds`: see
        `EtcdStore.watch_prefix` (a reader that trusts the watch to tell it of every expiry
        checks `WatchHandle.silent_seconds`)."""
        prefix = (
            self.layout.instances_dir(component)
            if component is not None
            else self.layout.components_dir
        )

        def on_event(event: WatchEvent) -> None:
            parsed = self.layout.parse(event.key)
            if parsed is None or parsed.kind != "instance" or parsed.instance is None:
                return
            hb = (
                self._heartbeat(event.key, event.value, event.lease_id)
                if event.kind == "put"
                else None
            )
            callback(
                InstanceEvent(event.kind, parsed.component, parsed.instance, hb, event.mod_revision)
            )

        return self.client.store.watch_prefix(
            prefix,
            on_event,
            on_error=on_error,
            progress_seconds=progress_seconds,
            stall_seconds=stall_seconds,
        )

    def _heartbeat(self, key: str, value: bytes, lease_id: int = 0) -> Heartbeat | None:
        """The record at `key`, marked verified or not; None when it is no heartbeat at all."""
        keyring = _held_keyring(self.client)
        unverified: str | None = None
        try:
            data = self.client.decode_json(key, value)
            if keyring is not None:
                try:
                    data = verify_record(keyring, key, data)
                except RecordAuthError as exc:
                    # Read anyway, to be shown and reported; nothing acts on it.
                    unverified = exc.problem
            hb = Heartbeat.model_validate(without_auth(data))
        except (DefenderConfigError, ValidationError, ValueError) as exc:
            log.warning("unreadable heartbeat %s: %s", key, exc)
            return None
        hb._lease_id = lease_id
        if keyring is not None:
            if unverified is None and hb.lease != f"{lease_id:x}":
                unverified = (
                    f"it was signed for lease {hb.lease!r} but etcd binds the key to lease"
                    f" {lease_id:x} (an earlier record of this key put back)"
                )
            hb._verified = unverified is None
            hb._unverified = unverified
        return hb


def _held_keyring(client: DefenderClient) -> Keyring | None:
    """The keyring to check records with; None while the client holds none (an operator whose
    keyring is not settled yet raises rather than answer None): records are then read
    unchecked, not dropped."""
    try:
        return client.envelope.keyring()
    except KeyringError:
        return None
