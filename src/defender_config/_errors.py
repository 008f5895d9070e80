"""Every error the library raises, under one root.

```
DefenderConfigError                          reason
├── SettingsError                            InvalidSettings
├── EnvelopeError                            EnvelopeError
│   ├── UnknownKeyError                      UnknownKey        wrong / retired key id
│   ├── AuthenticationFailedError            AuthenticationFailed  tampered, corrupt, moved
│   ├── CodecError                           CodecError
│   │   ├── UnknownCodecError                UnknownCodec
│   │   └── CodecMismatchError               CodecMismatch
│   ├── SizeAnomalyError                     SizeAnomaly       lengths, ratio, cap, truncated
│   ├── UnsupportedFormatError               UnsupportedFormat newer envelope version / flags
│   ├── NotAnEnvelopeError                   NotAnEnvelope     plaintext where sealed expected
│   ├── UnexpectedEnvelopeError              UnexpectedEnvelope  sealed where plaintext expected
│   ├── ValueTooLargeError                   ValueTooLarge     over etcd's request limit
│   └── RecordAuthError                      RecordUnauthenticated  control record: no/bad MAC
│       └── RecordReplayError                RecordReplayed    authentic, but older / not the
│                                                              record of the value beside it
│           └── RegistrationReplayError      RegistrationReplayed  of an earlier registration
│                                                              of a purged, re-registered name
├── KeyringError                             KeyringInvalid
│   ├── KeyringBackupError                   KeyringBackupInvalid  corrupt / unknown export file
│   │   └── WrongPassphraseError             WrongPassphrase   wrong or no passphrase
│   └── KeyringLacksKeysError                KeyringLacksKeys  stored values need key ids it lacks
├── RegistrationsFileError                   RegistrationsFileInvalid  registrations.json beside
│                                                              the keyring unreadable / malformed
├── StoreError                               StoreError
│   ├── StoreUnavailableError                StoreUnavailable
│   ├── StoreAuthError                       StoreAuth         bad user/password/cert
│   ├── ConflictError                        Conflict
│   ├── NotFoundError                        NotFound
│   │   └── VersionNotKeptError              VersionNotKept    rollback to a version not in history
│   └── StoreNoSpaceError                    StoreNoSpace      etcd NOSPACE alarm: writes refused
├── MaintenanceError                         MaintenanceRefused  etcd unfit for it / would overwrite
│   ├── SnapshotInvalidError                 SnapshotInvalid   hash or etcdutl check failed
│   ├── CompactionLagError                   CompactionLag     defrag: a member had not applied
│   │                                                          the compaction in time
│   └── DefragIncompleteError                DefragIncomplete  defrag: NOSPACE would not stay
│                                                              disarmed (still over the quota)
├── ConfigFrozenError                        ConfigFrozen      control/<component>/freeze set
├── ConfigValidationError                    ConfigInvalid
├── InvalidRollbackTargetError               InvalidRollbackTarget  not `master` or a version
├── MasterMissingError                       MasterMissing     seed refused: MASTER alone is gone
├── RepairRefusedError                       RepairRefused     scrub: the source does not verify
└── FileWriteError                           FileWriteFailed   a local file not replaced whole
```

`.reason` is a stable CamelCase word: alerts, heartbeats and Kubernetes conditions carry it, so it
never changes once released. Constructors take structured fields and build the message; messages
say what is wrong and what to check. None of them ever receives key material, only key ids and
fingerprints, so no message can leak a key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "AuthenticationFailedError",
    "CodecError",
    "CodecMismatchError",
    "CompactionLagError",
    "ConfigFrozenError",
    "ConfigValidationError",
    "ConflictError",
    "DefenderConfigError",
    "DefragIncompleteError",
    "EnvelopeError",
    "FieldError",
    "FileWriteError",
    "InvalidRollbackTargetError",
    "KeyringBackupError",
    "KeyringError",
    "KeyringLacksKeysError",
    "MaintenanceError",
    "MasterMissingError",
    "NotAnEnvelopeError",
    "NotFoundError",
    "RecordAuthError",
    "RecordReplayError",
    "RegistrationReplayError",
    "RegistrationsFileError",
    "RepairRefusedError",
    "SettingsError",
    "SizeAnomalyError",
    "SnapshotInvalidError",
    "StoreAuthError",
    "StoreError",
    "StoreNoSpaceError",
    "StoreUnavailableError",
    "UnexpectedEnvelopeError",
    "UnknownCodecError",
    "UnknownKeyError",
    "UnsupportedFormatError",
    "ValueTooLargeError",
    "WrongPassphraseError",
    "brief_listing",
]


def _at(path: str | None) -> str:
    return f" at {path!r}" if path else ""


class DefenderConfigError(Exception):
    """Root of every error raised by `defender_config`."""

    reason: ClassVar[str] = "DefenderConfigError"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"

    @property
    def record_message(self) -> str:
        """The message for records that etcd readers, log readers and other teams see (alerts,
        heartbeats, logs): the message itself, except where it quotes a config's values,
        which are sealed in etcd and must not reappear there in plaintext."""
        return self.message


class SettingsError(DefenderConfigError):
    """A settings file or environment value is missing, unreadable or invalid. ``problems``:
    from `override_settings`, each refused field's dotted location (``etcd.endpoints``,
    ``prefix``; ``etcd`` for a rule across its fields) and why, never the value given."""

    reason = "InvalidSettings"

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        problems: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.path = path
        self.problems = problems
        prefix = f"settings file {path}: " if path else "settings: "
        super().__init__(prefix + message)


# --- envelope ---------------------------------------------------------------------------------


class EnvelopeError(DefenderConfigError):
    """Anything that went wrong sealing or opening a stored value.

    `path` is the etcd key the value belongs to, when known; the store layer fills it in.
    """

    reason = "EnvelopeError"

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


class UnknownKeyError(EnvelopeError):
    """The value was sealed with a key this component does not hold (or holds only as retired)."""

    reason = "UnknownKey"

    def __init__(
        self,
        key_id: str,
        known_key_ids: Iterable[str],
        *,
        path: str | None = None,
        retired: bool = False,
    ) -> None:
        self.key_id = key_id
        self.known_key_ids = tuple(known_key_ids)
        self.retired = retired
        known = ", ".join(self.known_key_ids) or "none"
        if retired:
            what = (
                f"value{_at(path)} is sealed with key {key_id!r}, which this keyring has retired; "
                "re-seal the value with the primary key (rewrap) or restore the key as "
                "decrypt-only"
            )
        else:
            what = (
                f"value{_at(path)} is sealed with key {key_id!r}, which this component does not "
                "hold; check that the component mounts the current keyring Secret and that it "
                "has reloaded"
            )
        super().__init__(f"{what} (keys held: {known})", path=path)


class AuthenticationFailedError(EnvelopeError):
    """AEAD verification failed: the value was tampered with, is corrupt, or was sealed for
    another etcd key (the key path is associated data)."""

    reason = "AuthenticationFailed"

    def __init__(self, path: str | None, key_id: str, *, fingerprint: str | None = None) -> None:
        self.key_id = key_id
        self.fingerprint = fingerprint
        fp = f" (fingerprint {fingerprint})" if fingerprint else ""
        super().__init__(
            f"value{_at(path)} failed authentication with key {key_id!r}{fp}: it was modified "
            "after sealing, is corrupt, was copied from another etcd key, or the key with this "
            "id holds different material on this component; compare key fingerprints and "
            "restore the value from MASTER or history",
            path=path,
        )


class CodecError(EnvelopeError):
    """A compression or cipher codec problem."""

    reason = "CodecError"


class UnknownCodecError(CodecError):
    """The header names a codec id this library does not know."""

    reason = "UnknownCodec"

    def __init__(
        self,
        codec_id: int | str,
        *,
        kind: str = "compression",
        known: Iterable[str] = (),
        path: str | None = None,
    ) -> None:
        self.codec_id = codec_id
        self.kind = kind
        self.known = tuple(known)
        shown = f"0x{codec_id:02x}" if isinstance(codec_id, int) else repr(codec_id)
        known_s = ", ".join(self.known) or "none"
        super().__init__(
            f"unknown {kind} codec {shown}{_at(path)} (this library knows: {known_s}); the "
            "writer uses a codec or library version this reader lacks: align the envelope "
            "settings of all components or upgrade the reader",
            path=path,
        )


class CodecMismatchError(CodecError):
    """The value's codecs do not match what the reader requires or what the header claims."""

    reason = "CodecMismatch"

    def __init__(
        self, expected: str, found: str, *, path: str | None = None, detail: str = ""
    ) -> None:
        self.expected = expected
        self.found = found
        extra = f": {detail}" if detail else ""
        super().__init__(
            f"codec mismatch{_at(path)}: expected {expected}, found {found}{extra}; check the "
            "envelope settings (compress/encrypt/compression/cipher) of the writer and reader",
            path=path,
        )


