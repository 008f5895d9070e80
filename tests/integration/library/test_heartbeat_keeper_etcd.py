"""Heartbeats renewed by the store's keeper thread, against the real 3-member etcd: a steady beat
runs nothing on the heartbeater's own thread and writes nothing; a lease lost behind its back,
a stream whose member dies, a stop in the middle of a burst and a closed store each end with the
heartbeater renewing on its own as before the keeper; many heartbeaters share one keeper."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry

from defender_config import (
    DefenderClient,
    EtcdSettings,
    Heartbeater,
    InstanceEvent,
    Keyring,
    LibrarySettings,
    Registry,
    StoreError,
)
from defender_config._instance_guard import instance_guard
from defender_devcluster import EtcdCluster, wait_for

pytestmark = pytest.mark.etcd


class CountedHeartbeater(Heartbeater):
    """Counts what the heartbeater's own thread runs (a beat of its own: `_beat`)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.own_beats = 0

    def _beat(self, *, initial: bool = False) -> None:
        self.own_beats += 1
        super()._beat(initial=initial)


def beater(client: DefenderClient, instance: str, **kw: object) -> CountedHeartbeater:
    hb = CountedHeartbeater(
        client, "sniffer", instance, **{"interval_seconds": 0.5, "allowed_misses": 4, **kw}
    )
    hb.start()
    return hb


def kept(client: DefenderClient, hb: Heartbeater) -> bool:
    lease = hb.lease
    return lease is not None and lease.id in client.store._keeper


def keeper_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "defender-lease-keeper"]


def sample(client: DefenderClient, name: str, **labels: str) -> float:
    return client.store.metrics.registry.get_sample_value(name, labels) or 0.0


def handbacks(client: DefenderClient, reason: str) -> float:
    return sample(client, "defender_etcd_kept_lease_handbacks_total", reason=reason)


@pytest.fixture
def events(client: DefenderClient) -> Iterator[list[InstanceEvent]]:
    seen: list[InstanceEvent] = []
    handle = Registry(client).watch_instances(seen.append, component="sniffer")
    yield seen
    handle.cancel()


def test_steady_beats_come_from_the_keeper_and_write_nothing(
    client: DefenderClient, events: list[InstanceEvent]
) -> None:
    hb = beater(client, "s-0")
    try:
        wait_for("the keeper to take the beats", lambda: kept(client, hb), timeout=10)
        writes, beats, own = hb.writes, hb.beats, hb.own_beats
        wait_for("six beats by the keeper", lambda: hb.beats >= beats + 6, timeout=15)
        time.sleep(0.3)
        assert hb.own_beats == own, "a steady beat ran on the heartbeater's thread"
        assert hb.writes == writes and len([e for e in events if e.kind == "put"]) == 1
        assert not [e for e in events if e.kind == "delete"], "the lease lapsed"
        assert sample(client, "defender_etcd_kept_keepalives_total") >= 6
        assert (hb.failures, hb.regrants) == (0, 0)
        # A change wakes the heartbeater: written once, then the keeper beats again.
        hb.update(config_version=3)
        wait_for("the change", lambda: len([e for e in events if e.kind == "put"]) == 2)
        wait_for("back on the keeper", lambda: kept(client, hb), timeout=10)
        own, beats = hb.own_beats, hb.beats
        wait_for("beats", lambda: hb.beats >= beats + 3, timeout=10)
        assert hb.own_beats == own
    finally:
        hb.stop()
    assert not kept(client, hb) and len(client.store._keeper) == 0


def test_a_lease_revoked_behind_its_back_is_regranted_and_the_record_rewritten(
    client: DefenderClient, events: list[InstanceEvent]
) -> None:
    hb = beater(client, "s-0")
    key = client.layout.instance("sniffer", "s-0")
    # The keeper's own path: the watch on the heartbeater's key (`_instance_guard`) would see
    # the key deleted first and answer it (test_registry_etcd.py).
    instance_guard(client).unsubscribe("sniffer", key)
    try:
        wait_for("kept", lambda: kept(client, hb), timeout=10)
        first = hb.lease
        assert first is not None
        client.store.revoke_lease(first)  # what a long etcd outage does to a lease

        def rewritten() -> bool:
            stored = client.store.get(key)
            return stored is not None and stored.lease_id not in (0, first.id)

        wait_for("the key rewritten on a new lease", rewritten, timeout=10)
        stored = client.store.get(key)
        assert stored is not None and hb.regrants == 1
        assert sample(client, "defender_etcd_kept_lease_handbacks_total", reason="expired") == 1
        wait_for("the new lease kept", lambda: kept(client, hb), timeout=10)
        assert hb.lease is not None and hb.lease.id == stored.lease_id
        puts = [e for e in events if e.kind == "put"]
        assert len(puts) == 2 and puts[1].heartbeat is not None
        assert hb.failures == 0
    finally:
        hb.stop()


