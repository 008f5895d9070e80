"""The control-record MAC (sign_record / verify_record): what it binds (every field, the etcd
path, the key id) and every way a record can fail it, without a cluster; and what readers do
with a record that is not one (a rollout record, metadata, a status)."""

from __future__ import annotations

import base64
import copy
import json
import logging
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from defender_config import (
    ActiveConfig,
    Alert,
    CallableSink,
    ComponentOverview,
    ConfigStore,
    DefenderClient,
    EnvelopeError,
    EnvelopeOptions,
    EtcdSettings,
    Keyring,
    LibrarySettings,
    RecordAuthError,
    Registry,
    Rollouts,
    StoreError,
    sign_record,
    verify_record,
)
from defender_config._codecs import AES256GCM
from defender_config._component_view import view_from
from defender_config._records import _mac_key
from defender_config.store import StoredValue

PATH = "/ml-defender/components/firewall/metadata"
RECORD: dict[str, Any] = {
    "version": 3,
    "digest": "ab" * 32,
    "type": "firewall",
    "json_schema": None,
    "storage": {"compress": True, "encrypt": True, "level": 3, "threshold_bytes": 256},
    "last_modified": "2026-12-01T20:00:00+00:00",
}


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.generate()


def roundtrip(data: Any) -> Any:
    """What a reader gets back from etcd: JSON text parsed again."""
    return json.loads(json.dumps(data))


def test_signed_record_verifies_and_reads_back(keyring: Keyring) -> None:
    signed = roundtrip(sign_record(keyring, PATH, RECORD))
    assert signed["auth"]["kid"] == keyring.primary.key_id and signed["auth"]["v"] == 1
    assert verify_record(keyring, PATH, signed) == RECORD
    # Field order in the stored JSON does not matter (canonical form).
    reordered = dict(reversed(list(signed.items())))
    assert verify_record(keyring, PATH, reordered) == RECORD


def test_wrong_path_fails(keyring: Keyring) -> None:
    signed = roundtrip(sign_record(keyring, PATH, RECORD))
    for other in (
        "/ml-defender/components/sniffer/metadata",
        "/ml-defender/control/firewall/freeze",
        PATH + "/",
    ):
        with pytest.raises(RecordAuthError, match="does not match the record and its etcd path"):
            verify_record(keyring, other, signed)


def test_wrong_key_id_fails(keyring: Keyring) -> None:
    staged = keyring.with_new_decrypt_only()
    other_id = next(k for k in staged.key_ids if k != keyring.primary.key_id)
    signed = roundtrip(sign_record(staged, PATH, RECORD))
    # The record names key A; claiming key B (held too) does not verify.
    relabeled = copy.deepcopy(signed)
    relabeled["auth"]["kid"] = other_id
    with pytest.raises(RecordAuthError, match="does not match") as info:
        verify_record(staged, PATH, relabeled)
    assert info.value.key_id == other_id
    # A key id the reader does not hold.
    unknown = copy.deepcopy(signed)
    unknown["auth"]["kid"] = "k-nobody"
    with pytest.raises(RecordAuthError, match="does not hold"):
        verify_record(keyring, PATH, unknown)
    # Another deployment's keyring, same record: its key id is unknown here.
    with pytest.raises(RecordAuthError, match="does not hold"):
        verify_record(keyring, PATH, roundtrip(sign_record(Keyring.generate(), PATH, RECORD)))


def test_retired_key_fails_and_rotation_keeps_old_records_valid(keyring: Keyring) -> None:
    old = roundtrip(sign_record(keyring, PATH, RECORD))
    staged = keyring.with_new_decrypt_only()
    new_id = next(k for k in staged.key_ids if k != keyring.primary.key_id)
    rotated = staged.promote(new_id)
    assert verify_record(rotated, PATH, old) == RECORD  # decrypt-only still verifies
    retired = rotated.retire(keyring.primary.key_id)
    with pytest.raises(RecordAuthError, match="has retired"):
        verify_record(retired, PATH, old)
    assert verify_record(retired, PATH, roundtrip(sign_record(rotated, PATH, RECORD))) == RECORD


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (lambda d: d.update(version=4), "does not match"),
        (lambda d: d["storage"].update(encrypt=False), "does not match"),
        (lambda d: d.update(digest="cd" * 32), "does not match"),
        (lambda d: d.update(type="custom"), "does not match"),
        (lambda d: d.update(extra="field"), "does not match"),
        (lambda d: d["auth"].update(mac=_flip_hex(d["auth"]["mac"])), "does not match"),
        (lambda d: d["auth"].update(mac=d["auth"]["mac"].upper()), "64 hex digits"),
        (lambda d: d["auth"].update(mac=d["auth"]["mac"] + "\n"), "64 hex digits"),
    ],
    ids=["version", "storage", "digest", "type", "added-field", "mac-byte", "mac-case", "mac-nl"],
)
def test_tampered_byte_fails(keyring: Keyring, edit: Any, phrase: str) -> None:
    signed = roundtrip(sign_record(keyring, PATH, RECORD))
    edit(signed)
    with pytest.raises(RecordAuthError, match=phrase):
        verify_record(keyring, PATH, signed)