class SizeAnomalyError(EnvelopeError):
    """Lengths do not add up: truncated, declared ≠ actual, or over the ratio / size cap."""

    reason = "SizeAnomaly"

    def __init__(
        self, declared: int | None, actual: int | None, detail: str, *, path: str | None = None
    ) -> None:
        self.declared = declared
        self.actual = actual
        self.detail = detail
        nums = []
        if declared is not None:
            nums.append(f"declared {declared} bytes")
        if actual is not None:
            nums.append(f"actual {actual} bytes")
        shown = f" ({', '.join(nums)})" if nums else ""
        super().__init__(
            f"size anomaly{_at(path)}: {detail}{shown}; the value is truncated or corrupt, or "
            "the writer and reader disagree on compression/encryption settings or size caps",
            path=path,
        )


class UnsupportedFormatError(EnvelopeError):
    """The envelope uses a format version or flag bits newer than this library."""

    reason = "UnsupportedFormat"

    def __init__(self, detail: str, *, path: str | None = None) -> None:
        self.detail = detail
        super().__init__(
            f"unsupported envelope format{_at(path)}: {detail}; upgrade this component's "
            "defender_config library to the writer's version",
            path=path,
        )


class NotAnEnvelopeError(EnvelopeError):
    """Plaintext (or garbage) found where a sealed value was expected."""

    reason = "NotAnEnvelope"

    def __init__(self, *, path: str | None = None, detail: str = "") -> None:
        self.detail = detail
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"value{_at(path)} is not a sealed envelope{extra}; it was probably written by a "
            "client with compression and encryption off, or by hand with etcdctl: re-seal it or "
            "align the envelope settings",
            path=path,
        )


