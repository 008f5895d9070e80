"""What the operator needs from the defender etcd, as one narrow interface.

`Backend` lists the operations; `_library_backend.LibraryBackend` implements them with the
library (`ConfigStore`, `Registry`, `DefenderClient`): the operator never touches etcd, pyetcd
or the envelope itself. Keeping the interface narrow lets the async code call a handful of
blocking methods through `asyncio.to_thread` and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from defender_config import (
    Cadence,
    ChangeKind,
    Keyring,
    KeyUsage,
    RolloutRecord,
    ScrubReport,
    StoragePolicy,
)
from defender_operator._decisions.ownership import Claim
from defender_operator._decisions.storage_budget import Footprint


@dataclass(frozen=True)
class ComponentState:
    """What etcd holds for one component (None = absent)."""

    master_digest: str | None
    active_digest: str | None
    active_version: int | None
    frozen: bool = False
    freeze_sequence: int | None = None
    """The authentic freeze marker's sequence (0: written before it had one); None unfrozen."""
    storage: StoragePolicy | None = None
    """The policy recorded in the metadata (None = the store-wide envelope options)."""
    active_modified: datetime | None = None
    """When ACTIVE was last committed (any writer)."""
    active_rollback: bool = False
    """ACTIVE was written by a rollback (to MASTER or a kept version), not a commit."""
    master_error: str | None = None
    """Why MASTER exists but did not open (read with `tolerate_master`; `master_digest` None)."""
    registration: int | None = None
    """The verified metadata record's registration (None: from before registrations)."""


@dataclass(frozen=True)
class Declared:
    """What `Backend.declare` did, and what it saw on the way."""

    resigned: bool = False
    """It re-signed a metadata record that did not verify."""
    state: ComponentState | None = None
    """What `state` would return, from the declare's own read, so the seed that follows needs
    no read of its own. None: read `state` (the declare re-signed or recorded something)."""
    replayed: tuple[str, ...] = ()
    """Paths of a metadata record or history entries of another registration than the anchored
    one that the declare refused (the record rebuilt, the entries removed)."""
    schema_growth: int = 0
    """With a `schema_cap`: the bytes recording the spec's custom schema grew the metadata
    record by (negative: it shrank; 0: nothing recorded), or, `schema_capped`, would have. A
    re-sign records it too (its rebuilt record holds the spec's schema): then the schema's
    bytes beside those of the schema the record held, as stored."""
    schema_capped: bool = False
    """The schema would have grown the record past `schema_cap`: not recorded, and nothing
    written at all, a re-sign included (the caller judges the growth against the namespace's
    budget, then declares again with it as the cap, or refuses)."""


@dataclass(frozen=True)
class InstanceRecord:
    """One live instance, from its lease-bound heartbeat key (plaintext, no secrets)."""

    instance: str
    pod: str | None
    time: datetime
    status: str = ""
    config_version: int | None = None
    config_digest: str | None = None
    key_fingerprint: str | None = None
    key_fingerprints: frozenset[str] = field(default_factory=frozenset)
    last_error_reason: str | None = None
    last_error_detail: str = ""
    # The cadence the instance runs, as it advertises it (None: an older heartbeater).
    lease_ttl_seconds: int | None = None
    interval_seconds: float | None = None
    # The etcd lease the key is bound to (0: unknown); its keep-alives are the beats.
    lease_id: int = 0
    # Whether its MAC verified over its etcd path and lease (a key holder wrote it); only
    # verified records steer anything. `unverified` says why not (no key bytes). False unless
    # a reader says so: a record built without checking must not be trusted by default.
    verified: bool = False
    unverified: str | None = None
    # Who wrote it (random per heartbeater) and its count of its writes: a writer's records are
    # ordered by it. None: not signed.
    writer: str | None = None
    seq: int | None = None
    # Whether its MAC was checked at all: False when it was read while the operator held no
    # keyring (read again once it does, never judged as it is).
    checked: bool = True

    def holds(self, fingerprint: str) -> bool:
        return fingerprint in self.key_fingerprints or fingerprint == self.key_fingerprint


