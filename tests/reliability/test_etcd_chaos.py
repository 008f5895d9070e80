"""etcd chaos: members SIGKILLed by PID under continuous writes through the library.

* one of three members down (the leader): every acknowledged write is read back afterwards,
  through the library and from every member's own copy;
* two of three down (no quorum): writes fail with StoreUnavailableError saying what to check,
  reads are served from the last-known-good cache flagged stale, the operator's restart decision
  (fed by its own health probe) restarts nothing, and everything recovers when members return.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from reliability_support import (
    FIREWALL,
    LedgerWriter,
    assert_all_acknowledged_writes_present,
    make_client,
    member_index,
    new_keyring,
    restart_member,
)

from defender_config import (
    Alert,
    ConfigStore,
    DefenderClient,
    DefenderConfigError,
    StoreUnavailableError,
)
from defender_devcluster import EtcdCluster, wait_for

pytestmark = pytest.mark.etcd


def leader_index(cluster: EtcdCluster) -> int:
    return member_index(cluster, cluster.wait_for_leader())


def test_kill_the_leader_under_continuous_writes_loses_no_acknowledged_write(
    healthy_etcd: EtcdCluster, etcd_prefix: str, alerts: list[Alert]
) -> None:
    cluster = healthy_etcd
    keyring = new_keyring()
    client = make_client(cluster, etcd_prefix, keyring, alerts)
    writer = LedgerWriter(client, etcd_prefix).start()
    try:
        wait_for("30 writes before the kill", lambda: len(writer.acked) >= 30, timeout=60)
        victim = leader_index(cluster)
        cluster.kill_member(victim)
        before = len(writer.acked)
        wait_for(
            "100 writes with a member dead", lambda: len(writer.acked) >= before + 100, timeout=60
        )
        restart_member(cluster, victim)
        after_restart = len(writer.acked)
        wait_for(
            "writes after the restart", lambda: len(writer.acked) >= after_restart + 30, timeout=60
        )
    finally:
        writer.stop()
        client.close()
    # With one member of three down the cluster keeps quorum: no write may fail.
    assert writer.failed == [], f"writes failed with quorum intact: {writer.failed[:3]}"
    reader = make_client(cluster, etcd_prefix, keyring, alerts)
    try:
        assert_all_acknowledged_writes_present(cluster, etcd_prefix, reader, writer.acked)
    finally:
        reader.close()
    assert alerts == []


def test_no_quorum_fails_writes_clearly_serves_stale_reads_restarts_nothing_and_recovers(
    healthy_etcd: EtcdCluster, etcd_prefix: str, alerts: list[Alert]
) -> None:
    from defender_operator._decisions.restarts import (
        HeartbeatPolicy,
        PodView,
        RestartAction,
        RestartBudget,
        decide_restart,
    )
    from defender_operator._keys import MutableKeyringSource
    from defender_operator._library_backend import LibraryBackend
    from defender_operator._runtime import EtcdTracker

    cluster = healthy_etcd
    keyring = new_keyring()
    # Few short retries: the outage is certain, the test is about what happens after them.
    fast = {"retries": 1, "timeout_seconds": 1.0, "backoff_base_seconds": 0.02}
    client = make_client(cluster, etcd_prefix, keyring, alerts, etcd=fast)
    configs = ConfigStore(client)
    configs.seed("firewall", FIREWALL, "firewall", by="test")
    assert configs.get_active("firewall").version == 1
    client.put_sealed(etcd_prefix + "known", b"known-good value")
    assert client.get_sealed(etcd_prefix + "known") is not None
    settings = client.settings
    backend = LibraryBackend(settings, MutableKeyringSource(keyring), identity="reliability")
    tracker = EtcdTracker()
    try:
        victims = [0, 1]
        for i in victims:
            cluster.kill_member(i)
        survivor = cluster.endpoints[2]

        with pytest.raises(StoreUnavailableError) as info:
            client.put_sealed(etcd_prefix + "during-outage", b"x")
        message = str(info.value)
        assert "etcd unavailable" in message
        assert "quorum" in message, "the message must say what to check"
        assert survivor in message, "the message must name the endpoints tried"
        with pytest.raises(StoreUnavailableError):
            configs.commit("firewall", {**FIREWALL, "default_policy": "allow"}, by="test")

        active = configs.get_active("firewall")
        assert active.stale and active.version == 1 and active.config["default_policy"] == "deny"
        known = client.get_sealed(etcd_prefix + "known")
        assert known is not None and known.stale and known.data == b"known-good value"
        assert (
            client.store.metrics.registry.get_sample_value(
                "defender_etcd_stale_reads_total", {"op": "get"}
            )
            >= 2
        )

        # The operator's own probe and decision: a surviving member answers, but without
        # quorum heartbeats cannot be written, so their absence must not restart any pod.
        health = backend.health()
        assert not health.quorum, health
        now = datetime.now(UTC)
        tracker.record(now, health)
        long_ago = now - timedelta(hours=1)
        decision = decide_restart(
            now=now,
            pods=[PodView(f"firewall-{n}", created=long_ago) for n in range(3)],
            last_seen={f"firewall-{n}": long_ago for n in range(3)},
            watch_started=long_ago,
            etcd=tracker.view(),
            policy=HeartbeatPolicy(1, 3, 0),
            budget=RestartBudget(True, 5, 1800, 0, 0),
            restart_times=[],
        )
        assert decision.action is RestartAction.HOLD and decision.pod is None, decision
        # The probe reports a member that answers without quorum as unreachable (it cannot
        # serve a quorum read); either way the decision must be to hold.
        assert decision.reason in ("EtcdNoQuorum", "EtcdUnavailable"), decision

        for i in victims:
            restart_member(cluster, i)
        cluster.wait_for_leader()

        # The same client recovers without being recreated.
        wait_for("writes back", lambda: _writes(client, etcd_prefix + "after"), timeout=60)
        assert configs.commit("firewall", {**FIREWALL, "default_policy": "allow"}, by="test") == 2
        active = configs.get_active("firewall")
        assert not active.stale and active.version == 2
        # No assertion on "during-outage": a write that timed out has an unknown outcome (a
        # leader cut off from its followers may still commit it once they return).
        health = backend.health()
        assert health.reachable and health.quorum
        tracker.record(datetime.now(UTC), health)
        assert tracker.view().quorum
    finally:
        backend.client.close()
        client.close()
    assert alerts == [], "an outage is not a decoding problem: nothing to alert"


def _writes(client: DefenderClient, key: str) -> bool:
    try:
        client.put_sealed(key, b"back")
    except StoreUnavailableError:
        return False
    return True


@pytest.mark.slow
def test_rolling_kills_under_writes_and_commits_lose_nothing(
    healthy_etcd: EtcdCluster, etcd_prefix: str, alerts: list[Alert]
) -> None:
    """Every member in turn, then the leader three times, killed while a writer and a
    committer run; ACTIVE versions seen by a watcher only ever go up and end at the last
    committed version."""
    cluster = healthy_etcd
    keyring = new_keyring()
    client = make_client(cluster, etcd_prefix, keyring, alerts)
    committer_client = make_client(cluster, etcd_prefix, keyring, alerts)
    configs = ConfigStore(committer_client)
    configs.seed("firewall", FIREWALL, "firewall", by="test")
    seen: list[int | None] = []
    watch = ConfigStore(client).watch_active("firewall", lambda a: seen.append(a.version))
    stop = threading.Event()
    committed: list[int] = []
    commit_errors: list[BaseException] = []

    def committer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            rules = [{"id": f"r{n}", "action": "allow", "proto": "tcp", "ports": [1 + n % 60000]}]
            try:
                committed.append(configs.commit("firewall", {**FIREWALL, "rules": rules}, by="t"))
            except DefenderConfigError as exc:
                commit_errors.append(exc)
            time.sleep(0.02)

    writer = LedgerWriter(client, etcd_prefix).start()
    thread = threading.Thread(target=committer, daemon=True)
    thread.start()
    try:
        victims: list[int | None] = [0, 1, 2, None, None, None]  # None: the leader
        for victim in victims:
            i = leader_index(cluster) if victim is None else victim
            before, commits_before = len(writer.acked), len(committed)
            cluster.kill_member(i)
            wait_for(
                "writes during the kill", lambda b=before: len(writer.acked) >= b + 40, timeout=60
            )
            wait_for(
                "commits during kill", lambda c=commits_before: len(committed) >= c + 5, timeout=60
            )
            restart_member(cluster, i)
    finally:
        stop.set()
        writer.stop()
        thread.join(timeout=120)
    try:
        assert writer.failed == [] and commit_errors == []
        reader = make_client(cluster, etcd_prefix, keyring, alerts)
        try:
            assert_all_acknowledged_writes_present(cluster, etcd_prefix, reader, writer.acked)
        finally:
            reader.close()
        assert committed == sorted(committed) and len(set(committed)) == len(committed)
        final = configs.get_active("firewall").version
        assert final == committed[-1]
        wait_for(
            "the watcher to see the last version", lambda: seen and seen[-1] == final, timeout=60
        )
        versions = [v for v in seen if v is not None]
        assert versions == sorted(versions), f"ACTIVE went back: {versions}"
    finally:
        watch.cancel()
        client.close()
        committer_client.close()
    assert alerts == []
