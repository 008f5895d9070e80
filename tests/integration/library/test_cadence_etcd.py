"""The published heartbeat cadence against the real etcd: a Heartbeater follows it from its
next beat (new interval, new lease TTL, no restart), falls back to its own setting when the
record is absent, garbled or out of bounds (with one logged warning, no crash), and a gate that
fails holds renewals until the lease expires."""

from __future__ import annotations

import logging
import time

import pytest

from defender_config import (
    Cadence,
    DefenderClient,
    ErrorInfo,
    Heartbeater,
    Registry,
    StoreUnavailableError,
    read_cadence,
    write_cadence,
)
from defender_devcluster import wait_for

pytestmark = pytest.mark.etcd


def _beater(client: DefenderClient, **kw: object) -> Heartbeater:
    hb = Heartbeater(client, "sniffer", "s-0", interval_seconds=3, allowed_misses=3, **kw)  # type: ignore[arg-type]
    return hb.start()


def _stored_ttl(client: DefenderClient) -> tuple[int, int]:
    """(granted TTL of the lease the instance key is bound to now, its lease id)."""
    stored = client.store.get(client.layout.instance("sniffer", "s-0"))
    assert stored is not None and stored.lease_id
    return client.store.lease_ttl(stored.lease_id), stored.lease_id


def test_round_trip_and_absent(client: DefenderClient) -> None:
    assert read_cadence(client, "sniffer") is None
    cadence = Cadence(interval_seconds=5, allowed_misses=2, by="test")
    write_cadence(client, "sniffer", cadence)
    assert read_cadence(client, "sniffer") == cadence
    assert cadence.lease_ttl_seconds == 10
    raw = client.store.get(client.layout.cadence("sniffer"))
    assert raw is not None and raw.value.startswith(b"{")  # plaintext JSON, like heartbeats


def test_heartbeater_follows_a_new_cadence_from_its_next_beat(client: DefenderClient) -> None:
    hb = _beater(client)
    try:
        first = hb.record
        assert (first.interval_seconds, first.lease_ttl_seconds) == (3, 9)  # local fallback
        assert hb.cadence is None
        _, old_lease = _stored_ttl(client)
        write_cadence(client, "sniffer", Cadence(interval_seconds=0.5, allowed_misses=4))
        # Picked up at the next beat (at most one old interval), without a restart.
        wait_for("the published cadence", lambda: hb.interval == 0.5, timeout=3 + 5)
        wait_for("the new TTL in the record", lambda: hb.record.lease_ttl_seconds == 2)
        # A new TTL needs a new lease: the key moves to it at once.
        wait_for("the key on a new lease", lambda: _stored_ttl(client)[1] != old_lease)
        ttl, _ = _stored_ttl(client)
        assert ttl <= 2
        assert client.store.lease_ttl(old_lease) == -1, "the old lease was revoked"
        beats = hb.beats
        time.sleep(2.2)
        assert hb.beats >= beats + 3, "beating every 0.5 s now"
        assert hb.cadence is not None and hb.cadence.interval_seconds == 0.5
    finally:
        hb.stop()


def test_garbled_or_out_of_bounds_record_means_the_local_setting(
    client: DefenderClient, caplog: pytest.LogCaptureFixture
) -> None:
    write_cadence(client, "sniffer", Cadence(interval_seconds=0.5, allowed_misses=4))
    hb = _beater(client)
    try:
        assert hb.interval == 0.5
        key = client.layout.cadence("sniffer")
        with caplog.at_level(logging.WARNING, logger="defender_config.cadence"):
            client.store.put(key, b"\x00not json at all")
            wait_for("back to the local setting", lambda: hb.interval == 3, timeout=10)
            assert hb.record.lease_ttl_seconds == 9
            assert hb.cadence is None
            beats = hb.beats
            wait_for("still beating", lambda: hb.beats > beats, timeout=10)
        warnings = [r for r in caplog.records if "unreadable heartbeat cadence" in r.message]
        assert len(warnings) == 1, "one warning per bad record, not one per beat"
        # Valid JSON outside the API's bounds (a day between beats) is not followed either.
        client.put_json(key, {"interval_seconds": 86400, "allowed_misses": 3})
        assert read_cadence(client, "sniffer") is None
        # A sealed value where plaintext belongs: ignored too.
        client.store.put(key, client.seal(key, b'{"interval_seconds": 1, "allowed_misses": 1}'))
        assert read_cadence(client, "sniffer") is None
        time.sleep(3.5)
        assert hb.interval == 3 and hb.failures == 0
    finally:
        hb.stop()