@dataclass(frozen=True)
class AlertRecord:
    component: str
    instance: str | None
    reason: str
    detail: str
    time: datetime


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class StreamWatching(Cancellable, Protocol):
    def silent_seconds(self) -> float | None:
        """Seconds since the watch's stream last answered anything (an event, a progress
        answer); None while it is on no stream (re-created after an outage or a stall) and,
        with progress requests, until a progress answer proved the watch caught up on it."""
        ...


class InstanceWatching(StreamWatching, Protocol):
    """The heartbeat watch (`watch_instances`)."""


class Watching(StreamWatching, Protocol):
    """The component change watch (`watch_changes`)."""

    @property
    def connected(self) -> bool:
        """Whether the watch stream is up now (it is re-created by itself after an outage)."""
        ...


# (component, instance, heartbeat or None for a delete: the instance stopped or its lease expired)
InstanceCallback = Callable[[str, str, InstanceRecord | None], None]
# (component, mod revision of a put or delete of a key its monitor view reads, replayed: the key
# handed out again after the watch resumed past a compaction, whose deletes it could not replay)
ChangeCallback = Callable[[str, int, bool], None]


@dataclass(frozen=True)
class EtcdHealth:
    reachable: bool
    quorum: bool
    detail: str = ""
    # Filled by a full health check (`_etcd_health`); None/() when only reachability is known.
    healthy_members: int | None = None
    cluster_size: int | None = None
    alarms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Observation:
    """What a monitor pass reads from etcd about one component, at one revision."""

    state: ComponentState
    cadence: Cadence | None
    rollout: RolloutRecord | None
    """The authentic rollout record, an ended one (`RolloutRecord.ended`) included."""
    alerts: Sequence[AlertRecord]
    revision: int = 0
    """The etcd revision read at: a change above it is one this observation has not seen."""


