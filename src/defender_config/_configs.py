"""Versioned component configs: MASTER (create-only), ACTIVE (CAS on version), metadata, history.

Every write of a version is ONE etcd transaction that puts ACTIVE, metadata and the history entry
and prunes history beyond the limit, guarded by the metadata's mod_revision (so two writers never
both win) and by the absence of the freeze marker (so a freeze takes effect atomically).
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, NoReturn

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ._client import DefenderClient
from ._envelope import inspect, is_encrypted, is_envelope, registration_of
from ._errors import (
    ConfigFrozenError,
    ConfigValidationError,
    ConflictError,
    DefenderConfigError,
    EnvelopeError,
    FieldError,
    InvalidRollbackTargetError,
    MasterMissingError,
    NotFoundError,
    RecordAuthError,
    RecordReplayError,
    RegistrationReplayError,
    StoreError,
    StoreUnavailableError,
    ValueTooLargeError,
    VersionNotKeptError,
)
from ._json_parse import parse_json
from ._models import canonical_json, config_digest, validate_config
from ._read_again import ReadAgain
from ._records import is_signed, record_key_id, sign_record, verify_record
from ._registrations_file import RegistrationsSource
from ._settings import EnvelopeOptions, LibrarySettings
from ._store import WatchHandle
from ._store_types import (
    Compare,
    DeleteOp,
    GetOp,
    PutOp,
    StoredValue,
    WatchEvent,
)
from .contract import (
    HIGHEST_VERSION,
    ChangeKind,
    ComponentType,
    InvalidConfigPolicy,
    RollbackTarget,
    next_record_sequence,
)

__all__ = [
    "ActiveConfig",
    "ConfigMetadata",
    "ConfigStore",
    "FreezeInfo",
    "HistoryEntry",
    "RewrapReport",
    "SeedResult",
    "StoragePolicy",
]

log = logging.getLogger("defender_config.configs")

#: Bytes a RequestOp adds around key and value in a TxnRequest (tags, lengths), rounded up.
_PER_OP_OVERHEAD = 64


class StoragePolicy(BaseModel):
    """How a component's sealed values (MASTER, ACTIVE, history) are written, recorded in its
    (authenticated) metadata so later writes keep it. It steers writers only: whether a reader
    accepts an unencrypted value is decided by the reader's own settings
    (`LibrarySettings.plaintext_components`), never by anything stored in etcd. A record with
    `encrypt=true` can only make a lenient reader stricter."""

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


class ConfigMetadata(BaseModel):
    """`components/<name>/metadata` (plaintext JSON, readable with etcdctl)."""

    model_config = ConfigDict(extra="allow")

    version: int = Field(ge=1)
    last_modified: datetime
    modified_by: str
    digest: str
    type: str
    json_schema: dict[str, Any] | None = None
    """The schema commits are validated against (besides the type's model), as last set."""
    schema_digest: str | None = None
    """`config_digest` of the JSON schema this version was validated with; None when only the
    type's model validated it, and for records written before the field existed."""
    note: str | None = None
    change: ChangeKind = ChangeKind.COMMIT
    """What made this version. Records written before the field existed get it from their
    note (`ChangeKind.from_note`), so they read as before."""
    storage: StoragePolicy | None = None
    """None for records written before per-component storage existed: store-wide options."""
    authors: dict[str, str] = Field(default_factory=dict)
    """modified_by of each kept version (version number as a string), so history shows who
    wrote every version, not only the newest. Empty for records from before it existed."""
    registration: int | None = Field(default=None, ge=1, le=2**63 - 1)
    """Which registration of the component name this is: stamped by the seed (a sequence above
    the clock in ms, `next_record_sequence`), kept by every later write, and written into the
    header of every encrypted value of the component (MASTER, ACTIVE, history, candidate),
    which the AEAD covers. A component purged and registered again gets a higher one, so a
    record or value of the earlier registration put back is told apart (RegistrationReplayed).
    None: written before registrations existed; the next commit or storage change stamps one
    and re-seals every kept value with it."""

    @model_validator(mode="before")
    @classmethod
    def _change_from_note(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("change") is None:
            note = data.get("note")
            return {**data, "change": ChangeKind.from_note(note if isinstance(note, str) else None)}
        return data


class FreezeInfo(BaseModel):
    """`control/<name>/freeze`: while present, commits are refused."""

    model_config = ConfigDict(extra="allow")

    reason: str = ""
    since: datetime
    by: str | None = None
    sequence: int = Field(default=0, ge=0, le=2**63 - 1)
    """Orders the freezes of a component (signed with the record): the operator anchors the
    sequence of the freeze it lifted in the DefenderComponent status and removes a marker at or
    below it, a saved one put back. 0: written before the field existed."""


@dataclass(frozen=True)
class ComponentOverview:
    """What `ConfigStore.overview` read: None where the record is absent."""

    metadata: ConfigMetadata | None
    master: dict[str, Any] | None = field(repr=False)
    frozen: FreezeInfo | None
    master_error: EnvelopeError | None = None
    """Why MASTER did not open, when `overview(..., tolerate_master=True)` read it (then
    `master` is None although MASTER exists)."""


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
    metadata: ConfigMetadata | None = field(default=None, repr=False)
    """The metadata record written with this ACTIVE value (authenticated when the reader
    holds a keyring): its type and schema are the ones to validate this config with."""
    outdated: bool = False
    """Read at an older revision than a newer version this reader already accepted (not a
    replay: an old watch event or cache entry). Watches do not deliver it."""


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
    overview: ComponentOverview | None = None
    """What etcd holds right after the seed (as `ConfigStore.overview` would read it), from
    the seed's own transaction: a caller needs no read of its own to see what it wrote."""
    read: tuple[tuple[StoredValue, ...], ...] = ()
    """When `created`: what the caller's own `reads` found, in order, read in the seed's
    transaction after its writes."""
    revision: int = 0
    """The etcd revision of the seed's transaction (its writes' mod revision when `created`)."""


@dataclass(slots=True)
class RewrapReport:
    scanned: int = 0
    sealed: int = 0
    rewrapped: int = 0
    already_current: int = 0
    conflicts: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


class _Unread(enum.Enum):
    """The type of _UNREAD: a value the caller did not read (read it here)."""

    VALUE = "unread"


_UNREAD: Final = _Unread.VALUE


class _Any(enum.Enum):
    """The type of ANY_REGISTRATION: a value's registration is not checked."""

    REGISTRATION = "any"


ANY_REGISTRATION: Final = _Any.REGISTRATION


class _Recorded(enum.Enum):
    """The type of RECORDED: `commit` keeps the schema recorded in the metadata."""

    SCHEMA = "recorded"


RECORDED: Final = _Recorded.SCHEMA


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class KeptVersion:
    """A history entry that opened. `authenticated`: it was AEAD-sealed, so its version (in
    its path, the associated data) and its config are a key holder's; a plaintext entry is
    anyone's with etcd write access."""

    version: int
    digest: str
    authenticated: bool


class RepairAction(enum.Enum):
    KEEP = "keep"  # the record verifies and ACTIVE is its config
    HISTORY_MISSING = "history-missing"  # KEEP, but the record's own history entry is gone
    REBUILD = "rebuild"  # record (and ACTIVE where it differs) from the chosen entry
    NOTHING_TO_REBUILD = "nothing-to-rebuild"  # no record, and no history entry opens
    ACTIVE_LOST = "active-lost"  # ACTIVE is not the record's config, which history lost


def _published(settings: LibrarySettings) -> RegistrationsSource | None:
    """The registrations beside the keyring the settings mount, read leniently: a broken file
    is logged and holds nothing, as if none were published (`RegistrationsSource.last_error`)."""
    if settings.keyring_path is None:
        return None
    return RegistrationsSource(
        settings.keyring_path, poll_seconds=settings.keyring_poll_seconds, strict=False
    )


def plan_repair(
    record: tuple[int, str] | None, kept: Iterable[KeptVersion], active_digest: str | None
) -> tuple[RepairAction, KeptVersion | None]:
    """What `repair_metadata` does, from the verified record's (version, digest) (None: it does
    not verify or is absent), the history entries that open, newest first (consumed lazily:
    only as far as needed), and ACTIVE's digest (None: it does not open). Returns the action
    and the entry it is based on.

    Only an authenticated entry newer than a verified record proves the record stale (a
    replay); an unauthenticated one could name any version. A record newer than every entry
    is no replay (a writer puts its history entry in the same transaction): the entry was
    deleted, and rebuilding from an older one would roll ACTIVE back and make the next version
    one that readers already accepted."""
    if record is None:
        # The newest authenticated entry, else (a plaintext component) the newest that opens.
        opened = list(kept)
        source = next((e for e in opened if e.authenticated), opened[0] if opened else None)
        if source is None:
            return RepairAction.NOTHING_TO_REBUILD, None
        return RepairAction.REBUILD, source
    version, digest = record
    source = next((e for e in kept if e.authenticated or e.version <= version), None)
    if source is None or source.version < version:
        if active_digest == digest:
            return RepairAction.HISTORY_MISSING, source
        return RepairAction.ACTIVE_LOST, source
    if (source.version, source.digest) == (version, digest) and active_digest == digest:
        return RepairAction.KEEP, source
    return RepairAction.REBUILD, source


def repair_registration(anchored: int | None, verified: ConfigMetadata | None) -> int | _Any | None:
    """The registration a repair takes values of (`ANY_REGISTRATION`: any). The anchored one
    when there is one (a record of another was already set aside as no record); else the
    verified record's (None for a record from before registrations: only unstamped values);
    else, with neither, any (nothing tells registrations apart: the residual of a component
    whose registration is anchored nowhere)."""
    if anchored is not None:
        return anchored
    if verified is not None:
        return verified.registration
    return ANY_REGISTRATION


class ConfigStore:
    """MASTER/ACTIVE/history of every component, through one DefenderClient.

    `before_parse(component, size)` is called with the decoded size of every config value
    this store opens, after it is authenticated and decompressed and before it is parsed;
    whatever it raises (a DefenderConfigError, to reach the callers' handlers) refuses the
    value. Parsing costs many times the value's size in memory (a list of small numbers,
    ~45x in CPython), so a reader with little memory (the agent) refuses what it cannot
    afford here rather than being killed part way through."""

    def __init__(
        self,
        client: DefenderClient,
        *,
        history_limit: int | None = None,
        on_invalid: InvalidConfigPolicy | str = InvalidConfigPolicy.REJECT,
        plaintext_components: Iterable[str] | None = None,
        before_parse: Callable[[str, int], None] | None = None,
        registrations: RegistrationsSource | None = None,
    ) -> None:
        self.client = client
        self.before_parse = before_parse
        # The registrations the operator publishes beside the mounted keyring
        # (`registrations.json`): every metadata check holds the published registration of its
        # component first, so a reader started after an earlier registration's data was put
        # back refuses it. None without a mounted keyring to read them from.
        self.registrations = (
            registrations if registrations is not None else _published(client.settings)
        )
        self.layout = client.layout
        self.plaintext_components: set[str] = set(
            client.settings.plaintext_components
            if plaintext_components is None
            else plaintext_components
        )
        # component -> (version, digest, ACTIVE mod_revision) of the newest authentic metadata
        # this reader accepted.
        self._accepted: dict[str, tuple[int, str, int]] = {}
        self._accepted_lock = threading.Lock()
        # Versions and sequences are remembered per etcd cluster: a restored one (new cluster
        # id) legitimately starts again below them (`_follow_cluster`).
        self._cluster_changes = client.store.cluster_changes
        # component -> highest rollout sequence seen in an authentic rollout record (`Rollouts`).
        self._rollout_marks: dict[str, int] = {}
        # component -> the registration this reader holds (the newest authentic one it
        # accepted, or the one its caller anchored with `hold_registration`).
        self._registrations: dict[str, int] = {}
        self.history_limit = history_limit or client.settings.history_limit
        if self.history_limit < 1:
            raise ValueError("history_limit must be at least 1")
        self.on_invalid = InvalidConfigPolicy(on_invalid)

    # --- reader policy ----------------------------------------------------------------------

    def requires_encryption(self, component: str) -> bool:
        """Whether this reader refuses unencrypted MASTER/ACTIVE/history values of `component`.
        Decided by the reader's own settings (store-wide `envelope.encrypt`, minus the
        components listed in `plaintext_components`), never by a record in etcd."""
        return self.client.envelope.options.encrypt and component not in self.plaintext_components

    def allow_plaintext(self, component: str, allowed: bool = True) -> None:
        """Add (or remove) `component` to the components this reader accepts unencrypted. For
        readers whose settings come from elsewhere than the settings file (the operator: the
        DefenderComponent's `spec.storage`, read from the Kubernetes API)."""
        if allowed:
            self.plaintext_components.add(component)
        else:
            self.plaintext_components.discard(component)

    def _read_options(self, component: str, meta: ConfigMetadata | None) -> EnvelopeOptions:
        """What a value of `component` must be to be accepted. Encryption is required when the
        reader's settings say so; otherwise the metadata may still make it stricter (a
        component recorded as encrypted is never read in plaintext), never looser."""
        base = self.client.envelope.options
        required = self.requires_encryption(component) or (
            meta is not None and meta.storage is not None and meta.storage.encrypt
        )
        # `compress` matters to `open` only for bare plaintext, which an encrypting reader
        # refuses anyway; compression is a size choice, covered by the AEAD when encrypted.
        return base.model_copy(update={"encrypt": required, "compress": False})

    def _verifying(self) -> bool:
        return self.client.verifies_records

    # --- registrations --------------------------------------------------------------------------

    def hold_registration(self, component: str, registration: int) -> None:
        """Hold `registration` as the current registration of `component`, as if this reader
        had accepted it: records and values of any other one are refused (RegistrationReplay).
        For a reader started after a replay that knows the registration from elsewhere (the
        operator: the DefenderComponent's `status.registration`). Sets it whatever this reader
        held; `hold_registrations` (the operator's published `registrations.json`) only raises."""
        with self._accepted_lock:
            if self._registrations.get(component) != registration:
                self._registrations[component] = registration
                self._accepted.pop(component, None)

    def hold_registrations(self, mapping: Mapping[str, int]) -> None:
        """Hold each component's registration in `mapping` (component -> registration, as
        `read_registrations` returns the operator's `registrations.json`) where this reader
        holds none for it or a lower one; never lower what it holds: a stale file must not make
        a reader refuse the current registration it already saw. Records and values of any
        other registration than the one held are refused (RegistrationReplay)."""
        with self._accepted_lock:
            for component, registration in mapping.items():
                held = self._registrations.get(component)
                if held is None or registration > held:
                    self._registrations[component] = registration
                    self._accepted.pop(component, None)

    def held_registration(self, component: str) -> int | None:
        """The registration this reader holds for `component` (None: none yet)."""
        with self._accepted_lock:
            return self._registrations.get(component)

    def forget_registration(self, component: str) -> None:
        """Drop what this reader holds of `component` (the operator purged it): the next
        registration is taken as the first."""
        with self._accepted_lock:
            self._registrations.pop(component, None)
            self._accepted.pop(component, None)

    def _check_registration(self, component: str, meta: ConfigMetadata) -> None:
        """Refuse an authentic metadata record of another registration than the one this reader
        holds (alerted RegistrationReplayError). A higher one is the component registered again
        after a purge (only key holders sign, and every registration is stamped above the
        clock): held from now on, its versions start again. A record without one is accepted
        only while this reader holds none (written before registrations existed)."""
        found = meta.registration
        published = (
            self.registrations.registration(component) if self.registrations is not None else None
        )
        with self._accepted_lock:
            held = self._registrations.get(component)
            if published is not None and (held is None or published > held):
                # As `hold_registrations`: the operator's word raises what is held, never lowers.
                self._registrations[component] = held = published
                self._accepted.pop(component, None)
            if found == held:
                return
            if found is not None and (held is None or found > held):
                self._registrations[component] = found
                if held is not None:
                    self._accepted.pop(component, None)  # a new registration starts at 1
                return
        self._refuse(
            RegistrationReplayError(
                self.layout.metadata(component), found, held, what="the metadata record"
            ),
            component,
        )

    def _check_value(
        self,
        path: str,
        blob: bytes,
        component: str,
        registration: int | _Any | None,
        *,
        report: bool = True,
    ) -> None:
        """Refuse an encrypted value (opened: its header is authenticated) whose registration
        is not `registration` (alerted RegistrationReplayError). Unencrypted values carry none
        (nothing would authenticate it): a plaintext component is bound by its metadata's
        digest only."""
        if registration is ANY_REGISTRATION or not self._verifying():
            return
        if not is_encrypted(blob):
            return
        found = registration_of(blob)
        if found != registration:
            exc = RegistrationReplayError(path, found, registration, what="the sealed value")
            if report:
                self._refuse(exc, component)
            raise exc

    def _value_meta(
        self, component: str, probe: StoredValue | None = None
    ) -> ConfigMetadata | None:
        """The metadata a read of MASTER or history is checked against: always read when this
        reader verifies (its registration binds the values), else only where it may tighten
        the read. When the record does not verify, `probe` (the value about to be read) is
        opened first: a reader with the wrong key fails the record's MAC as well, and must be
        told about its key (UnknownKey), as `get_active` tells it, not about the record."""
        if not self._verifying():
            return self._tightening_meta(component)
        try:
            got = self._metadata(component, report=False)
        except DefenderConfigError as exc:
            if probe is not None:
                self.client.open(
                    probe.key,
                    probe.value,
                    self._read_options(component, None),
                    component=component,
                )
            if isinstance(exc, RecordAuthError):
                self._refuse(exc, component)
            raise
        meta = got[0] if got is not None else None
        if meta is not None:
            self._check_registration(component, meta)
        return meta

    # --- reads ----------------------------------------------------------------------------------

    def get_metadata(self, component: str) -> ConfigMetadata | None:
        """The metadata record; with a keyring its MAC must verify (RecordAuthError, alerted)."""
        got = self._metadata(component)
        return got[0] if got is not None else None

    def _metadata(
        self, component: str, *, report: bool = True
    ) -> tuple[ConfigMetadata, StoredValue] | None:
        path = self.layout.metadata(component)
        stored = self.client.store.get(path)
        if stored is None:
            return None
        return self._decode_metadata(path, stored.value, component, report=report), stored

    def _decode_metadata(
        self, path: str, blob: bytes, component: str, *, report: bool = True
    ) -> ConfigMetadata:
        return _parse_metadata(
            path, self.client.decode_record(path, blob, component=component, report=report)
        )

    def _encode_metadata(self, component: str, meta: ConfigMetadata) -> bytes:
        return self.client.encode_record(
            self.layout.metadata(component), meta.model_dump(mode="json")
        )

    def _metadata_at(self, component: str, revision: int) -> tuple[ConfigMetadata | None, bool]:
        """The metadata as of `revision`: the record written in the same transaction as a value
        read at that revision. The flag is False when etcd compacted that revision and the
        current record was read instead (a later commit may then explain a mismatch)."""
        meta_key = self.layout.metadata(component)
        exact = True
        try:
            stored = self.client.store.get(meta_key, revision=revision)
        except StoreError:  # compacted: the current record (same policy unless it changed)
            stored, exact = self.client.store.get(meta_key), False
        if stored is None:
            return None, exact
        return self._decode_metadata(meta_key, stored.value, component, report=False), exact

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
        registration: int | _Any | None = ANY_REGISTRATION,
    ) -> dict[str, Any]:
        data = self.client.open(path, blob, options, component=component)
        self._check_value(path, blob, component, registration)
        if self.before_parse is not None:
            self.before_parse(component, len(data))
        return _decode_config(path, data, component)

    def _tightening_meta(self, component: str) -> ConfigMetadata | None:
        """The metadata where it may still matter to a read (it can only tighten it): not read
        at all when the reader requires encryption anyway."""
        return None if self.requires_encryption(component) else self.get_metadata(component)

    def get_master(self, component: str) -> dict[str, Any]:
        """MASTER, decoded. NotFoundError if the component never registered."""
        path = self.layout.master_config(component)
        stored = self.client.store.get(path)
        if stored is None:
            raise NotFoundError(path, detail=f"component {component!r} is not registered")
        meta = self._value_meta(component, stored)
        return self._open_config(
            path,
            stored.value,
            component,
            self._read_options(component, meta),
            _registration(meta),
        )

    def get_active(self, component: str) -> ActiveConfig:
        """ACTIVE with its version. Served stale (flagged) from cache when etcd is unreachable.

        A reader with a keyring accepts ACTIVE only together with the authenticated metadata
        record written in the same transaction, whose digest matches it and whose version is
        not older than one this ConfigStore already accepted (RecordAuthError /
        RecordReplayError, alerted, otherwise)."""
        path = self.layout.active_config(component)
        attempts = 3
        for attempt in range(attempts):
            stored = self.client.store.get(path)
            if stored is None:
                raise NotFoundError(path, detail=f"component {component!r} is not registered")
            active = self._active_from(
                component,
                stored.value,
                stored.mod_revision,
                stale=stored.stale,
                final=attempt == attempts - 1,
            )
            if active is not None:
                return active
            # A commit landed between the two reads: read both again.
        raise AssertionError("unreachable")

    def _active_from(
        self, component: str, value: bytes, mod_revision: int, *, stale: bool, final: bool
    ) -> ActiveConfig | None:
        """ACTIVE read at `mod_revision`, checked against its metadata; None when the two may
        just be from different commits (re-read them) unless `final`."""
        path = self.layout.active_config(component)
        meta: ConfigMetadata | None = None
        meta_error: DefenderConfigError | None = None
        exact = False
        try:
            if stale:
                # A cached (stale) ACTIVE can only be matched with the cached current record.
                got = self._metadata(component, report=False)
                meta = got[0] if got is not None else None
            else:
                meta, exact = self._metadata_at(component, mod_revision)
        except DefenderConfigError as exc:
            # Reported after ACTIVE itself is opened, so a broken value is not masked by it
            # (and a reader with the wrong key reports its key, not the record, once).
            meta_error = exc
        config = self._open_config(
            path, value, component, self._read_options(component, meta), _registration(meta)
        )
        digest = config_digest(config)
        if self._verifying() and not stale and (meta is None or meta.digest != digest):
            # The record as of ACTIVE's revision may have been re-signed since (key rotation
            # re-signs it in its own write, after the value): a consistent read of both now,
            # with this very value still in ACTIVE, decides instead.
            current = self._current_metadata_for(component, value)
            if current is not None and current.digest == digest:
                meta, meta_error, exact = current, None, True
        if isinstance(meta_error, RecordAuthError):
            self._refuse(meta_error, component)
        if meta_error is not None:
            raise meta_error
        version: int | None = None
        outdated = False
        if meta is not None and meta.digest == digest:
            version = meta.version
            if self._verifying():
                outdated = not self._accept(component, meta, mod_revision)
        elif self._verifying() and not (stale and meta is not None):
            # (A stale pair comes from this process's own cache of two separate reads while
            # etcd is unreachable; both passed their checks, they may just be of two commits:
            # served flagged stale, without a version, as before.)
            if meta is not None and not exact and not final:
                return None
            if meta is None:
                self._refuse(
                    RecordAuthError(
                        self.layout.metadata(component),
                        "the metadata record of this ACTIVE value is missing, so its version "
                        "and origin cannot be checked",
                    ),
                    component,
                )
            self._refuse(
                RecordReplayError(
                    path,
                    f"ACTIVE (digest {digest[:12]}) is not the config of the metadata written "
                    f"with it (version {meta.version if meta else '?'}, digest "
                    f"{meta.digest[:12] if meta else '?'}): an older sealed value was put back",
                ),
                component,
            )
        elif meta is not None and not stale and not final:
            return None
        return ActiveConfig(
            component,
            config,
            version,
            digest,
            mod_revision,
            stale,
            self._codec(meta),
            metadata=meta,
            outdated=outdated,
        )

    def _current_metadata_for(self, component: str, value: bytes) -> ConfigMetadata | None:
        """The authentic current metadata, read in one transaction with ACTIVE, if ACTIVE
        still holds exactly `value`; None otherwise (nothing reported: the caller does)."""
        paths = (self.layout.active_config(component), self.layout.metadata(component))
        try:
            gets = self.client.store.txn([], [GetOp(p) for p in paths]).gets
            active_sv, meta_sv = (found[0] if found else None for found in gets)
            if active_sv is None or meta_sv is None or active_sv.value != value:
                return None
            return self._decode_metadata(paths[1], meta_sv.value, component, report=False)
        except DefenderConfigError:
            return None

    def _follow_cluster(self) -> None:
        """Forget accepted versions and rollout sequences once etcd answers as another cluster
        (called with `_accepted_lock` held). A restore brings back older versions, and the
        next commit numbers on from the snapshot's; refusing those as replays would leave a
        running component on its config for good, while a new process would take them. Only
        the members set the cluster id, so etcd write access alone cannot cause this."""
        changes = self.client.store.cluster_changes
        if changes != self._cluster_changes:
            self._cluster_changes = changes
            self._accepted.clear()
            self._rollout_marks.clear()

    def _remember_rollout(self, component: str, sequence: int) -> int:
        """Remember `sequence` of an authentic rollout record; returns the highest this reader
        has seen for `component`, this one included (a higher one means a replay)."""
        with self._accepted_lock:
            self._follow_cluster()
            highest = max(self._rollout_marks.get(component, 0), sequence)
            self._rollout_marks[component] = highest
            return highest

    def _accept(self, component: str, meta: ConfigMetadata, mod_revision: int) -> bool:
        """Remember the newest authentic version this reader accepted and refuse an older one
        written later (a replay: etcd gives every write, a replayed one too, a new, higher
        revision). An older version read at an older revision is no replay, just an old read
        (a watch event handled after a newer get): False, nothing remembered."""
        self._check_registration(component, meta)
        with self._accepted_lock:
            self._follow_cluster()
            seen = self._accepted.get(component)
            if seen is None or meta.version > seen[0] or (meta.version, meta.digest) == seen[:2]:
                if seen is None or mod_revision >= seen[2] or meta.version > seen[0]:
                    self._accepted[component] = (meta.version, meta.digest, mod_revision)
                return True
            if mod_revision < seen[2]:
                return False
            newest = seen[0]
        self._refuse(
            RecordReplayError(
                self.layout.metadata(component),
                f"version {meta.version} is older than version {newest}, which this reader "
                "already accepted (versions only grow: a rollback is a new version)",
            ),
            component,
        )

    def _refuse(self, exc: RecordAuthError, component: str) -> NoReturn:
        self.client.report(exc, path=exc.path, component=component)
        raise exc

    def history(self, component: str) -> list[HistoryEntry]:
        """The kept versions of ACTIVE that open, oldest first. An entry that does not (damaged,
        or junk put there with etcd write access) is alerted and left out: it is no version
        anyone could roll back to, and one such key must not hide every other."""
        entries: list[HistoryEntry] = []
        listed = self.client.store.list_prefix(self.layout.history_dir(component))
        meta = self._value_meta(component, listed[-1] if listed else None)
        options = self._read_options(component, meta)
        for sv in listed:
            parsed = self.layout.parse(sv.key)
            if parsed is None or parsed.version is None:
                continue
            try:
                config = self._open_config(
                    sv.key, sv.value, component, options, _registration(meta)
                )
            except EnvelopeError:
                continue  # alerted by `open` or the registration check
            except ConfigValidationError as exc:
                self.client.report(exc, path=sv.key, component=component)
                continue
            entries.append(HistoryEntry(parsed.version, config, config_digest(config)))
        return entries

    def frozen(self, component: str) -> FreezeInfo | None:
        """The freeze record, if present and authentic. A record that fails authentication
        does not freeze: it is alerted and ignored."""
        return self._freeze_state(component)[0]

    def _freeze_state(self, component: str) -> tuple[FreezeInfo | None, int]:
        """(authentic freeze or None, mod_revision of the freeze key as seen, 0 if absent):
        commits are guarded by that revision, so a forged marker does not block them and a
        real freeze landing meanwhile still does."""
        stored = self.client.store.get(self.layout.freeze(component))
        if stored is None:
            return None, 0
        return self._decode_freeze(component, stored.value), stored.mod_revision

    def _decode_freeze(self, component: str, blob: bytes) -> FreezeInfo | None:
        path = self.layout.freeze(component)
        if not self._verifying():
            return _parse_freeze(blob)
        try:
            return _parse_freeze(self.client.decode_record(path, blob, component=component))
        except RecordAuthError:
            return None  # alerted by decode_record; an unauthenticated marker is not obeyed
        except EnvelopeError:
            return None  # a sealed value where the marker belongs: alerted the same way

    def overview(self, component: str, *, tolerate_master: bool = False) -> ComponentOverview:
        """Metadata, MASTER (decoded) and the freeze record, read in one etcd transaction: one
        round trip and one revision, for callers that look at many components often (the
        operator's monitor passes). Errors as `get_metadata` and `get_master`; a freeze record
        that fails authentication is alerted and shown as no freeze. With `tolerate_master`, a
        MASTER that does not open (tampered, under a key not held: alerted all the same) is
        reported in `master_error` instead of raised, so what does not need MASTER goes on."""
        gets = self.client.store.txn([], self.overview_reads(component)).gets
        return self.overview_of(component, gets, tolerate_master)

    def overview_reads(self, component: str) -> list[GetOp]:
        """The reads `overview` makes, for a caller that adds them to a transaction of its
        own; `overview_of` decodes their results."""
        return [
            GetOp(self.layout.metadata(component)),
            GetOp(self.layout.master_config(component)),
            GetOp(self.layout.freeze(component)),
        ]

    def overview_of(
        self,
        component: str,
        gets: tuple[tuple[StoredValue, ...], ...],
        tolerate_master: bool,
    ) -> ComponentOverview:
        meta_sv, master_sv, freeze_sv = (found[0] if found else None for found in gets)
        meta = (
            self._decode_metadata(meta_sv.key, meta_sv.value, component)
            if meta_sv is not None
            else None
        )
        if meta is not None and self._verifying():
            self._check_registration(component, meta)
        master: dict[str, Any] | None = None
        master_error: EnvelopeError | None = None
        if master_sv is not None:
            try:
                master = self._open_config(
                    master_sv.key,
                    master_sv.value,
                    component,
                    self._read_options(component, meta),
                    _registration(meta),
                )
            except EnvelopeError as exc:
                if not tolerate_master:
                    raise
                master_error = exc
        return ComponentOverview(
            metadata=meta,
            master=master,
            master_error=master_error,
            frozen=self._decode_freeze(component, freeze_sv.value)
            if freeze_sv is not None
            else None,
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
        also: tuple[Sequence[Compare], Sequence[PutOp]] = ((), ()),
        reads: Sequence[GetOp] = (),
        registration_above: int = 0,
    ) -> SeedResult:
        """Register the component's config: MASTER, ACTIVE v1, metadata and history/1 in ONE
        create-only transaction. If MASTER exists already (another instance won), nothing is
        written and the existing metadata is returned: MASTER is never overwritten. If MASTER
        is absent but the component is not new (its metadata, ACTIVE or history/1 is there),
        nothing is written: MasterMissingError, alerted unless the caller added compares.

        `also`: compares and puts of the caller's own, in the same transaction (the operator's
        owner record, written atomically with the data it claims). Its puts are written
        exactly when `created`; when one of its compares fails while MASTER is still absent,
        nothing is written and ConflictError (retryable) is raised. `reads`: the caller's own
        reads, made after the writes when `created` (`SeedResult.read`), so a caller that
        would read right after the seed reads in the same round trip.

        `options` seals this component's values (instead of the store-wide options) and is
        recorded in the metadata as its StoragePolicy: later commits keep it unless they pass
        their own, and readers take the encryption requirement from it.

        `registration_above`: the new registration is above it as well as above the clock (the
        operator re-seeding a name whose readers hold a registration it knows: they take only
        a higher one, whatever the clock says)."""
        ctype = ComponentType(component_type)
        normalized = self._validate(component, ctype.value, config, json_schema)
        digest = config_digest(normalized)
        data = canonical_json(normalized)
        now = _now()
        registration = next_record_sequence(registration_above, now=now)
        meta = ConfigMetadata(
            version=1,
            last_modified=now,
            modified_by=by,
            digest=digest,
            type=ctype.value,
            json_schema=dict(json_schema) if json_schema is not None else None,
            schema_digest=_schema_digest(json_schema),
            note="registered",
            change=ChangeKind.REGISTER,
            authors={"1": by},
            storage=StoragePolicy.from_options(options) if options is not None else None,
            registration=registration,
        )
        lay, c = self.layout, self.client
        master, active, meta_key = (
            lay.master_config(component),
            lay.active_config(component),
            lay.metadata(component),
        )
        history = lay.history(component, 1)
        sealed = c.seal_many((master, active, history), data, options, registration=registration)
        puts: list[PutOp | DeleteOp | GetOp] = [
            PutOp(master, sealed[0]),
            PutOp(active, sealed[1]),
            PutOp(meta_key, self._encode_metadata(component, meta)),
            PutOp(history, sealed[2]),
        ]
        compares, extra = also
        puts.extend(extra)
        self._check_request_size(active, puts)
        # The freeze record is read in the same transaction either way, so the result is the
        # whole overview and the caller does not read etcd again to learn what it holds.
        freeze = GetOp(lay.freeze(component))
        # Absent, every key it writes, not MASTER alone: MASTER deleted (by someone with etcd
        # write access) must not make the component new again, with the seeder's config (after
        # a breaker rollback, the rejected one) as MASTER and version 1 over ACTIVE, metadata
        # and history. Compared in the transaction, so a write racing the seed cannot slip past.
        result = c.store.txn(
            [*(Compare.absent(key) for key in (master, active, meta_key, history)), *compares],
            [*puts, freeze, *reads],
            [*self.overview_reads(component), GetOp(active), GetOp(history)],
        )
        if result.succeeded:
            log.info("component %s registered (MASTER written by %s)", component, by)
            # This reader wrote the registration: it holds it from now on, so a record of an
            # earlier registration put back is refused by its reads (and repaired from this
            # one by the operator), not accepted as the first it ever saw.
            self.hold_registration(component, registration)
            freeze_sv = result.gets[0][0] if result.gets and result.gets[0] else None
            seeded = ComponentOverview(
                metadata=meta,
                master=normalized,
                frozen=self._decode_freeze(component, freeze_sv.value) if freeze_sv else None,
            )
            return SeedResult(
                created=True,
                metadata=meta,
                matches_master=True,
                overview=seeded,
                read=result.gets[1:],
                revision=result.revision,
            )
        meta_sv, existing_master, _, active_sv, history_sv = (
            found[0] if found else None for found in result.gets
        )
        if existing_master is None:
            found_there = (("metadata", meta_sv), ("ACTIVE", active_sv), ("history/1", history_sv))
            left = [what for what, sv in found_there if sv is not None]
            if left:
                missing = MasterMissingError(component, left)
                if not compares:
                    # A caller with compares of its own (a claim) may not own the name: it
                    # decides whether the refusal is its to report, and alerts it then.
                    c.report(missing, path=master, component=component)
                raise missing
            raise ConflictError(master, detail="a condition the caller added no longer holds")
        if meta_sv is None:
            raise ConflictError(
                meta_key,
                detail="MASTER exists but metadata is missing; repair the component keys",
                retryable=False,
            )
        found = self.overview_of(component, result.gets[:3], tolerate_master=False)
        assert found.metadata is not None and found.master is not None  # both read above
        current, master_cfg = found.metadata, found.master
        same = config_digest(master_cfg) == digest
        if not same:
            log.info(
                "component %s: MASTER exists with another config; adopting it (%s)",
                component,
                by,
            )
        return SeedResult(
            created=False,
            metadata=current,
            matches_master=same,
            overview=found,
            revision=result.revision,
        )

    def commit(
        self,
        component: str,
        new_config: Mapping[str, Any],
        by: str,
        expected_version: int | None = None,
        *,
        note: str | None = None,
        options: EnvelopeOptions | None = None,
        json_schema: Mapping[str, Any] | _Recorded | None = RECORDED,
        above: int = 0,
        history_limit: int | None = None,
    ) -> int:
        """Validate and write a new ACTIVE version; returns the version now active.

        `history_limit`: how many versions this commit keeps, the new one included (older
        ones are pruned in its transaction); None: the store's `history_limit`. A writer
        that keeps a limit per component (the operator: spec.rollout.historyLimit) passes it.

        `above`: a version the new one must also be above, though etcd no longer shows it (the
        version the operator saw last, when etcd went back: a restore, or newer versions
        deleted). Readers refuse a version below one they accepted, so a version they may
        have accepted is never written again.

        `json_schema` is the schema to validate against (a `custom` component's, or one added
        to a typed component's model): RECORDED (the default) uses the one in the metadata, a
        schema or None replaces it, so an edited schema governs this commit and the ones after
        it. The metadata records the schema's digest with the version it validated. A changed
        schema with an unchanged config writes no new version; the schema is recorded.

        `options` (None = the component's recorded StoragePolicy, else the store-wide options)
        seals the new version and becomes the component's policy. A change of the encryption
        or compression switch also re-seals MASTER and the kept history in the same
        transaction, so readers can apply one policy to every value of the component.

        Refused with ConfigFrozenError while the freeze marker exists, ConflictError if the
        version moved on (`expected_version`, or a concurrent commit). A config the component's
        model rejects raises ConfigValidationError after an alert; with policy
        REVERT_TO_MASTER, ACTIVE is rolled back to MASTER first."""
        keep = self._history_limit(history_limit)
        freeze, freeze_revision = self._freeze_state(component)
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
        schema = meta.json_schema if isinstance(json_schema, _Recorded) else json_schema
        try:
            normalized = self._validate(component, meta.type, new_config, schema)
        except ConfigValidationError:
            if self.on_invalid is InvalidConfigPolicy.REVERT_TO_MASTER:
                try:
                    self.rollback(
                        component,
                        "master",
                        f"{by} (auto: rejected config)",
                        change=ChangeKind.INVALID_REVERT,
                        history_limit=keep,
                    )
                except DefenderConfigError as exc:
                    log.error("automatic rollback of %s to MASTER failed: %s", component, exc)
            raise
        digest = config_digest(normalized)
        policy_unchanged = options is None or (meta.storage == StoragePolicy.from_options(options))
        schema_unchanged = _schema_digest(schema) == _schema_digest(meta.json_schema)
        if digest == meta.digest and policy_unchanged:
            if not schema_unchanged:
                # Same config (no new version, no watch event): the new schema governs the
                # commits after this one.
                self._record_schema(component, meta, meta_stored, schema)
            return meta.version
        try:
            return self._write_version(
                component,
                normalized,
                by,
                meta,
                meta_stored,
                note=note,
                change=ChangeKind.COMMIT,
                schema=schema,
                validated_with=_schema_digest(schema),
                freeze_revision=freeze_revision,
                options=options,
                above=above,
                history_limit=keep,
            )
        except ConflictError:
            # A write retried after a lost response finds its own first attempt applied and
            # reports the compare as lost: if the version after ours is ours, it landed.
            now = self.get_metadata(component)
            if (
                now is not None
                and now.version == max(meta.version, above) + 1
                and now.digest == digest
                and now.modified_by == by
            ):
                return now.version
            raise

    def _history_limit(self, history_limit: int | None) -> int:
        """The limit a write keeps (the store's when None); refused below 1 before anything
        is read, as the store's own is when it is built."""
        if history_limit is None:
            return self.history_limit
        if history_limit < 1:
            raise ValueError(f"history_limit must be at least 1, not {history_limit}")
        return history_limit

    def set_schema(
        self,
        component: str,
        json_schema: Mapping[str, Any] | None,
        by: str,
        *,
        metadata: StoredValue | None = None,
    ) -> bool:
        """Make `json_schema` the schema later commits (by anyone: the operator, rag, the
        plugin) are validated against, without a new version: ACTIVE keeps running, and
        `schema_digest` still names the schema that validated its version. ACTIVE must be
        valid under the new schema too (ConfigValidationError otherwise, nothing recorded):
        agents check ACTIVE against the schema in its record. Returns False when it is
        already the recorded one or the component is not registered (seed records it).

        `metadata`: the record as the caller just read it (None: read here), saving a round
        trip; the write is guarded by its mod_revision all the same."""
        got = (
            self._metadata(component)
            if metadata is None
            else (self._decode_metadata(metadata.key, metadata.value, component), metadata)
        )
        if got is None:
            return False
        meta, meta_stored = got
        if meta_stored.stale:
            raise self._unavailable_for_write(component)
        if _schema_digest(json_schema) == _schema_digest(meta.json_schema):
            return False
        self._validate(component, meta.type, self.get_active(component).config, json_schema)
        self._record_schema(component, meta, meta_stored, json_schema)
        log.info("component %s: JSON schema set by %s", component, by)
        return True

    def schema_growth(
        self,
        component: str,
        json_schema: Mapping[str, Any] | None,
        *,
        metadata: StoredValue | None,
    ) -> int:
        """How many bytes the metadata record (`metadata`, as the caller just read it) would
        grow by, as stored, were `set_schema` to record `json_schema` in it: 0 when it records
        it already, negative when it shrinks. Nothing read or written: a caller that keeps a
        storage budget judges the growth before `set_schema` writes it (guarded by the same
        record's mod_revision).

        A record that does not verify (or is absent: None) is one `repair_metadata` re-signs
        with `json_schema` in it: the growth is then that schema's size beside the one the
        record holds as stored (unauthenticated, but those are the bytes etcd keeps), so a
        re-sign is judged like a `set_schema`, before anything is written. Nothing alerted
        here: the repair reports the record."""
        if metadata is None:
            # Re-created: the schema is all of it the caller's spec adds (the rest is the
            # repair's own bookkeeping).
            return len(self.client.encode_json(json_schema)) if json_schema is not None else 0
        try:
            meta = self._decode_metadata(metadata.key, metadata.value, component, report=False)
        except DefenderConfigError:
            return _unverified_schema_growth(self.client, metadata.value, json_schema)
        if _schema_digest(json_schema) == _schema_digest(meta.json_schema):
            return 0
        new_meta = meta.model_copy(
            update={"json_schema": dict(json_schema) if json_schema is not None else None}
        )
        return len(self._encode_metadata(component, new_meta)) - len(metadata.value)

    def _record_schema(
        self,
        component: str,
        meta: ConfigMetadata,
        meta_stored: StoredValue,
        schema: Mapping[str, Any] | None,
    ) -> None:
        """Record `schema` as the one later commits are validated against, leaving the version
        (and the digest of the schema that validated it) as they are. Guarded by the record's
        mod_revision (ConflictError when a commit landed meanwhile)."""
        meta_key = self.layout.metadata(component)
        new_meta = meta.model_copy(
            update={"json_schema": dict(schema) if schema is not None else None}
        )
        result = self.client.store.txn(
            [Compare.mod_revision_is(meta_key, meta_stored.mod_revision)],
            [PutOp(meta_key, self._encode_metadata(component, new_meta))],
        )
        if not result.succeeded:
            raise ConflictError(
                meta_key, detail="another commit landed while the schema was recorded; retry"
            )
        log.info("component %s: new JSON schema recorded for later commits", component)

    def rollback(
        self,
        component: str,
        to: RollbackTarget,
        by: str,
        *,
        options: EnvelopeOptions | None = None,
        change: ChangeKind = ChangeKind.ROLLBACK,
        history_limit: int | None = None,
    ) -> int:
        """Make MASTER (`to="master"`) or a kept history version ACTIVE again, as a new
        version. Allowed while frozen: it is the way back to a known-good config. `options` and
        `history_limit` as in `commit` (a rollback is a new version, so it prunes like one);
        `change` says who asked (a person, the breaker, the invalid-config
        policy) and is recorded with the version. The target is validated again with the
        recorded schema, which may have been edited since it was written: every ACTIVE is
        valid under the schema recorded with it, which is what agents check it against
        (ConfigValidationError, alerted, when it is not: restore the schema or pick another
        version)."""
        keep = self._history_limit(history_limit)
        meta, meta_stored = self._metadata_for_write(component)
        if to == "master":
            target = self.get_master(component)
        else:
            if not 0 < int(to) <= HIGHEST_VERSION:
                # A library caller's number, unchecked by the annotation's parser (and str() of
                # one over 4,300 digits raises).
                shown = str(to) if abs(int(to)) < 10**20 else "a number over 20 digits"
                raise InvalidRollbackTargetError(shown, highest=HIGHEST_VERSION)
            path = self.layout.history(component, int(to))
            stored = self.client.store.get(path)
            if stored is None:
                kept = [e.version for e in self.history(component)]
                raise VersionNotKeptError(path, int(to), kept)
            target = self._open_config(
                path,
                stored.value,
                component,
                self._read_options(component, meta),
                _registration(meta),
            )
        target = self._validate(component, meta.type, target, meta.json_schema)
        version = self._write_version(
            component,
            target,
            by,
            meta,
            meta_stored,
            note=f"rollback to {to}",
            change=change,
            schema=meta.json_schema,
            validated_with=_schema_digest(meta.json_schema),
            freeze_revision=None,
            options=options,
            history_limit=keep,
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
        change: ChangeKind,
        schema: Mapping[str, Any] | None,
        validated_with: str | None,
        freeze_revision: int | None,
        options: EnvelopeOptions | None = None,
        above: int = 0,
        history_limit: int | None = None,
    ) -> int:
        """`freeze_revision`: the freeze key's mod_revision as the caller saw it (0: absent, or
        a forged marker's revision), guarding the write; None ignores the freeze (rollback).
        `above`, `history_limit`: as in `commit` (checked there)."""
        lay, c = self.layout, self.client
        respect_freeze = freeze_revision is not None
        # Versions only grow, even after an authentic old record was put back (replay): readers
        # refuse a version lower than one they accepted, so the next one must pass them all.
        version = max(meta.version, self._newest_authentic(component, meta), above) + 1
        if version > HIGHEST_VERSION:
            raise ConflictError(
                lay.metadata(component),
                detail=f"version numbers of {component!r} are used up (the last is "
                f"{HIGHEST_VERSION}): purge the component and register it again",
                retryable=False,
            )
        oldest_kept = version - (history_limit or self.history_limit) + 1
        authors = {
            v: who for v, who in meta.authors.items() if v.isdigit() and int(v) >= oldest_kept
        }
        authors[str(version)] = by
        data = canonical_json(config)
        if options is not None:
            policy: StoragePolicy | None = StoragePolicy.from_options(options)
            write: EnvelopeOptions | None = options
        else:
            policy = meta.storage
            write = self._recorded_write_options(component, meta)
        # A record from before registrations gets one now, and every kept value with it.
        registration = meta.registration or next_record_sequence(now=_now())
        new_meta = meta.model_copy(
            update={
                "version": version,
                "last_modified": _now(),
                "modified_by": by,
                "digest": config_digest(config),
                "note": note,
                "change": change,
                "json_schema": dict(schema) if schema is not None else None,
                "schema_digest": validated_with,
                "storage": policy,
                "authors": authors,
                "registration": registration,
            }
        )
        active, meta_key, freeze = (
            lay.active_config(component),
            lay.metadata(component),
            lay.freeze(component),
        )
        history = lay.history(component, version)
        compares = [Compare.mod_revision_is(meta_key, meta_stored.mod_revision)]
        if freeze_revision is not None:
            compares.append(Compare.mod_revision_is(freeze, freeze_revision))
        sealed = c.seal_many((active, history), data, write, registration=registration)
        success: list[PutOp | DeleteOp | GetOp] = [
            PutOp(active, sealed[0]),
            PutOp(meta_key, self._encode_metadata(component, new_meta)),
            PutOp(history, sealed[1]),
        ]
        old, new = self._effective_policy(meta), self._effective_policy(new_meta)
        if (old.encrypt, old.compress) != (new.encrypt, new.compress) or (
            meta.registration != registration
        ):
            # Readers apply the current policy (and registration) to every value of the
            # component: re-seal the ones kept from before, guarded so a concurrent rewrap is
            # not overwritten.
            compares.extend(
                self._reseal_kept(
                    component,
                    meta,
                    write,
                    oldest_kept,
                    success,
                    with_active=False,
                    registration=registration,
                    above=version,
                )
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
            info = self._decode_freeze(component, frozen_now[0].value)
            if info is not None:
                raise self._frozen_error(component, info)
        found: int | None = None
        if len(result.gets) > 1 and result.gets[1]:
            try:
                found = self._decode_metadata(meta_key, result.gets[1][0].value, component).version
            except DefenderConfigError:
                found = None  # reported by the decode; the conflict is what the caller needs
        raise ConflictError(
            active, expected=meta.version, found=found, detail="another commit landed first"
        )

    def _kept(
        self,
        component: str,
        read: EnvelopeOptions,
        *,
        above: int = 0,
        registration: int | _Any | None = ANY_REGISTRATION,
        foreign: list[StoredValue] | None = None,
    ) -> Iterator[tuple[StoredValue, dict[str, Any], KeptVersion]]:
        """The history entries above version `above` that open under `read` (and, encrypted,
        carry `registration`), newest first, opened as they are consumed (the listing is read
        at once). One that does not open (a junk or moved value, alerted by `client.open`) is
        skipped: it is nobody's version; one of another registration too (alerted), and added
        to `foreign` when given."""
        listed = self.client.store.list_prefix(self.layout.history_dir(component))
        return self._opened_kept(component, reversed(listed), read, above, registration, foreign)

    def _opened_kept(
        self,
        component: str,
        newest_first: Iterable[StoredValue],
        read: EnvelopeOptions,
        above: int,
        registration: int | _Any | None = ANY_REGISTRATION,
        foreign: list[StoredValue] | None = None,
    ) -> Iterator[tuple[StoredValue, dict[str, Any], KeptVersion]]:
        for sv in newest_first:
            parsed = self.layout.parse(sv.key)
            if parsed is None or parsed.version is None or parsed.version <= above:
                continue
            try:
                config = self._open_config(sv.key, sv.value, component, read, registration)
            except RegistrationReplayError:
                if foreign is not None:
                    foreign.append(sv)
                continue
            except DefenderConfigError:
                continue
            # It opened: when it was encrypted, the AEAD covered its path, so its version too.
            authenticated = is_envelope(sv.value) and inspect(sv.value).encrypted
            yield sv, config, KeptVersion(parsed.version, config_digest(config), authenticated)

    def _recorded_write_options(
        self, component: str, meta: ConfigMetadata
    ) -> EnvelopeOptions | None:
        """How a value written on `meta` without options of its own is sealed: by its recorded
        storage policy (None: the store-wide options).

        A record that says unencrypted while ACTIVE is encrypted is an older record put back
        (`set_storage` re-seals ACTIVE and rewrites the record in one transaction): refused
        (RecordReplayError, alerted) rather than followed, or anyone with etcd write and a
        saved record from a plaintext past would have the next commit written in the clear."""
        policy = meta.storage
        if policy is None:
            return None
        if not policy.encrypt:
            active = self.client.store.get(self.layout.active_config(component))
            if active is not None and is_encrypted(active.value):
                self._refuse(
                    RecordReplayError(
                        self.layout.metadata(component),
                        f"the record (version {meta.version}) says unencrypted but ACTIVE is "
                        "encrypted, so nothing was written (the operator's next pass repairs "
                        "the record; set_storage is what changes the policy)",
                    ),
                    component,
                )
        return policy.write_options(self.client.envelope.options)

    def _newest_authentic(self, component: str, meta: ConfigMetadata) -> int:
        """The newest history version above the record's that a key holder wrote (0: none),
        whatever the key names say: a plaintext or junk entry could name any version, and the
        next version (and the pruning below it) would follow it. Entries at or below the
        record's version cannot raise it: not opened (nothing to decrypt on a usual commit)."""
        read = self._read_options(component, meta)
        kept = self._kept(component, read, above=meta.version, registration=meta.registration)
        return next((e.version for _, _, e in kept if e.authenticated), 0)

    def _record_outlived_history(
        self,
        component: str,
        meta: ConfigMetadata,
        action: RepairAction,
        newest: KeptVersion | None,
    ) -> bool:
        """A verified record newer than every kept history entry: its own entry was deleted
        (nothing a writer does). The record stays the authority: rebuilding it from an older
        entry would roll ACTIVE back to a version of the deleter's choosing. Returns False
        (nothing written) while ACTIVE is still its config; RecordReplayError otherwise, since
        that config is nowhere left to restore from: a commit or rollback writes the next
        version."""
        c, lay = self.client, self.layout
        kept = f"version {newest.version}" if newest is not None else "none"
        detail = (
            f"metadata of {component!r} is version {meta.version} but its history entry is "
            f"gone (newest kept: {kept}); deleted from etcd"
        )
        if action is RepairAction.HISTORY_MISSING:
            c.alerter.event("HistoryMissing", component, detail, instance=c.instance)
            log.warning("component %s: %s; the record and ACTIVE are kept", component, detail)
            return False
        error = RecordReplayError(
            lay.active_config(component),
            f"{detail}, and ACTIVE is not that version's config: commit or roll back to write "
            f"version {meta.version + 1}",
        )
        c.report(error, path=error.path, component=component)
        raise error

    def _reseal_kept(
        self,
        component: str,
        meta: ConfigMetadata,
        write: EnvelopeOptions | None,
        oldest_kept: int,
        success: list[PutOp | DeleteOp | GetOp],
        *,
        with_active: bool,
        registration: int | None,
        above: int | None = None,
    ) -> list[Compare]:
        """Append puts re-sealing MASTER, the history from `oldest_kept` on (below `above`,
        which the caller writes itself) and ACTIVE when `with_active`, for `registration`;
        return the compares that guard them. A value of another registration than the
        record's (put back) is not re-sealed into this one: it is deleted."""
        lay, c = self.layout, self.client
        read = self._read_options(component, meta)
        kept = [
            sv
            for sv in c.store.list_prefix(lay.history_dir(component))
            if (parsed := lay.parse(sv.key)) is not None
            and parsed.version is not None
            and parsed.version >= oldest_kept
            and (above is None or parsed.version < above)
        ]
        singles = [lay.master_config(component)]
        if with_active:
            singles.append(lay.active_config(component))
        others = [sv for sv in (c.store.get(p) for p in singles) if sv is not None]
        compares: list[Compare] = []
        for sv in [*kept, *others]:
            plain = c.open(sv.key, sv.value, read, component=component)
            compares.append(Compare.mod_revision_is(sv.key, sv.mod_revision))
            try:
                self._check_value(sv.key, sv.value, component, meta.registration)
            except RegistrationReplayError:
                if sv in kept:
                    success.append(DeleteOp(sv.key))
                    continue
                raise
            success.append(PutOp(sv.key, c.seal(sv.key, plain, write, registration=registration)))
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
        # Every value is re-sealed anyway: a record from before registrations gets one now.
        registration = meta.registration or next_record_sequence(now=_now())
        success: list[PutOp | DeleteOp | GetOp] = [
            PutOp(
                meta_key,
                self._encode_metadata(
                    component,
                    meta.model_copy(update={"storage": policy, "registration": registration}),
                ),
            )
        ]
        compares = [Compare.mod_revision_is(meta_key, meta_stored.mod_revision)]
        compares.extend(
            self._reseal_kept(
                component, meta, options, 1, success, with_active=True, registration=registration
            )
        )
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

    def repair_metadata(
        self,
        component: str,
        *,
        component_type: ComponentType | str,
        json_schema: Mapping[str, Any] | None,
        by: str,
        trusted_digest: str | None = None,
        stored: tuple[StoredValue | None, StoredValue | None] | None = None,
        registration: int | None = None,
        replays: list[str] | None = None,
    ) -> bool:
        """`registration`: the component's registration as anchored outside etcd (the
        operator: `status.registration`), None when nothing is anchored. A record of another
        registration is then no record (alerted RegistrationReplayed) and rebuilt, and only
        values of the anchored one are a source (`repair_registration`); history entries of
        another one found above the source are deleted, and a MASTER of another one is
        written again from the anchored registration's version 1 (`_restore_master`).
        `replays` gets the paths of what was refused so.

        Re-sign the component's metadata when it does not verify: records written before
        control records were signed (the migration: the operator calls this on its next pass),
        forged ones, a deleted one while MASTER exists, or an authentic but stale record put
        back (replay: older than the newest kept history entry, or not matching ACTIVE).
        Returns False when the record verifies and matches ACTIVE and the newest entry, and
        when it verifies, is newer than every kept entry (its own was deleted: alerted
        `HistoryMissing`) and ACTIVE is its config; never rebuilds such a record from an older
        entry (RecordReplayError when ACTIVE is not its config: `plan_repair`).

        The record is rebuilt only from what is authenticated: version and config from the
        newest kept history entry that opens (its version is part of its etcd path, which is
        the AEAD associated data), type and schema from the caller (the operator's spec).
        ACTIVE is restored from that entry when it does not match it. A component whose
        values this reader accepts unencrypted has nothing authenticated to rebuild from, so
        it is re-signed only when that entry's digest is `trusted_digest` (the operator's
        spec); otherwise RecordAuthError. Guarded by the mod_revisions it read
        (ConflictError when something changed meanwhile). `stored`: (metadata, MASTER) as the
        caller just read them in one transaction (`overview_reads`), instead of reading them
        again here."""
        repaired = self._repair_metadata(
            component,
            component_type=component_type,
            json_schema=json_schema,
            by=by,
            trusted_digest=trusted_digest,
            stored=stored,
            registration=registration,
            replays=replays,
        )
        # MASTER as the caller read it (`stored`; the repair above never writes it): no read of
        # its own on a reconcile's declare.
        if registration is not None and self._restore_master(
            component, registration, by, stored[1] if stored is not None else _UNREAD
        ):
            if replays is not None:
                replays.append(self.layout.master_config(component))
            return True
        return repaired

    def _restore_master(
        self,
        component: str,
        registration: int,
        by: str,
        master_sv: StoredValue | _Unread | None = _UNREAD,
    ) -> bool:
        """MASTER of another registration than `registration` (an earlier one's, put back):
        written again, for `registration`, from its history version 1 (a registration's
        MASTER is the config its seed wrote, which is its version 1), when that entry is kept
        and opens, and the record (repaired first) is of `registration`. Alerted
        RegistrationReplayed. False when there was nothing to do or no source: a MASTER of
        another registration left so is refused by every read (it is never adopted)."""
        c, lay = self.client, self.layout
        master_key, first_key = lay.master_config(component), lay.history(component, 1)
        if isinstance(master_sv, _Unread):
            master_sv = c.store.get(master_key)
        if (
            master_sv is None
            or not is_encrypted(master_sv.value)
            or registration_of(master_sv.value) == registration
        ):
            return False  # none, unencrypted (bound by nothing but digests), or this one's
        try:
            meta = self.get_metadata(component)
        except DefenderConfigError:
            return False
        if meta is None or meta.registration != registration:
            return False
        read = self._read_options(component, meta)
        try:
            c.open(master_key, master_sv.value, read, component=component)
        except DefenderConfigError:
            return False  # not an authentic value at all: the scrub's to report
        first_sv = c.store.get(first_key)
        if first_sv is None:
            return False
        try:
            config = self._open_config(first_key, first_sv.value, component, read, registration)
        except DefenderConfigError:
            return False
        refused = RegistrationReplayError(
            master_key, registration_of(master_sv.value), registration, what="MASTER"
        )
        c.report(refused, path=master_key, component=component)
        write = meta.storage.write_options(c.envelope.options) if meta.storage else None
        put = PutOp(
            master_key,
            c.seal(master_key, canonical_json(config), write, registration=registration),
        )
        compares = [
            Compare.mod_revision_is(master_key, master_sv.mod_revision),
            Compare.mod_revision_is(first_key, first_sv.mod_revision),
        ]
        if not c.store.txn(compares, [put], []).succeeded:
            raise ConflictError(master_key, detail="the component changed while it was repaired")
        c.alerter.event(
            "MasterRestored",
            component,
            f"MASTER of {component!r} (of another registration, put back) written again from "
            f"history version 1 of registration {registration} by {by}",
            instance=c.instance,
        )
        log.warning(
            "component %s: MASTER of another registration replaced from history version 1 by %s",
            component,
            by,
        )
        return True

    def _repair_metadata(
        self,
        component: str,
        *,
        component_type: ComponentType | str,
        json_schema: Mapping[str, Any] | None,
        by: str,
        trusted_digest: str | None,
        stored: tuple[StoredValue | None, StoredValue | None] | None,
        registration: int | None,
        replays: list[str] | None,
    ) -> bool:
        c, lay = self.client, self.layout
        keyring = c.envelope.keyring()
        if keyring is None:
            return False
        meta_key, active_key = lay.metadata(component), lay.active_config(component)
        meta_sv = stored[0] if stored is not None else c.store.get(meta_key)
        old: Any = None
        verified: ConfigMetadata | None = None
        if meta_sv is not None:
            try:
                old = parse_json(meta_sv.value)
                verified = _parse_metadata(meta_key, verify_record(keyring, meta_key, old))
            except (ValueError, UnicodeDecodeError, DefenderConfigError):
                verified = None
        elif (
            stored[1] if stored is not None else c.store.get(lay.master_config(component))
        ) is None:
            return False  # not registered: seed writes a signed record
        foreign_record: RegistrationReplayError | None = None
        if (
            verified is not None
            and registration is not None
            and verified.registration != registration
        ):
            foreign_record = RegistrationReplayError(
                meta_key, verified.registration, registration, what="the metadata record"
            )
            c.report(foreign_record, path=meta_key, component=component)
            verified = None
            if replays is not None:
                replays.append(meta_key)
        expected = repair_registration(registration, verified)
        read = self._read_options(component, None)
        foreign: list[StoredValue] = []
        listed = self._kept(component, read, registration=expected, foreign=foreign)
        opened: dict[int, tuple[StoredValue, dict[str, Any]]] = {}

        def kept() -> Iterator[KeptVersion]:
            for sv, config, entry in listed:
                opened[entry.version] = (sv, config)
                yield entry

        active_sv = c.store.get(active_key)
        active_digest: str | None = None
        if active_sv is not None:
            try:
                opened_active = self._open_config(
                    active_key, active_sv.value, component, read, expected
                )
                active_digest = config_digest(opened_active)
            except DefenderConfigError:
                active_digest = None  # alerted; restored below when there is a source
        record = (verified.version, verified.digest) if verified is not None else None
        action, source = plan_repair(record, kept(), active_digest)
        if action is not RepairAction.KEEP:
            # plan_repair stops at its source. A repair is rare: open the entries below it as
            # well, so one of another registration put back there is removed with the rest
            # instead of being refused again at every rollback to it.
            for _ in listed:
                pass
        if foreign and expected is not ANY_REGISTRATION:
            self._drop_foreign(component, foreign, expected)
            if replays is not None:
                replays.extend(sv.key for sv in foreign)
        if action is RepairAction.KEEP:
            return False
        if action is RepairAction.NOTHING_TO_REBUILD:
            if foreign_record is not None:
                raise foreign_record
            raise RecordAuthError(
                meta_key, "it cannot be rebuilt: no kept history version opens; re-register"
            )
        if verified is not None and action is not RepairAction.REBUILD:
            return self._record_outlived_history(component, verified, action, source)
        assert source is not None  # REBUILD always names its entry
        hist_sv, config = opened[source.version]
        version, digest = source.version, source.digest
        active_ok = active_digest == digest
        if not self.requires_encryption(component) and digest != trusted_digest:
            raise RecordAuthError(
                meta_key,
                "it cannot be rebuilt: the component is stored unencrypted, so its history is "
                "not authenticated either; commit its config again or re-register",
            )
        storage: StoragePolicy | None = verified.storage if verified is not None else None
        if verified is None and isinstance(old, dict):
            try:
                storage = StoragePolicy.model_validate(old.get("storage"))
            except ValidationError:
                storage = None
        if storage is not None and not storage.encrypt and self.requires_encryption(component):
            storage = None  # an unauthenticated downgrade is not carried over
        meta = ConfigMetadata(
            version=version,
            last_modified=_now(),
            modified_by=by,
            digest=digest,
            type=ComponentType(component_type).value,
            json_schema=dict(json_schema) if json_schema is not None else None,
            note="re-signed" if meta_sv is not None else "re-created",
            change=ChangeKind.REPAIR,
            storage=storage,
            registration=(
                registration_of(hist_sv.value) if expected is ANY_REGISTRATION else expected
            ),
        )
        compares = [
            Compare.mod_revision_is(meta_key, meta_sv.mod_revision if meta_sv else 0),
            Compare.mod_revision_is(hist_sv.key, hist_sv.mod_revision),
        ]
        success: list[PutOp | DeleteOp | GetOp] = [
            PutOp(meta_key, self._encode_metadata(component, meta))
        ]
        if not active_ok:
            write = storage.write_options(c.envelope.options) if storage is not None else None
            success.append(
                PutOp(
                    active_key,
                    c.seal(
                        active_key, canonical_json(config), write, registration=meta.registration
                    ),
                )
            )
            compares.append(
                Compare.mod_revision_is(active_key, active_sv.mod_revision if active_sv else 0)
            )
        if not c.store.txn(compares, success, []).succeeded:
            raise ConflictError(meta_key, detail="the component changed while it was repaired")
        c.alerter.event(
            "MetadataResigned",
            component,
            f"metadata of {component!r} rebuilt from history version {version} and signed by "
            f"{by}" + ("" if active_ok else "; ACTIVE restored from that version"),
            instance=c.instance,
        )
        log.warning(
            "component %s: unauthenticated metadata re-signed as version %d (ACTIVE %s)",
            component,
            version,
            "kept" if active_ok else "restored",
        )
        return True

    def _drop_foreign(
        self, component: str, foreign: Sequence[StoredValue], expected: int | None
    ) -> None:
        """Delete history entries of another registration than `expected` (each alerted
        RegistrationReplayed when it was opened): never a version of this registration, they
        would be refused again on every read. Each delete is guarded by the entry's revision,
        so a version written there meanwhile is not lost."""
        c = self.client
        removed = [
            sv.key
            for sv in foreign
            if c.store.txn(
                [Compare.mod_revision_is(sv.key, sv.mod_revision)], [DeleteOp(sv.key)], []
            ).succeeded
        ]
        if removed:
            c.alerter.event(
                "RegistrationReplayRemoved",
                component,
                f"{len(removed)} history entr{'y' if len(removed) == 1 else 'ies'} of another "
                f"registration than {expected} removed: {', '.join(removed[:5])}",
                instance=c.instance,
            )
            log.warning(
                "component %s: removed %d history entries of another registration",
                component,
                len(removed),
            )

    def freeze(self, component: str, reason: str, by: str | None = None, *, after: int = 0) -> None:
        """Refuse commits to `component` until `unfreeze`. The marker's sequence is above
        `after` (the operator passes the sequence of the last freeze it lifted, so a new
        freeze is never taken for that one put back, whatever the clocks say) and above the
        marker in place."""
        current = self.frozen(component)
        now = _now()
        sequence = next_record_sequence(after, current.sequence if current else 0, now=now)
        info = FreezeInfo(reason=reason, since=now, by=by, sequence=sequence)
        self.client.put_record(self.layout.freeze(component), info.model_dump(mode="json"))
        self.client.alerter.event(
            "ConfigFrozen", component, f"commits refused: {reason}", instance=self.client.instance
        )

    def unfreeze(self, component: str) -> bool:
        """Lift the freeze (the marker is deleted); True if there was one. The operator
        anchors a marker it saw go as lifted, so a saved copy put back later is removed
        (docs/security.md, "Replays", item 6)."""
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
            """StoreError when a read its checks need failed (etcd away): worth another try."""
            try:
                active = self._active_from(component, value, mod_revision, stale=False, final=True)
            except EnvelopeError as exc:  # alerted already (client.open, record checks)
                fail(exc)
                return
            except StoreError:
                raise
            except DefenderConfigError as exc:
                self.client.report(exc, path=path, component=component)
                fail(exc)
                return
            assert active is not None  # final=True never asks for a re-read
            if active.outdated or active.digest == last_digest[0]:
                return
            last_digest[0] = active.digest
            callback(active)

        if initial:
            stored = store.get(path)
            if stored is not None:
                try:
                    deliver(stored.value, stored.mod_revision)
                except StoreError as exc:
                    fail(exc)

        made = threading.Event()
        handle: list[WatchHandle] = []

        def read() -> bool:
            stored = store.get(path)
            if stored is None:
                return True  # deleted since: nothing to hand out
            if stored.stale:
                return False
            deliver(stored.value, stored.mod_revision)
            return True

        def stopped(delay: float) -> bool:
            made.wait()
            return handle[0].wait_stopped(delay)

        # The event is spent, and a watch resuming after the outage announces nothing older:
        # ACTIVE is read again until etcd answers, on the watch's thread (which has nothing
        # else to hand out meanwhile; a cancel ends it).
        etcd = self.client.settings.etcd
        again = ReadAgain(
            read,
            wait=stopped,
            report=fail,
            base=etcd.backoff_base_seconds,
            cap=etcd.backoff_max_seconds,
            name=f"watch_active {component}",
            own_thread=False,
        )

        def on_event(event: WatchEvent) -> None:
            if event.kind != "put":
                return
            try:
                deliver(event.value, event.mod_revision)
            except StoreError as exc:
                again.missed(exc)

        def on_store_error(exc: StoreError) -> None:
            fail(exc)

        handle.append(
            store.watch_key(path, on_event, start_revision=start, on_error=on_store_error)
        )
        made.set()
        return handle[0]

    # --- key rotation ---------------------------------------------------------------------------

    def rewrap_all(self, prefix: str | None = None) -> RewrapReport:
        """Re-seal every sealed value under `prefix` (default: the whole deployment) that is not
        sealed with the current primary key and codecs. See `rewrap_values`."""
        return self.rewrap_values(self.client.store.list_prefix(prefix or self.layout.prefix + "/"))

    def rewrap_values(self, values: Iterable[StoredValue]) -> RewrapReport:
        """Re-seal these values with compare-and-swap, so a concurrent commit is never
        overwritten: a value that changed since it was read is re-read and retried once.
        Authenticated control records (metadata, freeze, ...) whose MAC was made with another
        key than the primary are verified and re-signed the same way; unsigned ones are left
        to `repair_metadata` (signing them blindly would launder a forged record). Values
        that cannot be opened or verified are alerted and counted as failed."""
        report = RewrapReport()
        c = self.client
        # Per component: (read, write) options.
        policies: dict[str, tuple[EnvelopeOptions | None, EnvelopeOptions | None]] = {}
        for sv in values:
            report.scanned += 1
            if not is_envelope(sv.value):
                self._resign_record(sv, report)
                continue
            report.sealed += 1
            read, write = self._rewrap_options(sv.key, policies)

            def reseal(
                current: StoredValue,
                read: EnvelopeOptions | None = read,
                write: EnvelopeOptions | None = write,
            ) -> bytes | None:
                sealing = write
                if is_encrypted(current.value) and not (write or c.envelope.options).encrypt:
                    # A rewrap changes keys, never protection: a policy that says plaintext
                    # for an encrypted value is an older record put back (`set_storage` is
                    # what changes it, re-sealing every value with the record).
                    sealing = (write or c.envelope.options).model_copy(update={"encrypt": True})
                try:
                    if not c.envelope.needs_reseal(current.value, sealing):
                        return None
                except EnvelopeError as exc:  # a corrupt header: c.open did not see it
                    c.report(exc, path=current.key)
                    raise
                plain = c.open(current.key, current.value, read)
                # The value keeps its own registration (authenticated by the open above).
                return c.seal(
                    current.key, plain, sealing, registration=registration_of(current.value)
                )

            self._rewrite(sv, reseal, report)
        log.info(
            "rewrap: %d scanned, %d rewrapped, %d current, %d conflicts, %d failed",
            report.scanned,
            report.rewrapped,
            report.already_current,
            report.conflicts,
            report.failed,
        )
        return report

    def _resign_record(self, sv: StoredValue, report: RewrapReport) -> None:
        """Re-sign a control record MAC'd with another key than the primary (rotation).
        Heartbeat records are their heartbeaters' word: each re-signs its own once it holds the
        new primary (its key fields change), one that never loads it stays on the retired key
        and is seen as such, and a heartbeater writes over any put it did not make."""
        c = self.client
        keyring = c.envelope.keyring()
        if keyring is None:
            return
        parsed = self.layout.parse(sv.key)
        if parsed is not None and parsed.kind == "instance":
            return
        try:
            data = parse_json(sv.value)
        except (ValueError, UnicodeDecodeError):
            return  # not a JSON record: nothing this pass signs
        if not is_signed(data):
            return
        report.sealed += 1

        def resign(current: StoredValue) -> bytes | None:
            try:
                doc = parse_json(current.value)
            except (ValueError, UnicodeDecodeError):
                return None  # replaced meanwhile by something that is not a record
            if record_key_id(doc) == keyring.primary.key_id:
                return None
            try:
                body = verify_record(keyring, current.key, doc)
            except RecordAuthError as exc:
                c.report(exc, path=current.key)
                raise
            return c.encode_json(sign_record(keyring, current.key, body))

        self._rewrite(sv, resign, report)

    def _rewrite(
        self,
        sv: StoredValue,
        rewrite: Callable[[StoredValue], bytes | None],
        report: RewrapReport,
    ) -> None:
        """Compare-and-swap `rewrite(value)` over `sv`, so a concurrent write is never lost: on
        a conflict the value is re-read and rewritten once more. `rewrite` returns None when
        the value is already current; its EnvelopeErrors (alerted by it) count as failed."""
        current: StoredValue | None = sv
        for attempt in range(2):
            if current is None:
                return  # deleted meanwhile: nothing left to rewrite
            try:
                new = rewrite(current)
                if new is None:
                    report.already_current += 1
                    return
                self.client.store.compare_and_swap(
                    current.key, current.mod_revision, new, lease=current.lease_id
                )
                report.rewrapped += 1
                return
            except ConflictError:
                if attempt == 1:
                    report.conflicts += 1
                    return
                current = self.client.store.get(sv.key)
            except EnvelopeError as exc:
                report.failed += 1
                report.errors.append(f"{sv.key}: {exc.reason}")
                return

    def _rewrap_options(
        self,
        key: str,
        cache: dict[str, tuple[EnvelopeOptions | None, EnvelopeOptions | None]],
    ) -> tuple[EnvelopeOptions | None, EnvelopeOptions | None]:
        parsed = self.layout.parse(key)
        if parsed is None or parsed.kind not in (
            "master_config",
            "active_config",
            "history",
            "candidate",
        ):
            return None, None
        component = parsed.component
        if component not in cache:
            try:
                meta = self.get_metadata(component)
            except DefenderConfigError:
                # Alerted; without an authentic policy, re-seal under the store-wide options
                # (never less protected than the reader requires).
                meta = None
            policy = meta.storage if meta is not None else None
            base = self.client.envelope.options
            cache[component] = (
                self._read_options(component, meta),
                policy.write_options(base) if policy is not None else None,
            )
        return cache[component]

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


def _registration(meta: ConfigMetadata | None) -> int | _Any | None:
    """The registration values read with `meta` must carry (any, without a record)."""
    return meta.registration if meta is not None else ANY_REGISTRATION


def _schema_digest(schema: Mapping[str, Any] | None) -> str | None:
    return config_digest(schema) if schema is not None else None


def _unverified_schema_growth(
    client: DefenderClient, blob: bytes, json_schema: Mapping[str, Any] | None
) -> int:
    """`ConfigStore.schema_growth` of a record that does not verify: the bytes `json_schema`
    takes in a record beside those of the schema `blob` holds (none when it is not a JSON
    object), each as the record embeds it."""
    try:
        data = parse_json(blob)
    except (ValueError, UnicodeDecodeError, DefenderConfigError):
        data = None
    held = data.get("json_schema") if isinstance(data, dict) else None
    wanted = dict(json_schema) if json_schema is not None else None
    return len(client.encode_json(wanted)) - len(client.encode_json(held))


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
            data = parse_json(raw)
        except (ValueError, UnicodeDecodeError):
            data = raw.decode("utf-8", "replace")
    try:
        return FreezeInfo.model_validate(data)
    except ValidationError:
        # Readers without a keyring cannot verify markers: any one they see freezes. Readers
        # with one only get here for an authentic record (a key holder's odd reason field).
        return FreezeInfo(reason=str(data)[:200], since=_now())


def _decode_config(path: str, data: bytes, component: str) -> dict[str, Any]:
    try:
        value = parse_json(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigValidationError(
            component, [FieldError("", f"stored config at {path} is not JSON")]
        ) from exc
    if not isinstance(value, dict):
        raise ConfigValidationError(
            component, [FieldError("", f"stored config at {path} is not a JSON object")]
        )
    return value
