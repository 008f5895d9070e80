"""Keyring export files: plain and passphrase-wrapped, and every way a file can be wrong."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from defender_config import (
    Envelope,
    Keyring,
    KeyringBackupError,
    KeyringLacksKeysError,
    WrongPassphraseError,
    _keyring_backup,
    key_usage,
    keys_opened,
    read_keyring_backup,
    write_keyring_backup,
)
from defender_config.store import StoredValue


@pytest.fixture
def keyring() -> Keyring:
    first = Keyring.generate()
    return first.with_new_decrypt_only()


def _material_texts(keyring: Keyring) -> list[str]:
    return [
        t for k in keyring.keys for t in (k.material.hex(), base64.b64encode(k.material).decode())
    ]


def test_plain_round_trip(keyring: Keyring) -> None:
    content = write_keyring_backup(keyring)
    back = read_keyring_backup(content)
    assert back.keyring == keyring
    assert not back.wrapped
    doc = json.loads(content)
    assert [k["fingerprint"] for k in doc["keys"]] == [k.fingerprint for k in keyring.keys]


def test_wrapped_round_trip_hides_the_material(keyring: Keyring) -> None:
    content = write_keyring_backup(keyring, "correct horse")
    text = content.decode()
    for secret in _material_texts(keyring):
        assert secret not in text
    back = read_keyring_backup(content, "correct horse")
    assert back.keyring == keyring
    assert back.wrapped


def test_wrong_or_missing_passphrase_is_typed(keyring: Keyring) -> None:
    content = write_keyring_backup(keyring, "correct horse")
    with pytest.raises(WrongPassphraseError) as wrong:
        read_keyring_backup(content, "battery staple", source="x.json")
    assert wrong.value.reason == "WrongPassphrase"
    assert "x.json" in str(wrong.value)
    with pytest.raises(WrongPassphraseError, match="passphrase-protected"):
        read_keyring_backup(content)
    with pytest.raises(KeyringBackupError, match="not passphrase-protected"):
        read_keyring_backup(write_keyring_backup(keyring), "unneeded")
    with pytest.raises(KeyringBackupError, match="empty passphrase"):
        write_keyring_backup(keyring, "")


def _edit(content: bytes, **changes: object) -> bytes:
    doc = json.loads(content)
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda c: b"\xff\xfe not json", "not JSON"),
        (lambda c: b"[" * 100_000, "not JSON .JSON nested too deeply"),
        (lambda c: b'{"keys": []}', "not a keyring export"),
        (lambda c: _edit(c, version=9), "version 9"),
        (lambda c: _edit(c, protection="rot13"), "unknown protection"),
        (lambda c: _edit(c, created="yesterday"), "created"),
        (lambda c: _edit(c, keys=[]), "key list does not match"),
        (lambda c: _edit(c, keyring={"version": 1, "keys": []}), "damaged"),
        (lambda c: _edit(c, keyring="x"), "must be an object"),
    ],
)
def test_corrupt_plain_files_are_typed(keyring: Keyring, mangle, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(KeyringBackupError, match=match) as info:
        read_keyring_backup(mangle(write_keyring_backup(keyring)))
    assert not isinstance(info.value, WrongPassphraseError)
    for secret in _material_texts(keyring):
        assert secret not in str(info.value)


@pytest.mark.parametrize("field", ["version", "protection"])
def test_material_pasted_into_a_clear_field_is_never_echoed(keyring: Keyring, field: str) -> None:
    # A hand-edited export with the key pasted where the version or the protection belongs:
    # the error describes what the field holds (it reaches the plugin's output and logs).
    for secret in _material_texts(keyring):
        content = _edit(write_keyring_backup(keyring), **{field: secret})
        with pytest.raises(KeyringBackupError) as info:
            read_keyring_backup(content)
        shown = str(info.value) + repr(info.value)
        assert secret not in shown and secret[:16] not in shown
        assert f"a string of {len(secret)} characters" in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("version", 2, "export version 2 is"),
        ("version", "1", "export version a string of 1 characters is"),
        ("protection", "scrypt", "unknown protection 'scrypt'"),
        ("protection", ["none"], "unknown protection a JSON list"),
    ],
)
def test_a_plain_wrong_version_or_protection_is_still_shown(
    keyring: Keyring, field: str, value: object, shown: str
) -> None:
    with pytest.raises(KeyringBackupError, match=shown):
        read_keyring_backup(_edit(write_keyring_backup(keyring), **{field: value}))


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        ("nonce", "%%%", KeyringBackupError, "base64"),
        ("nonce", base64.b64encode(b"short").decode(), KeyringBackupError, "12 bytes"),
        ("kdf", {"name": "pbkdf2"}, KeyringBackupError, "scrypt"),
        (
            "kdf",
            {"name": "scrypt", "salt": "AA==", "n": 3, "r": 8, "p": 1},
            KeyringBackupError,
            "power of two",
        ),
        (
            "kdf",
            {"name": "scrypt", "salt": "AA==", "n": 2**30, "r": 8, "p": 1},
            KeyringBackupError,
            "kdf.n",
        ),
        # A listed key removed or the cost lowered: authenticated, so it fails like a wrong
        # passphrase instead of opening.
        ("keys", [], WrongPassphraseError, "does not open"),
    ],
)
def test_corrupt_wrapped_files_are_typed(
    keyring: Keyring, field: str, value: object, error: type, match: str
) -> None:
    content = _edit(write_keyring_backup(keyring, "pw"), **{field: value})
    with pytest.raises(error, match=match):
        read_keyring_backup(content, "pw")


@pytest.mark.parametrize(
    ("kdf", "match"),
    [
        ({"n": 2**20, "r": 64, "p": 1}, "8192 MiB of memory"),  # within the caps on n and r
        ({"n": 2**18, "r": 16, "p": 1}, "512 MiB of memory"),
        ({"n": 2**15, "r": 8, "p": 5}, r"kdf\.p must be an integer in 1\.\.4"),
    ],
)
def test_scrypt_costs_over_the_caps_are_refused_before_scrypt_runs(
    keyring: Keyring, kdf: dict[str, int], match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = json.loads(write_keyring_backup(keyring, "pw"))
    doc["kdf"].update(kdf)

    def derive(*args: object) -> bytes:
        raise AssertionError("scrypt ran")

    monkeypatch.setattr(_keyring_backup, "_derive", derive)
    with pytest.raises(KeyringBackupError, match=match) as info:
        read_keyring_backup(json.dumps(doc).encode(), "pw")
    assert not isinstance(info.value, WrongPassphraseError)


def test_our_exports_cost_stays_under_the_caps(keyring: Keyring) -> None:
    kdf = json.loads(write_keyring_backup(keyring, "pw"))["kdf"]
    assert 128 * kdf["n"] * kdf["r"] * 8 <= _keyring_backup._MAX_SCRYPT_MEMORY
    assert kdf["p"] * 4 <= _keyring_backup._MAX_SCRYPT_P
    assert read_keyring_backup(write_keyring_backup(keyring, "pw"), "pw").keyring == keyring


def _fingerprint_changed(doc: dict[str, Any]) -> None:
    doc["keys"][0]["fingerprint"] = "0" * 16


def _state_swapped(doc: dict[str, Any]) -> None:
    doc["keys"][0]["state"], doc["keys"][1]["state"] = (
        doc["keys"][1]["state"],
        doc["keys"][0]["state"],
    )


def _created_moved(doc: dict[str, Any]) -> None:
    doc["created"] = "2020-01-01T00:00:00Z"


def _cost_lowered(doc: dict[str, Any]) -> None:
    doc["kdf"]["n"] = 2**14


def _kdf_field_added(doc: dict[str, Any]) -> None:
    doc["kdf"]["note"] = "harmless"


def _key_dropped(doc: dict[str, Any]) -> None:
    doc["keys"] = doc["keys"][:1]


@pytest.mark.parametrize(
    "edit",
    [
        _fingerprint_changed,
        _state_swapped,
        _created_moved,
        _cost_lowered,
        _kdf_field_added,
        _key_dropped,
    ],
)
def test_any_edit_of_a_clear_field_fails_like_a_wrong_passphrase(
    keyring: Keyring, edit: Callable[[dict[str, Any]], None]
) -> None:
    """docs/security.md: "the clear fields are authenticated, so an edited key list fails like a
    wrong passphrase". The right passphrase must not open a file whose clear part someone
    changed (the list a person checks before importing, or the cost that slows guessing)."""
    doc = json.loads(write_keyring_backup(keyring, "correct horse battery"))
    edit(doc)
    with pytest.raises(WrongPassphraseError, match="does not open"):
        read_keyring_backup(json.dumps(doc).encode(), "correct horse battery")


def test_each_wrapped_export_has_its_own_salt_and_nonce_and_the_documented_cost(
    keyring: Keyring,
) -> None:
    """docs/security.md: scrypt N=2^15, r=8, p=1, "a random salt per file"; AES-256-GCM under
    the derived key. A fixed salt would let one precomputed guess list serve every export."""
    docs = [json.loads(write_keyring_backup(keyring, "correct horse battery")) for _ in range(3)]
    for doc in docs:
        assert doc["protection"] == "scrypt+aes-256-gcm"
        kdf = doc["kdf"]
        assert (kdf["name"], kdf["n"], kdf["r"], kdf["p"]) == ("scrypt", 2**15, 8, 1)
        assert len(base64.b64decode(kdf["salt"])) == 16
        assert len(base64.b64decode(doc["nonce"])) == 12
    assert len({d["kdf"]["salt"] for d in docs}) == 3
    assert len({d["nonce"] for d in docs}) == 3
    assert len({d["ciphertext"] for d in docs}) == 3


def test_flipped_ciphertext_is_refused(keyring: Keyring) -> None:
    doc = json.loads(write_keyring_backup(keyring, "pw"))
    raw = bytearray(base64.b64decode(doc["ciphertext"]))
    raw[5] ^= 1
    doc["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(WrongPassphraseError):
        read_keyring_backup(json.dumps(doc).encode(), "pw")


def _sealed(keyring: Keyring, path: str) -> StoredValue:
    blob = Envelope(keyring).seal(b'{"a": 1}', path)
    return StoredValue(path, blob, 1, 1, 1)


def test_key_usage_and_proof_by_opening(keyring: Keyring) -> None:
    other = Keyring.generate()
    values = [
        _sealed(keyring, "/p/components/a/master_config"),
        _sealed(keyring, "/p/components/b/master_config"),
        StoredValue("/p/components/a/metadata", b'{"plain": true}', 1, 1, 1),
        StoredValue("/p/x", b"\x89DFC\x09broken", 1, 1, 1),
    ]
    usage = key_usage(values)
    assert usage.key_ids == {keyring.primary.key_id}
    assert usage.sealed == 2
    assert keys_opened(keyring, usage) == {keyring.primary.key_id}
    assert keys_opened(other, usage) == frozenset()
    # Same key id, other material: not a proof.
    forged = Keyring.from_json(
        keyring.to_json().replace(
            base64.b64encode(keyring.primary.material),
            base64.b64encode(other.primary.material),
        )
    )
    assert keys_opened(forged, usage) == frozenset()
    # A retired key still proves the material is there.
    promoted = keyring.promote(keyring.keys[-1].key_id)
    retired = promoted.retire(keyring.primary.key_id)
    assert keys_opened(retired, usage) == {keyring.primary.key_id}


def test_lacks_keys_error_names_ids_and_fingerprints_only() -> None:
    exc = KeyringLacksKeysError([("k1", "abcd"), ("k2", None)], source="f.json")
    assert exc.reason == "KeyringLacksKeys"
    assert "k1 (fingerprint abcd)" in str(exc) and "k2 (fingerprint not recorded)" in str(exc)
    assert exc.missing == {"k1": "abcd", "k2": None}
