"""Which keys the stored values need, and which of them a keyring can prove it holds.

Every sealed value names its key id in the clear envelope header, so one scan of the prefix
lists the key ids a keyring must keep. Holding an id proves nothing (ids are not secret); a
keyring is proven by opening a value sealed under it, which needs the material. The operator
(`_keyguard`) and `kubectl defender keyring import` both judge a keyring this way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ._envelope import Envelope, inspect, is_envelope
from ._errors import EnvelopeError
from ._json_parse import parse_json
from ._keyring import Keyring, KeyState
from ._layout import Layout
from ._settings import EnvelopeOptions
from ._store_types import StoredValue

if TYPE_CHECKING:
    from ._store import EtcdStore

log = logging.getLogger("defender_config.keys")

__all__ = ["KeyUsage", "key_usage", "keys_opened", "read_key_record", "write_key_record"]

# Read as "something is recorded" when the record cannot be parsed: an id no keyring holds.
UNREADABLE_RECORD = {"unreadable-record": "unknown"}


@dataclass(frozen=True)
class KeyUsage:
    """Key ids the stored values are sealed with: one sample value per id (path, ciphertext)
    and how many sealed values were seen."""

    samples: Mapping[str, tuple[str, bytes]] = field(default_factory=dict)
    sealed: int = 0

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self.samples)


def key_usage(values: Iterable[StoredValue]) -> KeyUsage:
    """Read the envelope header of each value (nothing is decrypted)."""
    samples: dict[str, tuple[str, bytes]] = {}
    sealed = 0
    for sv in values:
        if not is_envelope(sv.value):
            continue
        try:
            key_id = inspect(sv.value).key_id
        except EnvelopeError:
            continue  # a broken header names no key anyone could hold
        if key_id is None:
            continue
        sealed += 1
        samples.setdefault(key_id, (sv.key, sv.value))
    return KeyUsage(samples=samples, sealed=sealed)


def keys_opened(
    keyring: Keyring, usage: KeyUsage, options: EnvelopeOptions | None = None
) -> frozenset[str]:
    """The key ids of `usage` whose sample value `keyring` opens. Retired keys count: the
    question is whether the material is there, not whether the key may be used."""
    readable = Keyring(
        k.with_state(KeyState.DECRYPT_ONLY) if k.state is KeyState.RETIRED else k
        for k in keyring.keys
    )
    envelope = Envelope(readable, options)
    opened = set()
    for key_id, (path, blob) in usage.samples.items():
        if key_id not in readable:
            continue
        try:
            envelope.open(blob, path)
        except EnvelopeError:
            continue  # same id, other material
        opened.add(key_id)
    return frozenset(opened)


def read_key_record(store: EtcdStore, layout: Layout) -> dict[str, str]:
    """Key id → fingerprint as `<prefix>/keyring/record` holds it; empty when never written.

    The record is advisory (anyone with etcd write access can change it): it only tells that
    keys existed when no sealed value is left, and names fingerprints in messages."""
    return _read_record(store, layout)[0]


def _read_record(store: EtcdStore, layout: Layout) -> tuple[dict[str, str], str | None]:
    """(`read_key_record`'s answer, the primary key id the record names), from one read."""
    stored = store.get(layout.keyring_record)
    if stored is None:
        return {}, None
    try:
        doc = parse_json(stored.value)
        keys = {str(kid): str(fp) for kid, fp in doc["keys"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("keyring record %s is unreadable", layout.keyring_record)
        return dict(UNREADABLE_RECORD), None
    primary = doc.get("primary")
    return keys, primary if isinstance(primary, str) else None


def write_key_record(store: EtcdStore, layout: Layout, keyring: Keyring) -> bool:
    """Record the keyring's key ids and fingerprints (never material); False when the record
    already says so."""
    keys = keyring.fingerprints()
    primary = keyring.primary.key_id
    # Its primary too: a promotion keeps the ids and fingerprints, and a record left naming the
    # former primary would say so to whoever reads it with etcdctl.
    if _read_record(store, layout) == (keys, primary):
        return False
    doc = {
        "version": 1,
        "keys": keys,
        "primary": primary,
        "updated": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    store.put(layout.keyring_record, json.dumps(doc, sort_keys=True).encode("utf-8"))
    return True
