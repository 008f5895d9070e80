"""`Backend` implemented with the shared library: every etcd read/write, every seal/open and
every key operation below goes through `defender_config` (ConfigStore, Registry,
DefenderClient); this module only adapts shapes."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from defender_config import (
    Alert,
    Cadence,
    ChangeKind,
    ComponentOverview,
    ComponentView,
    ConfigStore,
    ConfigValidationError,
    ConflictError,
    DefenderClient,
    DefenderConfigError,
    EnvelopeOptions,
    Heartbeat,
    InstanceEvent,
    Keyring,
    KeyringError,
    KeyUsage,
    LibrarySettings,
    MasterMissingError,
    RecordAuthError,
    Registry,
    RolloutRecord,
    Rollouts,
    ScrubReport,
    SeedResult,
    StoragePolicy,
    StoreError,
    StoreUnavailableError,
    cadence_put,
    config_digest,
    decode_alerts,
    key_usage,
    keys_opened,
    read_cadence,
    read_key_record,
    restore_active,
    scrub_component,
    view_component,
    view_from,
    view_reads,
    viewed_component,
    write_cadence,
    write_key_record,
)
from defender_config.store import Compare, GetOp, PutOp, StoredValue, WatchEvent
from defender_operator._backend import (
    AlertRecord,
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
from defender_operator._decisions.restarts import MAX_HONOURED_LEASE_TTL_SECONDS
from defender_operator._decisions.storage_budget import Footprint, schema_fits
from defender_operator._errors import OwnerRecordError
from defender_operator._etcd_health import etcd_health, record_metrics
from defender_operator._keys import MutableKeyringSource

log = logging.getLogger("defender_operator.backend")


def _instance(hb: Heartbeat) -> InstanceRecord:
    err = hb.last_error
    return InstanceRecord(
        instance=hb.instance,
        pod=hb.pod,
        time=hb.time,
        status=str(hb.status),
        config_version=hb.config_version,
        config_digest=hb.config_digest,
        key_fingerprint=hb.key_fingerprint,
        key_fingerprints=frozenset(hb.key_fingerprints),
        last_error_reason=err.reason if err is not None else None,
        last_error_detail=err.detail if err is not None else "",
        lease_ttl_seconds=hb.lease_ttl_seconds,
        interval_seconds=hb.interval_seconds,
        lease_id=hb.lease_id,
        verified=hb.verified,
        writer=hb.writer,
        seq=hb.seq,
        checked=hb.verified or hb.unverified is not None,
        unverified=None
        if hb.verified
        else hb.unverified or "read while the operator held no keyring to check its MAC",
    )


def _state(seen: ComponentOverview) -> ComponentState:
    meta = seen.metadata
    return ComponentState(
        master_digest=config_digest(seen.master) if seen.master is not None else None,
        active_digest=meta.digest if meta is not None else None,
        active_version=meta.version if meta is not None else None,
        frozen=seen.frozen is not None,
        freeze_sequence=seen.frozen.sequence if seen.frozen is not None else None,
        storage=meta.storage if meta is not None else None,
        active_modified=meta.last_modified if meta is not None else None,
        active_rollback=meta is not None and meta.change.reverts,
        master_error=str(seen.master_error) if seen.master_error is not None else None,
        registration=meta.registration if meta is not None else None,
    )


def _alert_record(alert: Alert) -> AlertRecord:
    return AlertRecord(alert.component, alert.instance, alert.kind, alert.detail, alert.time)


def _observation(seen: ComponentView) -> Observation:
    return Observation(
        state=_state(seen.overview),
        cadence=seen.cadence,
        rollout=seen.rollout,
        alerts=[_alert_record(a) for a in seen.alerts],
        revision=seen.revision,
    )


class OwnerRecord(BaseModel):
    """`<prefix>/control/<name>/owner`: plaintext JSON, readable with etcdctl. It names a
    Kubernetes object, nothing secret; changing it only changes which resource the operator
    lets write, never what a component runs."""

    model_config = ConfigDict(extra="ignore")

    namespace: str
    name: str
    uid: str
    released: bool = False
    since: datetime | None = None
    by: str = ""


class LibraryBackend:
    def __init__(self, settings: LibrarySettings, keyring: MutableKeyringSource, identity: str):
        self.client = DefenderClient(settings, keyring, instance=identity)
        self.configs = ConfigStore(self.client)
        self.registry = Registry(self.client, self.configs)
        self.layout = self.client.layout
        # component -> (type, schema, digest) of its spec, as last declared by a reconcile: lets
        # a monitor pass re-sign a record that stopped verifying without waiting for one.
        self._declared: dict[str, tuple[str, Mapping[str, Any] | None, str]] = {}
        # component -> the registration its DefenderComponent's status anchors.
        self._anchored: dict[str, int] = {}

    def health(self) -> EtcdHealth:
        report = self.client.store.health()
        record_metrics(report)
        return etcd_health(report)

    @property
    def cluster_id(self) -> int | None:
        return self.client.store.cluster_id

    def state(self, component: str, *, tolerate_master: bool = False) -> ComponentState:
        try:
            seen = self.configs.overview(component, tolerate_master=tolerate_master)
        except RecordAuthError:
            if not self._repair(component):
                raise
            seen = self.configs.overview(component, tolerate_master=tolerate_master)
        return _state(seen)

    def observe(self, component: str, alerts_since: datetime) -> Observation:
        try:
            seen = view_component(self.configs, component, alerts_since=alerts_since)
        except RecordAuthError:
            if not self._repair(component):
                raise
            seen = view_component(self.configs, component, alerts_since=alerts_since)
        return _observation(seen)

    def _repair(self, component: str) -> bool:
        """Re-sign a metadata record that stopped verifying, from the spec a reconcile last
        declared; False when none was declared (then the error stands)."""
        declared = self._declared.get(component)
        if declared is None:
            return False
        ctype, schema, digest = declared
        self.configs.repair_metadata(
            component,
            component_type=ctype,
            json_schema=schema,
            by=f"operator:{self.client.instance}",
            trusted_digest=digest,
            # The status's anchor, else what this reader holds (the registration it read
            # before the record of another was put back).
            registration=self._anchored.get(component) or self.configs.held_registration(component),
        )
        return True

    def _options(self, storage: StoragePolicy | None) -> EnvelopeOptions | None:
        # Codecs and size caps stay the store-wide ones; the spec chooses the switches, the
        # zstd level and the threshold.
        return storage.write_options(self.client.envelope.options) if storage is not None else None

    def declare_storage(self, component: str, storage: StoragePolicy) -> None:
        # The spec (from the Kubernetes API) is the operator's own setting: a component may be
        # read unencrypted only when its spec stores it so. Permission is withdrawn only after
        # its values were re-sealed encrypted (commit / set_storage), which reads them first.
        if not storage.encrypt:
            self.configs.allow_plaintext(component)

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
        self.declare_storage(component, storage)
        judged = self._declared.get(component)
        self._declared[component] = (component_type, json_schema, digest)
        if registration is not None:
            # The status anchors it: this reader refuses any other from now on (the monitor's
            # reads too), and the repairs below take values of it only.
            self.configs.hold_registration(component, registration)
            self._anchored[component] = registration
        # One read answers whether the component exists, what a new one holds (the seed
        # needs it) and what the repair and the schema check would read first.
        gets = self.client.store.txn([], self.configs.overview_reads(component)).gets
        meta_sv, master_sv = (found[0] if found else None for found in gets[:2])
        if meta_sv is None and master_sv is None:
            # A new component: its seed writes a signed record with the schema.
            return Declared(state=_state(self.configs.overview_of(component, gets, False)))
        # An edited spec.customSchema governs the next commit even when spec.config did not
        # change with it (a commit by rag, say). When ACTIVE (a rollback, a commit by rag) is
        # not valid under it, it is recorded with the next commit of spec.config instead.
        # Judged before anything is written, the repair included: a record re-signed below is
        # rebuilt with the spec's schema in it, whatever schema the record held.
        growth = 0
        if schema_cap is not None:
            growth = self.configs.schema_growth(component, json_schema, metadata=meta_sv)
            if not schema_fits(growth, schema_cap):
                # Nor does a monitor pass re-sign with it (`_repair`): the schema the last
                # declare got past its cap, if any.
                if judged is None:
                    del self._declared[component]
                else:
                    self._declared[component] = (component_type, judged[1], digest)
                return Declared(schema_growth=growth, schema_capped=True)
        replays: list[str] = []
        resigned = self.configs.repair_metadata(
            component,
            component_type=component_type,
            json_schema=json_schema,
            by=modified_by,
            trusted_digest=digest,
            stored=(meta_sv, master_sv),
            registration=registration,
            replays=replays,
        )
        # The record read above is still current unless the repair rewrote it.
        recorded = False
        try:
            recorded = self.configs.set_schema(
                component, json_schema, modified_by, metadata=None if resigned else meta_sv
            )
        except ConfigValidationError as exc:
            log.warning("spec.customSchema of %s not recorded yet: %s", component, exc)
        if resigned or recorded or replays:
            # The record (or the history) changed: the caller reads again.
            return Declared(
                resigned=resigned,
                replayed=tuple(replays),
                schema_growth=growth if recorded or resigned else 0,
            )
        # Nothing written: the read above is the state (the repair verified its record).
        return Declared(state=_state(self.configs.overview_of(component, gets, False)))

    def _sealed_as(self, component: str, storage: StoragePolicy | None) -> None:
        if storage is not None and storage.encrypt:
            self.configs.allow_plaintext(component, False)

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
        # The library writes MASTER, ACTIVE v1 and metadata in one create-only transaction;
        # when MASTER exists it writes nothing and returns what is there. Either way the
        # transaction's response says what etcd holds: no read after it.
        seeded = self._seed(component, component_type, config, json_schema, modified_by, storage)
        if seeded.overview is None:
            return self.state(component)
        return _state(seeded.overview)

    def _seeded(self, component: str, seeded: SeedResult) -> None:
        """This seed wrote a new registration: the reconcile anchors it in the status
        (`decide_registration(seeded=True)`), so the monitor's repairs take it from now on,
        not the anchor the declare was given before (etcd had lost that registration's data)."""
        if seeded.created and seeded.metadata.registration is not None:
            self._anchored[component] = seeded.metadata.registration

    def _seed(
        self,
        component: str,
        component_type: str,
        config: Mapping[str, Any],
        json_schema: Mapping[str, Any] | None,
        modified_by: str,
        storage: StoragePolicy | None,
        also: tuple[Sequence[Compare], Sequence[PutOp]] = ((), ()),
        reads: Sequence[GetOp] = (),
        registration_above: int = 0,
    ) -> SeedResult:
        seeded = self.configs.seed(
            component,
            config,
            component_type,
            by=modified_by,
            json_schema=json_schema,
            options=self._options(storage),
            also=also,
            reads=reads,
            registration_above=registration_above,
        )
        self._seeded(component, seeded)
        return seeded

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
        store = ConfigStore(
            self.client,
            history_limit=history_limit,
            plaintext_components=self.configs.plaintext_components,
        )
        version = store.commit(
            component,
            config,
            modified_by,
            options=self._options(storage),
            json_schema=json_schema,
            above=above,
            # Given to the commit too: the store takes a falsy limit (0) for its default.
            history_limit=history_limit,
        )
        self._sealed_as(component, storage)
        return version

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
        return self.configs.rollback(
            component,
            "master" if to_version is None else to_version,
            modified_by,
            options=self._options(storage),
            change=change,
            history_limit=history_limit,
        )

    def set_storage(self, component: str, storage: StoragePolicy, *, modified_by: str) -> bool:
        options = storage.write_options(self.client.envelope.options)
        changed = self.configs.set_storage(component, options, modified_by)
        self._sealed_as(component, storage)
        return changed

    def freeze(self, component: str, reason: str, *, after: int = 0) -> None:
        self.configs.freeze(component, reason, by="defender-operator", after=after)

    def unfreeze(self, component: str) -> int | None:
        lifted = self.configs.frozen(component)
        self.configs.unfreeze(component)
        return lifted.sequence if lifted is not None else None

    def rollout(self, component: str) -> RolloutRecord | None:
        return Rollouts(self.configs).record(component)

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
        return Rollouts(self.configs).start(
            component, config, canaries, by, sequence=sequence, since=since, digest=digest
        )

    def promote_rollout(self, component: str, *, by: str, history_limit: int) -> int:
        return Rollouts(self.configs).promote(component, by, history_limit=history_limit)

    def abort_rollout(
        self, component: str, reason: str, *, by: str, history_limit: int, freeze_after: int = 0
    ) -> int | None:
        return Rollouts(self.configs).abort(
            component, reason, by, freeze_after=freeze_after, history_limit=history_limit
        )

    def end_rollout(self, component: str, *, sequence: int | None = None) -> None:
        Rollouts(self.configs).end(component, sequence=sequence)

    def purge(self, component: str) -> int:
        self._declared.pop(component, None)
        # The next registration of the name (a new resource) is another one.
        self._anchored.pop(component, None)
        self.configs.forget_registration(component)
        store = self.client.store
        removed = store.delete_prefix(self.layout.component_dir(component))
        removed += store.delete_prefix(self.layout.component_alerts_dir(component))
        removed += int(store.delete(self.layout.freeze(component)))
        removed += int(store.delete(self.layout.cadence(component)))
        removed += int(store.delete(self.layout.rollout(component)))
        # Last: a purge cut short leaves the claim, so only the owner can finish it.
        removed += int(store.delete(self.layout.owner(component)))
        return removed

    def read_claim(self, component: str) -> tuple[Claim | None, int]:
        key = self.layout.owner(component)
        return self._claim(component, self.client.store.get(key))

    def _claim(self, component: str, stored: StoredValue | None) -> tuple[Claim | None, int]:
        key = self.layout.owner(component)
        if stored is None:
            return None, 0
        if stored.stale:
            # Deciding who owns a name from a cached copy could let two resources write.
            raise StoreUnavailableError(
                self.client.store.endpoints, f"cannot read the owner record {key}"
            )
        try:
            rec = OwnerRecord.model_validate(self.client.decode_record(key, stored.value))
        except KeyringError:
            raise  # no keyring to check the MAC with: the record is not to blame
        except (DefenderConfigError, ValidationError, ValueError) as exc:
            raise OwnerRecordError(
                f"owner record {key} is not readable ({type(exc).__name__}); nobody may write"
                f" component {component!r} until it is repaired or deleted (etcdctl del {key})",
                revision=stored.mod_revision,
            ) from exc
        claim = Claim(rec.namespace, rec.name, rec.uid, released=rec.released)
        return claim, stored.mod_revision

    def write_claim(self, component: str, claim: Claim, *, revision: int) -> bool:
        key = self.layout.owner(component)
        done = self.client.store.txn(
            [Compare.mod_revision_is(key, revision)], [self._owner_put(component, claim)]
        )
        return done.succeeded

    def _owner_put(self, component: str, claim: Claim) -> PutOp:
        key = self.layout.owner(component)
        rec = OwnerRecord(
            namespace=claim.namespace,
            name=claim.name,
            uid=claim.uid,
            released=claim.released,
            since=datetime.now(UTC),
            by=self.client.instance or "",
        )
        return PutOp(key, self.client.encode_record(key, rec.model_dump(mode="json")))

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
        # The owner record goes into the seed's create-only transaction, compared absent: the
        # claim lands with the data it covers, or neither does. So does the cadence, and what
        # the first monitor pass would read is read in it too: one round trip for all.
        owner = self._owner_put(component, claim)
        layout = self.layout
        compares = [Compare.absent(owner.key), Compare.absent(layout.metadata(component))]
        try:
            seeded = self._seed(
                component,
                component_type,
                config,
                json_schema,
                modified_by,
                storage,
                also=(compares, [owner, cadence_put(self.client, component, cadence)]),
                reads=view_reads(layout, component),
                registration_above=registration_above,
            )
        except (ConflictError, MasterMissingError):
            # The owner record or metadata is there, or what a deleted MASTER left (refused,
            # not alerted): decide the claim on a read; the visit that owns the name reports it.
            return None
        except StoreError:
            raise
        except DefenderConfigError:
            # MASTER is there and what the seed read of it does not verify: nothing written.
            # The claim is decided on a read first, as for any name that holds something; the
            # steps after it refuse the record and name it.
            return None
        if not seeded.created or seeded.overview is None:
            return None  # MASTER is there: nothing written, the owner record neither
        self._declared[component] = (component_type, json_schema, seeded.metadata.digest)
        seen = view_from(
            self.configs,
            component,
            seeded.overview,
            seeded.read,
            revision=seeded.revision,
            since=alerts_since,
        )
        return _observation(seen)

    def footprint(self, component: str) -> Footprint:
        layout = self.layout
        found = self.client.store.list_prefix(layout.component_dir(component), stale_ok=False)
        active_key, history_dir = layout.active_config(component), layout.history_dir(component)
        # The instances' lease-bound records are the agents', and go with their pods: a budget
        # judged on them would move with every pod started or stopped.
        instances_dir = layout.instances_dir(component)
        total = active = 0
        history: dict[int, int] = {}
        for stored in found:
            if stored.key.startswith(instances_dir):
                continue
            size = len(stored.key.encode()) + len(stored.value)
            total += size
            if stored.key == active_key:
                active = size
            elif stored.key.startswith(history_dir) and stored.key[len(history_dir) :].isdigit():
                history[int(stored.key[len(history_dir) :])] = size
        return Footprint(total=total, active=active, history=history)

    def owners(self) -> dict[str, str]:
        control = self.layout.control_dir
        found = self.client.store.list_prefix(control, stale_ok=False)
        owned: dict[str, str] = {}
        for stored in found:
            component, _, leaf = stored.key[len(control) :].partition("/")
            if leaf != "owner":
                continue
            try:
                claim, _ = self._claim(component, stored)
            except (OwnerRecordError, ValueError):
                # Not a record, or not a component's name (ValueError): names nobody.
                continue
            if claim is not None:
                owned[component] = claim.namespace
        return owned

    def instances(self, component: str) -> Sequence[InstanceRecord]:
        return [_instance(hb) for hb in self.registry.list_instances(component)]

    def last_seen(
        self, component: str, instances: Sequence[InstanceRecord], *, ask: bool = True
    ) -> list[InstanceRecord] | None:
        out = []
        for rec in instances:
            # A reused sighting is safe while the restart decision waits at least the
            # advertised TTL after the last beat: up to MAX_HONOURED_LEASE_TTL_SECONDS.
            ttl = rec.lease_ttl_seconds
            reuse = ttl is not None and ttl <= MAX_HONOURED_LEASE_TTL_SECONDS
            seen: datetime | None
            if ask:
                # An unverified record's names lead to no other record (nothing judges it).
                moved = (component, rec.instance) if rec.verified else None
                seen = self.registry.lease_last_seen(
                    rec.lease_id, ttl, rec.time, reuse=reuse, instance=moved
                )
            else:
                seen = self.registry.lease_sighting(rec.lease_id, ttl, rec.time, reuse=reuse)
            if seen is None:
                return None  # only without `ask`: etcd would have to be asked
            out.append(rec if seen == rec.time else dataclasses.replace(rec, time=seen))
        return out

    def cadence(self, component: str) -> Cadence | None:
        return read_cadence(self.client, component)

    def publish_cadence(self, component: str, cadence: Cadence) -> None:
        write_cadence(self.client, component, cadence)

    def all_instances(self) -> Mapping[str, Sequence[InstanceRecord]]:
        # The heartbeat view's resync replaces the view with this listing and trusts it: a
        # listing cached before an outage (an etcd restore, say) would drop every instance
        # registered since, and their pods would be restarted for heartbeats never looked at.
        return {
            summary.name: [_instance(hb) for hb in summary.instances]
            for summary in self.registry.list_components(fresh=True)
        }

    def watch_instances(
        self,
        callback: InstanceCallback,
        on_error: Callable[[Exception], None],
        *,
        progress_seconds: float | None = None,
        stall_seconds: float | None = None,
    ) -> InstanceWatching:
        def on_event(event: InstanceEvent) -> None:
            if event.kind == "delete":
                callback(event.component, event.instance, None)
            elif event.heartbeat is not None:  # the library logged an unreadable one
                callback(event.component, event.instance, _instance(event.heartbeat))

        return self.registry.watch_instances(
            on_event,
            on_error=on_error,
            progress_seconds=progress_seconds,
            stall_seconds=stall_seconds,
        )

    def watch_changes(
        self,
        callback: ChangeCallback,
        on_error: Callable[[Exception], None],
        *,
        start_revision: int | None = None,
        progress_seconds: float | None = None,
        stall_seconds: float | None = None,
    ) -> Watching:
        layout = self.layout

        def on_event(event: WatchEvent) -> None:
            # One watch over the whole prefix, filtered here: the keys views read live under
            # components/, control/ and alerts/, and three watches would cost three streams.
            # The instances' heartbeats share components/ and are dropped (no view reads them).
            component = viewed_component(layout, event.key)
            if component is not None:
                callback(component, event.mod_revision, event.resync)

        return self.client.store.watch_prefix(
            layout.prefix + "/",
            on_event,
            start_revision=start_revision,
            on_error=on_error,
            progress_seconds=progress_seconds,
            stall_seconds=stall_seconds,
        )

    def revision(self) -> int:
        # A key the operator may read (with etcd auth the revision comes from a read).
        return self.client.store.current_revision(self.layout.prefix + "/")

    def alerts(self, component: str, since: datetime) -> Sequence[AlertRecord]:
        found = self.client.store.list_prefix(self.layout.component_alerts_dir(component))
        return [_alert_record(a) for a in decode_alerts(self.client, found, since)]

    def alert(self, kind: str, component: str, detail: str) -> None:
        self.client.alerter.event(kind, component, detail, instance=self.client.instance)

    def rewrap_all(self) -> int:
        report = self.configs.rewrap_all()
        if report.failed:
            # Values nobody can open stay as they are; say which, by key and reason only.
            raise KeyringError(
                f"rewrap left {report.failed} value(s) unopened: {'; '.join(report.errors[:5])}"
            )
        return report.rewrapped

    def key_usage(self) -> KeyUsage:
        return key_usage(self.client.store.list_prefix(self.layout.prefix + "/"))

    def opens(self, keyring: Keyring, usage: KeyUsage) -> frozenset[str]:
        return keys_opened(keyring, usage, self.client.envelope.options)

    def keyring_record(self) -> dict[str, str]:
        return read_key_record(self.client.store, self.layout)

    def record_keyring(self, keyring: Keyring) -> None:
        write_key_record(self.client.store, self.layout, keyring)

    def scrub(self, component: str) -> ScrubReport | None:
        return scrub_component(self.configs, component)

    def restore_active(self, component: str, version: int, *, modified_by: str) -> None:
        restore_active(self.configs, component, version, by=modified_by)

    def close(self) -> None:
        self.client.close()
