"""`Registry.lease_last_seen` follows an instance that moved to a new lease: a heartbeater whose
cadence changes puts its record on a new lease and revokes the old one, so a reader holding the
record from before asks a lease that is gone while the instance beats on. The record is read
again once, and only a verified record on another lease is followed. etcd is played by a fake
store (records are the bytes a heartbeater really writes)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from defender_config import (
    DefenderClient,
    EnvelopeOptions,
    EtcdSettings,
    Heartbeater,
    Keyring,
    LibrarySettings,
    Registry,
)
from defender_config._store_types import Lease, StoredValue

ETCD = EtcdSettings(endpoints=["127.0.0.1:1"])  # never contacted
OLD = Lease(id=0xA, ttl=3)
NEW = Lease(id=0xB, ttl=6)
INSTANCE = ("sniffer", "sniffer-0")
WRITTEN = datetime(2026, 1, 1, tzinfo=UTC)  # the old record's time: long ago


class FakeEtcd:
    """The instance key and the leases' seconds left (-1: gone); counts what is asked."""

    def __init__(self, client: DefenderClient) -> None:
        self.key = client.layout.instance(*INSTANCE)
        self.stored: StoredValue | None = None
        self.left: dict[int, int] = {OLD.id: -1}
        self.asked: list[int] = []
        self.reads = 0
        client.store.lease_ttl = self.lease_ttl  # type: ignore[method-assign,assignment]
        client.store.get = self.get  # type: ignore[method-assign,assignment]

    def lease_ttl(self, lease: int) -> int:
        self.asked.append(lease)
        return self.left.get(lease, -1)

    def get(self, path: str) -> StoredValue | None:
        assert path == self.key
        self.reads += 1
        return self.stored

    def put(self, blob: bytes, lease: Lease, *, stale: bool = False) -> None:
        self.stored = StoredValue(self.key, blob, 7, 1, 2, lease.id, stale)


def signed(client: DefenderClient, lease: Lease, at: datetime | None = None) -> bytes:
    """What a heartbeater of `client` granted `lease` puts for sniffer-0 (at time `at`)."""
    beat = Heartbeater(
        client, *INSTANCE, interval_seconds=lease.ttl / 3, allowed_misses=3, follow_cadence=False
    )
    assert beat.record.lease_ttl_seconds == lease.ttl
    if at is not None:
        beat._record = beat.record.model_copy(update={"time": at})
    puts: list[bytes] = []

    def put(key: str, value: bytes, **_: object) -> int:
        puts.append(value)
        return 1

    client.store.put = put  # type: ignore[method-assign,assignment]
    beat._write(beat.record, lease)
    return puts[0]


@pytest.fixture
def keyed(keyring: Keyring) -> Iterator[DefenderClient]:
    with DefenderClient(LibrarySettings(etcd=ETCD), keyring, alert_sinks=[]) as client:
        yield client


@pytest.fixture
def etcd(keyed: DefenderClient) -> FakeEtcd:
    return FakeEtcd(keyed)


def ask(registry: Registry, *, reuse: bool = False) -> datetime:
    return registry.lease_last_seen(OLD.id, OLD.ttl, WRITTEN, reuse=reuse, instance=INSTANCE)


def test_a_gone_lease_whose_instance_moved_answers_from_the_new_lease(
    keyed: DefenderClient, etcd: FakeEtcd
) -> None:
    # Moved half a minute ago, renewed since (the last time a second ago).
    etcd.put(signed(keyed, NEW, at=datetime.now(UTC) - timedelta(seconds=30)), NEW)
    etcd.left[NEW.id] = NEW.ttl - 1
    before = datetime.now(UTC)
    seen = ask(Registry(keyed))
    # Last seen = now - (the new record's granted TTL - seconds left): about a second ago.
    assert before - timedelta(seconds=1.5) <= seen <= datetime.now(UTC) - timedelta(seconds=0.5)
    assert etcd.asked == [OLD.id, NEW.id] and etcd.reads == 1


def test_the_new_leases_sighting_is_remembered_under_the_new_lease_only(
    keyed: DefenderClient, etcd: FakeEtcd
) -> None:
    etcd.put(signed(keyed, NEW), NEW)
    etcd.left[NEW.id] = NEW.ttl
    registry = Registry(keyed)
    seen = ask(registry, reuse=True)
    assert set(registry._sightings) == {NEW.id}
    # The new record's reader is answered without a request; the old lease is asked again.
    new_time = json.loads(etcd.stored.value)["time"]  # type: ignore[union-attr]
    new_written = datetime.fromisoformat(new_time)
    assert registry.lease_sighting(NEW.id, NEW.ttl, new_written, reuse=True) == seen
    assert registry.lease_sighting(OLD.id, OLD.ttl, WRITTEN, reuse=True) is None


