"""A heartbeater writes its record again when someone else changes its key: an authentic older
record put back, a forged one, or the key deleted. Its own writes, including the one whose
watch event arrives before etcd's answer, are not answered. Real etcd:
tests/integration/library/test_registry_etcd.py."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from defender_config import (
    DefenderClient,
    ErrorInfo,
    EtcdSettings,
    Heartbeater,
    Keyring,
    LibrarySettings,
)
from defender_config._instance_guard import overwritten
from defender_config._store_types import Lease, WatchEvent

ETCD = EtcdSettings(endpoints=["127.0.0.1:1"])  # never contacted
LEASE = Lease(id=0x5EED, ttl=3)
KEY = "/ml-defender/components/sniffer/instances/sniffer-0"


def put(revision: int, value: bytes = b"x") -> WatchEvent:
    return WatchEvent("put", KEY, value, revision, 1, LEASE.id)


def deleted(revision: int) -> WatchEvent:
    return WatchEvent("delete", KEY, b"", revision, 0)


def test_a_change_after_the_last_acknowledged_put_is_someone_elses() -> None:
    assert overwritten(put(11, b"older record"), 10, None, stopping=False)
    assert overwritten(deleted(11), 10, None, stopping=False)


def test_the_heartbeaters_own_writes_are_not_answered() -> None:
    assert not overwritten(put(10), 10, None, stopping=False)  # acknowledged
    assert not overwritten(put(9), 10, None, stopping=False)  # an earlier one, late
    # Its event arrived before etcd's answer: the bytes in flight.
    assert not overwritten(put(11, b"mine"), 10, b"mine", stopping=False)
    # Someone else's put while one of its own is in flight.
    assert overwritten(put(11, b"theirs"), 10, b"mine", stopping=False)
    # A delete is never the put in flight.
    assert overwritten(deleted(11), 10, b"mine", stopping=False)


def test_its_own_revoke_at_stop_is_not_answered() -> None:
    assert not overwritten(deleted(11), 10, None, stopping=True)


class FakeEtcd:
    """Just what a beat touches: puts get revisions, the lease stays alive, a watch is
    recorded."""

    def __init__(self) -> None:
        self.revision = 100
        self.puts: list[bytes] = []
        self.watched: list[str] = []

    def put(self, key: str, value: bytes, *, lease: object = None) -> int:
        self.revision += 1
        self.puts.append(value)
        return self.revision

    def refresh_lease(self, lease: Lease) -> int:
        return lease.ttl


@pytest.fixture
def beating(keyring: Keyring) -> Iterator[tuple[Heartbeater, FakeEtcd]]:
    with DefenderClient(LibrarySettings(etcd=ETCD), keyring, alert_sinks=[]) as client:
        etcd = FakeEtcd()
        client.store.put = etcd.put  # type: ignore[method-assign]
        client.store.refresh_lease = etcd.refresh_lease  # type: ignore[method-assign]
        beat = Heartbeater(client, "sniffer", "sniffer-0", follow_cadence=False, pod="sniffer-0")
        beat._lease = LEASE
        beat._write(beat._stamped(), LEASE)
        yield beat, etcd


def test_a_record_put_back_is_written_again_with_a_newer_count(
    beating: tuple[Heartbeater, FakeEtcd], caplog: pytest.LogCaptureFixture
) -> None:
    beat, etcd = beating
    first = etcd.puts[-1]
    beat._write(beat._stamped(), LEASE)  # a second record (seq 2) at revision 102
    assert beat._written_revision == etcd.revision == 102
    beat._wake.clear()
    beat._beat()
    assert len(etcd.puts) == 2  # a steady beat writes nothing

    with caplog.at_level(logging.WARNING, "defender_config"):
        beat._on_own_key(put(103, first))  # the seq-1 record put back
    assert beat._wake.is_set() and beat.overwrites == 1
    assert "written by someone else at revision 103" in caplog.text
    assert "sniffer-0" in caplog.text and "seq" not in caplog.text
    beat._beat()
    assert len(etcd.puts) == 3
    assert json.loads(etcd.puts[-1])["seq"] == 3
    # Answered once: the next steady beat writes nothing more.
    beat._beat()
    assert len(etcd.puts) == 3


def test_a_deleted_key_is_written_again(beating: tuple[Heartbeater, FakeEtcd]) -> None:
    beat, etcd = beating
    beat._on_own_key(deleted(etcd.revision + 1))
    beat._beat()
    assert len(etcd.puts) == 2 and beat.overwrites == 1


def test_its_own_write_seen_before_the_answer_is_not_answered(
    beating: tuple[Heartbeater, FakeEtcd],
) -> None:
    beat, etcd = beating
    real_put = etcd.put

    def put_seen_first(key: str, value: bytes, *, lease: object = None) -> int:
        # etcd applied the put and the watch delivered it before the answer arrived.
        beat._on_own_key(put(etcd.revision + 1, value))
        return real_put(key, value, lease=lease)

    beat.client.store.put = put_seen_first  # type: ignore[method-assign]
    beat.update(config_version=2)
    beat._beat()
    assert len(etcd.puts) == 2 and beat.overwrites == 0
    beat._beat()
    assert len(etcd.puts) == 2


def test_a_change_that_came_before_a_write_is_answered_by_it(
    beating: tuple[Heartbeater, FakeEtcd],
) -> None:
    beat, etcd = beating
    beat._on_own_key(put(etcd.revision + 1, b"forged"))
    beat.update(config_version=2)  # the next beat writes anyway
    beat._beat()
    beat._beat()
    assert len(etcd.puts) == 2  # one write answered both


def test_a_held_heartbeater_writes_its_held_record_again(
    beating: tuple[Heartbeater, FakeEtcd],
) -> None:
    # While the gate fails the lease is not renewed, and the record says why: a healthy record
    # put back must not hide that until the lease runs out.
    beat, etcd = beating
    why = ErrorInfo(reason="HealthCheckFailed", detail="probe failed")
    beat._gate = lambda: why
    beat._beat()
    assert len(etcd.puts) == 2 and json.loads(etcd.puts[-1])["last_error"]["reason"] == why.reason
    beat._beat()
    assert len(etcd.puts) == 2
    beat._on_own_key(put(etcd.revision + 1, etcd.puts[0]))
    beat._beat()
    assert len(etcd.puts) == 3 and json.loads(etcd.puts[-1])["last_error"]["reason"] == why.reason