def _flip_hex(mac: str) -> str:
    return ("0" if mac[0] != "0" else "1") + mac[1:]


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (lambda d: d.pop("auth"), "carries no MAC"),
        (lambda d: d["auth"].pop("mac"), "'auth.mac' is missing"),
        (lambda d: d["auth"].pop("kid"), "'auth.kid' is missing"),
        (lambda d: d["auth"].pop("v"), "'auth.v' is None"),
        (lambda d: d.update(auth="yes"), "not an object"),
        (lambda d: d.pop("version"), "does not match"),
        (lambda d: d.pop("storage"), "does not match"),
    ],
    ids=["auth", "mac", "kid", "v", "auth-not-object", "version", "storage"],
)
def test_missing_field_fails(keyring: Keyring, edit: Any, phrase: str) -> None:
    signed = roundtrip(sign_record(keyring, PATH, RECORD))
    edit(signed)
    with pytest.raises(RecordAuthError, match=phrase):
        verify_record(keyring, PATH, signed)


@pytest.mark.parametrize("data", [[1, 2], "text", None, 7])
def test_not_an_object_fails(keyring: Keyring, data: Any) -> None:
    with pytest.raises(RecordAuthError, match="not a JSON object"):
        verify_record(keyring, PATH, data)


def test_errors_are_typed_and_carry_no_key_material(keyring: Keyring) -> None:
    signed = roundtrip(sign_record(keyring, PATH, RECORD))
    signed["version"] = 99
    with pytest.raises(RecordAuthError) as info:
        verify_record(keyring, PATH, signed)
    err = info.value
    assert isinstance(err, EnvelopeError) and err.reason == "RecordUnauthenticated"
    assert err.path == PATH
    material = keyring.primary.material
    text = str(err) + repr(err)
    for needle in (material.hex(), base64.b64encode(material).decode(), _mac_key(material).hex()):
        assert needle not in text


def test_mac_key_has_its_own_label(keyring: Keyring) -> None:
    material = keyring.primary.material
    mac_key = _mac_key(material)
    assert mac_key != material
    assert mac_key != AES256GCM.derive(material)
    # The label is the record MAC's own HKDF info: derived the same way, it gives the same key.
    expected = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"ml-defender/control-record/v1/hmac-sha256",
    ).derive(material)
    assert mac_key == expected


def test_client_signs_only_with_a_keyring(keyring: Keyring) -> None:
    etcd = EtcdSettings(endpoints=["127.0.0.1:1"])  # never contacted
    keyed = DefenderClient(LibrarySettings(etcd=etcd), keyring, alert_sinks=[])
    plain = DefenderClient(
        LibrarySettings(etcd=etcd, envelope=EnvelopeOptions(encrypt=False)), None, alert_sinks=[]
    )
    try:
        blob = keyed.encode_record(PATH, RECORD)
        assert json.loads(blob)["auth"]["kid"] == keyring.primary.key_id
        assert keyed.decode_record(PATH, blob) == RECORD
        # Without a keyring: written unsigned, read unverified (it cannot tell).
        unsigned = plain.encode_record(PATH, RECORD)
        assert "auth" not in json.loads(unsigned)
        assert plain.decode_record(PATH, blob) == RECORD
        with pytest.raises(RecordAuthError, match="carries no MAC"):
            keyed.decode_record(PATH, unsigned)
        with pytest.raises(RecordAuthError, match="not JSON"):
            keyed.decode_record(PATH, b"yes")
    finally:
        keyed.close()
        plain.close()


