"""`Backend` held in memory, for unit tests of reconcile and the monitor pass without etcd.

Used only by tests (tests/unit/operator drive the operator's steps with it;
tests/integration/operator/test_operator_backend_contract.py runs the same contract against it
and against `LibraryBackend` on the real etcd, so the two cannot drift apart silently). It lives
in the package, not in tests/, so that `mypy --strict` checks it against the `Backend` protocol
(tests are not type-checked) and both suites import it by name; an import-linter contract keeps
the running operator from importing it.

Every write to a record a monitor pass reads (`observe`) moves one revision counter on, as an
etcd write does, and tells the change watchers (`watch_changes`) which component changed at
which revision; `observe` says the revision it read at. `touch` is a write by someone else,
`delay_changes`, `break_change_watch` and `replay_changes` are events in flight, a watch outage
and a compaction.

What it models as the library does: MASTER written once, ACTIVE versions that only grow
(a rollback is a new version), the kept history (`history_limit`), metadata (digest, version,
storage policy, time, the kind of change that wrote it), the freeze (commits refused with
ConfigFrozenError, rollbacks allowed), validation against the type and the schema a commit is
given (which becomes the recorded one), owner records guarded by a revision, the request-size
limit of one version's transaction (counting plain JSON: compression is not modelled), and
alerts, and registrations: each registration of a name gets a number above the clock, its
record and every history entry carry it, `put_back` returns values saved from an earlier one,
and `declare` with an anchored registration refuses another as the library's repair does
(rebuilt from the anchored registration's newest entry, entries of another above it removed,
RegistrationReplayError when none is left). What it does not: envelopes, keys and signatures
(`declare` never re-signs otherwise; key usage is empty).

Failures are injected per operation with `fail(operation, error)`; `unavailable = True` makes
every call fail like an unreachable etcd.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from defender_config import (
    Cadence,
    ChangeKind,
    ConfigFrozenError,
    ConfigValidationError,
    ConflictError,
    Keyring,
    KeyUsage,
    NotFoundError,
    RegistrationReplayError,
    RepairRefusedError,
    RolloutRecord,
    ScrubReport,
    StoragePolicy,
    StoreUnavailableError,
    ValueTooLargeError,
    VersionNotKeptError,
    canonical_json,
    config_digest,
    next_record_sequence,
    validate_config,
)
from defender_config.store import ETCD_REQUEST_LIMIT_BYTES
from defender_operator._backend import (
    AlertRecord,
    Backend,
    ChangeCallback,
    ComponentState,
    Declared,
    EtcdHealth,
    InstanceCallback,
    InstanceRecord,
    InstanceWatching,
    Observation,
    Watching,
)
from defender_operator._decisions.ownership import Claim
from defender_operator._decisions.storage_budget import Footprint, schema_fits
from defender_operator._errors import OwnerRecordError

ENDPOINTS = ["memory://defender"]
# As the library counts one put of a transaction (key, value and framing).
_PER_OP_BYTES = 64


def _json_size(value: Mapping[str, Any] | None) -> int:
    """What `footprint` counts for one value: its canonical JSON and its key."""
    return (len(canonical_json(value)) if value is not None else 0) + _PER_OP_BYTES


DEFAULT_HISTORY_LIMIT = 10


def _now() -> datetime:
    return datetime.now(UTC)


def _check_history_limit(history_limit: int) -> None:
    """As the library: a limit below 1 is refused before anything is touched (a freeze, the
    rollout record included)."""
    if history_limit < 1:
        raise ValueError(f"history_limit must be at least 1, not {history_limit}")


@dataclass
class Stored:
    """One component's values, as the library keeps them under `components/<name>/`."""

    component_type: str
    json_schema: dict[str, Any] | None
    master: dict[str, Any]
    active: dict[str, Any]
    version: int
    history: dict[int, dict[str, Any]]
    modified: datetime
    modified_by: str
    change: ChangeKind
    storage: StoragePolicy | None
    registration: int | None = None
    """The record's registration of the name (None: from before registrations)."""
    registrations: dict[int, int | None] = field(default_factory=dict)
    """The registration each history entry was sealed for."""


