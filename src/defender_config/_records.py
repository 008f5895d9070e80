"""Authenticated control records: the plaintext JSON records that steer readers and the operator
(component metadata, the freeze marker, and any later record such as a heartbeat cadence) carry
a MAC made with a key derived from the keyring, so write access to etcd alone cannot forge them.

```
{"version": 3, "digest": "...", ..., "auth": {"v": 1, "kid": "<key id>", "mac": "<64 hex>"}}
```

mac = HMAC-SHA256(K, "ml-defender/control-record/v1" 0x00 <len(path)> <path> <canonical JSON>)
K   = HKDF-SHA256(key material, info="ml-defender/control-record/v1/hmac-sha256")

The record stays readable with etcdctl (the MAC sits beside the fields, nothing is encrypted);
the canonical JSON is the record without `auth`, keys sorted, no whitespace. The etcd path is
part of the MAC, so a record copied to another key (another component's metadata, a freeze
marker) fails. The key id names the keyring key used; any key the reader holds and has not
retired verifies (rotation re-signs with the primary, see `ConfigStore.rewrap_values`).

Sealing the records like configs was the other option; a MAC keeps them readable for people
(`etcdctl get`, `kubectl defender status` without a key), and their content is not secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
import threading
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._errors import RecordAuthError, UnknownKeyError
from ._keyring import Keyring

__all__ = [
    "AUTH_FIELD",
    "RECORD_AUTH_VERSION",
    "is_signed",
    "record_key_id",
    "sign_record",
    "verify_record",
    "without_auth",
]

AUTH_FIELD = "auth"
RECORD_AUTH_VERSION = 1
_LABEL = b"ml-defender/control-record/v1"
_HKDF_INFO = _LABEL + b"/hmac-sha256"
_MAC_RE = re.compile(r"[0-9a-f]{64}")  # fullmatch: `$` would let a final newline through

_keys: dict[bytes, bytes] = {}
_keys_lock = threading.Lock()


def _mac_key(material: bytes) -> bytes:
    """The record MAC key of one keyring key (HKDF with its own label: never the bytes the
    envelope ciphers derive)."""
    key = _keys.get(material)
    if key is None:
        with _keys_lock:
            if len(_keys) >= 64:
                _keys.clear()
            key = _keys[material] = HKDF(
                algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO
            ).derive(material)
    return key


def _canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _mac(material: bytes, path: str, record: Mapping[str, Any]) -> str:
    path_b = path.encode("utf-8")
    msg = b"".join((_LABEL, b"\x00", struct.pack(">I", len(path_b)), path_b, _canonical(record)))
    return hmac.new(_mac_key(material), msg, hashlib.sha256).hexdigest()


def sign_record(keyring: Keyring, path: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """`record` (JSON-ready, without an `auth` field) plus its `auth` block for etcd key `path`,
    made with the keyring's primary key. Any `auth` already present is replaced."""
    body = {k: v for k, v in record.items() if k != AUTH_FIELD}
    key = keyring.primary
    return {
        **body,
        AUTH_FIELD: {
            "v": RECORD_AUTH_VERSION,
            "kid": key.key_id,
            "mac": _mac(key.material, path, body),
        },
    }


def without_auth(data: Any) -> Any:
    """`data` without its `auth` block (anything else as it is): what a reader that does not
    verify, or not yet, reads of a record."""
    if is_signed(data):
        return {k: v for k, v in data.items() if k != AUTH_FIELD}
    return data


def is_signed(data: Any) -> bool:
    """True when `data` carries an `auth` block (valid or not)."""
    return isinstance(data, Mapping) and AUTH_FIELD in data


def record_key_id(data: Any) -> str | None:
    """The key id an `auth` block names, or None."""
    if not is_signed(data):
        return None
    auth = data[AUTH_FIELD]
    kid = auth.get("kid") if isinstance(auth, Mapping) else None
    return kid if isinstance(kid, str) else None


def verify_record(keyring: Keyring, path: str, data: Any) -> dict[str, Any]:
    """The record read from `path` without its `auth` block, if the MAC verifies with a key of
    `keyring` that is not retired; RecordAuthError (naming what is wrong, never key bytes)
    otherwise."""
    if not isinstance(data, Mapping):
        raise RecordAuthError(path, f"it is not a JSON object but {type(data).__name__}")
    auth = data.get(AUTH_FIELD)
    if auth is None:
        raise RecordAuthError(path, "it carries no MAC (no 'auth' field)")
    if not isinstance(auth, Mapping):
        raise RecordAuthError(path, "its 'auth' field is not an object")
    kid, mac, version = auth.get("kid"), auth.get("mac"), auth.get("v")
    if version != RECORD_AUTH_VERSION:
        raise RecordAuthError(path, f"'auth.v' is {version!r}, this library checks version 1")
    if not isinstance(kid, str) or not kid:
        raise RecordAuthError(path, "'auth.kid' is missing")
    if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac):
        raise RecordAuthError(path, "'auth.mac' is missing or not 64 hex digits", key_id=kid)
    try:
        key = keyring.decryption_key(kid, path)
    except UnknownKeyError as exc:
        held = ", ".join(exc.known_key_ids) or "none"
        state = "has retired" if exc.retired else "does not hold"
        raise RecordAuthError(
            path, f"it names key {kid!r}, which this reader {state} (usable: {held})", key_id=kid
        ) from None
    body = {k: v for k, v in data.items() if k != AUTH_FIELD}
    try:
        expected = _mac(key.material, path, body)
    except ValueError:  # NaN/Infinity cannot be in a record this library wrote
        raise RecordAuthError(path, "it holds values JSON cannot represent", key_id=kid) from None
    if not hmac.compare_digest(expected, mac):
        raise RecordAuthError(
            path,
            "the MAC does not match the record and its etcd path (edited, copied from another "
            "key, or made with other material under the same key id)",
            key_id=kid,
        )
    return body