def test_a_new_lease_gone_as_well_answers_the_new_records_time(
    keyed: DefenderClient, etcd: FakeEtcd
) -> None:
    etcd.put(signed(keyed, NEW), NEW)
    new_written = datetime.fromisoformat(json.loads(etcd.stored.value)["time"])  # type: ignore[union-attr]
    assert ask(Registry(keyed)) == new_written
    assert etcd.asked == [OLD.id, NEW.id] and etcd.reads == 1  # no second record read


def test_a_gone_lease_whose_record_is_gone_is_the_records_time(
    keyed: DefenderClient, etcd: FakeEtcd
) -> None:
    assert ask(Registry(keyed)) == WRITTEN
    assert etcd.reads == 1


def test_a_record_still_on_the_gone_lease_is_not_followed(
    keyed: DefenderClient, etcd: FakeEtcd
) -> None:
    etcd.put(signed(keyed, OLD), OLD)
    assert ask(Registry(keyed)) == WRITTEN
    assert etcd.asked == [OLD.id]


def test_a_record_served_from_the_cache_is_not_followed(
    keyed: DefenderClient, etcd: FakeEtcd
) -> None:
    # etcd became unreachable after the lease was asked: the cached record says nothing now.
    etcd.put(signed(keyed, NEW), NEW, stale=True)
    etcd.left[NEW.id] = NEW.ttl
    assert ask(Registry(keyed)) == WRITTEN
    assert etcd.asked == [OLD.id]


def test_an_unsigned_record_on_a_live_lease_is_not_followed(
    keyed: DefenderClient, etcd: FakeEtcd
) -> None:
    # Anyone with etcd write access could keep a dead instance looking alive.
    data = json.loads(signed(keyed, NEW))
    del data["auth"]
    etcd.put(json.dumps(data).encode(), NEW)
    etcd.left[NEW.id] = NEW.ttl
    assert ask(Registry(keyed)) == WRITTEN
    assert etcd.asked == [OLD.id]


def test_a_record_signed_with_another_key_is_not_followed(
    keyed: DefenderClient, etcd: FakeEtcd
) -> None:
    with DefenderClient(LibrarySettings(etcd=ETCD), Keyring.generate(), alert_sinks=[]) as other:
        blob = signed(other, NEW)
    etcd.put(blob, NEW)
    etcd.left[NEW.id] = NEW.ttl
    assert ask(Registry(keyed)) == WRITTEN
    assert etcd.asked == [OLD.id]


def test_a_record_of_another_lease_put_back_on_a_live_one_is_not_followed(
    keyed: DefenderClient, etcd: FakeEtcd
) -> None:
    # An authentic record signed for lease C, put on lease B that the attacker keeps alive.
    etcd.put(signed(keyed, Lease(id=0xC, ttl=6)), NEW)
    etcd.left[NEW.id] = NEW.ttl
    assert ask(Registry(keyed)) == WRITTEN
    assert etcd.asked == [OLD.id]


def test_a_reader_without_a_keyring_follows_nothing(keyed: DefenderClient) -> None:
    settings = LibrarySettings(etcd=ETCD, envelope=EnvelopeOptions(encrypt=False))
    with DefenderClient(settings, None, alert_sinks=[]) as plain:
        etcd = FakeEtcd(plain)
        etcd.put(signed(keyed, NEW), NEW)
        etcd.left[NEW.id] = NEW.ttl
        assert ask(Registry(plain)) == WRITTEN
        assert etcd.asked == [OLD.id]


def test_without_the_instance_nothing_is_read_again(keyed: DefenderClient, etcd: FakeEtcd) -> None:
    etcd.put(signed(keyed, NEW), NEW)
    etcd.left[NEW.id] = NEW.ttl
    assert Registry(keyed).lease_last_seen(OLD.id, OLD.ttl, WRITTEN) == WRITTEN
    assert etcd.reads == 0


def test_last_seen_follows_from_a_verified_record_only(
    keyed: DefenderClient, etcd: FakeEtcd
) -> None:
    registry = Registry(keyed)
    old = registry._heartbeat(etcd.key, signed(keyed, OLD), OLD.id)
    assert old is not None and old.verified
    etcd.put(signed(keyed, NEW), NEW)
    etcd.left[NEW.id] = NEW.ttl
    assert registry.last_seen(old) > old.time
    # The same record, unverified (bound to a lease it was not signed for): its names lead
    # nowhere.
    moved = registry._heartbeat(etcd.key, signed(keyed, OLD), 0xD)
    assert moved is not None and not moved.verified
    reads = etcd.reads
    assert registry.last_seen(moved) == moved.time and etcd.reads == reads
