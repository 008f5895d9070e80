"""Versioned component configs: MASTER (create-only), ACTIVE (CAS on version), metadata, history.

Every write of a version is ONE etcd transaction that puts ACTIVE, metadata and the history entry
and prunes history beyond the limit, guarded by the metadata's mod_revision (so two writers never
both win) and by the absence of the freeze marker (so a freeze takes effect atomically).
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._client import DefenderClient
from ._envelope import is_envelope
from ._errors import (
    ConfigFrozenError,
    ConfigValidationError,
    ConflictError,
    DefenderConfigError,
    EnvelopeError,
    FieldError,
    NotFoundError,
    StoreError,
    StoreUnavailableError,
    ValueTooLargeError,
)
from ._models import ComponentType, canonical_json, config_digest, validate_config
from ._settings import EnvelopeOptions
from ._store import WatchHandle
from ._store_types import Compare, DeleteOp, GetOp, PutOp, StoredValue, WatchEvent

__all__ = [
    "ActiveConfig",
    "ConfigMetadata",
    "ConfigStore",
    "FreezeInfo",
    "HistoryEntry",
    "InvalidConfigPolicy",
    "RewrapReport",
    "SeedResult",
    "StoragePolicy",
]

log = logging.getLogger("defender_config.configs")

#: Bytes a RequestOp adds around key and value in a TxnRequest (tags, lengths), rounded up.
_PER_OP_OVERHEAD = 64


class InvalidConfigPolicy(enum.StrEnum):
    """What a rejected commit does to ACTIVE (it is always alerted and raised)."""

    KEEP = "keep"
    """ACTIVE stays as it was."""
    REVERT_TO_MASTER = "revert_to_master"
    """ACTIVE is rolled back to MASTER: the component returns to its known-good original."""


class StoragePolicy(BaseModel):
    """How a component's sealed values (MASTER, ACTIVE, history) are written, recorded in its
    metadata. Readers take `encrypt` from here, not from the value: a component recorded with
    `encrypt=false` may be read unencrypted even by a reader whose store-wide options encrypt,
    and one recorded with `encrypt=true` is never accepted unencrypted, whatever the reader's
    own options say. The header of a value never decides what is acceptable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    compress: bool
    encrypt: bool
    level: int = Field(ge=1, le=22)
    threshold_bytes: int = Field(ge=0)

    @classmethod
    def from_options(cls, options: EnvelopeOptions) -> StoragePolicy:
        return cls(
            compress=options.compress,
            encrypt=options.encrypt,
            level=options.level,
            threshold_bytes=options.threshold_bytes,
        )

    def write_options(self, base: EnvelopeOptions) -> EnvelopeOptions:
        """`base` (codecs, caps) with this policy's switches and compression settings."""
        return base.model_copy(
            update={
                "compress": self.compress,
                "encrypt": self.encrypt,
                "level": self.level,
                "threshold_bytes": self.threshold_bytes,
            }
        )

    def read_options(self, base: EnvelopeOptions) -> EnvelopeOptions:
        """What a reader requires: encryption exactly when the policy says so. A policy without
        encryption and compression also accepts values stored as bare plaintext."""
        return base.model_copy(update={"compress": self.compress, "encrypt": self.encrypt})


class ConfigMetadata(BaseModel):
    """`components/<name>/metadata` (plaintext JSON, readable with etcdctl)."""

    model_config = ConfigDict(extra="allow")

    version: int = Field(ge=1)
    last_modified: datetime
    modified_by: str
    digest: str
    type: str
    json_schema: dict[str, Any] | None = None
    note: str | None = None
    storage: StoragePolicy | None = None
    """None for records written before per-component storage existed: store-wide options."""


class FreezeInfo(BaseModel):
    """`control/<name>/freeze`: while present, commits are refused."""

    model_config = ConfigDict(extra="allow")

    reason: str = ""
    since: datetime
    by: str | None = None


@dataclass(frozen=True)
class ComponentOverview:
    """What `ConfigStore.overview` read: None where the record is absent."""

    metadata: ConfigMetadata | None
    master: dict[str, Any] | None
    frozen: FreezeInfo | None


