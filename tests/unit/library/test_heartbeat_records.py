"""Instance (heartbeat) records are signed over their etcd key and lease: a reader with the
keyring tells a key holder's record from one written with etcd write access alone, or put
back from another lease. Attacks are played on the bytes a heartbeater really writes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from defender_config import (
    DefenderClient,
    EnvelopeOptions,
    ErrorInfo,
    EtcdSettings,
    Heartbeat,
    Heartbeater,
    Keyring,
    KeyringError,
    LibrarySettings,
    Registry,
    SettingsError,
)
from defender_config._cadence import decode_cadence
from defender_config._store_types import Lease, StoredValue

ETCD = EtcdSettings(endpoints=["127.0.0.1:1"])  # never contacted
LEASE = Lease(id=0x5EED, ttl=3)


@pytest.fixture
def keyed(keyring: Keyring) -> Iterator[DefenderClient]:
    with DefenderClient(LibrarySettings(etcd=ETCD), keyring, alert_sinks=[]) as client:
        yield client


@pytest.fixture
def plain() -> Iterator[DefenderClient]:
    settings = LibrarySettings(etcd=ETCD, envelope=EnvelopeOptions(encrypt=False))
    with DefenderClient(settings, None, alert_sinks=[]) as client:
        yield client


def written(client: DefenderClient, lease: Lease = LEASE, **fields: Any) -> tuple[str, bytes]:
    """(key, bytes) a heartbeater of `client` puts for instance sniffer-0."""
    beat = Heartbeater(client, "sniffer", "sniffer-0", follow_cadence=False, **fields)
    puts: list[tuple[str, bytes]] = []
    client.store.put = lambda key, value, **_: puts.append((key, value)) or 1  # type: ignore[method-assign]
    beat._write(beat.record, lease)
    assert len(puts) == 1
    return puts[0]


def read(client: DefenderClient, key: str, blob: bytes, lease_id: int) -> Heartbeat:
    hb = Registry(client)._heartbeat(key, blob, lease_id)
    assert hb is not None
    return hb


def test_a_heartbeaters_record_is_signed_for_its_key_and_lease(keyed: DefenderClient) -> None:
    key, blob = written(keyed, pod="sniffer-0")
    data = json.loads(blob)
    assert data["lease"] == "5eed" and data["auth"]["v"] == 1
    hb = read(keyed, key, blob, LEASE.id)
    assert hb.verified and hb.unverified is None
    assert hb.pod == "sniffer-0" and hb.lease_id == LEASE.id


def test_each_write_carries_the_writers_count(keyed: DefenderClient) -> None:
    beat = Heartbeater(keyed, "sniffer", "sniffer-0", follow_cadence=False, pod="sniffer-0")
    puts: list[bytes] = []
    keyed.store.put = lambda key, value, **_: puts.append(value) or 1  # type: ignore[method-assign]
    beat._write(beat.record, LEASE)
    beat._write(beat.record, Lease(id=LEASE.id + 1, ttl=3))
    assert [json.loads(p)["seq"] for p in puts] == [1, 2]
    key = keyed.layout.instance("sniffer", "sniffer-0")
    assert read(keyed, key, puts[1], LEASE.id + 1).seq == 2


def test_a_record_without_a_mac_is_read_but_not_verified(
    keyed: DefenderClient, plain: DefenderClient
) -> None:
    # An agent without the keyring, or anyone with etcd write access: readable, not trusted.
    key, blob = written(plain, pod="sniffer-0")
    assert "auth" not in json.loads(blob)
    hb = read(keyed, key, blob, LEASE.id)
    assert not hb.verified
    assert hb.unverified is not None and "no MAC" in hb.unverified
    assert hb.pod == "sniffer-0"


def test_an_edited_record_does_not_verify(keyed: DefenderClient) -> None:
    key, blob = written(keyed, pod="sniffer-0")
    data = json.loads(blob)
    data["last_error"] = {"reason": "ConfigRejected", "detail": "forged"}
    hb = read(keyed, key, json.dumps(data).encode(), LEASE.id)
    assert not hb.verified and "does not match" in (hb.unverified or "")


def test_a_record_moved_to_another_instance_key_does_not_verify(keyed: DefenderClient) -> None:
    key, blob = written(keyed, pod="sniffer-0")
    other = key.replace("sniffer-0", "sniffer-1")
    assert other != key
    assert not read(keyed, other, blob, LEASE.id).verified


def test_a_record_put_back_under_another_lease_does_not_verify(keyed: DefenderClient) -> None:
    # An authentic record of an earlier lease (or another instance's) put on a lease the
    # attacker keeps alive.
    key, blob = written(keyed, pod="sniffer-0")
    hb = read(keyed, key, blob, LEASE.id + 1)
    assert not hb.verified
    assert hb.unverified is not None and "lease '5eed'" in hb.unverified


def test_a_record_signed_with_another_deployments_key_does_not_verify(
    keyed: DefenderClient,
) -> None:
    with DefenderClient(LibrarySettings(etcd=ETCD), Keyring.generate(), alert_sinks=[]) as other:
        key, blob = written(other, pod="sniffer-0")
    hb = read(keyed, key, blob, LEASE.id)
    assert not hb.verified and "does not hold" in (hb.unverified or "")


def test_a_record_signed_with_the_old_key_verifies_until_it_is_retired(keyring: Keyring) -> None:
    with DefenderClient(LibrarySettings(etcd=ETCD), keyring, alert_sinks=[]) as old_writer:
        key, blob = written(old_writer, pod="sniffer-0")
    staged = keyring.with_new_decrypt_only()
    new_id = next(k for k in staged.key_ids if k != keyring.primary.key_id)
    promoted = staged.promote(new_id)
    with DefenderClient(LibrarySettings(etcd=ETCD), promoted, alert_sinks=[]) as reader:
        assert read(reader, key, blob, LEASE.id).verified
    retired = promoted.retire(keyring.primary.key_id)
    with DefenderClient(LibrarySettings(etcd=ETCD), retired, alert_sinks=[]) as reader:
        hb = read(reader, key, blob, LEASE.id)
        assert not hb.verified and "retired" in (hb.unverified or "")


def test_a_reader_without_a_keyring_verifies_nothing_and_says_no_reason(
    keyed: DefenderClient, plain: DefenderClient
) -> None:
    key, blob = written(keyed, pod="sniffer-0")
    hb = read(plain, key, blob, LEASE.id)
    assert not hb.verified and hb.unverified is None
    assert hb.pod == "sniffer-0"


@pytest.mark.parametrize("blob", [b"", b"not json", b"[1, 2]", b'{"component": "sniffer"}'])
def test_junk_at_an_instance_key_is_no_heartbeat(keyed: DefenderClient, blob: bytes) -> None:
    assert Registry(keyed)._heartbeat("/defender/components/sniffer/instances/x", blob, 1) is None


def test_the_reason_names_no_key_material(keyring: Keyring, keyed: DefenderClient) -> None:
    key, blob = written(keyed, pod="sniffer-0")
    data = json.loads(blob)
    data["status"] = "STOPPED"
    hb = read(keyed, key, json.dumps(data).encode(), LEASE.id)
    text = hb.unverified or ""
    for k in keyring.key_ids:
        material = keyring.decryption_key(k).material
        assert material.hex() not in text and material.hex().upper() not in text


# --- at least two misses ------------------------------------------------------------------------


def test_a_heartbeater_allowing_one_miss_is_refused(plain: DefenderClient) -> None:
    with pytest.raises(SettingsError, match="allowed_misses is 1; at least 2"):
        Heartbeater(plain, "sniffer", "sniffer-0", allowed_misses=1, follow_cadence=False)
    assert Heartbeater(plain, "sniffer", "sniffer-0", allowed_misses=2).ttl >= 2


def test_settings_allowing_one_miss_are_refused() -> None:
    with pytest.raises(ValidationError, match="heartbeat_allowed_misses"):
        LibrarySettings(etcd=ETCD, heartbeat_allowed_misses=1)


def test_a_cadence_of_one_miss_is_not_followed(plain: DefenderClient) -> None:
    # An older operator published 1 for `missedBeforeRestart: 1`; this one writes 2.
    key = plain.layout.cadence("sniffer")

    def stored(misses: int) -> StoredValue:
        body = b'{"interval_seconds": 5, "allowed_misses": %d}' % misses
        return StoredValue(key, body, mod_revision=misses, create_revision=1, version=misses)

    assert decode_cadence(plain, key, stored(2)) is not None
    assert decode_cadence(plain, key, stored(1)) is None


class _NotSettled:
    """A keyring source that holds none yet (as the operator's before its keyring settles)."""

    def current(self) -> Keyring:
        raise KeyringError("no keyring held yet")


def test_a_reader_whose_keyring_is_not_settled_reads_records_unchecked(
    keyed: DefenderClient,
) -> None:
    key, blob = written(keyed, pod="sniffer-0")
    with DefenderClient(LibrarySettings(etcd=ETCD), _NotSettled(), alert_sinks=[]) as waiting:  # type: ignore[arg-type]
        hb = read(waiting, key, blob, LEASE.id)
    # Neither dropped nor judged: unchecked (no reason), to be read again with the keyring.
    assert not hb.verified and hb.unverified is None and hb.pod == "sniffer-0"


def test_each_heartbeater_signs_as_a_writer_of_its_own(keyed: DefenderClient) -> None:
    key, first = written(keyed, pod="sniffer-0")
    _, second = written(keyed, pod="sniffer-0")
    a, b = read(keyed, key, first, LEASE.id), read(keyed, key, second, LEASE.id)
    assert a.writer and b.writer and a.writer != b.writer and a.seq == b.seq == 1


def test_an_update_that_changes_nothing_does_not_wake_the_beat(plain: DefenderClient) -> None:
    # A woken beat renews the lease (an etcd request) even when it writes nothing: an update
    # repeating what the record says must not cost one.
    beat = Heartbeater(plain, "sniffer", "sniffer-0", follow_cadence=False, pod="sniffer-0")
    beat.update(last_error=ErrorInfo(reason="FileDrifted", detail="edited"))
    assert beat._wake.is_set()
    beat._wake.clear()
    beat.update(last_error=ErrorInfo(reason="FileDrifted", detail="edited"))
    assert not beat._wake.is_set()
    beat.update(last_error=None)
    assert beat._wake.is_set() and beat.record.last_error is None
