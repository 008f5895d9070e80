"""Registry and heartbeats against the real cluster: registration races, lease-bound instance
keys, a SIGKILLed instance disappearing by lease expiry, status transitions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from defender_config import (
    ComponentStatus,
    ConfigStore,
    DefenderClient,
    Heartbeater,
    InstanceEvent,
    Keyring,
    LibrarySettings,
    Registration,
    Registry,
)
from defender_devcluster import wait_for

pytestmark = pytest.mark.etcd

DETECTOR: dict[str, Any] = {
    "node_id": "detector-01",
    "version": "1.0.0",
    "capabilities": ["ddos", "ransomware"],
}


def test_concurrent_registrations_leave_exactly_one_master(
    settings: LibrarySettings, keyring: Keyring
) -> None:
    clients = [
        DefenderClient(settings, keyring, registry=CollectorRegistry(), alert_sinks=[])
        for _ in range(8)
    ]
    results: list[Registration] = []
    errors: list[BaseException] = []
    gate = threading.Barrier(8)

    def register(n: int) -> None:
        try:
            gate.wait()
            config = {**DETECTOR, "node_id": f"detector-{n:02d}"}
            results.append(
                Registry(clients[n]).register(
                    "ml-detector", f"pod-{n}", config, "ml-detector", interval_seconds=5
                )
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(n,)) for n in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        winners = [r for r in results if r.created_master]
        assert len(results) == 8 and len(winners) == 1
        master = ConfigStore(clients[0]).get_master("ml-detector")
        assert master["node_id"] == f"detector-{int(winners[0].instance.removeprefix('pod-')):02d}"
        raw = clients[0].store.get(clients[0].layout.master_config("ml-detector"))
        assert raw is not None and raw.version == 1  # written once, never overwritten
        # Everyone runs what the winner wrote.
        assert {r.active.digest for r in results} == {winners[0].active.digest}
        assert all(r.active.version == 1 for r in results)
        instances = Registry(clients[0]).list_instances("ml-detector")
        assert sorted(h.instance for h in instances) == [f"pod-{n}" for n in range(8)]
    finally:
        for r in results:
            r.heartbeater.stop()
        for c in clients:
            c.close()


def test_status_transitions_and_stop_revokes_lease(client: DefenderClient) -> None:
    reg = Registry(client)
    r = reg.register(
        "firewall",
        "fw-a",
        {"node_id": "fw-01", "version": "1.0.0", "default_policy": "deny"},
        "firewall",
    )
    status = reg.get_status("firewall")
    assert status is not None and status.status is ComponentStatus.STARTING
    assert [h.status for h in reg.list_instances("firewall")] == [ComponentStatus.STARTING]
    r.heartbeater.set_status(ComponentStatus.RUNNING)
    wait_for(
        "the firewall heartbeat to say RUNNING",
        lambda: [h.status for h in reg.list_instances("firewall")] == [ComponentStatus.RUNNING],
        timeout=20,
    )
    lease = r.heartbeater.lease
    assert lease is not None
    r.heartbeater.stop()
    assert reg.list_instances("firewall") == []
    assert client.store.lease_ttl(lease) == -1
    status = reg.get_status("firewall")
    assert status is not None and status.status is ComponentStatus.STOPPED
    summary = {c.name: c for c in reg.list_components()}["firewall"]
    assert summary.status is ComponentStatus.STOPPED and summary.active_version == 1
    assert summary.type == "firewall" and summary.instances == ()


def test_one_replica_stopping_leaves_the_component_running(client: DefenderClient) -> None:
    reg = Registry(client)
    config = {"node_id": "fw-01", "version": "1.0.0", "default_policy": "deny"}
    first = reg.register("fw-pair", "fw-a", config, "firewall")
    second = reg.register("fw-pair", "fw-b", config, "firewall")
    for r in (first, second):
        r.heartbeater.set_status(ComponentStatus.RUNNING)
    first.heartbeater.stop()
    status = reg.get_status("fw-pair")
    assert status is not None and status.status is ComponentStatus.RUNNING
    assert [h.instance for h in reg.list_instances("fw-pair")] == ["fw-b"]
    second.heartbeater.stop()
    status = reg.get_status("fw-pair")
    assert status is not None and status.status is ComponentStatus.STOPPED


def test_start_with_a_lease_that_died_takes_a_fresh_one(client: DefenderClient) -> None:
    beat = Heartbeater(client, "fw-dead-lease", "fw-a", interval_seconds=30, allowed_misses=3)
    dead = client.store.grant_lease(90)
    client.store.revoke_lease(dead)
    # What a start() retried after its first write failed looks like: it holds a lease that
    # etcd has since dropped, and the initial beat writes without refreshing it first.
    beat._lease = dead
    beat.start()
    try:
        assert beat.lease is not None and beat.lease != dead and beat.regrants == 1
        got = [h.instance for h in Registry(client).list_instances("fw-dead-lease")]
        assert got == ["fw-a"]
    finally:
        beat.stop()


def test_heartbeat_carries_mutable_fields(client: DefenderClient, keyring: Keyring) -> None:
    reg = Registry(client)
    r = reg.register("rag", "rag-0", {"node_id": "rag-01", "version": "1.0.0"}, "rag", pod="rag-0")
    try:
        [hb] = reg.list_instances("rag")
        assert hb.pod == "rag-0" and hb.config_version == 1
        assert hb.key_fingerprint == keyring.primary_fingerprint
        assert hb.key_fingerprints == [keyring.primary_fingerprint]
        assert hb.codec == "zstd+aes-256-gcm"
        assert hb.last_error is None
        from defender_config import CodecMismatchError

        r.heartbeater.update(
            config_version=7, last_error=CodecMismatchError("zstd", "none", path="/x")
        )
        wait_for(
            "config_version 7 in the rag heartbeat",
            lambda: reg.list_instances("rag")[0].config_version == 7,
            timeout=20,
        )
        [hb] = reg.list_instances("rag")
        assert hb.last_error is not None and hb.last_error.reason == "CodecMismatch"
    finally:
        r.heartbeater.stop()


def test_reported_codec_survives_a_key_refresh(client: DefenderClient) -> None:
    # A component whose ACTIVE is stored without encryption reports so; a key rotation
    # re-reads the key fields but must not put the store-wide label back.
    reg = Registry(client)
    beat = Heartbeater(client, "fw-codec", "fw-0", interval_seconds=30, allowed_misses=3)
    beat.start()
    try:
        assert beat.record.codec == "zstd+aes-256-gcm"
        beat.update(codec="zstd+none")
        beat.refresh_key_fields()
        assert beat.record.codec == "zstd+none"
        wait_for(
            "the reported codec in etcd",
            lambda: reg.list_instances("fw-codec")[0].codec == "zstd+none",
            timeout=20,
        )
    finally:
        beat.stop()
    # Given at construction, it wins the same way.
    seeded = Heartbeater(client, "fw-codec", "fw-1", codec="none+none")
    seeded.refresh_key_fields()
    assert seeded.record.codec == "none+none"


def test_heartbeater_regrants_an_expired_lease(client: DefenderClient) -> None:
    reg = Registry(client)
    r = reg.register(
        "sniffer",
        "s-0",
        {"node_id": "s-01", "version": "1.0.0", "interface": "eth0"},
        "sniffer",
        interval_seconds=0.5,
        allowed_misses=4,
    )
    try:
        first = r.heartbeater.lease
        assert first is not None
        client.store.revoke_lease(first)  # what a long etcd outage does to the lease
        wait_for("a new lease", lambda: r.heartbeater.regrants == 1, timeout=20)
        wait_for(
            "the key written again", lambda: len(reg.list_instances("sniffer")) == 1, timeout=20
        )
        stored = client.store.get(client.layout.instance("sniffer", "s-0"))
        assert stored is not None and stored.lease_id not in (0, first.id)
    finally:
        r.heartbeater.stop()


_CHILD = textwrap.dedent(
    """
    import sys, time
    from defender_config import DefenderClient, Registry, load_settings
    client = DefenderClient(load_settings(None), alert_sinks=[])
    r = Registry(client).register(
        "ml-detector", "doomed",
        {"node_id": "d-01", "version": "1.0.0", "capabilities": ["ddos"]}, "ml-detector",
        interval_seconds=1, allowed_misses=2,
    )
    r.heartbeater.set_status("RUNNING")
    print("registered", flush=True)
    time.sleep(600)
    """
)


def test_killed_instance_disappears_by_lease_expiry(
    client: DefenderClient, settings: LibrarySettings, keyring: Keyring, tmp_path: Path
) -> None:
    keyring_file = tmp_path / "keyring.json"
    keyring_file.write_bytes(keyring.to_json())
    env = {
        **os.environ,
        "DEFENDER_ETCD__ENDPOINTS": ",".join(settings.etcd.endpoints),
        "DEFENDER_PREFIX": settings.prefix,
        "DEFENDER_KEYRING_PATH": str(keyring_file),
    }
    events: list[InstanceEvent] = []
    handle = Registry(client).watch_instances(events.append, component="ml-detector")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "registered"
        wait_for("the heartbeat put", lambda: any(e.kind == "put" for e in events), timeout=20)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        # Nothing deletes the key but etcd's lease expiry (TTL 2 s): no revoke, no poller.
        wait_for("the lease expiry", lambda: any(e.kind == "delete" for e in events), timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        handle.cancel()
    last = events[-1]
    assert last.kind == "delete" and last.instance == "doomed" and last.heartbeat is None
    assert all(e.heartbeat is not None for e in events if e.kind == "put")
    assert Registry(client).list_instances("ml-detector") == []


def test_heartbeats_end_when_the_store_is_closed(
    settings: LibrarySettings, keyring: Keyring
) -> None:
    c = DefenderClient(settings, keyring, registry=CollectorRegistry(), alert_sinks=[])
    r = Registry(c).register(
        "rag", "rag-0", {"node_id": "rag-01", "version": "1.0.0"}, "rag", interval_seconds=0.2
    )
    thread = r.heartbeater._thread
    assert thread is not None and thread.is_alive()
    c.close()
    wait_for("the heartbeat thread to end", lambda: not thread.is_alive(), timeout=20)


def test_a_forged_or_moved_heartbeat_does_not_verify_on_a_real_store(
    client: DefenderClient,
) -> None:
    """The record a heartbeater signs verifies as etcd returns it (list and watch alike); one
    written with etcd write access alone, or put back under another lease, does not. Each is
    seen by a watch at its revision; the heartbeater then writes its own record again."""
    reg = Registry(client)
    beat = Heartbeater(
        client, "fw-signed", "fw-0", interval_seconds=30, allowed_misses=3, pod="fw-0"
    ).start()
    events: list[InstanceEvent] = []
    watch = reg.watch_instances(events.append, component="fw-signed")
    try:
        [hb] = reg.list_instances("fw-signed")
        assert hb.verified and hb.unverified is None and hb.seq == 1
        key = client.layout.instance("fw-signed", "fw-0")
        signed = client.store.get(key)
        assert signed is not None
        # Without the keyring, under a lease the attacker keeps (the agent's own stays alive).
        theirs = client.store.grant_lease(30)
        forged = {**hb.model_dump(mode="json"), "last_error": {"reason": "X", "detail": "y"}}
        at = client.store.put(key, client.encode_json(forged), lease=theirs)
        seen = wait_for("the forged put", lambda: _event_at(events, at))
        assert not seen.verified and "no MAC" in (seen.unverified or "")
        # The agent's own signed bytes, put back under the attacker's lease.
        at = client.store.put(key, signed.value, lease=theirs)
        seen = wait_for("the put back", lambda: _event_at(events, at))
        assert not seen.verified and "lease" in (seen.unverified or "")
        # Neither stays: the heartbeater wrote its record again, signed, on its own lease.
        wait_for("written again", lambda: _verified_after(reg, "fw-signed", at))
        [hb] = reg.list_instances("fw-signed")
        assert beat.lease is not None and hb.lease_id == beat.lease.id
        client.store.revoke_lease(theirs)
    finally:
        watch.cancel()
        beat.stop()


def _event_at(events: list[InstanceEvent], revision: int) -> Any:
    """The heartbeat a watch delivered for the put at `revision`, if it has yet."""
    return next((e.heartbeat for e in list(events) if e.revision == revision), None)


def _verified_after(reg: Registry, component: str, revision: int) -> bool:
    found = reg.client.store.get(reg.client.layout.instance(component, "fw-0"))
    if found is None or found.mod_revision <= revision:
        return False
    [hb] = reg.list_instances(component)
    return hb.verified


def test_a_heartbeater_writes_its_record_again_when_it_is_put_back_or_deleted(
    client: DefenderClient,
) -> None:
    """An authentic older record of the same writer put back on its own lease (what a reader
    that did not see the newer one, an operator just restarted, would take for the pod's word),
    or the key deleted: the heartbeater writes its newest record again at once, not at its
    next change or after its lease would have run out."""
    reg = Registry(client)
    beat = Heartbeater(
        client, "fw-guard", "fw-0", interval_seconds=30, allowed_misses=3, pod="fw-0"
    ).start()
    try:
        key = client.layout.instance("fw-guard", "fw-0")
        older = client.store.get(key)
        assert older is not None and beat.lease is not None
        beat.update(config_version=7)
        wait_for("seq 2", lambda: reg.list_instances("fw-guard")[0].seq == 2)
        at = client.store.put(key, older.value, lease=beat.lease)
        wait_for("written again", lambda: _verified_after(reg, "fw-guard", at))
        [hb] = reg.list_instances("fw-guard")
        assert hb.verified and hb.seq == 3 and hb.config_version == 7
        assert beat.overwrites == 1
        at = client.store.put(key, b"", lease=beat.lease)  # overwritten with junk
        client.store.delete(key)
        wait_for("back after the delete", lambda: _verified_after(reg, "fw-guard", at + 1))
        [hb] = reg.list_instances("fw-guard")
        assert hb.config_version == 7 and hb.seq is not None and hb.seq >= 4
    finally:
        beat.stop()
    # Its own revoke at stop is not answered: the key stays gone.
    assert client.store.get(client.layout.instance("fw-guard", "fw-0")) is None