@dataclass(frozen=True, slots=True)
class ActiveConfig:
    """ACTIVE, decoded. `version` is None only if metadata could not be matched to it (a
    commit landed between the two reads and the store became unreachable)."""

    component: str
    config: dict[str, Any] = field(repr=False)
    version: int | None
    digest: str
    mod_revision: int
    stale: bool = False
    codec: str = ""
    """The component's own storage rule (`zstd+aes-256-gcm`, `none+none`, ...) from its
    metadata record, not the store-wide default; what heartbeats report."""


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    version: int
    config: dict[str, Any] = field(repr=False)
    digest: str


@dataclass(frozen=True, slots=True)
class SeedResult:
    """`created` is True for the one registration that wrote MASTER; the others adopt it."""

    created: bool
    metadata: ConfigMetadata
    matches_master: bool


@dataclass(slots=True)
class RewrapReport:
    scanned: int = 0
    sealed: int = 0
    rewrapped: int = 0
    already_current: int = 0
    conflicts: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def _now() -> datetime:
    return datetime.now(UTC)


class ConfigStore:
    """MASTER/ACTIVE/history of every component, through one DefenderClient."""

    def __init__(
        self,
        client: DefenderClient,
        *,
        history_limit: int | None = None,
        on_invalid: InvalidConfigPolicy | Literal["keep", "revert_to_master"] = "keep",
    ) -> None:
        self.client = client
        self.layout = client.layout
        self.history_limit = history_limit or client.settings.history_limit
        if self.history_limit < 1:
            raise ValueError("history_limit must be at least 1")
        self.on_invalid = InvalidConfigPolicy(on_invalid)

    # --- reads ----------------------------------------------------------------------------------

    def get_metadata(self, component: str) -> ConfigMetadata | None:
        got = self._metadata(component)
        return got[0] if got is not None else None

    def _metadata(self, component: str) -> tuple[ConfigMetadata, StoredValue] | None:
        path = self.layout.metadata(component)
        got = self.client.get_json(path)
        if got is None:
            return None
        data, stored = got
        return _parse_metadata(path, data), stored

    def _metadata_at(self, component: str, revision: int) -> ConfigMetadata | None:
        """The metadata as of `revision`: the record written in the same transaction as a value
        read at that revision, so its storage policy is the one that value was sealed under."""
        meta_key = self.layout.metadata(component)
        try:
            stored = self.client.store.get(meta_key, revision=revision)
        except StoreError:  # compacted: the current record (same policy unless it changed)
            stored = self.client.store.get(meta_key)
        if stored is None:
            return None
        return _parse_metadata(meta_key, self.client.decode_json(meta_key, stored.value))

    def _read_options(self, meta: ConfigMetadata | None) -> EnvelopeOptions | None:
        """Per-component reader options from the metadata record; None = store-wide."""
        if meta is None or meta.storage is None:
            return None
        return meta.storage.read_options(self.client.envelope.options)

    def _codec(self, meta: ConfigMetadata | None) -> str:
        """The label of the rule values of this component are sealed with."""
        base = self.client.envelope.options
        return self.client.envelope.codec_label(self._effective_policy(meta).write_options(base))

    def _effective_policy(self, meta: ConfigMetadata | None) -> StoragePolicy:
        if meta is not None and meta.storage is not None:
            return meta.storage
        return StoragePolicy.from_options(self.client.envelope.options)

    def _open_config(
        self,
        path: str,
        blob: bytes,
        component: str,
        options: EnvelopeOptions | None = None,
    ) -> dict[str, Any]:
        data = self.client.open(path, blob, options, component=component)
        return _decode_config(path, data, component)

    def get_master(self, component: str) -> dict[str, Any]:
        """MASTER, decoded. NotFoundError if the component never registered."""
        path = self.layout.master_config(component)
        stored = self.client.store.get(path)
        if stored is None:
            raise NotFoundError(path, detail=f"component {component!r} is not registered")
        meta = self.get_metadata(component)
        return self._open_config(path, stored.value, component, self._read_options(meta))

    def get_active(self, component: str) -> ActiveConfig:
        """ACTIVE with its version. Served stale (flagged) from cache when etcd is unreachable."""
        path = self.layout.active_config(component)
        attempts = 3
        for attempt in range(attempts):
            stored = self.client.store.get(path)
            if stored is None:
                raise NotFoundError(path, detail=f"component {component!r} is not registered")
            # Metadata as of ACTIVE's revision carries the policy ACTIVE was sealed under; a
            # cached (stale) ACTIVE can only be matched with the cached current record.
            meta: ConfigMetadata | None = None
            meta_error: DefenderConfigError | None = None
            try:
                if stored.stale:
                    got = self._metadata(component)
                    meta = got[0] if got is not None else None
                else:
                    meta = self._metadata_at(component, stored.mod_revision)
            except DefenderConfigError as exc:
                # A broken record is reported after ACTIVE itself, opened with the store-wide
                # options, so a broken value is not masked by it.
                meta_error = exc
            config = self._open_config(path, stored.value, component, self._read_options(meta))
            if meta_error is not None:
                raise meta_error
            digest = config_digest(config)
            version = meta.version if meta is not None and meta.digest == digest else None
            if version is not None or stored.stale or attempt == attempts - 1:
                return ActiveConfig(
                    component,
                    config,
                    version,
                    digest,
                    stored.mod_revision,
                    stored.stale,
                    self._codec(meta),
                )
            # A commit landed between the two reads: read both again.
        raise AssertionError("unreachable")

    def history(self, component: str) -> list[HistoryEntry]:
        """The kept versions of ACTIVE, oldest first."""
        entries: list[HistoryEntry] = []
        options = self._read_options(self.get_metadata(component))
        for sv in self.client.store.list_prefix(self.layout.history_dir(component)):
            parsed = self.layout.parse(sv.key)
            if parsed is None or parsed.version is None:
                continue
            config = self._open_config(sv.key, sv.value, component, options)
            entries.append(HistoryEntry(parsed.version, config, config_digest(config)))
        return entries

    def frozen(self, component: str) -> FreezeInfo | None:
        stored = self.client.store.get(self.layout.freeze(component))
        if stored is None:
            return None
        return _parse_freeze(stored.value)

    def overview(self, component: str) -> ComponentOverview:
        """Metadata, MASTER (decoded) and the freeze record, read in one etcd transaction: one
        round trip and one revision, for callers that look at many components often (the
        operator's monitor passes). Errors as `get_metadata` and `get_master`."""
        paths = (
            self.layout.metadata(component),
            self.layout.master_config(component),
            self.layout.freeze(component),
        )
        gets = self.client.store.txn([], [GetOp(p) for p in paths]).gets
        meta_sv, master_sv, freeze_sv = (found[0] if found else None for found in gets)
        meta = (
            _parse_metadata(paths[0], self.client.decode_json(paths[0], meta_sv.value))
            if meta_sv is not None
            else None
        )
        master = (
            self._open_config(paths[1], master_sv.value, component, self._read_options(meta))
            if master_sv is not None
            else None
        )
        return ComponentOverview(
            metadata=meta,
            master=master,
            frozen=_parse_freeze(freeze_sv.value) if freeze_sv is not None else None,
        )

    # --- writes ---------------------------------------------------------------------------------

    def seed(
        self,
        component: str,
        config: Mapping[str, Any],
        component_type: ComponentType | str,
        *,
        by: str,
        json_schema: Mapping[str, Any] | None = None,
        options: EnvelopeOptions | None = None,
    ) -> SeedResult:
        """Register the component's config: MASTER, ACTIVE v1, metadata and history/1 in ONE
        create-only transaction. If MASTER exists already (another instance won), nothing is
        written and the existing metadata is returned: MASTER is never overwritten.

        `options` seals this component's values (instead of the store-wide options) and is
        recorded in the metadata as its StoragePolicy: later commits keep it unless they pass
        their own, and readers take the encryption requirement from it."""
        ctype = ComponentType(component_type)
        normalized = self._validate(component, ctype.value, config, json_schema)
        digest = config_digest(normalized)
        data = canonical_json(normalized)
        meta = ConfigMetadata(
            version=1,
            last_modified=_now(),
            modified_by=by,
            digest=digest,
            type=ctype.value,
            json_schema=dict(json_schema) if json_schema is not None else None,
            note="registered",
            storage=StoragePolicy.from_options(options) if options is not None else None,
        )
        lay, c = self.layout, self.client
        master, active, meta_key = (
            lay.master_config(component),
            lay.active_config(component),
            lay.metadata(component),
        )
        history = lay.history(component, 1)
        puts: list[PutOp | DeleteOp | GetOp] = [
            PutOp(master, c.seal(master, data, options)),
            PutOp(active, c.seal(active, data, options)),
            PutOp(meta_key, _encode_metadata(meta)),
            PutOp(history, c.seal(history, data, options)),
        ]
        self._check_request_size(active, puts)
        result = c.store.txn([Compare.absent(master)], puts, [GetOp(meta_key), GetOp(master)])
        if result.succeeded:
            log.info("component %s registered (MASTER written by %s)", component, by)
            return SeedResult(created=True, metadata=meta, matches_master=True)
        existing_meta = result.gets[0][0] if result.gets and result.gets[0] else None
        existing_master = result.gets[1][0] if len(result.gets) > 1 and result.gets[1] else None
        if existing_meta is None or existing_master is None:
            raise ConflictError(
                meta_key,
                detail="MASTER exists but metadata is missing; repair the component keys",
                retryable=False,
            )
        current = _parse_metadata(meta_key, c.decode_json(meta_key, existing_meta.value))
        master_cfg = self._open_config(
            master, existing_master.value, component, self._read_options(current)
        )
        same = config_digest(master_cfg) == digest
        if not same:
            log.info(
                "component %s: MASTER exists with another config; adopting it (%s)",
                component,
                by,
            )
        return SeedResult(created=False, metadata=current, matches_master=same)

    def commit(
        self,
        component: str,
        new_config: Mapping[str, Any],
        by: str,
        expected_version: int | None = None,
        *,
        note: str | None = None,
        options: EnvelopeOptions | None = None,
    ) -> int:
        """Validate and write a new ACTIVE version; returns the version now active.

        `options` (None = the component's recorded StoragePolicy, else the store-wide options)
        seals the new version and becomes the component's policy. A change of the encryption
        or compression switch also re-seals MASTER and the kept history in the same
        transaction, so readers can apply one policy to every value of the component.

        Refused with ConfigFrozenError while the freeze marker exists, ConflictError if the
        version moved on (`expected_version`, or a concurrent commit). A config the component's
        model rejects raises ConfigValidationError after an alert; with policy
        REVERT_TO_MASTER, ACTIVE is rolled back to MASTER first."""
        freeze = self.frozen(component)
        if freeze is not None:
            raise self._frozen_error(component, freeze)
        meta, meta_stored = self._metadata_for_write(component, "; seed it first")
        if expected_version is not None and expected_version != meta.version:
            raise ConflictError(
                self.layout.active_config(component),
                expected=expected_version,
                found=meta.version,
                detail="config version moved on",
            )
        try:
            normalized = self._validate(component, meta.type, new_config, meta.json_schema)
        except ConfigValidationError:
            if self.on_invalid is InvalidConfigPolicy.REVERT_TO_MASTER:
                try:
                    self.rollback(component, "master", f"{by} (auto: rejected config)")
                except DefenderConfigError as exc:
                    log.error("automatic rollback of %s to MASTER failed: %s", component, exc)
            raise
        digest = config_digest(normalized)
        policy_unchanged = options is None or (meta.storage == StoragePolicy.from_options(options))
        if digest == meta.digest and policy_unchanged:
            return meta.version  # nothing changes: no new version, no watch event
        try:
            return self._write_version(
                component,
                normalized,
                by,
                meta,
                meta_stored,
                note=note,
                respect_freeze=True,
                options=options,
            )
        except ConflictError:
            # A write retried after a lost response finds its own first attempt applied and
            # reports the compare as lost: if the version after ours is ours, it landed.
            now = self.get_metadata(component)
            if (
                now is not None
                and now.version == meta.version + 1
                and now.digest == digest
                and now.modified_by == by
            ):
                return now.version
            raise

    def rollback(
        self,
        component: str,
        to: Literal["master"] | int,
        by: str,
        *,
        options: EnvelopeOptions | None = None,
    ) -> int:
        """Make MASTER (`to="master"`) or a kept history version ACTIVE again, as a new
        version. Allowed while frozen: it is the way back to a known-good config. `options` as
        in `commit`."""
        meta, meta_stored = self._metadata_for_write(component)
        if to == "master":
            target = self.get_master(component)
        else:
            path = self.layout.history(component, int(to))
            stored = self.client.store.get(path)
            if stored is None:
                kept = [e.version for e in self.history(component)]
                raise NotFoundError(
                    path,
                    detail=f"version {to} is not kept (history holds {kept}); "
                    "roll back to one of those or to master",
                )
            target = self._open_config(path, stored.value, component, self._read_options(meta))
        version = self._write_version(
            component,
            target,
            by,
            meta,
            meta_stored,
            note=f"rollback to {to}",
            respect_freeze=False,
            options=options,
        )
        self.client.alerter.event(
            "ConfigRolledBack",
            component,
            f"ACTIVE of {component!r} rolled back to {to} as version {version} by {by}",
            instance=self.client.instance,
        )
        return version

    def _write_version(
        self,
        component: str,
        config: dict[str, Any],
        by: str,
        meta: ConfigMetadata,
        meta_stored: StoredValue,
        *,
        note: str | None,
        respect_freeze: bool,
        options: EnvelopeOptions | None = None,
    ) -> int:
        lay, c = self.layout, self.client
        version = meta.version + 1
        data = canonical_json(config)
        if options is not None:
            policy: StoragePolicy | None = StoragePolicy.from_options(options)
            write: EnvelopeOptions | None = options
        else:
            policy = meta.storage
            write = policy.write_options(c.envelope.options) if policy is not None else None
        new_meta = meta.model_copy(
            update={
                "version": version,
                "last_modified": _now(),
                "modified_by": by,
                "digest": config_digest(config),
                "note": note,
                "storage": policy,
            }
        )
        active, meta_key, freeze = (
            lay.active_config(component),
            lay.metadata(component),
            lay.freeze(component),
        )
        history = lay.history(component, version)
        compares = [Compare.mod_revision_is(meta_key, meta_stored.mod_revision)]
        if respect_freeze:
            compares.append(Compare.absent(freeze))
        success: list[PutOp | DeleteOp | GetOp] = [
            PutOp(active, c.seal(active, data, write)),
            PutOp(meta_key, _encode_metadata(new_meta)),
            PutOp(history, c.seal(history, data, write)),
        ]
        oldest_kept = version - self.history_limit + 1
        old, new = self._effective_policy(meta), self._effective_policy(new_meta)
        if (old.encrypt, old.compress) != (new.encrypt, new.compress):
            # Readers apply the current policy to every value of the component: re-seal the
            # ones kept from before, guarded so a concurrent rewrap is not overwritten.
            compares.extend(
                self._reseal_kept(component, meta, write, oldest_kept, success, with_active=False)
            )
        if oldest_kept > 1:
            # Everything below the oldest kept version, in one range delete.
            success.append(
                DeleteOp(lay.history_dir(component), range_end=lay.history(component, oldest_kept))
            )
        self._check_request_size(active, success)
        result = c.store.txn(compares, success, [GetOp(freeze), GetOp(meta_key)])
        if result.succeeded:
            log.info("component %s: version %d written by %s", component, version, by)
            return version
        frozen_now = result.gets[0] if result.gets else ()
        if respect_freeze and frozen_now:
            raise self._frozen_error(component, _parse_freeze(frozen_now[0].value))
        found: int | None = None
        if len(result.gets) > 1 and result.gets[1]:
            found = _parse_metadata(
                meta_key, c.decode_json(meta_key, result.gets[1][0].value)
            ).version
        raise ConflictError(
            active, expected=meta.version, found=found, detail="another commit landed first"
        )

    def _reseal_kept(
        self,
        component: str,
        meta: ConfigMetadata,
        write: EnvelopeOptions | None,
        oldest_kept: int,
        success: list[PutOp | DeleteOp | GetOp],
        *,
        with_active: bool,
    ) -> list[Compare]:
        """Append puts re-sealing MASTER, the history from `oldest_kept` on (and ACTIVE when
        `with_active`); return the compares that guard them."""
        lay, c = self.layout, self.client
        read = self._read_options(meta)
        kept = [
            sv
            for sv in c.store.list_prefix(lay.history_dir(component))
            if (parsed := lay.parse(sv.key)) is not None
            and parsed.version is not None
            and parsed.version >= oldest_kept
        ]
        singles = [lay.master_config(component)]
        if with_active:
            singles.append(lay.active_config(component))
        others = [sv for sv in (c.store.get(p) for p in singles) if sv is not None]
        compares: list[Compare] = []
        for sv in [*kept, *others]:
            plain = c.open(sv.key, sv.value, read, component=component)
            success.append(PutOp(sv.key, c.seal(sv.key, plain, write)))
            compares.append(Compare.mod_revision_is(sv.key, sv.mod_revision))
        return compares

    def set_storage(self, component: str, options: EnvelopeOptions, by: str) -> bool:
        """Make `options` the component's StoragePolicy without a new config version: MASTER,
        ACTIVE, the kept history and the metadata record are re-sealed/rewritten in one
        transaction guarded by their mod_revisions. Returns False when the policy is already
        that. Allowed while frozen: the config does not change (watchers see the same digest)."""
        meta, meta_stored = self._metadata_for_write(component)
        policy = StoragePolicy.from_options(options)
        if meta.storage == policy:
            return False
        meta_key = self.layout.metadata(component)
        success: list[PutOp | DeleteOp | GetOp] = [
            PutOp(meta_key, _encode_metadata(meta.model_copy(update={"storage": policy})))
        ]
        compares = [Compare.mod_revision_is(meta_key, meta_stored.mod_revision)]
        compares.extend(self._reseal_kept(component, meta, options, 1, success, with_active=True))
        self._check_request_size(self.layout.active_config(component), success)
        if not self.client.store.txn(compares, success, []).succeeded:
            raise ConflictError(
                self.layout.active_config(component),
                detail="a commit or rewrap landed while the storage policy was changing; retry",
            )
        log.info(
            "component %s: storage policy %s set by %s (%d values re-sealed)",
            component,
            policy,
            by,
            len(success) - 1,
        )
        return True

    def freeze(self, component: str, reason: str, by: str | None = None) -> None:
        """Refuse commits to `component` until `unfreeze`."""
        info = FreezeInfo(reason=reason, since=_now(), by=by)
        self.client.put_json(self.layout.freeze(component), info.model_dump(mode="json"))
        self.client.alerter.event(
            "ConfigFrozen", component, f"commits refused: {reason}", instance=self.client.instance
        )

    def unfreeze(self, component: str) -> bool:
        return self.client.store.delete(self.layout.freeze(component))

    # --- watch ----------------------------------------------------------------------------------

    def watch_active(
        self,
        component: str,
        callback: Callable[[ActiveConfig], None],
        *,
        on_error: Callable[[DefenderConfigError], None] | None = None,
        initial: bool = True,
    ) -> WatchHandle:
        """Call `callback(active)` with the decoded ACTIVE config on every change (and once at
        start when `initial`). A value that fails to decode is alerted and handed to `on_error`
        (logged if None); the watch goes on. Re-seals that do not change the config (key
        rotation) are not delivered."""
        path = self.layout.active_config(component)
        store = self.client.store
        start = store.current_revision(path) + 1
        last_digest: list[str | None] = [None]

        def fail(exc: DefenderConfigError) -> None:
            if on_error is not None:
                try:
                    on_error(exc)
                except Exception:
                    log.exception("watch_active on_error callback failed")
            else:
                log.error("watch_active %s: %s", component, exc)

        def deliver(value: bytes, mod_revision: int) -> None:
            meta = self._meta_for_watch(component, mod_revision)
            try:
                config = self._open_config(path, value, component, self._read_options(meta))
            except EnvelopeError as exc:  # already alerted by client.open
                fail(exc)
                return
            except DefenderConfigError as exc:
                self.client.report(exc, path=path, component=component)
                fail(exc)
                return
            digest = config_digest(config)
            if digest == last_digest[0]:
                return
            version = meta.version if meta is not None and meta.digest == digest else None
            last_digest[0] = digest
            callback(
                ActiveConfig(
                    component, config, version, digest, mod_revision, codec=self._codec(meta)
                )
            )

        if initial:
            stored = store.get(path)
            if stored is not None:
                deliver(stored.value, stored.mod_revision)

        def on_event(event: WatchEvent) -> None:
            if event.kind == "put":
                deliver(event.value, event.mod_revision)

        def on_store_error(exc: StoreError) -> None:
            fail(exc)

        return store.watch_key(path, on_event, start_revision=start, on_error=on_store_error)

    def _version_at(self, component: str, digest: str, revision: int) -> int | None:
        """The metadata version written with ACTIVE at `revision` if it matches `digest`."""
        meta = self._meta_for_watch(component, revision)
        return meta.version if meta is not None and meta.digest == digest else None

    def _meta_for_watch(self, component: str, revision: int) -> ConfigMetadata | None:
        """The metadata written with ACTIVE at `revision` (same transaction), read as of that
        revision so later commits do not hide its version and policy; None if unreadable (the
        value is then opened with the store-wide options)."""
        try:
            return self._metadata_at(component, revision)
        except DefenderConfigError as exc:
            log.warning("watch_active %s: metadata unreadable: %s", component, exc)
            return None

    # --- key rotation ---------------------------------------------------------------------------

    def rewrap_all(self, prefix: str | None = None) -> RewrapReport:
        """Re-seal every sealed value under `prefix` (default: the whole deployment) that is not
        sealed with the current primary key and codecs. See `rewrap_values`."""
        return self.rewrap_values(self.client.store.list_prefix(prefix or self.layout.prefix + "/"))

    def rewrap_values(self, values: Iterable[StoredValue]) -> RewrapReport:
        """Re-seal these values with compare-and-swap, so a concurrent commit is never
        overwritten: a value that changed since it was read is re-read and retried once.
        Values that cannot be opened are alerted and counted as failed."""
        report = RewrapReport()
        c = self.client
        # Per component: (read, write) options from its recorded StoragePolicy.
        policies: dict[str, tuple[EnvelopeOptions | None, EnvelopeOptions | None]] = {}
        for sv in values:
            report.scanned += 1
            if not is_envelope(sv.value):
                continue
            report.sealed += 1
            read, write = self._rewrap_options(sv.key, policies)
            current: StoredValue | None = sv
            for attempt in range(2):
                if current is None:
                    break  # deleted meanwhile: nothing left to rewrap
                try:
                    try:
                        stale_seal = c.envelope.needs_reseal(current.value, write)
                    except EnvelopeError as exc:  # a corrupt header: c.open did not see it
                        c.report(exc, path=current.key)
                        raise
                    if not stale_seal:
                        report.already_current += 1
                        break
                    data = c.open(current.key, current.value, read)
                    resealed = c.seal(current.key, data, write)
                    c.store.compare_and_swap(
                        current.key, current.mod_revision, resealed, lease=current.lease_id
                    )
                    report.rewrapped += 1
                    break
                except ConflictError:
                    if attempt == 1:
                        report.conflicts += 1
                        break
                    current = c.store.get(sv.key)
                except EnvelopeError as exc:
                    report.failed += 1
                    report.errors.append(f"{sv.key}: {exc.reason}")
                    break
        log.info(
            "rewrap: %d scanned, %d rewrapped, %d current, %d conflicts, %d failed",
            report.scanned,
            report.rewrapped,
            report.already_current,
            report.conflicts,
            report.failed,
        )
        return report

    def _rewrap_options(
        self,
        key: str,
        cache: dict[str, tuple[EnvelopeOptions | None, EnvelopeOptions | None]],
    ) -> tuple[EnvelopeOptions | None, EnvelopeOptions | None]:
        parsed = self.layout.parse(key)
        if parsed is None or parsed.kind not in ("master_config", "active_config", "history"):
            return None, None
        if parsed.component not in cache:
            meta = self.get_metadata(parsed.component)
            policy = meta.storage if meta is not None else None
            base = self.client.envelope.options
            cache[parsed.component] = (
                (policy.read_options(base), policy.write_options(base))
                if policy is not None
                else (None, None)
            )
        return cache[parsed.component]

    # --- helpers --------------------------------------------------------------------------------

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
            self.client.alerter.error(exc, component, instance=self.client.instance)
            raise

    def _check_request_size(self, path: str, ops: list[PutOp | DeleteOp | GetOp]) -> None:
        """One version is written as one transaction holding several sealed copies (ACTIVE,
        history, and MASTER at registration); etcd refuses requests over its limit as a whole,
        so check the sum before sending instead of failing with an opaque etcd error."""
        limit = self.client.envelope.options.request_limit_bytes
        size = sum(
            len(op.key) + len(op.value) + _PER_OP_OVERHEAD for op in ops if isinstance(op, PutOp)
        )
        if size > limit:
            raise ValueTooLargeError(
                size,
                limit,
                path=path,
                what="etcd request limit for one config version (ACTIVE + history copy + "
                "metadata, + MASTER at registration)",
            )

    def _frozen_error(self, component: str, info: FreezeInfo) -> ConfigFrozenError:
        return ConfigFrozenError(
            component,
            why=info.reason,
            since=info.since.isoformat(),
            marker=self.layout.freeze(component),
        )

    def _metadata_for_write(
        self, component: str, hint: str = ""
    ) -> tuple[ConfigMetadata, StoredValue]:
        """The metadata record a write is based on: it must exist and be fresh, since a write
        computed from a stale (cached) record would be built on a version that may be gone."""
        got = self._metadata(component)
        if got is None:
            raise NotFoundError(
                self.layout.metadata(component),
                detail=f"component {component!r} is not registered{hint}",
            )
        if got[1].stale:
            raise self._unavailable_for_write(component)
        return got

    def _unavailable_for_write(self, component: str) -> StoreError:
        return StoreUnavailableError(
            self.client.store.endpoints,
            f"cannot write the config of {component!r}: only a cached copy of its metadata "
            "is readable",
        )


