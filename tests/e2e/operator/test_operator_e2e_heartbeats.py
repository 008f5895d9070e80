"""Heartbeats → restarts: a silent instance's pod is deleted and recreated by its controller;
an etcd quorum loss restarts nothing and says why; misconfiguration and the breaker."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from operator_e2e_support import (
    FAST_RESTARTS,
    SNIFFER_LABELS,
    OperatorRun,
    free_port,
    wait_for,
)
from operator_e2e_support import metric as _metric

from defender_config import (
    ChangeKind,
    CodecMismatchError,
    ConfigStore,
    UnknownKeyError,
    contract,
)

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]

LABELS = SNIFFER_LABELS
FAST = FAST_RESTARTS


def _pod_names(run: OperatorRun) -> set[str]:
    return {p.metadata.name for p in run.pods(LABELS)}


def _running_sniffer(run: OperatorRun, replicas: int) -> set[str]:
    run.apply_sample("sniffer", **FAST)
    run.wait_active_version("sniffer", 1)
    run.deployment("sniffer", LABELS, replicas=replicas)
    pods = wait_for(
        f"{replicas} pods", lambda: len(_pod_names(run)) == replicas and _pod_names(run)
    )
    for pod in sorted(pods):
        run.heartbeat("sniffer", pod)
    run.wait_condition("sniffer", "Heartbeating", status="True")
    return pods


def test_silent_instance_pod_is_restarted_by_its_controller(operator_run: OperatorRun) -> None:
    run = operator_run
    metrics_port = free_port()
    run.start(DEFENDER_OPERATOR_METRICS_PORT=str(metrics_port))
    pods = _running_sniffer(run, replicas=2)
    victim, survivor = sorted(pods)
    # Stop one instance's heartbeats the hard way: its lease is revoked, the key vanishes.
    next(hb for hb in run.heartbeaters if hb.instance == victim).stop()

    wait_for("victim pod deleted", lambda: victim not in _pod_names(run), timeout=60)
    replacement = wait_for(
        "replacement pod from the ReplicaSet",
        lambda: (_pod_names(run) - {survivor}) or None,
        timeout=60,
    )
    assert survivor in _pod_names(run), "only the silent pod may be restarted"
    assert replacement and victim not in replacement
    status = wait_for(
        "restart counted", lambda: (s := run.get("sniffer")["status"])["restarts"] == 1 and s
    )
    assert status["restarts"] == 1
    run.wait_event("sniffer", "PodRestarted")
    assert "PodRestarted" in _alert_kinds(run.client().store, f"{run.prefix}/alerts/sniffer/")
    # The replacement heartbeats again: the component is healthy with no further restarts.
    run.heartbeat("sniffer", next(iter(replacement)))
    run.wait_condition("sniffer", "Heartbeating", status="True")
    assert run.get("sniffer")["status"]["restarts"] == 1
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        metrics = resp.read().decode()
    assert 'defender_operator_pod_restarts_total{component="sniffer"} 1.0' in metrics
    assert "defender_operator_etcd_available 1.0" in metrics


def test_an_operator_restart_leaves_a_healthy_component_ready(operator_run: OperatorRun) -> None:
    # Restarting the operator changes nothing that is already right: no condition flaps to
    # Pending while the new operator has not yet watched a full heartbeat threshold.
    run = operator_run
    run.start()
    _running_sniffer(run, replicas=1)
    ready = run.wait_condition("sniffer", "Ready", status="True")
    before = {c["type"]: c for c in run.get("sniffer")["status"]["conditions"]}
    run.stop()
    run.start()
    seen = []
    deadline = time.monotonic() + 10  # several passes, well past the 3 s threshold
    while time.monotonic() < deadline:
        seen.append({c["type"]: c for c in run.get("sniffer")["status"]["conditions"]})
        time.sleep(0.3)
    for conditions in seen:
        assert conditions["Ready"]["status"] == "True", conditions["Ready"]
        for ctype, was in before.items():
            assert conditions[ctype]["status"] == was["status"], (ctype, conditions[ctype])
            assert conditions[ctype]["lastTransitionTime"] == was["lastTransitionTime"]
    assert seen[-1]["Ready"]["lastTransitionTime"] == ready["lastTransitionTime"]
    assert run.get("sniffer")["status"]["restarts"] == 0


def test_expiry_arrives_through_the_watch_not_a_poll(operator_run: OperatorRun) -> None:
    """With the full re-read every 300 s, only the watch's delete event (and the survivor's
    lease, read each pass, keeping it fresh) can explain a timely, correct restart."""
    run = operator_run
    metrics_port = free_port()
    run.start(
        DEFENDER_OPERATOR_METRICS_PORT=str(metrics_port),
        DEFENDER_OPERATOR_HEARTBEAT_RESYNC_SECONDS="300",
        DEFENDER_OPERATOR_LIVENESS_WATCH_STALL_SECONDS="600",
    )
    pods = _running_sniffer(run, replicas=2)
    victim, survivor = sorted(pods)
    wait_for(
        "the first full read",
        lambda: _metric(metrics_port, "defender_operator_heartbeat_resyncs_total") == 1.0,
    )
    direct_before = _metric(metrics_port, "defender_operator_heartbeat_direct_reads_total")
    deletes_before = _metric(
        metrics_port, 'defender_operator_heartbeat_events_total{kind="delete"}'
    )
    next(hb for hb in run.heartbeaters if hb.instance == victim).stop()

    # Far below the 300 s resync: the restart is driven by the watch.
    wait_for("victim pod deleted", lambda: victim not in _pod_names(run), timeout=60)
    assert survivor in _pod_names(run), "the survivor's heartbeats arrive by watch too"
    assert (
        _metric(metrics_port, 'defender_operator_heartbeat_events_total{kind="delete"}')
        > deletes_before
    )
    assert _metric(metrics_port, "defender_operator_heartbeat_resyncs_total") == 1.0
    assert (
        _metric(metrics_port, "defender_operator_heartbeat_direct_reads_total") == direct_before
    ), "the monitor read etcd directly instead of the watch view"
    restarts = wait_for("restart counted", lambda: run.get("sniffer")["status"].get("restarts"))
    assert restarts == 1
    assert _liveness(run) == 200


def _liveness(run: OperatorRun) -> int:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{run.liveness_port}/healthz", timeout=5
        ) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_etcd_quorum_loss_restarts_nothing(operator_run: OperatorRun) -> None:
    run = operator_run
    run.start(
        DEFENDER_OPERATOR_LIVENESS_ETCD_MAX_UNAVAILABLE_SECONDS="4",
        DEFENDER_ETCD__TIMEOUT_SECONDS="1",
        DEFENDER_ETCD__RETRIES="1",
    )
    pods = _running_sniffer(run, replicas=2)
    assert wait_for("liveness 200", lambda: _liveness(run) == 200)
    etcd = run.etcd
    stopped = [1, 2]
    for i in stopped:
        etcd.stop_member(i)
    try:
        # A component created during the outage says why it is not seeded yet.
        run.apply_sample("firewall")
        synced = run.wait_condition(
            "firewall", "ConfigSynced", reason="StoreUnavailable", timeout=90
        )
        assert synced["status"] == "Unknown"
        # One member still answers, without quorum: that is EtcdNoQuorum, not unreachable.
        cond = run.wait_condition("sniffer", "Heartbeating", reason="EtcdNoQuorum", timeout=60)
        assert cond["status"] == "Unknown"
        # Heartbeats cannot be written now; wait well past the restart threshold (3 s).
        time.sleep(12)
        assert _pod_names(run) == pods
        assert run.get("sniffer")["status"]["restarts"] == 0
        ready = run.condition("sniffer", "Ready")
        assert ready is not None and ready["status"] == "Unknown"
        # The operator's liveness fails once etcd has been gone longer than the limit (4 s);
        # kopf caches probe results for 10 s.
        wait_for("liveness 500", lambda: _liveness(run) == 500, timeout=30)
    finally:
        for i in stopped:
            etcd.restart_member(i)
        etcd.wait_for_leader()
    # Back to normal, still without a restart: the heartbeaters re-register on their own.
    run.wait_condition("sniffer", "Heartbeating", status="True", timeout=90)
    assert _pod_names(run) == pods
    assert run.get("sniffer")["status"]["restarts"] == 0
    # kopf retries the firewall reconcile: seeded once etcd is back.
    run.wait_active_version("firewall", 1, timeout=90)
    wait_for("liveness 200 again", lambda: _liveness(run) == 200, timeout=30)


def _alert_kinds(store: Any, prefix: str) -> set[str]:
    return {json.loads(v.value)["kind"] for v in store.list_prefix(prefix)}


def test_decode_errors_set_misconfigured(operator_run: OperatorRun) -> None:
    run = operator_run
    run.start()
    pods = _running_sniffer(run, replicas=1)
    hb = next(h for h in run.heartbeaters if h.instance in pods)
    hb.update(last_error=UnknownKeyError("k9", ["k1"]))
    cond = run.wait_condition("sniffer", "Misconfigured", status="True")
    assert cond["reason"] == "UnknownKey"
    assert hb.instance in cond["message"]
    assert run.condition("sniffer", "Ready")["reason"] == "UnknownKey"  # type: ignore[index]
    run.wait_event("sniffer", "UnknownKey")
    # ... and an alert record where rag reads alerts.
    store = run.client().store
    wait_for(
        "Misconfigured alert in etcd",
        lambda: "Misconfigured" in _alert_kinds(store, f"{run.prefix}/alerts/sniffer/"),
    )
    hb.update(last_error=None)
    run.wait_condition("sniffer", "Misconfigured", status="False")


def _two_instances_on_version_2(run: OperatorRun) -> set[str]:
    """Two heartbeating sniffer pods, a breaker that trips above 1, and ACTIVE version 2."""
    run.start()
    pods = _running_sniffer(run, replicas=2)
    run.patch("sniffer", {"spec": {"rollout": {"maxUnhealthyInstances": 1}}})
    run.patch("sniffer", {"spec": {"config": {"snaplen": 512}}})
    run.wait_active_version("sniffer", 2)
    return pods


def _fail_and_wait_frozen(run: OperatorRun, pods: set[str]) -> None:
    """Both instances report a decode error: more than 1 → the breaker trips."""
    for hb in run.heartbeaters:
        if hb.instance in pods:
            hb.update(last_error=CodecMismatchError("zstd", "none"))
    wait_for("frozen", lambda: run.get("sniffer")["status"].get("frozen") is True, timeout=60)


def test_breaker_freezes_and_reverts_a_bad_change(operator_run: OperatorRun) -> None:
    run = operator_run
    pods = _two_instances_on_version_2(run)
    # Both instances fail to decode right after the change: more than 1 → trip.
    _fail_and_wait_frozen(run, pods)
    configs = run.configs()
    active = configs.get_active("sniffer")
    assert active.version == 3
    assert active.config["snaplen"] == 256  # version 1's value, restored as version 3
    assert active.metadata is not None and active.metadata.change is ChangeKind.BREAKER_REVERT
    run.wait_event("sniffer", "BlastRadiusExceeded")
    # Further commits are refused while frozen, and say so.
    run.patch("sniffer", {"spec": {"config": {"snaplen": 1024}}})
    cond = run.wait_condition("sniffer", "ConfigSynced", reason="Frozen")
    assert "unfreeze" in cond["message"]
    assert configs.get_active("sniffer").version == 3
    # A person fixes things and lifts the freeze: the pending spec is committed.
    for hb in run.heartbeaters:
        hb.update(last_error=None)
    run.patch("sniffer", {"metadata": {"annotations": {contract.UNFREEZE_ANNOTATION: "now"}}})
    wait_for("version 4", lambda: configs.get_active("sniffer").version == 4, timeout=60)
    active = configs.get_active("sniffer")
    assert active.config["snaplen"] == 1024
    assert active.metadata is not None and active.metadata.change is ChangeKind.COMMIT


def test_forged_heartbeats_naming_real_pods_do_not_trip_the_breaker(
    operator_run: OperatorRun,
) -> None:
    """etcd write access alone: records naming both real pods, reporting a decode error right
    after the change, under a lease the attacker keeps. Unsigned, they steer nothing: reported,
    and version 2 stays."""
    run = operator_run
    pods = _two_instances_on_version_2(run)
    client = run.client()
    store = client.store
    lease = store.grant_lease(60)
    try:
        for pod in sorted(pods):
            record = {
                "component": "sniffer",
                "instance": f"{pod}-x",
                "pod": pod,
                "status": "RUNNING",
                "time": "2026-12-05T00:00:00+00:00",
                "config_version": 2,
                "last_error": {"reason": "CodecMismatch", "detail": "forged"},
            }
            store.put(
                client.layout.instance("sniffer", f"{pod}-x"),
                json.dumps(record).encode(),
                lease=lease,
            )
        # A pass may come between the two puts: wait for the one that saw both.
        wait_for(
            "both forged records reported",
            lambda: (
                "2 heartbeat record(s) fail authentication (ignored)"
                in (run.condition("sniffer", "Heartbeating") or {}).get("message", "")
            ),
            timeout=60,
        )
        run.wait_event("sniffer", "UnverifiedInstances")
        events = [e for e in run.events("sniffer") if e.reason == "UnverifiedInstances"]
        assert all("no MAC" in e.message for e in events)
        assert run.condition("sniffer", "Heartbeating")["status"] == "True"  # type: ignore[index]
        assert run.get("sniffer")["status"]["instances"] == {"alive": 2, "expected": 2}
        assert run.get("sniffer")["status"].get("frozen") is not True
        assert run.configs().get_active("sniffer").version == 2
        assert run.condition("sniffer", "Misconfigured")["status"] == "False"  # type: ignore[index]
    finally:
        store.revoke_lease(lease)


def _frozen_with_saved_marker(run: OperatorRun) -> tuple[ConfigStore, str, bytes]:
    """Version 2 on two instances, the breaker tripped on it; the freeze marker as someone
    who can read etcd saves it."""
    pods = _two_instances_on_version_2(run)
    _fail_and_wait_frozen(run, pods)
    configs = run.configs()
    marker = configs.client.layout.freeze("sniffer")
    saved = configs.client.store.get(marker)
    assert saved is not None
    return configs, marker, saved.value


def _put_back_and_removed(run: OperatorRun, marker: str, value: bytes) -> None:
    store = run.configs().client.store
    store.put(marker, value)
    wait_for("the replayed marker removed", lambda: store.get(marker) is None, timeout=30)
    run.wait_event("sniffer", "FreezeReplayed")


def test_a_saved_freeze_marker_put_back_after_an_unfreeze_is_removed(
    operator_run: OperatorRun,
) -> None:
    # docs/security.md ("Replays"): the breaker's authentic freeze marker, saved by someone
    # who can read etcd, put back with a raw put after a person lifted the freeze. It must not
    # hold commits until a person unfreezes again.
    run = operator_run
    configs, marker, saved = _frozen_with_saved_marker(run)
    client = configs.client
    for hb in run.heartbeaters:
        hb.update(last_error=None)
    run.patch("sniffer", {"metadata": {"annotations": {contract.UNFREEZE_ANNOTATION: "now"}}})
    wait_for("unfrozen", lambda: run.get("sniffer")["status"].get("frozen") is False, timeout=60)
    assert client.store.get(marker) is None

    _put_back_and_removed(run, marker, saved)
    # Commits go on: the next spec change is committed, not refused as frozen.
    run.patch("sniffer", {"spec": {"config": {"snaplen": 1024}}})
    wait_for("version 4", lambda: configs.get_active("sniffer").version == 4, timeout=60)
    assert configs.get_active("sniffer").config["snaplen"] == 1024
    assert run.get("sniffer")["status"].get("frozen") is False


def test_a_freeze_lifted_by_a_key_holder_cannot_be_put_back(operator_run: OperatorRun) -> None:
    # docs/security.md ("Replays", item 6): the freeze is lifted by ConfigStore.unfreeze (a
    # plugin holding the key), not by the operator's unfreeze command. The operator saw the
    # marker, sees it gone, and anchors it as lifted: the saved marker put back is removed.
    run = operator_run
    configs, marker, saved = _frozen_with_saved_marker(run)
    frozen = configs.frozen("sniffer")
    assert frozen is not None
    wait_for(
        "the marker published in status",
        lambda: run.get("sniffer")["status"].get("freezeSequence") == frozen.sequence,
        timeout=30,
    )
    for hb in run.heartbeaters:
        hb.update(last_error=None)
    configs.unfreeze("sniffer")
    wait_for(
        "the lift anchored",
        lambda: run.get("sniffer")["status"].get("freezeLiftedSequence") == frozen.sequence,
        timeout=30,
    )
    wait_for("unfrozen", lambda: run.get("sniffer")["status"].get("frozen") is False, timeout=30)

    _put_back_and_removed(run, marker, saved)
    run.patch("sniffer", {"spec": {"config": {"snaplen": 1024}}})
    wait_for("version 4", lambda: configs.get_active("sniffer").version == 4, timeout=60)
    assert configs.get_active("sniffer").config["snaplen"] == 1024


def test_a_new_operator_keeps_guarding_a_change_committed_before_it(
    operator_run: OperatorRun,
) -> None:
    # The operator that committed version 2 stops before the instances fail; the next one
    # learns of the change from etcd and trips on it inside its window.
    run = operator_run
    pods = _two_instances_on_version_2(run)
    run.stop()
    run.start()
    _fail_and_wait_frozen(run, pods)
    active = run.configs().get_active("sniffer")
    assert (active.version, active.config["snaplen"]) == (3, 256)
    run.wait_event("sniffer", "BlastRadiusExceeded")


def test_restart_budget_exhausted_marks_degraded_and_stops(operator_run: OperatorRun) -> None:
    run = operator_run
    run.start()
    budget = {"maxRestarts": 1, "windowSeconds": 600, "backoffBaseSeconds": 0}
    run.apply_sample("sniffer", **{**FAST, "restartBudget": budget})
    run.wait_active_version("sniffer", 1)
    run.deployment("sniffer", LABELS, replicas=1)
    # The pod never heartbeats: restarted once after its grace, then the replacement never
    # heartbeats either, and the budget (1) is spent.
    first = wait_for("a pod", lambda: _pod_names(run))
    wait_for("first pod restarted", lambda: first.isdisjoint(_pod_names(run)), timeout=60)
    cond = run.wait_condition("sniffer", "Heartbeating", reason="RestartBudgetExhausted")
    assert cond["status"] == "False"
    run.wait_event("sniffer", "RestartBudgetExhausted")
    survivor = _pod_names(run)
    time.sleep(8)  # well past another threshold + grace: nothing more is restarted
    assert _pod_names(run) == survivor
    status = run.get("sniffer")["status"]
    assert status["restarts"] == 1
    assert len(status["recentRestartTimes"]) == 1
    # A new operator (restarted, or a standby taking over) inherits the spent budget from the
    # status: it restarts nothing and does not announce the exhausted budget a second time.
    run.stop()
    run.start()
    run.patch("sniffer", {"spec": {"version": "1.0.1"}})
    wait_for(
        "the new operator to handle the component",
        lambda: (
            run.get("sniffer")["status"]["observedGeneration"]
            == run.get("sniffer")["metadata"]["generation"]
        ),
    )
    time.sleep(8)  # the new operator's own threshold (3 s) and then some
    assert _pod_names(run) == survivor
    assert run.get("sniffer")["status"]["restarts"] == 1
    exhausted = [e for e in run.events("sniffer") if e.reason == "RestartBudgetExhausted"]
    assert sum(e.count or 1 for e in exhausted) == 1, [e.metadata.name for e in exhausted]
    cond = run.condition("sniffer", "Heartbeating")
    assert cond is not None and cond["reason"] == "RestartBudgetExhausted"