class _Reads:
    """The store reads of the readers below, on a dict."""

    def __init__(self) -> None:
        self.values: dict[str, StoredValue] = {}
        self.cluster_changes = 0  # one cluster: never restored

    def put(self, path: str, value: bytes) -> None:
        self.values[path] = StoredValue(path, value, 7, 7, 1)

    def get(self, path: str, revision: int | None = None) -> StoredValue | None:
        return self.values.get(path)

    def list_prefix(self, prefix: str, *, stale_ok: bool = True) -> list[StoredValue]:
        return [v for k, v in sorted(self.values.items()) if k.startswith(prefix)]


def test_a_rollout_record_that_is_an_envelope_is_ignored_like_an_unauthenticated_one(
    keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Anyone with etcd write access can put the envelope magic where the plaintext record
    # belongs: the instance runs ACTIVE and the operator's view shows no rollout, as for junk.
    alerts: list[Alert] = []
    store = _Reads()
    client = DefenderClient(
        LibrarySettings(etcd=EtcdSettings(endpoints=["127.0.0.1:1"])),
        keyring,
        store=store,  # type: ignore[arg-type]
        alert_sinks=[CallableSink(alerts.append)],
    )
    configs = ConfigStore(client)
    active = ActiveConfig("fw", {"v": 1}, 1, "ab" * 32, mod_revision=5)
    monkeypatch.setattr(configs, "get_active", lambda component: active)
    path = client.layout.rollout("fw")
    store.put(path, b"\x89DFC")  # the envelope magic
    assert Rollouts(configs).effective("fw", "fw-0") is active
    seen = view_from(
        configs,
        "fw",
        ComponentOverview(None, None, None),
        [(), (store.values[path],), ()],
        revision=7,
        since=datetime(2000, 1, 1, tzinfo=UTC),
    )
    assert seen.rollout is None
    # Junk where a record belongs, whatever its first bytes: an unauthenticated record.
    assert [(a.kind, a.path) for a in alerts] == [("RecordUnauthenticated", path)] * 2


def _keyless(store: _Reads) -> DefenderClient:
    settings = LibrarySettings(
        etcd=EtcdSettings(endpoints=["127.0.0.1:1"]), envelope=EnvelopeOptions(encrypt=False)
    )
    return DefenderClient(settings, None, store=store, alert_sinks=[])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value", [b"[1,2]", b'"x"', b'{"last_modified": "not a time"}', b"{not json", b"[" * 100_000]
)
def test_a_listing_without_a_keyring_skips_metadata_that_is_not_a_record(
    value: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # Without a keyring any JSON is taken unverified: what is not a metadata record is skipped
    # (logged) as one failing its MAC is, and the component is still listed.
    store = _Reads()
    client = _keyless(store)
    good = {**RECORD, "modified_by": "ops"}
    store.put(client.layout.metadata("fw"), value)
    store.put(client.layout.metadata("rag"), json.dumps(good).encode())
    with caplog.at_level(logging.WARNING, logger="defender_config"):
        fw, rag = Registry(client).list_components()
    assert (fw.name, fw.type, fw.active_version, fw.last_modified) == ("fw", None, None, None)
    assert (rag.type, rag.active_version, rag.modified_by) == ("firewall", 3, "ops")
    assert rag.last_modified == datetime(2026, 12, 1, 20, 0, tzinfo=UTC)
    assert f"skipping unreadable {client.layout.metadata('fw')}" in caplog.text


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        (b"[" * 100_000, "not JSON: JSON nested too deeply"),
        (b'{"status": "bogus", "time": "2026-12-01T20:00:00Z"}', "1 problems: status: Input"),
        (b'{"status": "RUNNING", "time": "not a time"}', "1 problems: time: Input"),
        (b"[]", "1 problems: : Input should be a valid dictionary"),
    ],
)
def test_a_status_that_is_not_a_record_is_a_store_error(value: bytes, problem: str) -> None:
    store = _Reads()
    client = _keyless(store)
    path = client.layout.status("fw")
    store.put(path, value)
    with pytest.raises(StoreError, match="is not a valid record") as info:
        Registry(client).get_status("fw")
    assert type(info.value) is StoreError and info.value.path == path
    assert problem in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
