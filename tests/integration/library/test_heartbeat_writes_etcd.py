"""One RPC per beat: in steady state a heartbeat is a lease keep-alive only; the record is put
again only when what it says changes, and readers take "last seen" from the lease. Against the
real 3-member etcd (the instance key's puts are counted by a watch)."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry

from defender_config import (
    Cadence,
    ComponentStatus,
    DefenderClient,
    Heartbeater,
    InstanceEvent,
    Keyring,
    LibrarySettings,
    Registry,
    write_cadence,
)
from defender_config._store import _keepalive
from defender_devcluster import wait_for

pytestmark = pytest.mark.etcd


def _puts(events: list[InstanceEvent]) -> list[InstanceEvent]:
    return [e for e in events if e.kind == "put"]


def test_steady_beats_renew_the_lease_and_write_nothing(client: DefenderClient) -> None:
    events: list[InstanceEvent] = []
    registry = Registry(client)
    handle = registry.watch_instances(events.append, component="sniffer")
    hb = Heartbeater(client, "sniffer", "s-0", interval_seconds=0.5, allowed_misses=4).start()
    try:
        hb.set_status(ComponentStatus.RUNNING)
        wait_for("RUNNING written", lambda: len(_puts(events)) == 2, timeout=10)
        writes, beats = hb.writes, hb.beats
        wait_for("six more beats", lambda: hb.beats >= beats + 6, timeout=15)
        time.sleep(0.3)  # a put made by the last beat would have reached the watch by now
        assert hb.writes == writes, "a beat with nothing new rewrote the record"
        assert len(_puts(events)) == 2
        assert not [e for e in events if e.kind == "delete"], "the lease lapsed"
        # The record's time is its last write; the lease says the instance beat just now.
        [listed] = registry.list_instances("sniffer")
        assert listed.lease_id == hb.lease.id  # type: ignore[union-attr]
        assert datetime.now(UTC) - listed.time > timedelta(seconds=2.5)
        assert datetime.now(UTC) - registry.last_seen(listed) < timedelta(seconds=1.5)
    finally:
        hb.stop()
        handle.cancel()


def test_a_change_is_written_once(client: DefenderClient) -> None:
    events: list[InstanceEvent] = []
    handle = Registry(client).watch_instances(events.append, component="sniffer")
    hb = Heartbeater(client, "sniffer", "s-0", interval_seconds=0.5, allowed_misses=4).start()
    try:
        wait_for("the first put", lambda: len(_puts(events)) == 1, timeout=10)
        hb.update(config_version=7, config_digest="abc")
        wait_for("the change", lambda: len(_puts(events)) == 2, timeout=10)
        beats = hb.beats
        wait_for("more beats", lambda: hb.beats >= beats + 4, timeout=15)
        time.sleep(0.3)
        puts = _puts(events)
        assert len(puts) == 2, [e.heartbeat for e in puts]
        assert puts[1].heartbeat is not None and puts[1].heartbeat.config_version == 7
        # The same values again are no change.
        hb.update(config_version=7, config_digest="abc")
        beats = hb.beats
        wait_for("more beats", lambda: hb.beats >= beats + 2, timeout=15)
        time.sleep(0.3)
        assert len(_puts(events)) == 2
    finally:
        hb.stop()
        handle.cancel()


def test_a_published_cadence_arrives_without_polling(client: DefenderClient) -> None:
    # A 30 s interval: a heartbeater reading the cadence only with its beats would not see
    # the new one for 30 s; the client's cadence watch brings it at once.
    hb = Heartbeater(client, "sniffer", "s-0", interval_seconds=30, allowed_misses=3).start()
    other = Heartbeater(client, "firewall", "f-0", interval_seconds=30, allowed_misses=3).start()
    try:
        write_cadence(client, "sniffer", Cadence(interval_seconds=0.5, allowed_misses=4))
        wait_for("the pushed cadence", lambda: hb.interval == 0.5, timeout=10)
        assert hb.record.lease_ttl_seconds == 2
        assert other.interval == 30, "another component's cadence is not this one's"
        # Deleted: back to the local setting.
        client.store.delete(client.layout.cadence("sniffer"))
        wait_for("the local setting again", lambda: hb.interval == 30, timeout=10)
    finally:
        hb.stop()
        other.stop()


def test_the_last_seen_of_a_gone_lease_is_the_records_time(client: DefenderClient) -> None:
    registry = Registry(client)
    hb = Heartbeater(client, "sniffer", "s-0", interval_seconds=0.5, allowed_misses=4).start()
    try:
        [listed] = registry.list_instances("sniffer")
    finally:
        hb.stop()  # revokes the lease
    assert registry.last_seen(listed) == listed.time


def test_the_last_seen_of_a_lease_the_instance_moved_off_is_the_new_leases(
    client: DefenderClient,
) -> None:
    # A new cadence moves the key to a new lease and revokes the old one: a reader holding the
    # record from before must not take the instance for silent since that record's time.
    registry = Registry(client)
    hb = Heartbeater(client, "sniffer", "s-0", interval_seconds=0.5, allowed_misses=4).start()
    try:
        [listed] = registry.list_instances("sniffer")
        assert listed.verified and listed.lease_ttl_seconds == 2
        time.sleep(1)  # the record ages while the lease is renewed
        write_cadence(client, "sniffer", Cadence(interval_seconds=0.5, allowed_misses=6))
        wait_for("the move", lambda: client.store.lease_ttl(listed.lease_id) < 0, timeout=10)
        [moved] = registry.list_instances("sniffer")
        assert moved.verified and moved.lease_id != listed.lease_id
        assert moved.lease_ttl_seconds == 3
        time.sleep(2)  # renewed on the new lease since it was put there
        seen = registry.last_seen(listed)
        # From the new lease: after the new record's time, not the old record's time.
        assert seen > moved.time + timedelta(seconds=0.5)
        assert datetime.now(UTC) - seen < timedelta(seconds=1.5)
        # A reused answer is remembered for the new lease, never for the revoked one.
        ttl, written = listed.lease_ttl_seconds, listed.time
        instance = ("sniffer", "s-0")
        again = registry.lease_last_seen(
            listed.lease_id, ttl, written, reuse=True, instance=instance
        )
        assert again > moved.time and set(registry._sightings) == {moved.lease_id}
        # Without the instance's name there is no record to read again: today's answer.
        assert registry.lease_last_seen(listed.lease_id, ttl, written) == written
    finally:
        hb.stop()  # revokes the new lease: nothing replaces it
    assert registry.last_seen(listed) == listed.time
    assert registry.last_seen(moved) == moved.time


def test_a_forged_record_on_a_live_lease_is_not_followed(
    client: DefenderClient, settings: LibrarySettings
) -> None:
    # Write access to etcd alone must not keep an instance whose lease is gone looking alive.
    registry = Registry(client)
    hb = Heartbeater(client, "sniffer", "s-0", interval_seconds=0.5, allowed_misses=4).start()
    try:
        [listed] = registry.list_instances("sniffer")
    finally:
        hb.stop()  # revokes the lease, etcd deletes the key
    key = client.layout.instance("sniffer", "s-0")
    live = client.store.grant_lease(30)
    now = datetime.now(UTC).isoformat()
    forged = {**listed.model_dump(mode="json"), "time": now, "lease": f"{live.id:x}"}
    other_keyring = DefenderClient(
        settings, Keyring.generate(), registry=CollectorRegistry(), alert_sinks=[]
    )
    try:
        with other_keyring:
            badly_signed = other_keyring.encode_record(key, forged)
        for blob in (client.encode_json(forged), badly_signed):
            client.store.put(key, blob, lease=live)
            [read] = registry.list_instances("sniffer")
            assert read.lease_id == live.id and not read.verified
            assert registry.last_seen(listed) == listed.time
            instance = ("sniffer", "s-0")
            answer = registry.lease_last_seen(
                listed.lease_id, listed.lease_ttl_seconds, listed.time, instance=instance
            )
            assert answer == listed.time
    finally:
        client.store.revoke_lease(live)


def test_reused_sightings_ask_the_lease_once_while_it_is_certainly_alive(
    client: DefenderClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(client)
    # 1 s beats, lease 10 s: after an answer the lease has at least 9 s left.
    hb = Heartbeater(client, "sniffer", "s-0", interval_seconds=1, allowed_misses=10).start()
    asked: list[int] = []
    real = client.store.lease_ttl

    def counted(lease: int) -> int:
        asked.append(lease)
        return real(lease)

    monkeypatch.setattr(client.store, "lease_ttl", counted)
    try:
        [listed] = registry.list_instances("sniffer")
        first = registry.lease_last_seen(
            listed.lease_id, listed.lease_ttl_seconds, listed.time, reuse=True
        )
        time.sleep(1.5)  # beats happened meanwhile
        again = registry.lease_last_seen(
            listed.lease_id, listed.lease_ttl_seconds, listed.time, reuse=True
        )
        assert (len(asked), again) == (1, first), "asked again while certainly alive"
        # The same answer without a request, for a caller that must not block.
        ttl = listed.lease_ttl_seconds
        assert registry.lease_sighting(listed.lease_id, ttl, listed.time, reuse=True) == first
        # Without reuse it would have to ask; without a lease the record's time is the answer.
        assert registry.lease_sighting(listed.lease_id, ttl, listed.time) is None
        assert registry.lease_sighting(0, ttl, listed.time, reuse=True) == listed.time
        # Never newer than the truth, and last seen + TTL is still ahead: not judged stale.
        assert again <= registry.last_seen(listed)
        assert again + timedelta(seconds=10) > datetime.now(UTC)
        # Without reuse every call asks (the plugin and tests want the newest beat).
        fresh = registry.lease_last_seen(listed.lease_id, listed.lease_ttl_seconds, listed.time)
        assert fresh > first and len(asked) == 3
        # Once the seconds it had left ran out, it is asked again.
        sightings = registry._sightings
        sightings[listed.lease_id] = (time.monotonic() - 1, first)
        assert registry.lease_sighting(listed.lease_id, ttl, listed.time, reuse=True) is None
        renewed = registry.lease_last_seen(
            listed.lease_id, listed.lease_ttl_seconds, listed.time, reuse=True
        )
        assert len(asked) == 4 and renewed > first
        # A lease etcd keeps longer than the TTL the caller goes by (10 s kept, 2 s told):
        # the sighting holds for 2 s at most, not for the 9-10 s the lease has left.
        sightings.pop(listed.lease_id)
        registry.lease_last_seen(listed.lease_id, 2, listed.time, reuse=True)
        asked_before = len(asked)
        time.sleep(2.2)
        registry.lease_last_seen(listed.lease_id, 2, listed.time, reuse=True)
        assert len(asked) == asked_before + 1
    finally:
        hb.stop()  # revokes the lease
    # A gone lease is forgotten: the record's time, asked (not a remembered sighting).
    sightings[listed.lease_id] = (time.monotonic() - 1, first)
    gone = registry.lease_last_seen(
        listed.lease_id, listed.lease_ttl_seconds, listed.time, reuse=True
    )
    assert gone == listed.time and listed.lease_id not in registry._sightings


class _UnansweredStream:
    """A keep-alive stream whose answer never reaches the caller, even after its reset (an
    answer or failure still being handed over by another thread, forever)."""

    label = "stalled"
    alive = True

    def send(self, lease_id: int) -> Future[int]:
        return Future()

    def fail(self, why: object) -> None:
        pass


def test_a_keep_alive_that_times_out_is_an_expected_failure_retried_and_logged_as_such(
    settings: LibrarySettings,
    keyring: Keyring,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The lease keep-alive gets no answer: the heartbeater logs a warning naming the timeout
    and retries (it was a bare TimeoutError, logged as "unexpected" with a traceback), and
    beats again once keep-alives are answered."""
    monkeypatch.setattr(_keepalive, "_SETTLE_SECONDS", 0.05)
    quick = settings.etcd.model_copy(update={"timeout_seconds": 0.5, "retries": 1})
    client = DefenderClient(
        settings.model_copy(update={"etcd": quick}),
        keyring,
        registry=CollectorRegistry(),
        alert_sinks=[],
    )
    request.addfinalizer(client.close)
    hb = Heartbeater(client, "sniffer", "s-0", interval_seconds=0.5, allowed_misses=6).start()
    try:
        mux = client.store._keepalive
        real = mux._stream_for
        with caplog.at_level(logging.WARNING, logger="defender_config"):
            monkeypatch.setattr(mux, "_stream_for", lambda c: _UnansweredStream())
            wait_for("a failed beat", lambda: hb.failures >= 1, timeout=30)
            monkeypatch.setattr(mux, "_stream_for", real)
        failed = [r for r in caplog.records if "heartbeat" in r.getMessage()]
        assert failed and all(r.levelno == logging.WARNING for r in failed)
        assert not [r for r in caplog.records if "unexpected" in r.getMessage()]
        assert any("no keep-alive answer" in r.getMessage() for r in failed)
        beats = hb.beats
        wait_for("beats again", lambda: hb.beats > beats, timeout=30)
    finally:
        hb.stop()