@dataclass
class _Watch:
    callback: InstanceCallback
    on_error: Callable[[Exception], None]
    cancelled: bool = False
    # What `silent_seconds` answers: a test stalls the stream by setting it.
    silent: float | None = 0.0

    def cancel(self) -> None:
        self.cancelled = True

    def silent_seconds(self) -> float | None:
        return self.silent


@dataclass
class _ChangeWatch:
    callback: ChangeCallback
    on_error: Callable[[Exception], None]
    cancelled: bool = False
    connected: bool = True
    # Changes made while disconnected, delivered on reconnect: the library's watch resumes from
    # the next revision it had not delivered, so an outage delays changes but loses none.
    pending: list[tuple[str, int]] = field(default_factory=list)
    # What `silent_seconds` answers: a test stalls the stream by setting it.
    silent: float | None = 0.0

    def cancel(self) -> None:
        self.cancelled = True

    def silent_seconds(self) -> float | None:
        return self.silent


@dataclass
class MemoryBackend:
    history_limit: int = DEFAULT_HISTORY_LIMIT
    request_limit_bytes: int = ETCD_REQUEST_LIMIT_BYTES
    identity: str = "memory"
    unavailable: bool = False
    components: dict[str, Stored] = field(default_factory=dict)
    cluster_id: int | None = 0x5EED
    """The etcd cluster id (`Backend.cluster_id`): a test restores a snapshot by replacing
    `components` and setting another one, as `kubectl defender restore` makes a new cluster."""
    frozen: dict[str, str] = field(default_factory=dict)
    freeze_sequences: dict[str, int] = field(default_factory=dict)
    rollouts: dict[str, tuple[RolloutRecord, dict[str, Any]]] = field(default_factory=dict)
    claims: dict[str, tuple[Claim, int]] = field(default_factory=dict)
    garbled: set[str] = field(default_factory=set)
    """Components whose owner record no longer verifies (`garble_claim`)."""
    live: dict[str, dict[str, InstanceRecord]] = field(default_factory=dict)
    cadences: dict[str, Cadence] = field(default_factory=dict)
    raised: list[AlertRecord] = field(default_factory=list)
    key_record: dict[str, str] = field(default_factory=dict)
    # Every call, in order, by operation name: what the tests assert was (not) written.
    calls: list[str] = field(default_factory=list)
    # Whether `last_seen(ask=False)` answers (as leases sighted recently do) or says "ask".
    known_sightings: bool = True
    _failures: dict[str, list[Exception]] = field(default_factory=dict)
    _revision: int = 0
    _registered: int = 0
    _watches: list[_Watch] = field(default_factory=list)
    _change_watches: list[_ChangeWatch] = field(default_factory=list)
    # component -> revision of its last viewed write, for `replay_changes`
    _written: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- test controls ---------------------------------------------------------------------

    def fail(self, operation: str, error: Exception, times: int = 1) -> None:
        """The next `times` calls of `operation` (a method name) raise `error`."""
        self._failures.setdefault(operation, []).extend([error] * times)

    def add_instance(self, component: str, record: InstanceRecord) -> None:
        """An instance beats (its lease-bound key is written); watchers hear of it."""
        self.live.setdefault(component, {})[record.instance] = record
        self._notify(component, record.instance, record)

    def remove_instance(self, component: str, instance: str) -> None:
        """An instance stops, or its lease expires; watchers hear of it."""
        self.live.get(component, {}).pop(instance, None)
        self._notify(component, instance, None)

    def touch(self, component: str) -> int:
        """Someone else (an agent, rag, a person with etcdctl) wrote a record `component`'s
        monitor view reads, leaving what this backend models as it is; returns the revision."""
        return self._changed(component)

    def break_change_watch(self, error: Exception) -> None:
        """The change watches' stream breaks: each hears `error`, and stays disconnected until
        `reconnect_change_watch`."""
        for watch in self._change_watches:
            if not watch.cancelled:
                watch.connected = False
                watch.on_error(error)

    def delay_changes(self) -> None:
        """Changes reach the change watches only at `reconnect_change_watch`, and no error is
        reported: events in flight, or a stream the library re-created at once."""
        for watch in self._change_watches:
            watch.connected = False

    def reconnect_change_watch(self) -> None:
        for watch in self._change_watches:
            watch.connected = True
            held, watch.pending = watch.pending, []
            for component, revision in held:
                if not watch.cancelled:
                    watch.callback(component, revision, False)

    def replay_changes(self) -> None:
        """The change watch resumed past a compaction: it hands out every component's records
        again (as the library does, `replayed`), at the revision each was last written."""
        for component, revision in sorted(self._written.items()):
            for watch in self._change_watches:
                if not watch.cancelled:
                    watch.callback(component, revision, True)

    def _changed(self, component: str) -> int:
        """A record `component`'s view reads was written (or deleted): a new revision."""
        with self._lock:
            revision = self._next_revision()
            self._written[component] = revision
        for watch in self._change_watches:
            if watch.cancelled:
                continue
            if watch.connected:
                watch.callback(component, revision, False)
            else:
                watch.pending.append((component, revision))
        return revision

    def _notify(self, component: str, instance: str, record: InstanceRecord | None) -> None:
        for watch in self._watches:
            if not watch.cancelled:
                watch.callback(component, instance, record)

    def _enter(self, operation: str) -> None:
        self.calls.append(operation)
        if self.unavailable:
            raise StoreUnavailableError(ENDPOINTS, f"{operation}: etcd unreachable (injected)")
        queued = self._failures.get(operation)
        if queued:
            raise queued.pop(0)

    def _next_revision(self) -> int:
        self._revision += 1
        return self._revision

    def _stored(self, component: str) -> Stored:
        stored = self.components.get(component)
        if stored is None:
            raise NotFoundError(
                f"/memory/components/{component}/metadata",
                detail=f"component {component!r} is not registered",
            )
        return stored

    def _check_size(self, component: str, config: Mapping[str, Any], copies: int) -> None:
        size = copies * (len(canonical_json(config)) + _PER_OP_BYTES)
        if size > self.request_limit_bytes:
            raise ValueTooLargeError(
                size,
                self.request_limit_bytes,
                path=f"/memory/components/{component}/active_config",
                what="etcd request limit for one config version",
            )

    def _validate(
        self,
        component: str,
        component_type: str,
        config: Mapping[str, Any],
        json_schema: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        try:
            return validate_config(component_type, config, json_schema, component=component)
        except ConfigValidationError as exc:
            self._alert(exc.reason, component, str(exc))
            raise

    def _alert(self, kind: str, component: str, detail: str) -> None:
        self.raised.append(AlertRecord(component, self.identity, kind, detail, _now()))
        self._changed(component)

    def _write_version(
        self,
        component: str,
        stored: Stored,
        config: dict[str, Any],
        by: str,
        change: ChangeKind,
        storage: StoragePolicy | None,
        above: int = 0,
        history_limit: int | None = None,
    ) -> int:
        self._check_size(component, config, copies=2)
        version = max(stored.version, max(stored.history, default=0), above) + 1
        if stored.registration is None:
            # As the library: a record from before registrations gets one at its next write.
            stored.registration = next_record_sequence(now=_now())
            stored.registrations = dict.fromkeys(stored.history, stored.registration)
        stored.active = config
        stored.version = version
        stored.history[version] = config
        stored.registrations[version] = stored.registration
        keep = self.history_limit if history_limit is None else history_limit
        for old in [v for v in stored.history if v <= version - keep]:
            del stored.history[old]
            stored.registrations.pop(old, None)
        stored.modified, stored.modified_by, stored.change = _now(), by, change
        if storage is not None:
            stored.storage = storage
        self._changed(component)
        return version

    # --- Backend -------------------------------------------------------------------------

    def health(self) -> EtcdHealth:
        self.calls.append("health")
        if self.unavailable:
            return EtcdHealth(reachable=False, quorum=False, detail="etcd unreachable (injected)")
        return EtcdHealth(reachable=True, quorum=True)

    def state(self, component: str, *, tolerate_master: bool = False) -> ComponentState:
        self._enter("state")
        return self._state(component)

    def _state(self, component: str) -> ComponentState:
        stored = self.components.get(component)
        if stored is None:
            return ComponentState(
                None,
                None,
                None,
                frozen=component in self.frozen,
                freeze_sequence=self.freeze_sequences.get(component),
            )
        return ComponentState(
            master_digest=config_digest(stored.master),
            active_digest=config_digest(stored.active),
            active_version=stored.version,
            frozen=component in self.frozen,
            freeze_sequence=self.freeze_sequences.get(component)
            if component in self.frozen
            else None,
            storage=stored.storage,
            active_modified=stored.modified,
            active_rollback=stored.change.reverts,
            registration=stored.registration,
        )

    def declare_storage(self, component: str, storage: StoragePolicy) -> None:
        self._enter("declare_storage")

    def declare(
        self,
        component: str,
        component_type: str,
        *,
        json_schema: Mapping[str, Any] | None,
        storage: StoragePolicy,
        digest: str,
        modified_by: str,
        registration: int | None = None,
        schema_cap: int | None = None,
    ) -> Declared:
        self._enter("declare")
        stored = self.components.get(component)
        if stored is None:
            # As the library: a new component's state comes from the declare's own read.
            return Declared(state=self._state(component))
        # As the library: the spec's schema governs the next commit.
        wanted = dict(json_schema) if json_schema is not None else None
        recorded = stored.json_schema != wanted
        # As `footprint` counts the schema (the library: the record's size as stored). Judged
        # before anything is written, the repair included: its rebuilt record holds `wanted`.
        growth = _json_size(wanted) - _json_size(stored.json_schema) if recorded else 0
        if schema_cap is not None and not schema_fits(growth, schema_cap):
            return Declared(schema_growth=growth, schema_capped=True)
        replayed, resigned = self._repair_registration(component, stored, registration)
        if resigned and recorded:
            # As the library: the record is rebuilt with the spec's schema, ACTIVE valid
            # under it or not.
            stored.json_schema = wanted
            return Declared(
                resigned=True,
                replayed=replayed,
                schema_growth=growth if schema_cap is not None else 0,
            )
        if recorded:
            try:
                self._validate(component, stored.component_type, stored.active, wanted)
            except ConfigValidationError:
                # As the library: recorded with the next commit of spec.config instead.
                recorded, growth = False, 0
        if recorded:
            stored.json_schema = wanted
            self._changed(component)  # the library records it in the metadata
        if recorded or resigned or replayed:
            # The record (or the history) changed: the caller reads again.
            return Declared(
                resigned=resigned,
                replayed=replayed,
                schema_growth=growth if schema_cap is not None else 0,
            )
        # Nothing here is signed, so nothing needs re-signing; nothing written.
        return Declared(state=self._state(component))

    def _repair_registration(
        self, component: str, stored: Stored, anchored: int | None
    ) -> tuple[tuple[str, ...], bool]:
        """As `ConfigStore.repair_metadata(registration=anchored)`: a record of another
        registration than the anchored one is no record (alerted RegistrationReplayed) and is
        rebuilt from the newest history entry of the anchored one; entries of another
        registration above that source are removed (alerted RegistrationReplayRemoved).
        RegistrationReplayError when nothing of the anchored registration is left. Returns
        (the paths refused, whether the record was rebuilt)."""
        meta_path = f"/memory/components/{component}/metadata"
        expected = anchored if anchored is not None else stored.registration
        replayed: list[str] = []
        foreign_record = anchored is not None and stored.registration != anchored
        if foreign_record:
            replayed.append(meta_path)
            refused = RegistrationReplayError(
                meta_path, stored.registration, anchored, what="the metadata record"
            )
            self._alert(refused.reason, component, str(refused))
        own = [v for v in stored.history if stored.registrations.get(v) == expected]
        source = max(own, default=0)
        foreign = sorted(
            v for v in stored.history if v > source and stored.registrations.get(v) != expected
        )
        if foreign_record and not own:
            # As the library: every entry was read for a source, so every foreign one goes.
            foreign = sorted(v for v in stored.history if stored.registrations.get(v) != expected)
        for v in foreign:
            del stored.history[v]
            stored.registrations.pop(v, None)
            replayed.append(f"/memory/components/{component}/history/{v}")
        if foreign:
            self._alert(
                "RegistrationReplayRemoved",
                component,
                f"{len(foreign)} history entries of another registration than {expected} removed",
            )
        if not foreign_record:
            return tuple(replayed), False
        if not own:
            raise RegistrationReplayError(
                meta_path, stored.registration, anchored, what="the metadata record"
            )
        stored.version, stored.active = source, stored.history[source]
        stored.registration = anchored
        stored.modified, stored.change = _now(), ChangeKind.REPAIR
        self._changed(component)
        return tuple(replayed), True

    def put_back(
        self,
        component: str,
        saved: Stored,
        *,
        record: bool = True,
        history: Sequence[int] = (),
    ) -> None:
        """Tests: someone with etcd write access and no key puts back values saved (a deep
        copy of `components[component]`) from an earlier registration of the name: its record
        and ACTIVE (with `record`) and the history entries `history`. MASTER is left: it is
        create-only, and the seed's own MASTER of the new registration holds the spec."""
        stored = self._stored(component)
        for v in history:
            stored.history[v] = saved.history[v]
            stored.registrations[v] = saved.registrations.get(v)
        if record:
            stored.version, stored.active = saved.version, saved.active
            stored.registration, stored.change = saved.registration, saved.change
            stored.modified, stored.modified_by = saved.modified, saved.modified_by
        self._changed(component)

    def seed(
        self,
        component: str,
        component_type: str,
        config: Mapping[str, Any],
        *,
        json_schema: Mapping[str, Any] | None,
        modified_by: str,
        storage: StoragePolicy | None = None,
    ) -> ComponentState:
        self._enter("seed")
        normalized = self._validate(component, component_type, config, json_schema)
        self._check_size(component, normalized, copies=3)
        if component not in self.components:
            self._register(component, component_type, normalized, json_schema, modified_by, storage)
        return self._state(component)  # as the library: from the seed's own transaction

    def footprint(self, component: str) -> Footprint:
        """As the library counts it, with each value stored as its canonical JSON (this
        backend neither seals nor compresses) plus `_PER_OP_BYTES` for its key."""
        self._enter("footprint")
        stored = self.components.get(component)
        if stored is None:
            return Footprint()

        active = _json_size(stored.active)
        history = {v: _json_size(config) for v, config in stored.history.items()}
        total = (
            _json_size(stored.master)
            + active
            + sum(history.values())
            + _json_size(stored.json_schema)
        )
        return Footprint(total=total, active=active, history=history)

    def owners(self) -> dict[str, str]:
        self._enter("owners")
        return {
            component: claim.namespace
            for component, (claim, _) in self.claims.items()
            if component not in self.garbled
        }

    def _register(
        self,
        component: str,
        component_type: str,
        normalized: dict[str, Any],
        json_schema: Mapping[str, Any] | None,
        modified_by: str,
        storage: StoragePolicy | None,
        registration_above: int = 0,
    ) -> None:
        now = _now()
        # As the library's seed: a registration above the clock in ms, on every value (and
        # above the last one here, so two in the same millisecond differ too).
        registration = self._registered = next_record_sequence(
            self._registered, registration_above, now=now
        )
        self.components[component] = Stored(
            component_type=component_type,
            json_schema=dict(json_schema) if json_schema is not None else None,
            master=normalized,
            active=normalized,
            version=1,
            history={1: normalized},
            modified=now,
            modified_by=modified_by,
            change=ChangeKind.REGISTER,
            storage=storage,
            registration=registration,
            registrations={1: registration},
        )
        self._changed(component)

    def commit(
        self,
        component: str,
        component_type: str,
        config: Mapping[str, Any],
        *,
        json_schema: Mapping[str, Any] | None,
        modified_by: str,
        history_limit: int,
        storage: StoragePolicy | None = None,
        above: int = 0,
    ) -> int:
        self._enter("commit")
        _check_history_limit(history_limit)
        if component in self.frozen:
            raise ConfigFrozenError(component, why=self.frozen[component])
        stored = self._stored(component)
        # As the library: validated against the schema given, which becomes the recorded one.
        normalized = self._validate(component, stored.component_type, config, json_schema)
        stored.json_schema = dict(json_schema) if json_schema is not None else None
        same_policy = storage is None or storage == stored.storage
        if config_digest(normalized) == config_digest(stored.active) and same_policy:
            return stored.version
        return self._write_version(
            component,
            stored,
            normalized,
            modified_by,
            ChangeKind.COMMIT,
            storage,
            above,
            history_limit=history_limit,
        )

    def rollback(
        self,
        component: str,
        to_version: int | None,
        *,
        modified_by: str,
        history_limit: int,
        storage: StoragePolicy | None = None,
        change: ChangeKind = ChangeKind.ROLLBACK,
    ) -> int:
        self._enter("rollback")
        _check_history_limit(history_limit)
        stored = self._stored(component)
        if to_version is None:
            target = stored.master
        elif to_version in stored.history:
            target = stored.history[to_version]
        else:
            raise VersionNotKeptError(
                f"/memory/components/{component}/history/{to_version}",
                to_version,
                sorted(stored.history),
            )
        what = "master" if to_version is None else to_version
        version = self._write_version(
            component, stored, target, modified_by, change, storage, history_limit=history_limit
        )
        self._alert(
            "ConfigRolledBack",
            component,
            f"ACTIVE of {component!r} rolled back to {what} as version {version} by {modified_by}",
        )
        return version

    def set_storage(self, component: str, storage: StoragePolicy, *, modified_by: str) -> bool:
        self._enter("set_storage")
        stored = self._stored(component)
        if stored.storage == storage:
            return False
        stored.storage = storage
        self._changed(component)
        return True

    def freeze(self, component: str, reason: str, *, after: int = 0) -> None:
        self._enter("freeze")
        self._freeze(component, reason, after)

    def _freeze(self, component: str, reason: str, after: int) -> None:
        self.frozen[component] = reason
        current = self.freeze_sequences.get(component, 0)
        self.freeze_sequences[component] = next_record_sequence(after, current, now=_now())
        self._changed(component)

    def unfreeze(self, component: str) -> int | None:
        self._enter("unfreeze")
        if self.frozen.pop(component, None) is None:
            return None
        self._changed(component)
        return self.freeze_sequences.get(component, 0)

    def rollout(self, component: str) -> RolloutRecord | None:
        self._enter("rollout")
        found = self.rollouts.get(component)
        return found[0] if found is not None else None

    def start_rollout(
        self,
        component: str,
        config: Mapping[str, Any],
        canaries: Sequence[str],
        *,
        by: str,
        sequence: int | None = None,
        since: datetime | None = None,
        digest: str | None = None,
    ) -> RolloutRecord:
        self._enter("start_rollout")
        if component in self.frozen:
            raise ConfigFrozenError(component, why=self.frozen[component])
        stored = self._stored(component)
        normalized = self._validate(component, stored.component_type, config, stored.json_schema)
        if digest is not None and config_digest(normalized) != digest:
            raise ConflictError(
                f"/memory/control/{component}/rollout",
                detail="the config to roll out is not the one named",
                retryable=False,
            )
        now = datetime.now(UTC)
        if sequence is None:
            current = self.rollouts.get(component)
            sequence = next_record_sequence(current[0].sequence if current else 0, now=now)
        record = RolloutRecord(
            version=stored.version + 1,
            base_version=stored.version,
            digest=config_digest(normalized),
            canaries=tuple(sorted(set(canaries))),
            since=since or now,
            by=by,
            sequence=sequence,
        )
        self.rollouts[component] = (record, normalized)
        self._changed(component)
        return record

    def promote_rollout(self, component: str, *, by: str, history_limit: int) -> int:
        self._enter("promote_rollout")
        _check_history_limit(history_limit)
        found = self.rollouts.pop(component, None)
        if found is None:
            raise NotFoundError(f"/memory/control/{component}/rollout", detail="no rollout")
        stored = self._stored(component)
        return self._write_version(
            component,
            stored,
            found[1],
            found[0].by,
            ChangeKind.COMMIT,
            None,
            history_limit=history_limit,
        )

    def abort_rollout(
        self, component: str, reason: str, *, by: str, history_limit: int, freeze_after: int = 0
    ) -> int | None:
        self._enter("abort_rollout")
        _check_history_limit(history_limit)
        self._freeze(component, reason, freeze_after)
        found = self.rollouts.pop(component, None)
        self._changed(component)
        if found is None:
            return None
        stored = self._stored(component)
        target = stored.history[found[0].base_version]
        return self._write_version(
            component,
            stored,
            target,
            by,
            ChangeKind.CANARY_ABORT,
            None,
            history_limit=history_limit,
        )

    def end_rollout(self, component: str, *, sequence: int | None = None) -> None:
        self._enter("end_rollout")
        if self.rollouts.pop(component, None) is not None:
            self._changed(component)

    def purge(self, component: str) -> int:
        self._enter("purge")
        removed = 0
        stored = self.components.pop(component, None)
        if stored is not None:
            removed += 3 + len(stored.history)  # MASTER, ACTIVE, metadata, history
        alerts = [a for a in self.raised if a.component == component]
        self.raised = [a for a in self.raised if a.component != component]
        removed += len(alerts)
        removed += int(self.frozen.pop(component, None) is not None)
        removed += int(self.cadences.pop(component, None) is not None)
        removed += int(self.rollouts.pop(component, None) is not None)
        removed += int(self.claims.pop(component, None) is not None)
        self._changed(component)
        return removed

    def garble_claim(self, component: str) -> None:
        """Tests: the owner record no longer verifies (forged without the key, or damaged)."""
        with self._lock:
            held, _ = self.claims[component]
            self.claims[component] = (held, self._next_revision())
            self.garbled.add(component)

    def read_claim(self, component: str) -> tuple[Claim | None, int]:
        self._enter("read_claim")
        held = self.claims.get(component)
        if component in self.garbled and held is not None:
            raise OwnerRecordError(f"owner record of {component} is not readable", revision=held[1])
        return held if held is not None else (None, 0)

    def write_claim(self, component: str, claim: Claim, *, revision: int) -> bool:
        self._enter("write_claim")
        with self._lock:
            _, current = self.claims.get(component, (None, 0))
            if current != revision:
                return False
            self.claims[component] = (claim, self._next_revision())
            self.garbled.discard(component)
            return True

    def claim_and_seed(
        self,
        component: str,
        component_type: str,
        config: Mapping[str, Any],
        *,
        claim: Claim,
        json_schema: Mapping[str, Any] | None,
        modified_by: str,
        storage: StoragePolicy | None = None,
        cadence: Cadence,
        alerts_since: datetime,
        registration_above: int = 0,
    ) -> Observation | None:
        self._enter("claim_and_seed")
        normalized = self._validate(component, component_type, config, json_schema)
        self._check_size(component, normalized, copies=3)
        with self._lock:
            if component in self.claims or component in self.components:
                return None  # as the library's compares: nothing written
            self.claims[component] = (claim, self._next_revision())
        self._register(
            component,
            component_type,
            normalized,
            json_schema,
            modified_by,
            storage,
            registration_above=registration_above,
        )
        self.cadences[component] = cadence
        found = self.rollouts.get(component)
        return Observation(
            state=self._state(component),
            cadence=cadence,
            rollout=found[0] if found is not None else None,
            alerts=[a for a in self.raised if a.component == component and a.time >= alerts_since],
            revision=self._revision,
        )

    def instances(self, component: str) -> Sequence[InstanceRecord]:
        self._enter("instances")
        return list(self.live.get(component, {}).values())

    def cadence(self, component: str) -> Cadence | None:
        self._enter("cadence")
        return self.cadences.get(component)

    def publish_cadence(self, component: str, cadence: Cadence) -> None:
        self._enter("publish_cadence")
        self.cadences[component] = cadence
        self._changed(component)

    def all_instances(self) -> Mapping[str, Sequence[InstanceRecord]]:
        self._enter("all_instances")
        return {name: list(found.values()) for name, found in self.live.items() if found}

    def watch_instances(
        self,
        callback: InstanceCallback,
        on_error: Callable[[Exception], None],
        *,
        progress_seconds: float | None = None,
        stall_seconds: float | None = None,
    ) -> InstanceWatching:
        self._enter("watch_instances")
        watch = _Watch(callback, on_error)
        self._watches.append(watch)
        return watch

    def watch_changes(
        self,
        callback: ChangeCallback,
        on_error: Callable[[Exception], None],
        *,
        start_revision: int | None = None,
        progress_seconds: float | None = None,
        stall_seconds: float | None = None,
    ) -> Watching:
        self._enter("watch_changes")
        watch = _ChangeWatch(callback, on_error)
        if start_revision is not None:
            # Nothing is compacted here: hand out what changed from that revision on.
            for component, revision in sorted(self._written.items(), key=lambda kv: kv[1]):
                if revision >= start_revision:
                    callback(component, revision, False)
        self._change_watches.append(watch)
        return watch

    def revision(self) -> int:
        self._enter("revision")
        return self._revision

    def alerts(self, component: str, since: datetime) -> Sequence[AlertRecord]:
        self._enter("alerts")
        return [a for a in self.raised if a.component == component and a.time >= since]

    def observe(self, component: str, alerts_since: datetime) -> Observation:
        # The library reads these in one transaction; here each keeps its own name too, so a
        # test can fail the whole read or any part of it.
        self._enter("observe")
        return Observation(
            state=self.state(component, tolerate_master=True),
            cadence=self.cadence(component),
            rollout=self.rollout(component),
            alerts=self.alerts(component, alerts_since),
            revision=self._revision,
        )

    def alert(self, kind: str, component: str, detail: str) -> None:
        # Never raises, as the library's alerter.
        self.calls.append("alert")
        self._alert(kind, component, detail)

    def rewrap_all(self) -> int:
        self._enter("rewrap_all")
        return 0

    def key_usage(self) -> KeyUsage:
        self._enter("key_usage")
        return KeyUsage()

    def opens(self, keyring: Keyring, usage: KeyUsage) -> frozenset[str]:
        self._enter("opens")
        return usage.key_ids

    def keyring_record(self) -> dict[str, str]:
        self._enter("keyring_record")
        return dict(self.key_record)

    def record_keyring(self, keyring: Keyring) -> None:
        self._enter("record_keyring")
        self.key_record = dict(keyring.fingerprints())

    def last_seen(
        self, component: str, instances: Sequence[InstanceRecord], *, ask: bool = True
    ) -> list[InstanceRecord] | None:
        # No leases here: an instance's record time is when it last beat (`add_instance`).
        # Known without asking only when `known_sightings` says so (tests of both paths).
        if not ask and not self.known_sightings:
            return None
        self._enter("last_seen")
        return list(instances)

    def scrub(self, component: str) -> ScrubReport | None:
        # Nothing here is sealed, so a scrub has nothing to open (see the module docstring).
        self._enter("scrub")
        return None

    def restore_active(self, component: str, version: int, *, modified_by: str) -> None:
        self._enter("restore_active")
        stored = self._stored(component)
        if version != stored.version or version not in stored.history:
            raise RepairRefusedError(
                f"/memory/components/{component}/active_config",
                f"version {version} is not the kept current version",
            )
        stored.active = stored.history[version]

    def close(self) -> None:
        self.calls.append("close")


def as_backend(backend: MemoryBackend) -> Backend:
    """Typed as the protocol: mypy --strict fails here when the two stop matching."""
    return backend


__all__ = ["MemoryBackend", "Stored", "as_backend"]