class UnexpectedEnvelopeError(EnvelopeError):
    """A sealed envelope found where plaintext was expected."""

    reason = "UnexpectedEnvelope"

    def __init__(self, *, path: str | None = None) -> None:
        super().__init__(
            f"value{_at(path)} is a sealed envelope where plaintext was expected; a writer "
            "sealed a key that must stay readable with etcdctl (metadata, status, heartbeats), "
            "or the reader has encryption and compression switched off",
            path=path,
        )


class ValueTooLargeError(EnvelopeError):
    """The value would not fit: etcd's request limit, or the readers' decompressed-size cap."""

    reason = "ValueTooLarge"

    def __init__(
        self, size: int, limit: int, *, path: str | None = None, what: str = "etcd request limit"
    ) -> None:
        self.size = size
        self.limit = limit
        self.what = what
        super().__init__(
            f"value{_at(path)} is {size} bytes, over the {what} of {limit} bytes; split the "
            "config, enable compression, or raise the limit on every member and reader",
            path=path,
        )


class RecordAuthError(EnvelopeError):
    """A control record (metadata, freeze marker, ...) that steers readers or the operator has
    no valid MAC: missing, malformed, made with a key this reader does not hold, or not matching
    the record and its etcd path. Such a record is ignored and reported, never obeyed."""

    reason = "RecordUnauthenticated"

    def __init__(self, path: str | None, problem: str, *, key_id: str | None = None) -> None:
        self.problem = problem
        self.key_id = key_id
        kid = f" (key {key_id!r})" if key_id else ""
        super().__init__(
            f"control record{_at(path)} failed authentication{kid}: {problem}; it was written "
            "without the keyring (by hand, by an old version, or by someone with etcd write "
            "access only) and is ignored. The operator re-signs records it can verify against "
            "the sealed configs on its next pass; otherwise re-register the component",
            path=path,
        )


class RecordReplayError(RecordAuthError):
    """An authentic control record that is not the current one: older than a version this
    reader already accepted, or not the record of the sealed value written beside it."""

    reason = "RecordReplayed"

    def __init__(self, path: str | None, problem: str, *, key_id: str | None = None) -> None:
        EnvelopeError.__init__(
            self,
            f"control record{_at(path)} is authentic but stale: {problem}; an older record was "
            "put back (replay) and is ignored; the last accepted config stays in force",
            path=path,
        )
        self.problem = problem
        self.key_id = key_id


