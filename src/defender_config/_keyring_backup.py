"""The keyring as a file a person keeps apart from the etcd snapshots (`kubectl defender keyring
export` / `import`).

An etcd snapshot without the keyring is noise: every config in it is sealed. The keyring Secret
and its copies live in the cluster, so a deleted namespace or a lost cluster takes them with it.
The export is the one thing that must be kept safe.

File format (JSON, so `head` shows what it is without revealing anything):

    {"format": "ml-defender-keyring-export", "version": 1, "created": "...Z",
     "keys": [{"id": ..., "state": ..., "fingerprint": ...}],      # never material
     "protection": "none",             "keyring": {<keyring.json>}
   or
     "protection": "scrypt+aes-256-gcm",
     "kdf": {"salt": b64, "n": 32768, "r": 8, "p": 1}, "nonce": b64, "ciphertext": b64}

The wrapped form seals `keyring.json` with AES-256-GCM under a key derived from the passphrase
with scrypt; the associated data is the canonical JSON of the clear fields (format, version,
created, keys, kdf), so a changed key list or cost parameter fails like a wrong passphrase. After
opening, the listed ids and fingerprints must match the keyring inside.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ._errors import KeyringBackupError, KeyringError, WrongPassphraseError
from ._json_parse import parse_json
from ._keyring import Keyring, integer_or_shape, word_or_shape

__all__ = ["KeyringBackup", "read_keyring_backup", "write_keyring_backup"]

FORMAT = "ml-defender-keyring-export"
VERSION = 1
PLAIN = "none"
WRAPPED = "scrypt+aes-256-gcm"
# scrypt cost: 32 MiB and about 0.1 s per try on a laptop core; stored in the file so it can
# grow without breaking old exports.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
# An import refuses files whose scrypt would allocate more than this (128·n·r bytes; the caps
# on n and r alone allow 8 GiB, an OOM kill) or hash p times over: 8 and 4 times what exports
# cost now, room for them to grow.
_MAX_SCRYPT_N = 2**20
_MAX_SCRYPT_MEMORY = 256 * 2**20
_MAX_SCRYPT_P = 4
_SALT_BYTES, _NONCE_BYTES = 16, 12


@dataclass(frozen=True)
class KeyringBackup:
    """What an export file holds once opened."""

    keyring: Keyring
    created: datetime
    wrapped: bool


def _clear_part(created: str, keyring: Keyring, kdf: dict[str, Any] | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "created": created,
        "keys": [
            {"id": k.key_id, "state": k.state.value, "fingerprint": k.fingerprint}
            for k in keyring.keys
        ],
    }
    if kdf is not None:
        doc["kdf"] = kdf
    return doc


def _aad(doc: dict[str, Any]) -> bytes:
    clear = {k: doc[k] for k in ("format", "version", "created", "keys", "kdf") if k in doc}
    return json.dumps(clear, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _derive(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


def write_keyring_backup(
    keyring: Keyring, passphrase: str | None = None, *, now: datetime | None = None
) -> bytes:
    """The export file's content; wrapped when `passphrase` is given (it must not be empty)."""
    created = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if passphrase is None:
        doc = _clear_part(created, keyring, None)
        doc["protection"] = PLAIN
        doc["keyring"] = json.loads(keyring.to_json())
    else:
        if not passphrase:
            raise KeyringBackupError("an empty passphrase protects nothing; give one or none")
        salt = os.urandom(_SALT_BYTES)
        kdf = {
            "name": "scrypt",
            "salt": base64.b64encode(salt).decode("ascii"),
            "n": SCRYPT_N,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
        }
        doc = _clear_part(created, keyring, kdf)
        doc["protection"] = WRAPPED
        nonce = os.urandom(_NONCE_BYTES)
        key = _derive(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        sealed = AESGCM(key).encrypt(nonce, keyring.to_json(), _aad(doc))
        doc["nonce"] = base64.b64encode(nonce).decode("ascii")
        doc["ciphertext"] = base64.b64encode(sealed).decode("ascii")
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def _b64(doc: dict[str, Any], field: str, source: str | None) -> bytes:
    value = doc.get(field)
    try:
        if not isinstance(value, str):
            raise ValueError
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise KeyringBackupError(f"field {field!r} is not valid base64", source=source) from None


def _int(kdf: dict[str, Any], field: str, low: int, high: int, source: str | None) -> int:
    value = kdf.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise KeyringBackupError(f"kdf.{field} must be an integer in {low}..{high}", source=source)
    return value


def read_keyring_backup(
    content: bytes, passphrase: str | None = None, *, source: str | None = None
) -> KeyringBackup:
    """Open an export file. KeyringBackupError when it is not one or is damaged,
    WrongPassphraseError when it is wrapped and `passphrase` is absent or wrong."""
    try:
        doc = parse_json(content)
    except ValueError as exc:
        raise KeyringBackupError(f"not a keyring export: not JSON ({exc})", source=source) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise KeyringBackupError(
            f'not a keyring export (no "format": "{FORMAT}"); a keyring.json from a Secret'
            " is imported with --raw",
            source=source,
        )
    if doc.get("version") != VERSION:
        # Quoted only when it cannot be material (a hand-edited file may hold the key anywhere).
        raise KeyringBackupError(
            f"export version {integer_or_shape(doc.get('version'))} is not supported (need"
            f" {VERSION}); use a newer kubectl-defender",
            source=source,
        )
    try:
        created = datetime.fromisoformat(str(doc.get("created", "")).replace("Z", "+00:00"))
    except ValueError:
        raise KeyringBackupError('unreadable "created" time', source=source) from None
    protection = doc.get("protection")
    if protection == PLAIN:
        if passphrase is not None:
            raise KeyringBackupError(
                "this export is not passphrase-protected; import it without a passphrase",
                source=source,
            )
        inner = doc.get("keyring")
        if not isinstance(inner, dict):
            raise KeyringBackupError('"keyring" must be an object', source=source)
        keyring = _parse(json.dumps(inner).encode("utf-8"), source)
    elif protection == WRAPPED:
        kdf = doc.get("kdf")
        if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
            raise KeyringBackupError('"kdf" must describe scrypt', source=source)
        n = _int(kdf, "n", 2, _MAX_SCRYPT_N, source)
        if n & (n - 1):
            raise KeyringBackupError("kdf.n must be a power of two", source=source)
        r = _int(kdf, "r", 1, 64, source)
        p = _int(kdf, "p", 1, _MAX_SCRYPT_P, source)
        if 128 * n * r > _MAX_SCRYPT_MEMORY:
            raise KeyringBackupError(
                f"kdf.n and kdf.r ask scrypt for {128 * n * r // 2**20} MiB of memory"
                f" (128·n·r), over the {_MAX_SCRYPT_MEMORY // 2**20} MiB an import allows",
                source=source,
            )
        salt = _b64(kdf, "salt", source)
        nonce = _b64(doc, "nonce", source)
        sealed = _b64(doc, "ciphertext", source)
        if len(nonce) != _NONCE_BYTES:
            raise KeyringBackupError(f"nonce must be {_NONCE_BYTES} bytes", source=source)
        if passphrase is None:
            raise WrongPassphraseError(
                "this export is passphrase-protected; give the passphrase (--passphrase-file or"
                " --passphrase-env)",
                source=source,
            )
        key = _derive(passphrase, salt, n, r, p)
        try:
            plain = AESGCM(key).decrypt(nonce, sealed, _aad(doc))
        except InvalidTag:
            raise WrongPassphraseError(
                "the passphrase does not open this export (wrong passphrase, or the file was"
                " altered)",
                source=source,
            ) from None
        keyring = _parse(plain, source)
    else:
        raise KeyringBackupError(
            f"unknown protection {word_or_shape(protection)} (known: {PLAIN}, {WRAPPED})",
            source=source,
        )
    listed = doc.get("keys")
    expected = _clear_part(str(doc.get("created")), keyring, None)["keys"]
    if listed != expected:
        raise KeyringBackupError(
            "the key list does not match the keyring inside (the file was edited or damaged)",
            source=source,
        )
    return KeyringBackup(keyring=keyring, created=created, wrapped=protection == WRAPPED)


def _parse(content: bytes, source: str | None) -> Keyring:
    try:
        return Keyring.from_json(content, source=source)
    except KeyringError as exc:
        raise KeyringBackupError(
            f"the keyring inside is damaged: {exc.message}", source=source
        ) from None