class Backend(Protocol):
    """Blocking calls; every StoreError etc. is the library's, translated by `_errors`."""

    def health(self) -> EtcdHealth: ...

    @property
    def cluster_id(self) -> int | None:
        """The id of the etcd cluster that answered last (None before any answer). Only the
        members set it: a new one means a restore from a snapshot (a new cluster), never a
        write to etcd (`_decisions.registration.decide_replayed`)."""
        ...

    def state(self, component: str, *, tolerate_master: bool = False) -> ComponentState:
        """What etcd holds. With `tolerate_master`, a MASTER that does not open is reported in
        `master_error` (the scrub raises it) instead of failing what does not need MASTER."""
        ...

    def declare_storage(self, component: str, storage: StoragePolicy) -> None:
        """Whether this reader accepts the component's values unencrypted: from its spec
        (`storage`), never from etcd. No request to etcd, nothing written."""
        ...

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
        """`registration`: the anchored one (`status.registration`, None: none yet): held by
        the backend's reader from now on, and the only one a repair takes values of.

        What the spec says, before the seed reads what etcd holds: `declare_storage`, then
        re-sign the metadata record when it does not verify (written before records were
        signed, forged, or an older one put back), rebuilt from authenticated values,
        `component_type`/`json_schema` and, for a plaintext component, only when it holds
        `digest` (the valid spec config's digest). `json_schema` also becomes the schema later
        commits are validated against, unless it grows the record by more than `schema_cap`
        bytes (None: no storage budget applies; `schema_fits`): then `schema_capped`, and
        nothing is written, not the re-sign either (judged first: it records the schema).
        `resigned` when it re-signed; RecordAuthError when it cannot. The existence check, the
        repair's and the schema's reads are one read where they can be, and a new component's
        state comes back with it."""
        ...

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
        """Create MASTER (only if absent) and ACTIVE (only if absent) from `config`, sealed
        with `storage` (None = store-wide options), which becomes the component's policy.
        MasterMissingError (alerted, nothing written) when MASTER is absent but not the rest."""
        ...

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
        """Validate `config` against its type's model and `json_schema` (which becomes the
        component's recorded schema) and write a new ACTIVE version, above `above` too (a
        version etcd no longer shows: `ConfigStore.commit`); returns it.
        ConfigValidationError / ConfigFrozenError leave ACTIVE untouched."""
        ...

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
        """Make ACTIVE a copy of MASTER (`to_version` None) or of a history version; returns
        the new ACTIVE version number. `change` (a person's rollback, the breaker's revert,
        the invalid-config policy's) is recorded with the version. Keeps `history_limit`
        versions as `commit` does (the spec's now): a rollback is a new version too."""
        ...

    def set_storage(self, component: str, storage: StoragePolicy, *, modified_by: str) -> bool:
        """Re-seal the component's stored values under `storage` without a new version;
        False when that is already its policy."""
        ...

    def freeze(self, component: str, reason: str, *, after: int = 0) -> None:
        """Freeze commits; the marker's sequence is above `after` (the lifted one anchored)."""
        ...

    def unfreeze(self, component: str) -> int | None:
        """Lift the freeze: the sequence of the authentic marker it removed (None: none)."""
        ...

    def rollout(self, component: str) -> RolloutRecord | None:
        """The authentic canary rollout record (None: none, or one that fails its MAC)."""
        ...

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
        """Seal `config` as the candidate and sign the record naming `canaries`, with
        `sequence` (None: one above the record in etcd) and `since` (None: now); a config
        whose digest is not `digest` is refused (ConflictError), nothing written."""
        ...

    def promote_rollout(self, component: str, *, by: str, history_limit: int) -> int:
        """Commit the candidate as ACTIVE and end the rollout; the version now ACTIVE. Keeps
        `history_limit` versions as `commit` does: the spec's when it is promoted (a limit
        edited during the rollout applies), since this is the commit that prunes, or fewer
        where the storage budget has no room for a limit raised since the start
        (`_canary._promote`)."""
        ...

    def abort_rollout(
        self, component: str, reason: str, *, by: str, history_limit: int, freeze_after: int = 0
    ) -> int | None:
        """Freeze (above `freeze_after`, as `freeze`), end the rollout and write the base
        config again as a new ACTIVE version, keeping `history_limit` versions as
        `promote_rollout` does. A limit below 1 is refused before the freeze."""
        ...

    def end_rollout(self, component: str, *, sequence: int | None = None) -> None:
        """Remove the candidate and leave an ended rollout record under `sequence` (None: one
        above the record's), which running readers remember."""
        ...

    def purge(self, component: str) -> int:
        """Delete every key of the component, its owner record included; returns how many."""
        ...

    def read_claim(self, component: str) -> tuple[Claim | None, int]:
        """The owner record of `component` and its etcd mod revision ((None, 0) when absent);
        OwnerRecordError when it exists but is not one (edited by hand or by an attacker)."""
        ...

    def write_claim(self, component: str, claim: Claim, *, revision: int) -> bool:
        """Store `claim` if the owner record is still at `revision` (0: still absent); False
        when someone changed it meanwhile."""
        ...

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
        """`registration_above`: the seed's registration is above it too (a re-seed after a
        restore: readers hold a registration they take only a higher one than).

        `write_claim(claim, revision=0)`, `seed` and `publish_cadence(cadence)` in ONE
        create-only transaction, for a name etcd holds nothing of: written only while none of
        the owner record, the metadata, MASTER, ACTIVE and history/1 exists; the spec is
        declared as `declare` with its digest would. Returns what `observe(alerts_since)` would
        read right after, from the same transaction, or None when any of them exists (nothing
        written: the caller reads the claim and decides it, then seeds, as always)."""
        ...

    def footprint(self, component: str) -> Footprint:
        """The bytes `component` keeps under its etcd directory, as stored, its instances'
        records aside (one range read; never from a cache: a budget judged on a listing from
        before an outage could let a namespace past it)."""
        ...

    def owners(self) -> dict[str, str]:
        """component -> the namespace its owner record names, released ones (retention Keep)
        included: one range read of the owner records (never from a cache); a record that is
        not readable names nobody."""
        ...

    def instances(self, component: str) -> Sequence[InstanceRecord]: ...

    def last_seen(
        self, component: str, instances: Sequence[InstanceRecord], *, ask: bool = True
    ) -> list[InstanceRecord] | None:
        """The same records (of `component`) with `time` = when each instance last beat, read
        from its lease (a beat is a keep-alive; the record is rewritten only when its content
        changes). A verified record whose lease is gone because the instance moved to a new
        one (its cadence changed) since it was read answers from the new lease. With `ask`
        False, only what is known without a request to etcd: None when any instance's lease
        would have to be asked (never None with `ask`)."""
        ...

    def cadence(self, component: str) -> Cadence | None:
        """The published heartbeat cadence; None when absent or unreadable (logged)."""
        ...

    def publish_cadence(self, component: str, cadence: Cadence) -> None: ...

    def all_instances(self) -> Mapping[str, Sequence[InstanceRecord]]: ...

    def watch_instances(
        self,
        callback: InstanceCallback,
        on_error: Callable[[Exception], None],
        *,
        progress_seconds: float | None = None,
        stall_seconds: float | None = None,
    ) -> InstanceWatching:
        """Watch every instance key; `callback` and `on_error` run on the watch's own thread.
        The watch survives member outages by itself (`on_error` hears of each once). With
        `progress_seconds`, it asks etcd for a progress answer whenever its stream was silent
        that long (`InstanceWatching.silent_seconds` then tells a stall from quiet), and
        replaces a stream silent past `stall_seconds` (default: three of them)."""
        ...

    def watch_changes(
        self,
        callback: ChangeCallback,
        on_error: Callable[[Exception], None],
        *,
        start_revision: int | None = None,
        progress_seconds: float | None = None,
        stall_seconds: float | None = None,
    ) -> Watching:
        """Watch every key an `observe` reads, of every component (one watch); `callback` and
        `on_error` run on the watch's own thread. From `start_revision` (default: changes after
        this call); the watch survives member outages by itself (`on_error` hears of each once)
        and resumes past a compaction by replaying the current keys (`replayed`).
        `progress_seconds`, `stall_seconds`: as for `watch_instances`."""
        ...

    def revision(self) -> int:
        """etcd's current revision (a linearizable read)."""
        ...

    def alerts(self, component: str, since: datetime) -> Sequence[AlertRecord]: ...

    def observe(self, component: str, alerts_since: datetime) -> Observation:
        """`state` (MASTER tolerated), `cadence`, `rollout` and `alerts` as one read, at the
        `revision` it says: a monitor pass's view of etcd (the library backend makes it one
        transaction)."""
        ...

    def alert(self, kind: str, component: str, detail: str) -> None:
        """Raise an alert (logs + `<prefix>/alerts/`, where rag reads them); never raises."""
        ...

    def rewrap_all(self) -> int:
        """Re-seal every stored value under the current primary key; returns how many."""
        ...

    def key_usage(self) -> KeyUsage:
        """Scan every stored value's envelope header for the key id it is sealed with."""
        ...

    def opens(self, keyring: Keyring, usage: KeyUsage) -> frozenset[str]:
        """The key ids of `usage` whose sample value `keyring` actually opens (retired keys
        included: what matters is whether the material is there)."""
        ...

    def keyring_record(self) -> dict[str, str]:
        """Key id → fingerprint as recorded in etcd (empty when never recorded)."""
        ...

    def record_keyring(self, keyring: Keyring) -> None:
        """Record the keyring's key ids and fingerprints (never material) in etcd."""
        ...

    def scrub(self, component: str) -> ScrubReport | None:
        """Open and verify every sealed value of `component` (`defender_config.scrub_component`);
        None when it has none. Nothing is alerted: the caller announces findings."""
        ...

    def restore_active(self, component: str, version: int, *, modified_by: str) -> None:
        """Rewrite ACTIVE from its verified history entry `version`; RepairRefusedError when
        the entry or the metadata does not verify, or the component changed meanwhile."""
        ...

    def close(self) -> None: ...