@pytest.fixture
def failover_client(
    members_restored: EtcdCluster,
    make_etcd_settings: Callable[..., EtcdSettings],
    etcd_prefix: str,
    keyring: Keyring,
) -> Iterator[DefenderClient]:
    settings = LibrarySettings(
        etcd=make_etcd_settings(timeout_seconds=1.5, backoff_base_seconds=0.05),
        prefix=etcd_prefix.rstrip("/"),
    )
    c = DefenderClient(settings, keyring, registry=CollectorRegistry(), alert_sinks=[])
    yield c
    c.close()


def on_a_follower(client: DefenderClient, cluster: EtcdCluster) -> int:
    """Point the client at a follower (before its keep-alive stream opens): killing or freezing
    that member then tests the stream, not a leader election. Returns the member's index."""
    leader = cluster.wait_for_leader()
    follower = next(e for e in cluster.endpoints if e != leader)
    with client.store._client._ep_lock:
        client.store._client._current_endpoint_label = follower.split("://")[-1]
    return cluster.endpoints.index(follower)


def stream_member(client: DefenderClient, cluster: EtcdCluster) -> int:
    stream = client.store._keepalive._stream
    assert stream is not None
    return [e.split("://")[-1] for e in cluster.endpoints].index(stream.label)


def test_the_member_under_the_stream_dying_hangs_nobody_and_beats_go_on(
    members_restored: EtcdCluster, failover_client: DefenderClient
) -> None:
    client, cluster = failover_client, members_restored
    victim = on_a_follower(client, cluster)
    beaters = [beater(client, f"s-{i}", allowed_misses=6) for i in range(5)]
    try:
        wait_for("all kept", lambda: all(kept(client, hb) for hb in beaters), timeout=10)
        wait_for("a keep-alive stream", lambda: client.store._keepalive._stream, timeout=10)
        assert stream_member(client, cluster) == victim
        stream = client.store._keepalive._stream
        cluster.kill_member(victim)
        # Keep-alives in flight fail with the stream and go back to their heartbeaters, which
        # renew through the store's retries; the next burst opens a stream to a live member.
        beats = [hb.beats for hb in beaters]
        wait_for(
            "beats on a new stream",
            lambda: all(hb.beats >= b + 4 for hb, b in zip(beaters, beats, strict=True)),
            timeout=15,
        )
        new = client.store._keepalive._stream
        assert new is not None and new is not stream and stream_member(client, cluster) != victim
        wait_for("all kept again", lambda: all(kept(client, hb) for hb in beaters), timeout=15)
        assert all(hb.regrants == 0 for hb in beaters), "no lease expired meanwhile"
        keys = Registry(client).list_instances("sniffer")
        assert sorted(h.instance for h in keys) == [f"s-{i}" for i in range(5)]
    finally:
        for hb in beaters:
            hb.stop()


def test_a_frozen_member_under_the_stream_times_out_and_the_leases_go_back(
    members_restored: EtcdCluster, failover_client: DefenderClient
) -> None:
    """SIGSTOP: the connection stays open and nothing answers. The keeper resets the stream
    after the request timeout and hands the leases back; each heartbeater renews on another
    member and the keeper takes the lease again. No caller waits longer than the timeout."""
    client, cluster = failover_client, members_restored
    victim = on_a_follower(client, cluster)
    beaters = [beater(client, f"s-{i}", allowed_misses=10) for i in range(5)]
    try:
        wait_for("all kept", lambda: all(kept(client, hb) for hb in beaters), timeout=10)
        wait_for("a keep-alive stream", lambda: client.store._keepalive._stream, timeout=10)
        assert stream_member(client, cluster) == victim
        with cluster.frozen(victim):
            wait_for(
                "the leases handed back",
                lambda: handbacks(client, "stream_failed") + handbacks(client, "timeout") >= 5,
                timeout=15,
            )
            wait_for("all kept again", lambda: all(kept(client, hb) for hb in beaters), timeout=15)
            assert stream_member(client, cluster) != victim
            beats = [hb.beats for hb in beaters]
            wait_for(
                "beats on the new stream",
                lambda: all(hb.beats >= b + 3 for hb, b in zip(beaters, beats, strict=True)),
                timeout=15,
            )
        assert all(hb.regrants == 0 for hb in beaters), "no lease expired meanwhile"
        assert all(hb.own_beats >= 2 for hb in beaters), "each renewed once on its own thread"
    finally:
        for hb in beaters:
            hb.stop()


