"""The shared keyring: its source Secret, its copies, and the rotation state kept beside it.

The source Secret lives in the operator's namespace. Each namespace that has DefenderComponents
gets a copy with the same name, for component pods to mount. Copies are labelled as managed by
the operator and carry the source's digest in an annotation, so "in sync" is a string compare
and never needs the key material outside `data`.

Rotation state (stage, since, key ids; nothing secret) is stored as annotations on the source
Secret: it changes in the same write as the keyring, so the two can never disagree.

Key material never leaves `data`: Secret objects are not logged, API errors are reduced to
status + reason (see `KeySecretError`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from defender_config import (
    REGISTRATIONS_FILE,
    Keyring,
    KeyringError,
    RegistrationsFileError,
    parse_registrations,
    render_registrations,
)
from defender_config.contract import (
    API_GROUP,
    EXPORTED_ANNOTATION,
    EXPORTED_KEYS_ANNOTATION,
    KEYRING_LABELS,
    MANAGED_BY,
    RESTORED_ANNOTATION,
    ROTATE_ANNOTATION,
    ROTATION_STAGE_ANNOTATION,
)
from defender_operator._api import RotationStage
from defender_operator._decisions.keyring import may_replace_copy
from defender_operator._decisions.registration import registrations_to_publish
from defender_operator._decisions.rotation import RotationState
from defender_operator._errors import (
    ForeignSecretError,
    KeyDropRefusedError,
    KeySecretError,
    api_errors_only,
)

log = logging.getLogger("defender_operator.keys")

LABELS = KEYRING_LABELS
A_STAGE = ROTATION_STAGE_ANNOTATION
# The operator's own bookkeeping on the Secret (nobody else reads or writes these).
A_SINCE = f"{API_GROUP}/rotation-since"
A_NEW = f"{API_GROUP}/rotation-new-key"
A_OLD = f"{API_GROUP}/rotation-old-key"
A_LAST = f"{API_GROUP}/last-rotation-time"
A_DIGEST = f"{API_GROUP}/keyring-digest"
A_SOURCE = f"{API_GROUP}/source"
A_EXPORTED = EXPORTED_ANNOTATION
A_EXPORTED_KEYS = EXPORTED_KEYS_ANNOTATION
A_RESTORED = RESTORED_ANNOTATION
# Annotations a person's tools or a restore add; kept across the operator's own rewrites.
_KEPT = (A_EXPORTED, A_EXPORTED_KEYS, A_RESTORED)
# The holder named in A_RESTORED when the operator writes the source back from what it holds.
MEMORY = "the operator's memory"


class KeyringUnavailableError(KeyringError):
    """The operator holds no verified keyring (refused, or not settled yet): nothing is sealed
    or opened until a person restores it (docs/troubleshooting.md#keyringmissing)."""

    reason = "KeyUnavailable"

    def __init__(self) -> None:
        super().__init__(
            "the shared keyring is unavailable: the operator refuses to seal or open values"
            " until the keyring Secret is restored (docs/troubleshooting.md#keyringmissing)"
        )


class MutableKeyringSource:
    """The operator's in-memory keyring provider: `current()` for the library's Envelope,
    `set()` when the operator itself changes the keyring. Thread-safe.

    Empty (None) until a keyring has been checked against the store, and again while the
    operator refuses one: `current()` then raises KeyringUnavailableError, so nothing can be
    sealed under a keyring that could not open what is stored."""

    def __init__(self, keyring: Keyring | None) -> None:
        self._lock = threading.Lock()
        self._keyring = keyring

    def current(self) -> Keyring:
        with self._lock:
            if self._keyring is None:
                raise KeyringUnavailableError()
            return self._keyring

    def peek(self) -> Keyring | None:
        """The keyring held, or None; never raises."""
        with self._lock:
            return self._keyring

    def set(self, keyring: Keyring | None) -> None:
        with self._lock:
            self._keyring = keyring

    def __repr__(self) -> str:
        held = self.peek()
        return f"MutableKeyringSource(primary={held.primary_fingerprint if held else None})"


@dataclass(frozen=True)
class StoredKeyring:
    keyring: Keyring
    rotation: RotationState
    last_rotation: datetime | None
    resource_version: str
    request_pending: bool = False
    kept: dict[str, str] = field(default_factory=dict)
    """Annotations the operator does not manage but carries over (last export time)."""

    @property
    def exported(self) -> datetime | None:
        return _time(self.kept.get(A_EXPORTED))

    @property
    def exported_keys(self) -> frozenset[str] | None:
        """The key ids the last export holds, as its stamp lists them; None when the stamp
        lists none (by hand, or an older plugin)."""
        listed = self.kept.get(A_EXPORTED_KEYS)
        if listed is None:
            return None
        return frozenset(k.strip() for k in listed.split(",") if k.strip())


_last_digest: tuple[Keyring, str] | None = None


def keyring_digest(keyring: Keyring) -> str:
    """Digest of the serialized keyring: identifies a version without revealing it."""
    global _last_digest
    # Asked by every monitor pass of the same (immutable) keyring: serialized once per keyring.
    last = _last_digest
    if last is not None and last[0] is keyring:
        return last[1]
    digest = hashlib.sha256(keyring.to_json()).hexdigest()[:32]
    _last_digest = (keyring, digest)
    return digest


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None  # a person's edit; read as absent


@dataclass(frozen=True)
class ExportSeen:
    """The last-export stamp last seen on the source Secret (its time, and the key ids it
    lists if it does), and the digest of the keyring the Secret held then."""

    digest: str
    stamp: str
    keys: str | None = None


def restore_annotations(holder: str, keyring: Keyring, seen: ExportSeen | None) -> dict[str, str]:
    """The annotations of a source Secret written back with `keyring` from `holder`: where it
    came from, and the last-export stamp the Secret had with this keyring. The export exists
    whether or not the Secret does: without the stamp an operator started later warns
    NoKeyringExport and asks for one again. A stamp seen with another keyring is not carried:
    it tells of an export of what that Secret held, not of this keyring."""
    annotations = {A_RESTORED: holder}
    if seen is not None and seen.digest == keyring_digest(keyring):
        annotations[A_EXPORTED] = seen.stamp
        if seen.keys is not None:
            annotations[A_EXPORTED_KEYS] = seen.keys
    return annotations


def _rotation_from(annotations: dict[str, str]) -> RotationState:
    return RotationState(
        stage=RotationStage(annotations.get(A_STAGE, RotationStage.IDLE.value)),
        since=_time(annotations.get(A_SINCE)),
        new_key_id=annotations.get(A_NEW) or None,
        old_key_id=annotations.get(A_OLD) or None,
    )


def _annotations(
    keyring: Keyring, rotation: RotationState, last_rotation: datetime | None
) -> dict[str, str | None]:
    # None values remove the annotation in a merge patch / replace.
    return {
        A_STAGE: rotation.stage.value,
        A_SINCE: rotation.since.isoformat() if rotation.since else None,
        A_NEW: rotation.new_key_id,
        A_OLD: rotation.old_key_id,
        A_LAST: last_rotation.isoformat() if last_rotation else None,
        A_DIGEST: keyring_digest(keyring),
    }


# Creates answered 409 (it exists) while reads answer 404 (it does not) before giving up: one is
# a race with another writer; more is an API server that contradicts itself, not to be looped on.
_CREATE_RACES = 3


def _fail(action: str, namespace: str, name: str, exc: ApiException) -> KeySecretError:
    return KeySecretError(action, namespace, name, exc.status, str(exc.reason))


class KeyringSecrets:
    """Reads and writes the keyring Secrets through the Kubernetes API (blocking calls: run
    them in a thread from async code)."""

    def __init__(self, core: client.CoreV1Api, namespace: str, name: str) -> None:
        self._core = api_errors_only(core)
        self.namespace = namespace
        self.name = name
        # namespace -> (digest of its copy, monotonic time it was read or written)
        self._copies: dict[str, tuple[str | None, float]] = {}
        # namespace -> (what its Secret's registrations.json holds, monotonic time it was read
        # or written): carried into every rewrite of that Secret, so a rotation or a copy
        # re-created after a delete does not leave readers without it until the next publish.
        self._registrations: dict[str, tuple[dict[str, int], float]] = {}
        # The last-export stamp last read on the source Secret: carried into a Secret written
        # back after a delete (`restore`).
        self._export_seen: ExportSeen | None = None

    def _registrations_data(self, namespace: str) -> dict[str, str]:
        held = self._registrations.get(namespace)
        if not held or not held[0]:
            return {}
        return {REGISTRATIONS_FILE: base64.b64encode(render_registrations(held[0])).decode()}

    def _recent(self, namespace: str, max_age: float) -> tuple[str | None, bool]:
        seen = self._copies.get(namespace)
        if seen is None or max_age <= 0 or time.monotonic() - seen[1] > max_age:
            return None, False
        return seen[0], True

    def _read(self, namespace: str) -> Any | None:
        """This Secret's name in `namespace`; None when there is none (other refusals typed)."""
        try:
            return self._core.read_namespaced_secret(self.name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise _fail("read", namespace, self.name, exc) from None
            return None

    def _parse(self, secret: Any) -> StoredKeyring:
        source = f"Secret {self.namespace}/{self.name}"
        keyring = Keyring.from_secret_data(secret.data or {}, source=source)
        annotations = dict(secret.metadata.annotations or {})
        if annotations.get(A_EXPORTED):
            self._export_seen = ExportSeen(
                keyring_digest(keyring), annotations[A_EXPORTED], annotations.get(A_EXPORTED_KEYS)
            )
        return StoredKeyring(
            keyring=keyring,
            rotation=_rotation_from(annotations),
            last_rotation=_time(annotations.get(A_LAST)),
            resource_version=secret.metadata.resource_version,
            request_pending=ROTATE_ANNOTATION in annotations,
            kept={k: annotations[k] for k in _KEPT if k in annotations},
        )

    def load(self) -> StoredKeyring | None:
        secret = self._read(self.namespace)
        return None if secret is None else self._parse(secret)

    def restore(self, keyring: Keyring, holder: str) -> tuple[StoredKeyring, bool]:
        """Write the deleted source Secret back with `keyring`, taken from `holder`, as
        `create` does (`restore_annotations`)."""
        return self.create(keyring, restore_annotations(holder, keyring, self._export_seen))

    def create(
        self, keyring: Keyring, annotations: Mapping[str, str] | None = None
    ) -> tuple[StoredKeyring, bool]:
        """Create the source Secret (create-only). Two operator replicas may race here: the
        loser gets 409 and reads the winner's keyring, so there is only ever one key. Returns
        what is stored and whether this call wrote it."""
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=self.name,
                namespace=self.namespace,
                labels=LABELS,
                annotations={
                    **{
                        k: v
                        for k, v in _annotations(keyring, RotationState(), None).items()
                        if v is not None
                    },
                    **(annotations or {}),
                },
            ),
            type="Opaque",
            data={**keyring.to_secret_data(), **self._registrations_data(self.namespace)},
        )
        created = True
        try:
            self._core.create_namespaced_secret(self.namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise _fail("create", self.namespace, self.name, exc) from None
            created = False
        stored = self.load()
        if stored is None:
            raise KeySecretError("read back", self.namespace, self.name, 404, "vanished")
        return stored, created

    def save(
        self,
        keyring: Keyring,
        rotation: RotationState,
        last_rotation: datetime | None,
        resource_version: str,
        keep: Mapping[str, str] | None = None,
    ) -> StoredKeyring:
        """Replace the source Secret if nobody changed it since `resource_version`
        (409 → KeySecretError with status 409: re-load and decide again). Drops a pending
        rotation request: the caller has acted on it. `keep`: annotations to carry over
        (`StoredKeyring.kept`)."""
        annotations = {
            **(keep or {}),
            **{
                k: v
                for k, v in _annotations(keyring, rotation, last_rotation).items()
                if v is not None
            },
        }
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=self.name,
                namespace=self.namespace,
                labels=LABELS,
                annotations=annotations,
                resource_version=resource_version,
            ),
            type="Opaque",
            data={**keyring.to_secret_data(), **self._registrations_data(self.namespace)},
        )
        try:
            secret = self._core.replace_namespaced_secret(self.name, self.namespace, body)
        except ApiException as exc:
            raise _fail("replace", self.namespace, self.name, exc) from None
        return self._parse(secret)

    def fan_out(
        self,
        keyring: Keyring,
        namespace: str,
        *,
        max_age: float = 0.0,
        referenced: Callable[[], frozenset[str]] | None = None,
        _races: int = 0,
    ) -> bool:
        """Create or update the copy in `namespace`. True when something was written.

        With `max_age`, a copy this operator read or wrote with the same digest less than
        `max_age` seconds ago is taken as current without reading it again.

        A copy may be the last holder of a key (the source was deleted), so it is replaced only
        by a keyring that keeps every key id it holds that stored values still use:
        `referenced()` returns those ids and is called only when the replacement drops a key
        (without it, any drop is refused). Refusals raise KeyDropRefusedError."""
        if self.copy_is_current(keyring, namespace, max_age=max_age):
            return False
        digest = keyring_digest(keyring)
        meta = client.V1ObjectMeta(
            name=self.name,
            namespace=namespace,
            labels=LABELS,
            annotations={A_DIGEST: digest, A_SOURCE: f"{self.namespace}/{self.name}"},
        )
        current = self._read(namespace)
        if current is None:
            data = {**keyring.to_secret_data(), **self._registrations_data(namespace)}
            body = client.V1Secret(metadata=meta, type="Opaque", data=data)
            try:
                self._core.create_namespaced_secret(namespace, body)
            except ApiException as exc:
                if exc.status == 409 and _races < _CREATE_RACES:
                    # Someone created it since the read: read it again and judge that one.
                    return self.fan_out(
                        keyring, namespace, referenced=referenced, _races=_races + 1
                    )
                raise _fail("create", namespace, self.name, exc) from None
            self._copies[namespace] = (digest, time.monotonic())
            log.info("copied the keyring to %s/%s (%s)", namespace, self.name, digest)
            return True
        if not _managed(current):
            raise ForeignSecretError(namespace, self.name)
        if (current.metadata.annotations or {}).get(A_DIGEST) == digest:
            self._copies[namespace] = (digest, time.monotonic())
            return False
        held = self._held(current, namespace)
        new_ids = frozenset(keyring.key_ids)
        verdict = may_replace_copy(
            held,
            new_ids,
            None if held is None or held <= new_ids else _referenced_or_all(referenced, held),
        )
        if not verdict.replace:
            raise KeyDropRefusedError(namespace, self.name, sorted(verdict.dropped))
        meta.resource_version = current.metadata.resource_version
        on_file = (current.data or {}).get(REGISTRATIONS_FILE)
        carried = {REGISTRATIONS_FILE: on_file} if on_file else self._registrations_data(namespace)
        body = client.V1Secret(
            metadata=meta, type="Opaque", data={**keyring.to_secret_data(), **carried}
        )
        try:
            self._core.replace_namespaced_secret(self.name, namespace, body)
        except ApiException as exc:
            raise _fail("replace", namespace, self.name, exc) from None
        self._copies[namespace] = (digest, time.monotonic())
        log.info("updated the keyring copy %s/%s (%s)", namespace, self.name, digest)
        return True

    def publish_registrations(
        self,
        namespace: str,
        known: Mapping[str, int],
        removed: Collection[str] = (),
        *,
        max_age: float = 0.0,
    ) -> bool:
        """Write `registrations.json` into the keyring Secret readers of `namespace` mount (its
        copy; the source itself in the operator's namespace): the registration each component
        of `known` anchors, entries of `removed` dropped (`registrations_to_publish`). True when
        something was written.

        With `max_age`, what this operator read or wrote there less than `max_age` seconds ago
        is taken as the file without reading it again. No Secret (or a copy the operator does
        not manage): nothing is written; a copy `fan_out` creates carries what this operator
        last published there, and the next round writes the rest."""
        held = self._registrations.get(namespace)
        if (
            held is not None
            and max_age > 0
            and time.monotonic() - held[1] <= max_age
            and registrations_to_publish(held[0], known, removed) == held[0]
        ):
            return False  # what this operator last read or wrote there already says so
        current = self._read(namespace)
        if current is None:
            # Kept in memory: `fan_out` (or `ensure`, for the source) writes it into the Secret
            # it creates again.
            return False
        if namespace != self.namespace and not _managed(current):
            return False
        on_file = self._read_registrations(current, namespace)
        desired = registrations_to_publish(on_file or {}, known, removed)
        if desired == on_file or (not desired and on_file is None):
            self._registrations[namespace] = (desired, time.monotonic())
            return False
        content = base64.b64encode(render_registrations(desired)).decode()
        # A replace of what was read (RBAC grants `update` on the keyring Secret, not `patch`):
        # refused (409) if the Secret changed since, and the next round reads it again.
        current.data = {**(current.data or {}), REGISTRATIONS_FILE: content}
        try:
            self._core.replace_namespaced_secret(self.name, namespace, current)
        except ApiException as exc:
            self._registrations.pop(namespace, None)
            if exc.status in (404, 409):
                return False
            raise _fail("publish registrations to", namespace, self.name, exc) from None
        self._registrations[namespace] = (desired, time.monotonic())
        log.info(
            "published %d registration(s) to %s/%s",
            len(desired),
            namespace,
            self.name,
            extra={"namespace": namespace, "registrations": len(desired)},
        )
        return True

    def _read_registrations(self, secret: Any, namespace: str) -> dict[str, int] | None:
        """The Secret's registrations.json (None: it has none). One that does not parse counts
        as none: it is rewritten whole from what the operator knows."""
        raw = (secret.data or {}).get(REGISTRATIONS_FILE)
        if not raw:
            return None
        source = f"Secret {namespace}/{self.name}"
        try:
            return parse_registrations(base64.b64decode(raw, validate=True), source=source)
        except (binascii.Error, RegistrationsFileError) as exc:
            log.warning(
                "%s: %s is unreadable, writing it again: %s", source, REGISTRATIONS_FILE, exc
            )
            return None

    def _held(self, secret: Any, namespace: str) -> frozenset[str] | None:
        try:
            copy = Keyring.from_secret_data(
                secret.data or {}, source=f"Secret {namespace}/{self.name}"
            )
        except KeyringError:
            return None  # unreadable: it holds nothing anyone can use
        return frozenset(copy.key_ids)

    def read_copy(self, namespace: str) -> tuple[Keyring | None, str | None] | None:
        """The operator-managed copy in `namespace`: (keyring, None), (None, why unreadable),
        or None when there is none (absent, or not labelled as the operator's)."""
        current = self._read(namespace)
        if current is None or not _managed(current):
            return None
        try:
            keyring = Keyring.from_secret_data(
                current.data or {}, source=f"Secret {namespace}/{self.name}"
            )
        except KeyringError as exc:
            return None, exc.message
        return keyring, None

    def copy_is_current(self, keyring: Keyring, namespace: str, *, max_age: float) -> bool:
        """Whether `fan_out` has nothing to do, answered from memory: `namespace` holds the
        source itself, or a copy of `keyring` this operator read or wrote less than `max_age`
        seconds ago."""
        if namespace == self.namespace:
            return True  # the source itself is mountable there
        known, fresh = self._recent(namespace, max_age)
        return fresh and known == keyring_digest(keyring)

    def known_copy_digests(self) -> dict[str, str | None]:
        """namespace -> the copy's digest as this operator last read or wrote it, however long
        ago (a key rotation round compares them before and after: a copy it wrote or found
        changed is news for every monitor pass)."""
        return {namespace: digest for namespace, (digest, _) in self._copies.items()}

    def known_copy_digest(self, namespace: str, *, max_age: float) -> tuple[str | None, bool]:
        """`copy_digest` as this operator read or wrote it less than `max_age` seconds ago, and
        whether it is that fresh (False: call `copy_digest`, which reads the Secret)."""
        return self._recent(namespace, max_age)

    def copy_digest(self, namespace: str, *, max_age: float = 0.0) -> str | None:
        """Digest annotation of the copy in `namespace` (None when absent). With `max_age`,
        what this operator read or wrote less than `max_age` seconds ago."""
        known, fresh = self._recent(namespace, max_age)
        if fresh:
            return known
        current = self._read(namespace)
        if current is None:
            self._copies[namespace] = (None, time.monotonic())
            return None
        digest: str | None = (current.metadata.annotations or {}).get(A_DIGEST)
        self._copies[namespace] = (digest, time.monotonic())
        return digest


def _managed(secret: Any) -> bool:
    return bool((secret.metadata.labels or {}).get("app.kubernetes.io/managed-by") == MANAGED_BY)


def _referenced_or_all(
    referenced: Callable[[], frozenset[str]] | None, held: frozenset[str]
) -> frozenset[str]:
    # Without a way to look, every held key counts as used: refusing is the safe answer.
    return referenced() if referenced is not None else held
