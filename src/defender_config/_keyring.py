"""Keys, the immutable Keyring with its rotation stages, and a reloading KeyringSource.

Rotation without downtime is four keyring versions, each rolled out to every component before the
next one is written:

1. `with_new_decrypt_only()`  every component learns the new key but still seals with the old;
2. `promote(new_id)`          the new key seals, the old one only decrypts;
3. (the operator re-seals every stored value with the new key)
4. `retire(old_id)`           the old key refuses to decrypt; `remove(old_id)` drops it.

Key material is 32 random bytes. It is never used directly: each cipher derives its own key with
HKDF-SHA256 (see `_codecs.Cipher.derive`). Fingerprints are the first 16 hex digits of a
domain-separated SHA-256 over the material: they identify a key in logs, heartbeats and status
without revealing anything usable. SHA-256 is a hash, not a cipher: nothing is "encrypted with
SHA-256" here.

On disk the keyring is the Kubernetes Secret file `keyring.json`:

    {"version": 1, "keys": [{"id": "...", "state": "primary", "created": "...Z",
                             "material": "<base64 of 32 bytes>"}]}

Kubernetes mounts Secrets as `<dir>/keyring.json -> ..data/keyring.json`, with `..data` a symlink
to a timestamped directory that kubelet swaps atomically; reading through the symlink always sees
one complete version.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._errors import KeyringError, UnknownKeyError
from ._files import read_file_bounded
from ._json_parse import parse_json

__all__ = [
    "KEYRING_FILE",
    "Key",
    "KeyState",
    "Keyring",
    "KeyringSource",
]

log = logging.getLogger("defender_config.keyring")

KEYRING_FILE = "keyring.json"
KEY_BYTES = 32
_KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # fullmatch: `$` would let "k1\n" through
_FP_DOMAIN = b"ml-defender key fingerprint v1\x00"


class KeyState(enum.StrEnum):
    """What a key may do."""

    PRIMARY = "primary"
    """Seals new values (exactly one per keyring) and opens old ones."""
    DECRYPT_ONLY = "decrypt-only"
    """Opens values; used during a rotation window."""
    RETIRED = "retired"
    """Refuses to open anything: values still sealed with it need a rewrap."""


def fingerprint_of(material: bytes) -> str:
    """First 16 hex digits of SHA-256 over a domain tag and the material: safe to log."""
    return hashlib.sha256(_FP_DOMAIN + material).hexdigest()[:16]


# A field of a keyring file (or of its export) is quoted in an error only when it cannot be
# material, else described by its shape: a hand edit may have swapped fields, and the message
# reaches logs, heartbeats, alerts and the agent's GET /status.


def shape_of(value: Any) -> str:
    """What a keyring field holds, without its content (which may be misplaced material)."""
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    return f"a JSON {type(value).__name__}"


def word_or_shape(value: Any) -> str:
    """A short word as it is (a mistyped state such as 'active'); anything else by its shape:
    material (44 characters of base64, ending in '=') is never a word of at most 20 letters."""
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z_-]{1,20}", value):
        return repr(value)
    return shape_of(value)


def integer_or_shape(value: Any) -> str:
    """An integer as it is (a format version); anything else, material included, by its shape."""
    return repr(value) if type(value) is int else shape_of(value)


def _new_key_id(now: datetime) -> str:
    return f"k{now.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class Key:
    """One key. `repr` and `str` show the id, state and fingerprint, never the material."""

    key_id: str
    material: bytes = field(repr=False)
    state: KeyState
    created: datetime

    def __post_init__(self) -> None:
        if not _KEY_ID_RE.fullmatch(self.key_id):
            # Not echoed: what a hand edit put there may be the material (fields swapped).
            raise KeyringError(
                f"key id ({shape_of(self.key_id)}) must be 1-64 characters of letters, digits, "
                "'.', '_', '-'"
            )
        if len(self.material) != KEY_BYTES:
            raise KeyringError(
                f"key {self.key_id!r} has {len(self.material)} bytes of material, need "
                f"{KEY_BYTES}; regenerate the keyring Secret"
            )
        if self.created.tzinfo is None:
            raise KeyringError(f"key {self.key_id!r} has a creation time without a time zone")

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.material)

    def with_state(self, state: KeyState) -> Key:
        return Key(self.key_id, self.material, state, self.created)

    @classmethod
    def generate(cls, state: KeyState = KeyState.PRIMARY, key_id: str | None = None) -> Key:
        now = datetime.now(UTC).replace(microsecond=0)
        return cls(key_id or _new_key_id(now), secrets.token_bytes(KEY_BYTES), state, now)

    def __repr__(self) -> str:
        return (
            f"Key(key_id={self.key_id!r}, state={self.state.value}, "
            f"fingerprint={self.fingerprint!r}, created={self.created.isoformat()!r})"
        )

    __str__ = __repr__


class Keyring:
    """An immutable, ordered set of keys with exactly one primary.

    Every stage helper returns a new Keyring, so a keyring seen by one thread never changes.
    """

    __slots__ = ("_by_id", "_keys", "_primary")

    def __init__(self, keys: Iterable[Key]) -> None:
        key_list = tuple(keys)
        if not key_list:
            raise KeyringError("no keys; the keyring Secret must hold at least one primary key")
        by_id: dict[str, Key] = {}
        for key in key_list:
            if key.key_id in by_id:
                raise KeyringError(f"key id {key.key_id!r} appears twice")
            by_id[key.key_id] = key
        primaries = [k for k in key_list if k.state is KeyState.PRIMARY]
        if len(primaries) != 1:
            ids = ", ".join(k.key_id for k in primaries) or "none"
            raise KeyringError(f"need exactly one primary key, found {len(primaries)} ({ids})")
        fps: dict[str, str] = {}
        for key in key_list:
            other = fps.setdefault(key.fingerprint, key.key_id)
            if other != key.key_id:
                raise KeyringError(f"keys {other!r} and {key.key_id!r} hold the same material")
        self._keys = key_list
        self._by_id = by_id
        self._primary = primaries[0]

    # --- reading ---------------------------------------------------------------------------

    @property
    def primary(self) -> Key:
        """The key that seals new values."""
        return self._primary

    @property
    def primary_fingerprint(self) -> str:
        return self._primary.fingerprint

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(k.key_id for k in self._keys)

    @property
    def keys(self) -> tuple[Key, ...]:
        return self._keys

    def __iter__(self) -> Iterator[Key]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._by_id

    def get(self, key_id: str) -> Key | None:
        """The key with this id (any state), or None."""
        return self._by_id.get(key_id)

    def fingerprint(self, key_id: str) -> str:
        """Fingerprint of a held key; KeyringError for an unknown id."""
        key = self._by_id.get(key_id)
        if key is None:
            raise KeyringError(f"no key {key_id!r} (held: {', '.join(self.key_ids)})")
        return key.fingerprint

    def decryption_key(self, key_id: str, path: str | None = None) -> Key:
        """The key to open a value sealed with `key_id`: UnknownKeyError if absent or retired."""
        key = self._by_id.get(key_id)
        if key is None or key.state is KeyState.RETIRED:
            usable = [k.key_id for k in self._keys if k.state is not KeyState.RETIRED]
            raise UnknownKeyError(key_id, usable, path=path, retired=key is not None)
        return key

    def fingerprints(self) -> dict[str, str]:
        """key id → fingerprint, for status and logs."""
        return {k.key_id: k.fingerprint for k in self._keys}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Keyring) and self._keys == other._keys

    def __hash__(self) -> int:
        return hash(self._keys)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k.key_id}:{k.state.value}:{k.fingerprint}" for k in self._keys)
        return f"Keyring([{inner}])"

    # --- building and rotating ---------------------------------------------------------------

    @classmethod
    def generate(cls) -> Keyring:
        """A new keyring with one fresh primary key."""
        return cls([Key.generate(KeyState.PRIMARY)])

    def with_new_decrypt_only(self, key_id: str | None = None) -> Keyring:
        """Stage 1: add a fresh decrypt-only key (returned keyring's last key)."""
        key = Key.generate(KeyState.DECRYPT_ONLY, key_id)
        if key.key_id in self._by_id:
            raise KeyringError(f"key id {key.key_id!r} already exists")
        return Keyring([*self._keys, key])

    def promote(self, key_id: str) -> Keyring:
        """Stage 2: `key_id` becomes primary; the previous primary becomes decrypt-only."""
        target = self._require(key_id)
        if target.state is KeyState.RETIRED:
            raise KeyringError(f"key {key_id!r} is retired; add a new key instead of reviving it")
        if target.state is KeyState.PRIMARY:
            return self
        return Keyring(
            k.with_state(KeyState.PRIMARY)
            if k.key_id == key_id
            else k.with_state(KeyState.DECRYPT_ONLY)
            if k.state is KeyState.PRIMARY
            else k
            for k in self._keys
        )

    def retire(self, key_id: str) -> Keyring:
        """Stage 4: `key_id` stops decrypting. The primary cannot be retired."""
        target = self._require(key_id)
        if target.state is KeyState.PRIMARY:
            raise KeyringError(f"key {key_id!r} is the primary; promote another key first")
        return Keyring(
            k.with_state(KeyState.RETIRED) if k.key_id == key_id else k for k in self._keys
        )

    def remove(self, key_id: str) -> Keyring:
        """Drop a retired key for good."""
        target = self._require(key_id)
        if target.state is not KeyState.RETIRED:
            raise KeyringError(f"key {key_id!r} is {target.state.value}; retire it before removal")
        return Keyring(k for k in self._keys if k.key_id != key_id)

    def _require(self, key_id: str) -> Key:
        key = self._by_id.get(key_id)
        if key is None:
            raise KeyringError(f"no key {key_id!r} (held: {', '.join(self.key_ids)})")
        return key

    # --- Secret form ---------------------------------------------------------------------------

    def to_json(self) -> bytes:
        """The `keyring.json` file content."""
        doc = {
            "version": 1,
            "keys": [
                {
                    "id": k.key_id,
                    "state": k.state.value,
                    "created": k.created.astimezone(UTC).isoformat().replace("+00:00", "Z"),
                    "material": base64.b64encode(k.material).decode("ascii"),
                }
                for k in self._keys
            ],
        }
        return json.dumps(doc, indent=2).encode("utf-8")

    def to_secret_data(self) -> dict[str, str]:
        """The Kubernetes Secret `data` mapping: {"keyring.json": base64 of the file}."""
        return {KEYRING_FILE: base64.b64encode(self.to_json()).decode("ascii")}

    @classmethod
    def from_json(cls, content: bytes, source: str | None = None) -> Keyring:
        """Parse `keyring.json` content. Errors name the source and the bad entry, never bytes."""
        try:
            doc = parse_json(content)
        except ValueError as exc:
            # The decoder's message quotes no input, only a position.
            raise KeyringError(f"{KEYRING_FILE} is not valid JSON ({exc})", source=source) from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise KeyringError(
                f'{KEYRING_FILE} must be an object with a "keys" list', source=source
            )
        if doc.get("version", 1) != 1:
            shown = integer_or_shape(doc.get("version"))
            raise KeyringError(
                f"{KEYRING_FILE} version {shown} is not supported (need 1); upgrade this component",
                source=source,
            )
        keys = [cls._parse_key(i, entry, source) for i, entry in enumerate(doc["keys"])]
        try:
            return cls(keys)
        except KeyringError as exc:
            raise KeyringError(exc.message.removeprefix("keyring: "), source=source) from exc

    @staticmethod
    def _parse_key(index: int, entry: Any, source: str | None) -> Key:
        where = f"keys[{index}]"
        if not isinstance(entry, dict):
            raise KeyringError(f"{where} must be an object", source=source)
        missing = [f for f in ("id", "state", "created", "material") if f not in entry]
        if missing:
            raise KeyringError(f"{where} lacks {', '.join(missing)}", source=source)
        key_id = entry["id"]
        if not isinstance(key_id, str):
            raise KeyringError(f"{where}.id must be a string", source=source)
        # Values other than the material are shown only when they cannot be it: a hand edit
        # may have swapped fields, and this message reaches logs, heartbeats and alerts.
        # Nor is the parser's own error chained: it quotes its input.
        if not _KEY_ID_RE.fullmatch(key_id):
            raise KeyringError(
                f"{where}.id ({shape_of(key_id)}) must be 1-64 characters of letters, digits, "
                "'.', '_', '-'",
                source=source,
            )
        where = f"key {key_id!r}"
        try:
            state = KeyState(entry["state"])
        except ValueError:
            allowed = ", ".join(s.value for s in KeyState)
            raise KeyringError(
                f"{where} has state {word_or_shape(entry['state'])}; allowed: {allowed}",
                source=source,
            ) from None
        try:
            created = datetime.fromisoformat(str(entry["created"]).replace("Z", "+00:00"))
        except ValueError:
            raise KeyringError(
                f"{where} has an unreadable created time (need ISO 8601)", source=source
            ) from None
        raw = entry["material"]
        try:
            if not isinstance(raw, str):
                raise ValueError
            material = base64.b64decode(raw, validate=True)
        except (ValueError, binascii.Error):
            # Never echo the value: it is (possibly mangled) key material.
            raise KeyringError(f"{where} material is not valid base64", source=source) from None
        try:
            return Key(key_id, material, state, created)
        except KeyringError as exc:
            raise KeyringError(exc.message.removeprefix("keyring: "), source=source) from None

    @classmethod
    def from_secret_data(
        cls, data: Mapping[str, bytes | str], source: str | None = None
    ) -> Keyring:
        """From Secret data: bytes values are file content (a mounted Secret, `stringData`),
        str values are base64 (the API's `data` form, as `to_secret_data` returns)."""
        if KEYRING_FILE not in data:
            found = ", ".join(sorted(data)) or "nothing"
            raise KeyringError(
                f"Secret has no {KEYRING_FILE} entry (found: {found}); check the Secret name "
                "and that it was created by the operator",
                source=source,
            )
        value = data[KEYRING_FILE]
        if isinstance(value, str):
            try:
                content = base64.b64decode(value, validate=True)
            except (ValueError, binascii.Error):
                raise KeyringError(
                    f"Secret data {KEYRING_FILE} is not valid base64", source=source
                ) from None
        else:
            content = bytes(value)
        return cls.from_json(content, source=source)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> Keyring:
        """From a mounted Secret directory (reads `keyring.json`) or the file itself."""
        content, shown = _read_keyring_file(Path(path))
        return cls.from_json(content, source=shown)


def _keyring_file(path: Path) -> Path:
    return path / KEYRING_FILE if path.is_dir() else path


# A keyring comes from a Secret, which holds at most 1 MiB.
MAX_KEYRING_FILE_BYTES = 1024 * 1024


def _read_keyring_file(path: Path) -> tuple[bytes, str]:
    file = _keyring_file(path)
    try:
        return read_file_bounded(file, MAX_KEYRING_FILE_BYTES), str(file)
    except PermissionError as exc:
        # The Secret is mounted (the file is there) but its files belong to root and a group:
        # "check that it is mounted" sent people looking in the wrong place. A non-root
        # process reads them only through the pod's fsGroup and a group-readable defaultMode.
        raise KeyringError(
            f"cannot read {file} ({exc.strerror or exc}): this process (uid {os.getuid()}, gid"
            f" {os.getgid()}) may not read the mounted keyring; give the pod a"
            " securityContext.fsGroup of this process's group and the Secret volume a"
            " group-readable defaultMode (0440), as docs/agent.md shows",
            source=str(path),
        ) from exc
    except OSError as exc:
        raise KeyringError(
            f"cannot read {file} ({exc.strerror or exc}); check that the keyring Secret is "
            "mounted there",
            source=str(path),
        ) from exc


def _stat_signature(file: Path) -> tuple[int, int, int, int] | None:
    try:
        # stat() follows the ..data symlink chain, so a kubelet swap changes the inode.
        st = file.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class KeyringSource:
    """The current keyring of a mounted Secret, reloaded when the file changes. Thread-safe.

    `current()` costs one clock read on the fast path; at most every `poll_seconds` it stats the
    file and, if that changed, re-reads and parses it. A broken new file keeps the last good
    keyring, logs the error and exposes it as `last_error` (and through `on_error`), so a bad
    Secret update never takes a running component down; when the file is readable again with
    the same keyring, `last_error` clears and `on_recover` is called. Construction fails if the
    first read fails: there is no good keyring to fall back to.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        poll_seconds: float = 2.0,
        on_change: Callable[[Keyring, Keyring], None] | None = None,
        on_error: Callable[[KeyringError], None] | None = None,
        on_recover: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = Path(path)
        self._poll = poll_seconds
        self._on_change = on_change
        self._on_error = on_error
        # Told when the file is readable again after an error and holds the keyring in use:
        # on_change does not fire then, and whoever showed the error must learn it is over.
        self._on_recover = on_recover
        self._clock = clock
        self._lock = threading.Lock()
        self._file = _keyring_file(self._path)
        self._signature = _stat_signature(self._file)
        content, shown = _read_keyring_file(self._path)
        self._digest = hashlib.sha256(content).digest()
        self._keyring = Keyring.from_json(content, source=shown)
        self._next_check = clock() + poll_seconds
        self._last_error: KeyringError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def static(cls, keyring: Keyring) -> StaticKeyringSource:
        """A source that always returns `keyring` (tests, or keys handed over in memory)."""
        return StaticKeyringSource(keyring)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def last_error(self) -> KeyringError | None:
        """The error of the latest failed reload, None once a reload succeeds."""
        return self._last_error

    def current(self) -> Keyring:
        """The latest good keyring."""
        # While another thread re-reads the file, hand out the current keyring instead of
        # queueing behind its I/O.
        if self._clock() >= self._next_check and not self._lock.locked():
            self.refresh()
        return self._keyring

    def refresh(self) -> bool:
        """Check the file now. Returns True if a new keyring was loaded."""
        error: KeyringError | None = None
        changed: tuple[Keyring, Keyring] | None = None
        recovered = False
        with self._lock:
            self._next_check = self._clock() + self._poll
            # Secret mounts can swap a different directory in; re-resolve the file each time.
            self._file = _keyring_file(self._path)
            signature = _stat_signature(self._file)
            if signature is not None and signature == self._signature:
                return False
            new: Keyring | None = None
            try:
                content, shown = _read_keyring_file(self._path)
                digest = hashlib.sha256(content).digest()
                if digest == self._digest:
                    # E.g. the mount was briefly gone (a Secret deleted and re-created) and is
                    # back with the same keyring: nothing changed, but an error is over.
                    self._signature = signature
                    recovered, self._last_error = self._last_error is not None, None
                else:
                    new = Keyring.from_json(content, source=shown)
            except KeyringError as exc:
                # Remember the signature so a broken file is reported once, not every poll;
                # the next change is read again.
                self._signature = signature
                self._last_error = error = exc
                log.error(
                    "keyring reload failed, keeping the last good keyring (primary %s): %s",
                    self._keyring.primary_fingerprint,
                    exc,
                )
            else:
                if new is not None:
                    changed = (self._keyring, new)
                    self._keyring = new
                    self._signature, self._digest = signature, digest
                    self._last_error = None
                    log.info(
                        "keyring reloaded: primary %s (%s), keys %s",
                        new.primary.key_id,
                        new.primary_fingerprint,
                        ",".join(new.key_ids),
                    )
                elif recovered:
                    log.info(
                        "keyring readable again, unchanged (primary %s)",
                        self._keyring.primary_fingerprint,
                    )
        # Callbacks run outside the lock so they may call current() themselves. A failing one
        # is logged, never raised: current() refreshes inline in whatever thread reads the
        # keyring, and a callback's bug must not fail that reader's decrypt.
        if error is not None and self._on_error is not None:
            _notify(self._on_error, error)
        if recovered and self._on_recover is not None:
            _notify(self._on_recover)
        if changed is not None and self._on_change is not None:
            _notify(self._on_change, *changed)
        return changed is not None

    def start(self) -> None:
        """Poll in a daemon thread, so changes are noticed (and `on_change` fires) even when
        nothing calls `current()`."""
        with self._lock:
            if self._thread is not None:
                return
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="defender-keyring-poll", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            try:
                self.refresh()
            except Exception:  # nothing may kill the poller; the next poll tries again
                log.exception("keyring poll failed")

    def __repr__(self) -> str:
        return f"KeyringSource({str(self._path)!r}, primary={self._keyring.primary_fingerprint})"


def _notify(callback: Callable[..., None], *args: Any) -> None:
    try:
        callback(*args)
    except Exception:
        log.exception("keyring callback failed")


class StaticKeyringSource:
    """A keyring source that never changes."""

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring

    def current(self) -> Keyring:
        return self._keyring

    @property
    def last_error(self) -> KeyringError | None:
        return None

    def __repr__(self) -> str:
        return f"StaticKeyringSource(primary={self._keyring.primary_fingerprint})"