def test_stopping_in_the_middle_of_a_burst(client: DefenderClient) -> None:
    """Half the heartbeaters stop while the keeper is sending their keep-alives: their keys go at
    once, nothing renews or regrants their leases afterwards, the others beat on untouched."""
    beaters = [beater(client, f"s-{i:02d}") for i in range(30)]
    keeper = client.store._keeper
    stopping, stoppers = beaters[::2], []
    real_send = keeper._send_due

    def send_while_stopping(now: float, tick: float) -> None:
        if not stoppers and len(keeper) == len(beaters):
            stoppers.extend(threading.Thread(target=hb.stop) for hb in stopping)
            for t in stoppers:
                t.start()
        real_send(now, tick)

    try:
        wait_for("all kept", lambda: len(keeper) == len(beaters), timeout=15)
        keeper._send_due = send_while_stopping  # type: ignore[method-assign]
        wait_for("the stops to start", lambda: stoppers, timeout=10)
        started = time.monotonic()
        for t in stoppers:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in stoppers), "a stop hung"
        assert time.monotonic() - started < 15
        keeper._send_due = real_send  # type: ignore[method-assign]
        leases = [hb.lease for hb in stopping]
        assert leases == [None] * len(stopping)
        assert len(keeper) == len(beaters) - len(stopping)
        running = beaters[1::2]
        beats = [hb.beats for hb in running]
        wait_for(
            "the others beat on",
            lambda: all(hb.beats >= b + 3 for hb, b in zip(running, beats, strict=True)),
            timeout=15,
        )
        assert all(hb.regrants == 0 and hb.failures == 0 for hb in beaters)
        assert all(hb._thread is not None and not hb._thread.is_alive() for hb in stopping)
        left = Registry(client).list_instances("sniffer")
        assert sorted(h.instance for h in left) == [hb.instance for hb in running]
    finally:
        keeper._send_due = real_send  # type: ignore[method-assign]
        for hb in beaters:
            hb.stop()


def test_many_heartbeaters_share_one_keeper_thread(
    client: DefenderClient, events: list[InstanceEvent]
) -> None:
    before = {t.ident for t in threading.enumerate()}
    beaters = [beater(client, f"s-{i:02d}") for i in range(40)]
    gated = beater(client, "gated", gate=lambda: None)
    try:
        wait_for("all kept", lambda: all(kept(client, hb) for hb in beaters), timeout=15)
        assert len(keeper_threads()) == 1
        new = [t for t in threading.enumerate() if t.ident not in before]
        own = [t for t in new if t.name.startswith("defender-heartbeat:")]
        # One sleeping thread per heartbeater (it wakes for changes), one keeper for them all.
        assert len(own) == len(beaters) + 1
        assert not kept(client, gated), "a gate is asked on the heartbeater's own thread"
        own_beats = [hb.own_beats for hb in beaters]
        beats = [hb.beats for hb in beaters]
        gated_beats = gated.own_beats
        wait_for(
            "three beats each",
            lambda: all(hb.beats >= b + 3 for hb, b in zip(beaters, beats, strict=True)),
            timeout=15,
        )
        assert [hb.own_beats for hb in beaters] == own_beats
        assert gated.own_beats > gated_beats
        assert len([e for e in events if e.kind == "put"]) == len(beaters) + 1
    finally:
        for hb in [*beaters, gated]:
            hb.stop()
    assert len(client.store._keeper) == 0


def test_closing_the_store_hands_the_leases_back_and_ends_the_threads(
    settings: LibrarySettings, keyring: Keyring
) -> None:
    c = DefenderClient(settings, keyring, registry=CollectorRegistry(), alert_sinks=[])
    beaters = [beater(c, f"s-{i}") for i in range(3)]
    wait_for("all kept", lambda: all(kept(c, hb) for hb in beaters), timeout=10)
    [keeper] = keeper_threads()
    c.close()
    wait_for(
        "every thread ended",
        lambda: (
            not keeper.is_alive()
            and all(hb._thread is not None and not hb._thread.is_alive() for hb in beaters)
        ),
        timeout=20,
    )
    assert sample(c, "defender_etcd_kept_lease_handbacks_total", reason="closed") == 3


def test_a_keeper_that_refuses_the_lease_leaves_the_beats_on_the_heartbeaters_thread(
    client: DefenderClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    hb = beater(client, "s-0")
    try:
        wait_for("kept", lambda: kept(client, hb), timeout=10)
        real = client.store.keep_lease

        def refuse(*args: object, **kwargs: object) -> None:
            raise StoreError("the EtcdStore is closed; create a new one")

        monkeypatch.setattr(client.store, "keep_lease", refuse)
        hb.update(config_version=2)  # wakes the thread: it takes the lease back and beats
        own = hb.own_beats
        wait_for("beats on its own thread", lambda: hb.own_beats >= own + 3, timeout=10)
        assert not kept(client, hb) and (hb.failures, hb.regrants) == (0, 0)
        monkeypatch.setattr(client.store, "keep_lease", real)
        wait_for("kept again", lambda: kept(client, hb), timeout=10)
    finally:
        hb.stop()