def test_a_record_nested_too_deeply_to_parse_means_the_local_setting(
    client: DefenderClient,
) -> None:
    # Read when the heartbeater starts and at every beat: refused like a garbled record, where
    # json alone would raise RecursionError and end the instance.
    client.store.put(client.layout.cadence("sniffer"), b"[" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        client.get_json(client.layout.cadence("sniffer"))
    assert read_cadence(client, "sniffer") is None
    hb = _beater(client)
    try:
        assert (hb.interval, hb.ttl) == (3, 9) and hb.cadence is None
        beats = hb.beats
        wait_for("still beating", lambda: hb.beats > beats, timeout=10)
        assert hb.failures == 0
    finally:
        hb.stop()


def test_follow_cadence_off_keeps_the_local_setting(client: DefenderClient) -> None:
    write_cadence(client, "sniffer", Cadence(interval_seconds=1, allowed_misses=2))
    hb = _beater(client, follow_cadence=False)
    try:
        assert (hb.interval, hb.ttl) == (3, 9)
    finally:
        hb.stop()


def test_a_failing_gate_holds_renewals_until_the_lease_expires(client: DefenderClient) -> None:
    problem: list[ErrorInfo] = []
    events = []
    handle = Registry(client).watch_instances(events.append, component="sniffer")
    hb = Heartbeater(
        client,
        "sniffer",
        "s-0",
        interval_seconds=0.5,
        allowed_misses=4,
        gate=lambda: problem[0] if problem else None,
    ).start()
    try:
        wait_for("renewals", lambda: hb.beats >= 3, timeout=10)
        problem.append(ErrorInfo(reason="ComponentUnhealthy", detail="pid 7 is stopped"))
        # The record says why once, then nothing renews the lease: etcd deletes the key.
        wait_for(
            "the reason in the record",
            lambda: any(
                e.kind == "put"
                and e.heartbeat is not None
                and e.heartbeat.last_error is not None
                and e.heartbeat.last_error.reason == "ComponentUnhealthy"
                for e in events
            ),
            timeout=10,
        )
        held_at = time.monotonic()
        wait_for("the lease expiry", lambda: any(e.kind == "delete" for e in events), timeout=20)
        assert time.monotonic() - held_at >= 0.5, "expired by its TTL, not revoked"
        assert hb.held is not None and hb.held_beats >= 1
        assert hb.record.last_error is None, "the gate's reason is not the record's own error"
        # Well again: a new lease and the key come back.
        problem.clear()
        wait_for(
            "the key back",
            lambda: client.store.get(client.layout.instance("sniffer", "s-0")) is not None,
            timeout=10,
        )
        assert hb.held is None and hb.regrants >= 1
    finally:
        hb.stop()
        handle.cancel()


def test_a_longer_cadence_moves_to_a_longer_lease_before_the_old_one_ends(
    client: DefenderClient,
) -> None:
    """0.5 s x 4 (a 2 s lease) → 4 s x 3: waiting the new 4 s interval under the old 2 s lease
    would let the key expire; the heartbeater takes the 12 s lease at once instead."""
    write_cadence(client, "sniffer", Cadence(interval_seconds=0.5, allowed_misses=4))
    events = []
    handle = Registry(client).watch_instances(events.append, component="sniffer")
    hb = _beater(client)
    try:
        assert (hb.interval, hb.ttl) == (0.5, 2)
        write_cadence(client, "sniffer", Cadence(interval_seconds=4, allowed_misses=3))
        wait_for("the 12 s lease", lambda: _stored_ttl(client)[0] > 2, timeout=10)
        assert hb.record.lease_ttl_seconds == 12
        time.sleep(6)  # past the old lease's 2 s many times over, less than one new interval x 2
        assert not [e for e in events if e.kind == "delete"], "the key expired in between"
        assert client.store.get(client.layout.instance("sniffer", "s-0")) is not None
    finally:
        hb.stop()
        handle.cancel()


def test_an_old_lease_that_cannot_be_revoked_is_left_to_expire(
    client: DefenderClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    hb = _beater(client)
    try:
        _, old_lease = _stored_ttl(client)

        def refuse(lease: object) -> None:
            raise StoreUnavailableError(["127.0.0.1:2379"], "member gone")

        monkeypatch.setattr(client.store, "revoke_lease", refuse)
        with caplog.at_level(logging.WARNING, logger="defender_config.registry"):
            write_cadence(client, "sniffer", Cadence(interval_seconds=0.5, allowed_misses=4))
            wait_for("the key on a new lease", lambda: _stored_ttl(client)[1] != old_lease)
        assert "old lease not revoked (it expires)" in caplog.text
        beats = hb.beats
        wait_for("beating on", lambda: hb.beats > beats + 2, timeout=10)
        assert hb.failures == 0, "the move to the new lease succeeded; nothing failed"
        assert client.store.lease_ttl(old_lease) > 0, (
            "still there, holding no key, until it expires"
        )
    finally:
        monkeypatch.undo()
        hb.stop()


def test_a_record_without_the_keyrings_mac_is_never_followed(
    client: DefenderClient, alerts: list[object]
) -> None:
    # Write access to etcd alone: a well-formed cadence of an hour between beats, unsigned or
    # signed with another keyring, would hide a hung instance for hours if it were followed.
    from defender_config import Keyring, sign_record

    key = client.layout.cadence("sniffer")
    forged = {"interval_seconds": 3600, "allowed_misses": 100}
    client.put_json(key, forged)
    assert read_cadence(client, "sniffer") is None
    client.put_json(key, sign_record(Keyring.generate(), key, forged))
    assert read_cadence(client, "sniffer") is None
    hb = _beater(client)
    try:
        beats = hb.beats
        wait_for("beating on the local setting", lambda: hb.beats > beats + 1, timeout=10)
        assert (hb.interval, hb.cadence) == (3, None)
        reasons = [getattr(a, "kind", None) for a in alerts]
        assert reasons.count("RecordUnauthenticated") == 2, reasons  # one per bad write
        # The operator's signed record is followed.
        write_cadence(client, "sniffer", Cadence(interval_seconds=0.5, allowed_misses=4))
        wait_for("the signed cadence", lambda: hb.interval == 0.5, timeout=3 + 5)
        assert b'"auth"' in client.store.get(key).value  # type: ignore[union-attr]
    finally:
        hb.stop()