class RegistrationReplayError(RecordReplayError):
    """An authentic record or sealed value of another registration of the component than the
    one the reader holds: a component purged and registered again under the same name starts
    a new registration, and what the earlier one wrote, put back, is not the current config."""

    reason = "RegistrationReplayed"

    def __init__(
        self,
        path: str | None,
        found: int | None,
        expected: int | None,
        *,
        what: str = "it",
        key_id: str | None = None,
    ) -> None:
        def name(registration: int | None) -> str:
            return f"registration {registration}" if registration is not None else "none"

        super().__init__(
            path,
            f"{what} belongs to {name(found)} of the component, the current one is "
            f"{name(expected)} (a value or record of an earlier registration of the same name "
            "was put back)",
            key_id=key_id,
        )
        self.found = found
        self.expected = expected


# --- keyring, store, validation -----------------------------------------------------------------


class KeyringError(DefenderConfigError):
    """The keyring is empty, has no (or two) primary keys, or its Secret layout is wrong."""

    reason = "KeyringInvalid"

    def __init__(self, message: str, *, source: str | None = None) -> None:
        self.source = source
        prefix = f"keyring {source}: " if source else "keyring: "
        super().__init__(prefix + message)


class KeyringBackupError(KeyringError):
    """A keyring export file is not one, is damaged, or is of a newer format."""

    reason = "KeyringBackupInvalid"


class WrongPassphraseError(KeyringBackupError):
    """A passphrase-wrapped export did not open: wrong passphrase, none given, or the wrapped
    part was altered (AES-GCM cannot tell these apart)."""

    reason = "WrongPassphrase"


class KeyringLacksKeysError(KeyringError):
    """A keyring would replace one that stored values need, but lacks some of their key ids."""

    reason = "KeyringLacksKeys"

    def __init__(
        self, missing: Iterable[tuple[str, str | None]], *, source: str | None = None
    ) -> None:
        self.missing = dict(missing)
        listed = ", ".join(
            f"{kid} (fingerprint {fp or 'not recorded'})"
            for kid, fp in sorted(self.missing.items())
        )
        super().__init__(
            f"lacks key id(s) that stored values are sealed with: {listed}; use an export that"
            " holds them (every value sealed with a missing key would become unreadable)",
            source=source,
        )


class RegistrationsFileError(DefenderConfigError):
    """The `registrations.json` file the operator publishes beside `keyring.json` (in the
    keyring Secret) cannot be read or is not the format: the registrations it would name are not
    held (a reader keeps those it holds). The message names the file and the bad entry, never
    the file's content."""

    reason = "RegistrationsFileInvalid"

    def __init__(self, message: str, *, source: str | None = None) -> None:
        self.source = source
        prefix = f"registrations file {source}: " if source else "registrations file: "
        super().__init__(prefix + message)


class StoreError(DefenderConfigError):
    """etcd access failed."""

    reason = "StoreError"

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


class StoreUnavailableError(StoreError):
    """No endpoint answered or the cluster has no quorum, after all retries."""

    reason = "StoreUnavailable"

    def __init__(
        self,
        endpoints: Sequence[str],
        detail: str,
        *,
        attempts: int | None = None,
        path: str | None = None,
    ) -> None:
        self.endpoints = tuple(endpoints)
        self.detail = detail
        self.attempts = attempts
        tries = f" after {attempts} attempts" if attempts is not None else ""
        super().__init__(
            f"etcd unavailable{tries} (endpoints: {', '.join(self.endpoints) or 'none'}): "
            f"{detail}; check that the members run, have quorum, and that TLS/auth settings "
            "match",
            path=path,
        )


class StoreAuthError(StoreError):
    """etcd refused the credentials: wrong user/password, no permission, or an expired token
    that could not be renewed. Never retried: retrying cannot fix a credential.

    ``credentials_refused``: True when etcd refused who the caller is (a login failed, a token
    it did not accept), False when it knows the user but the user's roles lack a right on the
    key (``PERMISSION_DENIED``). Only the first is over once any authenticated call succeeds;
    the second only once a call on the same keys does."""

    reason = "StoreAuth"

    def __init__(
        self, detail: str, *, path: str | None = None, credentials_refused: bool = True
    ) -> None:
        self.detail = detail
        self.credentials_refused = credentials_refused
        super().__init__(
            f"etcd refused the request{_at(path)}: {detail}; check etcd.user/etcd.password, "
            "the client certificate and the user's role permissions on the prefix",
            path=path,
        )


