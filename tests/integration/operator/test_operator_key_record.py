"""What the operator learns from the real etcd before it trusts a keyring: the key ids stored
values are sealed with (proved by opening one each) and the key record."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest

from defender_config import Keyring, LibrarySettings
from defender_config.store import EtcdStore
from defender_devcluster import EtcdCluster, etcd_client_settings
from defender_operator._keys import MutableKeyringSource
from defender_operator._library_backend import LibraryBackend

pytestmark = pytest.mark.etcd

FIREWALL = {"node_id": "fw-01", "version": "1.0.0", "default_policy": "deny", "rules": []}


@pytest.fixture
def backend(defender_etcd: EtcdCluster, etcd_prefix: str) -> Iterator[LibraryBackend]:
    settings = LibrarySettings(
        etcd=etcd_client_settings(defender_etcd.endpoints), prefix=etcd_prefix.rstrip("/")
    )
    b = LibraryBackend(settings, MutableKeyringSource(Keyring.generate()), "test")
    try:
        yield b
    finally:
        b.close()


def test_usage_proof_and_record(backend: LibraryBackend) -> None:
    assert backend.key_usage().key_ids == frozenset()
    assert backend.keyring_record() == {}
    keyring = backend.client.envelope.keyring()
    assert keyring is not None
    backend.seed("firewall", "firewall", FIREWALL, json_schema=None, modified_by="test")
    backend.alert("Test", "firewall", "plaintext records are not sealed values")
    usage = backend.key_usage()
    assert usage.key_ids == {keyring.primary.key_id}
    assert usage.sealed >= 2  # MASTER, ACTIVE, history
    assert backend.opens(keyring, usage) == {keyring.primary.key_id}
    assert backend.opens(Keyring.generate(), usage) == frozenset()

    backend.record_keyring(keyring)
    assert backend.keyring_record() == keyring.fingerprints()
    store: EtcdStore = backend.client.store
    first = store.get(backend.layout.keyring_record)
    backend.record_keyring(keyring)  # unchanged: not rewritten
    again = store.get(backend.layout.keyring_record)
    assert first is not None and again is not None
    assert again.mod_revision == first.mod_revision
    # No key material in the record.
    assert keyring.primary.material.hex().encode() not in again.value
    # An unreadable record still says "keys existed": never read as an empty store.
    store.put(backend.layout.keyring_record, b"{not json")
    assert backend.keyring_record() != {}


def test_the_record_follows_a_promotion_and_never_holds_material(backend: LibraryBackend) -> None:
    """A promotion keeps the key ids and fingerprints: the record must still name the new
    primary (etcd-layout.md), and hold ids and fingerprints only (docs/security.md)."""
    keyring = backend.client.envelope.keyring()
    assert keyring is not None
    staged = keyring.with_new_decrypt_only()
    backend.record_keyring(staged)
    promoted = staged.promote(staged.keys[-1].key_id)
    backend.record_keyring(promoted)
    stored = backend.client.store.get(backend.layout.keyring_record)
    assert stored is not None
    doc = json.loads(stored.value)
    assert doc["primary"] == promoted.primary.key_id != keyring.primary.key_id
    assert doc["keys"] == promoted.fingerprints()
    assert set(doc) == {"version", "keys", "primary", "updated"}
    for key in promoted.keys:
        for form in (key.material, key.material.hex().encode(), base64.b64encode(key.material)):
            assert form not in stored.value
