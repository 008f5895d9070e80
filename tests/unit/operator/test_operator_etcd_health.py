"""The defender etcd's own health as the components see it: the EtcdHealthy condition, the
NOSPACE Event/alert transitions, no restart while NOSPACE refuses heartbeats, and metrics."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import REGISTRY

from defender_config.store import HealthReport, MemberHealth
from defender_operator._backend import EtcdHealth
from defender_operator._decisions.conditions import FALSE, TRUE, Observation, compute
from defender_operator._decisions.etcd import (
    ETCD_HEALTHY,
    EtcdFacts,
    etcd_condition,
    nospace_change,
)
from defender_operator._decisions.restarts import (
    EtcdView,
    HeartbeatPolicy,
    PodView,
    RestartAction,
    RestartBudget,
    decide_restart,
)
from defender_operator._etcd_health import etcd_health, record_metrics
from defender_operator._runtime import EtcdTracker

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def member(i: int, *, serving: bool = True, leader: bool = False, alarms: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    return MemberHealth(
        endpoint=f"127.0.0.1:{2379 + i}",
        healthy=serving and not alarms,
        member_id=100 + i if serving else None,
        name=f"etcd-{i}",
        is_leader=leader,
        db_size_bytes=4096 * (i + 1),
        db_size_in_use_bytes=2048,
        revision=42 + i,
        alarms=alarms,
        serving=serving,
        error=None if serving else "connection refused",
    )


def report(*members: MemberHealth) -> HealthReport:
    leader = next((m.member_id for m in members if m.is_leader and m.serving), None)
    return HealthReport(
        members=members,
        cluster_size=3,
        leader_id=leader,
        quorum=any(m.serving for m in members),
    )


def test_a_cluster_with_every_member_healthy_is_etcd_healthy() -> None:
    c = etcd_condition(EtcdFacts(True, True, 3, 3, (), "3/3 healthy"))
    assert (c.type, c.status, c.reason) == (ETCD_HEALTHY, TRUE, "EtcdHealthy")


def test_a_member_down_with_quorum_kept_is_degraded() -> None:
    health = etcd_health(report(member(0, leader=True), member(1), member(2, serving=False)))
    c = etcd_condition(EtcdFacts(True, True, 2, 3, (), health.detail))
    assert (c.status, c.reason) == (FALSE, "EtcdDegraded")
    assert "2/3 healthy" in c.message and "127.0.0.1:2381" in c.message


def test_nospace_wins_over_degraded_and_says_how_to_recover() -> None:
    c = etcd_condition(EtcdFacts(True, True, 0, 3, ("NOSPACE",), ""))
    assert (c.status, c.reason) == (FALSE, "EtcdNoSpace")
    assert "defrag --compact --disarm-nospace" in c.message


def test_unreachable_and_no_quorum_have_their_own_reasons() -> None:
    assert etcd_condition(EtcdFacts(False, False, 0, 3)).reason == "EtcdUnavailable"
    assert etcd_condition(EtcdFacts(True, False, 0, 3)).reason == "EtcdNoQuorum"
    assert etcd_condition(EtcdFacts(True, True, 3, 3, ("CORRUPT",))).reason == "EtcdAlarm"


def test_nospace_keeps_quorum_in_the_operator_view() -> None:
    alarms = ("NOSPACE",)
    health = etcd_health(
        report(
            member(0, leader=True, alarms=alarms),
            member(1, alarms=alarms),
            member(2, alarms=alarms),
        )
    )
    assert health.reachable and health.quorum
    assert health.alarms == ("NOSPACE",) and health.healthy_members == 0


def test_nospace_change_reports_start_and_end_once() -> None:
    assert nospace_change((), ("NOSPACE",)) == "raised"
    assert nospace_change(("NOSPACE",), ("NOSPACE",)) is None
    assert nospace_change(("NOSPACE",), ()) == "cleared"
    assert nospace_change((), ("CORRUPT",)) is None


def test_the_etcd_condition_is_informational_and_never_blocks_ready() -> None:
    bad = etcd_condition(EtcdFacts(True, True, 2, 3, (), "2/3 healthy"))
    conds = compute(Observation(etcd=bad))
    assert conds[-1] == bad
    assert next(c for c in conds if c.type == "Ready").reason != "EtcdDegraded"
    assert ETCD_HEALTHY not in {c.type for c in compute(Observation())}


POLICY = HeartbeatPolicy(interval_seconds=10, missed_before_restart=3, startup_grace_seconds=60)
BUDGET = RestartBudget(
    enabled=True,
    max_restarts=3,
    window_seconds=600,
    backoff_base_seconds=10,
    backoff_max_seconds=40,
)


def test_no_pod_is_restarted_while_nospace_refuses_heartbeats() -> None:
    old = T0 - timedelta(hours=1)
    decision = decide_restart(
        now=T0,
        pods=[PodView("p-0", old)],
        last_seen={"p-0": T0 - timedelta(minutes=10)},
        watch_started=old,
        etcd=EtcdView(reachable=True, quorum=True, healthy_since=old, writable=False),
        policy=POLICY,
        budget=BUDGET,
        restart_times=[],
    )
    assert (decision.action, decision.reason) == (RestartAction.HOLD, "EtcdNoSpace")


def test_after_nospace_ends_restarts_wait_one_threshold_again() -> None:
    tracker = EtcdTracker()
    ok = EtcdHealth(True, True, "3/3 healthy", 3, 3, ())
    full = EtcdHealth(True, True, "0/3 healthy", 0, 3, ("NOSPACE",))
    tracker.record(T0 - timedelta(hours=1), ok)
    tracker.record(T0 - timedelta(minutes=5), full)
    assert tracker.view().writable is False
    # NOSPACE is not an outage for the liveness probe: the operator is not restarted for it.
    assert tracker.healthy_since == T0 - timedelta(hours=1)
    assert tracker.unavailable_for(T0) == timedelta(0)
    tracker.record(T0, ok)
    view = tracker.view()
    assert view.writable and view.healthy_since == T0
    condition = tracker.condition()
    assert condition is not None and condition.reason == "EtcdHealthy"


def test_the_tracker_shows_no_etcd_condition_before_its_first_measurement() -> None:
    assert EtcdTracker().condition() is None


def test_metrics_show_members_leader_sizes_revision_and_alarms() -> None:
    record_metrics(
        report(member(0, leader=True, alarms=("NOSPACE",)), member(1), member(2, serving=False))
    )

    def value(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, labels)

    assert value("defender_operator_etcd_members_healthy") == 1
    assert value("defender_operator_etcd_member_is_leader", member="etcd-0") == 1
    assert value("defender_operator_etcd_member_healthy", member="etcd-2") == 0
    assert value("defender_operator_etcd_db_size_bytes", member="etcd-1") == 8192
    assert value("defender_operator_etcd_db_size_in_use_bytes", member="etcd-0") == 2048
    assert value("defender_operator_etcd_revision") == 44
    assert value("defender_operator_etcd_alarm", alarm="NOSPACE") == 1
    assert value("defender_operator_etcd_alarm", alarm="CORRUPT") == 0