class ConflictError(StoreError):
    """A compare-and-swap lost: someone else changed the key first (`retryable`: re-read and
    try again). `retryable=False` when the stored keys contradict each other and no retry can
    succeed until a person repairs them."""

    reason = "Conflict"

    def __init__(
        self,
        path: str,
        *,
        expected: int | None = None,
        found: int | None = None,
        detail: str = "",
        retryable: bool = True,
    ) -> None:
        self.expected = expected
        self.found = found
        self.retryable = retryable
        rev = ""
        if expected is not None or found is not None:
            rev = f" (expected revision {expected}, found {found})"
        extra = f": {detail}" if detail else ""
        advice = "re-read the current value and retry" if retryable else "retrying cannot help"
        super().__init__(f"conflicting update of {path!r}{rev}{extra}; {advice}", path=path)


class StoreNoSpaceError(StoreError):
    """etcd refused a write because its database reached the backend quota (the NOSPACE alarm
    is raised cluster-wide; reads still work). Never retried: only compaction, defragmentation
    and disarming the alarm bring writes back (docs/troubleshooting.md#storenospace)."""

    reason = "StoreNoSpace"

    def __init__(self, detail: str, *, path: str | None = None) -> None:
        self.detail = detail
        super().__init__(
            f"etcd refused the write{_at(path)}: its database is full ({detail}); run"
            " `kubectl defender defrag --compact --disarm-nospace` or raise"
            " etcd.quotaBackendBytes (docs/troubleshooting.md#storenospace)",
            path=path,
        )


class NotFoundError(StoreError):
    """The key does not exist."""

    reason = "NotFound"

    def __init__(self, path: str, *, detail: str = "") -> None:
        extra = f"; {detail}" if detail else ""
        super().__init__(f"no value at {path!r}{extra}", path=path)


class VersionNotKeptError(NotFoundError):
    """A rollback names a version the history does not hold (never written, or pruned). Its
    own type, not only a NotFoundError: retrying cannot make the version appear, so the
    operator refuses the command instead of retrying it (and holding up every later edit of
    the component while it does)."""

    reason = "VersionNotKept"

    def __init__(self, path: str, version: int, kept: list[int]) -> None:
        self.version = version
        self.kept = list(kept)
        super().__init__(
            path,
            detail=f"version {version} is not kept (history holds {self.kept}); "
            "roll back to one of those or to master",
        )


class MaintenanceError(DefenderConfigError):
    """A maintenance step (snapshot, defragmentation, restore) refused to run or stopped: the
    cluster is not healthy enough, or a restore would overwrite a member's data."""

    reason = "MaintenanceRefused"


class CompactionLagError(MaintenanceError):
    """A member had not finished applying the compaction when its turn to be defragmented came,
    within the wait: it was left as it was, and so were the members after it. Defragmenting it
    before its compaction would keep the space the compaction frees, and its NOSPACE alarm
    would come back at the next write."""

    reason = "CompactionLag"

    def __init__(self, endpoint: str, revision: int, detail: str) -> None:
        self.endpoint = endpoint
        self.revision = revision
        super().__init__(
            f"{endpoint} did not finish applying the compaction to revision {revision} ({detail});"
            " it and the members after it were not defragmented: check its log, run it again"
        )


class DefragIncompleteError(MaintenanceError):
    """Every member was defragmented, yet NOSPACE would not stay disarmed: a member's database
    is still at or over its quota (etcd counts the file's size), or the alarm was back right
    after it was cleared. What is left is live data: delete some or raise the quota."""

    reason = "DefragIncomplete"

    def __init__(self, detail: str, *, members: tuple[str, ...] = ()) -> None:
        self.members = members
        super().__init__(detail)


class FileWriteError(DefenderConfigError):
    """A local file (`write_file_atomic`) could not be replaced whole. The previous file is
    untouched and no temporary file is left, unless only the final directory flush failed: then
    the new file is in place but its rename may not survive a crash. `path` is what failed (the
    file, or its directory for the flush); `detail` never holds the file's content."""

    reason = "FileWriteFailed"

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"cannot write {path}: {detail}")


class SnapshotInvalidError(MaintenanceError):
    """A snapshot file failed its check: the SHA-256 etcd appends does not match, or etcdutl
    could not read it. Never restore from it."""

    reason = "SnapshotInvalid"

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        super().__init__(f"snapshot {path} is not usable: {detail}; take a new one")