def _encode_metadata(meta: ConfigMetadata) -> bytes:
    return json.dumps(meta.model_dump(mode="json"), sort_keys=True).encode()


def _parse_metadata(path: str, data: Any) -> ConfigMetadata:
    try:
        return ConfigMetadata.model_validate(data)
    except ValidationError as exc:
        raise StoreError(
            f"metadata at {path!r} is not a valid record ({exc.error_count()} problems: "
            f"{_first_error(exc)}); it was edited by hand: restore it from the component's "
            "history or re-register",
            path=path,
        ) from exc


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False, include_input=False)[0]
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"


def _parse_freeze(raw: bytes | Any) -> FreezeInfo:
    data = raw
    if isinstance(raw, bytes):
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            data = raw.decode("utf-8", "replace")
    try:
        return FreezeInfo.model_validate(data)
    except ValidationError:
        # A marker written by hand (etcdctl put .../freeze yes) still freezes.
        return FreezeInfo(reason=str(data)[:200], since=_now())


def _decode_config(path: str, data: bytes, component: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigValidationError(
            component, [FieldError("", f"stored config at {path} is not JSON")]
        ) from exc
    if not isinstance(value, dict):
        raise ConfigValidationError(
            component, [FieldError("", f"stored config at {path} is not a JSON object")]
        )
    return value