class ConfigFrozenError(DefenderConfigError):
    """Commits to the component are refused while its freeze marker exists."""

    reason = "ConfigFrozen"

    def __init__(self, component: str, *, why: str = "", since: str = "", marker: str = "") -> None:
        self.component = component
        self.why = why
        self.since = since
        parts = [
            p for p in (f"reason: {why}" if why else "", f"since {since}" if since else "") if p
        ]
        shown = f" ({', '.join(parts)})" if parts else ""
        where = f" delete {marker!r}" if marker else " unfreeze it"
        super().__init__(
            f"config of {component!r} is frozen{shown}; commits are refused until an operator "
            f"lifts the freeze:{where}"
        )


@dataclass(frozen=True, slots=True)
class FieldError:
    """One readable validation problem: where (dotted location) and what. ``unquoted``: what
    records say instead, without any config value (None when the message quotes none)."""

    location: str
    message: str
    unquoted: str | None = None

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message

    def for_record(self) -> str:
        text = self.message if self.unquoted is None else self.unquoted
        return f"{self.location}: {text}" if self.location else text


class ConfigValidationError(DefenderConfigError):
    """A component config was rejected by its pydantic model or JSON schema."""

    reason = "ConfigInvalid"

    def __init__(self, component: str, errors: Sequence[FieldError]) -> None:
        self.component = component
        self.errors = tuple(errors)
        super().__init__(self._render(str))

    def _render(self, show: Callable[[FieldError], str]) -> str:
        # A config can have thousands of errors, each quoting a value of any size: the message
        # lists a few (`brief_listing`); `errors` keeps them all.
        listed = brief_listing([show(e) for e in self.errors]) or "no detail"
        n = len(self.errors)
        plural = "s" if n != 1 else ""
        return f"config for {self.component!r} rejected ({n} error{plural}): {listed}"

    @property
    def record_message(self) -> str:
        # The message names the offending value for whoever submitted the config (the webhook's
        # answer, the CR's status); alerts and heartbeats in etcd get it without the value.
        return self._render(FieldError.for_record)


def brief_listing(items: Sequence[str], *, most: int = 20, chars: int = 160) -> str:
    """`items` joined with "; " for people: the first `most`, each cut to `chars`, then how
    many more. What lists a config's problems goes into conditions (32 KiB at most, or the API
    server refuses the whole status patch), Events, logs and admission answers."""
    shown = [text if len(text) <= chars else text[: chars - 1] + "…" for text in items[:most]]
    if len(items) > most:
        shown.append(f"and {len(items) - most} more")
    return "; ".join(shown)


_QUOTED_TARGET = 32


class InvalidRollbackTargetError(DefenderConfigError, ValueError):
    """A rollback target that is neither `master` nor a positive version number. Also a
    ValueError, so argument parsers treat it as a bad value."""

    reason = "InvalidRollbackTarget"

    def __init__(self, text: str, *, highest: int) -> None:
        self.text = text
        # The text comes from an annotation of any length; the message goes into Events and
        # the webhook's answer, so it quotes only the start.
        shown = text if len(text) <= _QUOTED_TARGET else text[:_QUOTED_TARGET] + "..."
        super().__init__(
            f"rollback target {shown!r} is not valid: use `master` or a version number from 1"
            f" to {highest} (`kubectl defender history <component>` lists the kept versions)"
        )


class RepairRefusedError(DefenderConfigError):
    """A repair was refused because its source does not verify (a scrub never restores a
    value from anything unauthenticated) or the component changed while it was repaired."""

    reason = "RepairRefused"

    def __init__(self, path: str, why: str) -> None:
        self.path = path
        super().__init__(f"cannot repair {path!r}: {why}")


class MasterMissingError(DefenderConfigError):
    """A seed found MASTER absent but the component not new: its metadata, ACTIVE or first
    history entry is still in etcd. Seeding it would write whatever config
    the seeder holds as MASTER and as a new version 1 over what is there (after a breaker
    rollback, the very config the breaker rejected), so nothing is written. Not a StoreError:
    no retry brings MASTER back, a person must (docs/troubleshooting.md#mastermissing)."""

    reason = "MasterMissing"

    def __init__(self, component: str, found: Sequence[str]) -> None:
        self.component = component
        self.found = tuple(found)
        super().__init__(
            f"MASTER of {component!r} is missing but etcd still holds its"
            f" {', '.join(self.found)}: not seeded again, nothing written; components keep"
            " running ACTIVE. Restore the component's keys from an etcd snapshot, or delete it"
            " with retention Purge and create it again (docs/troubleshooting.md#mastermissing)"
        )
