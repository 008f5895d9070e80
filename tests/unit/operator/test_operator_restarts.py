"""decide_restart: missed heartbeats, grace, budget, backoff, and never during an etcd outage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from defender_operator._decisions.restarts import (
    EtcdView,
    HeartbeatPolicy,
    PodView,
    RestartAction,
    RestartBudget,
    backoff,
    budget_report,
    decide_restart,
    restart_history,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = HeartbeatPolicy(interval_seconds=10, missed_before_restart=3, startup_grace_seconds=60)
BUDGET = RestartBudget(
    enabled=True,
    max_restarts=3,
    window_seconds=600,
    backoff_base_seconds=10,
    backoff_max_seconds=40,
)
HEALTHY = EtcdView(reachable=True, quorum=True, healthy_since=T0 - timedelta(hours=1))
OLD = T0 - timedelta(hours=1)


def decide(now: datetime, pods: list[PodView], seen: dict[str, datetime], **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "now": now,
        "pods": pods,
        "last_seen": seen,
        "watch_started": OLD,
        "etcd": HEALTHY,
        "policy": POLICY,
        "budget": BUDGET,
        "restart_times": [],
    }
    args.update(kw)
    return decide_restart(**args)  # type: ignore[arg-type]


def test_fresh_heartbeats_mean_nothing_to_do() -> None:
    d = decide(T0, [PodView("a", OLD)], {"a": T0 - timedelta(seconds=29)})
    assert d.action is RestartAction.NONE


def test_missed_beyond_threshold_restarts_that_pod() -> None:
    pods = [PodView("a", OLD), PodView("b", OLD)]
    d = decide(T0, pods, {"a": T0 - timedelta(seconds=5), "b": T0 - timedelta(seconds=31)})
    assert d.action is RestartAction.RESTART
    assert d.pod == "b"
    assert d.reason == "MissedHeartbeats"


def test_the_stalest_pod_goes_first_and_only_one() -> None:
    pods = [PodView("a", OLD), PodView("b", OLD)]
    seen = {"a": T0 - timedelta(seconds=100), "b": T0 - timedelta(seconds=50)}
    d = decide(T0, pods, seen)
    assert d.pod == "a"
    assert d.stale_pods == ("a", "b")


def test_startup_grace_protects_a_new_pod() -> None:
    young = PodView("new", T0 - timedelta(seconds=59))
    assert decide(T0, [young], {}).action is RestartAction.NONE
    grown = PodView("new", T0 - timedelta(seconds=61))
    assert decide(T0, [grown], {}).action is RestartAction.RESTART


def test_grace_counts_from_when_the_containers_started() -> None:
    # Created 5 minutes ago, but the kubelet (busy machine) only got its containers running
    # 30 s ago: the agent still has its grace to register.
    late = PodView("new", T0 - timedelta(minutes=5), started=T0 - timedelta(seconds=30))
    assert decide(T0, [late], {}).action is RestartAction.NONE
    later = PodView("new", T0 - timedelta(minutes=5), started=T0 - timedelta(seconds=61))
    assert decide(T0 + timedelta(seconds=0), [later], {}).action is RestartAction.RESTART


def test_a_container_restarted_by_its_kubelet_gets_the_grace_again() -> None:
    # Its last beat is long gone (the old process died), the kubelet restarted it 10 s ago.
    pod = PodView("a", OLD, started=T0 - timedelta(seconds=10))
    assert decide(T0, [pod], {"a": T0 - timedelta(minutes=2)}).action is RestartAction.NONE
    hung = PodView("a", OLD, started=T0 - timedelta(minutes=3))
    d = decide(T0, [hung], {"a": T0 - timedelta(minutes=2)})
    assert d.action is RestartAction.RESTART and d.pod == "a"


def test_a_pod_its_kubelet_is_still_starting_is_never_judged() -> None:
    pulling = PodView("a", OLD, starting=True)
    assert decide(T0, [pulling], {}).action is RestartAction.NONE
    assert decide(T0, [pulling, PodView("b", OLD)], {}).pod == "b"


def test_after_operator_start_absence_must_be_watched_for_a_threshold() -> None:
    pod = PodView("a", OLD)
    just_started = T0 - timedelta(seconds=20)
    assert decide(T0, [pod], {}, watch_started=just_started).action is RestartAction.NONE
    assert decide(T0, [pod], {}, watch_started=T0 - timedelta(seconds=31)).pod == "a"


@pytest.mark.parametrize(
    ("etcd", "reason"),
    [
        (EtcdView(reachable=False, quorum=False, healthy_since=None), "EtcdUnavailable"),
        (EtcdView(reachable=True, quorum=False, healthy_since=None), "EtcdNoQuorum"),
        (
            EtcdView(reachable=True, quorum=True, healthy_since=T0 - timedelta(seconds=5)),
            "EtcdRecovering",
        ),
    ],
)
def test_never_restart_when_etcd_is_the_problem(etcd: EtcdView, reason: str) -> None:
    every_pod_silent = [PodView(n, OLD) for n in "abc"]
    d = decide(T0, every_pod_silent, {}, etcd=etcd)
    assert d.action is RestartAction.HOLD
    assert d.reason == reason
    assert d.pod is None


def test_disabled_budget_only_reports() -> None:
    budget = RestartBudget(False, 3, 600, 10, 40)
    d = decide(T0, [PodView("a", OLD)], {}, budget=budget)
    assert (d.action, d.reason, d.stale_pods) == (RestartAction.HOLD, "RestartsDisabled", ("a",))


def test_budget_exhausted_degrades() -> None:
    times = [T0 - timedelta(seconds=s) for s in (500, 300, 100)]
    d = decide(T0, [PodView("a", OLD)], {}, restart_times=times)
    assert d.action is RestartAction.DEGRADED
    assert d.reason == "RestartBudgetExhausted"
    # Judged again when the oldest of the three leaves the 600 s window (a restart is allowed
    # then), not whenever the next pass happens to come.
    assert d.retry_after == T0 + timedelta(seconds=100)
    just_before = T0 + timedelta(seconds=99)
    assert decide(just_before, [PodView("a", OLD)], {}, restart_times=times).action is (
        RestartAction.DEGRADED
    )
    assert decide(d.retry_after, [PodView("a", OLD)], {}, restart_times=times).action is not (
        RestartAction.DEGRADED
    )
    # Four within the window and a budget of three: two must leave before one more is allowed.
    four = [T0 - timedelta(seconds=s) for s in (550, 500, 300, 100)]
    assert decide(T0, [PodView("a", OLD)], {}, restart_times=four).retry_after == (
        T0 + timedelta(seconds=100)
    )
    # Restarts older than the window no longer count.
    older = [T0 - timedelta(seconds=s) for s in (900, 800, 700)]
    assert decide(T0, [PodView("a", OLD)], {}, restart_times=older).action is RestartAction.RESTART


def test_backoff_doubles_and_caps() -> None:
    assert [backoff(BUDGET, n).total_seconds() for n in range(5)] == [0, 10, 20, 40, 40]


def test_backoff_holds_the_next_restart() -> None:
    times = [T0 - timedelta(seconds=300), T0 - timedelta(seconds=15)]
    d = decide(T0, [PodView("a", OLD)], {}, restart_times=times)
    assert d.action is RestartAction.HOLD
    assert d.reason == "RestartBackoff"
    assert d.retry_after == T0 + timedelta(seconds=5)
    later = decide(T0 + timedelta(seconds=6), [PodView("a", OLD)], {}, restart_times=times)
    assert later.action is RestartAction.RESTART


def test_one_at_a_time_terminating_pod() -> None:
    pods = [PodView("a", OLD, deleting=True), PodView("b", OLD)]
    d = decide(T0, pods, {})
    assert (d.action, d.reason) == (RestartAction.HOLD, "RestartInProgress")


def test_one_at_a_time_replacement_still_starting() -> None:
    last = T0 - timedelta(seconds=120)
    replacement = PodView("a2", last + timedelta(seconds=1))
    stale = PodView("b", OLD)
    policy = HeartbeatPolicy(10, 3, startup_grace_seconds=300)
    d = decide(T0, [replacement, stale], {}, restart_times=[last], policy=policy)
    assert (d.action, d.reason) == (RestartAction.HOLD, "RestartInProgress")
    # Once the replacement heartbeats, the next stale pod may go.
    d = decide(T0, [replacement, stale], {"a2": T0}, restart_times=[last], policy=policy)
    assert d.pod == "b"


def test_recovering_etcd_does_not_hide_healthy_pods() -> None:
    etcd = EtcdView(reachable=True, quorum=True, healthy_since=T0 - timedelta(seconds=5))
    d = decide(T0, [PodView("a", OLD)], {"a": T0}, etcd=etcd)
    assert d.action is RestartAction.NONE


def test_restart_history_from_status_keeps_the_newest_valid_times() -> None:
    stored = [
        "2026-01-01T00:00:03Z",
        "2026-01-01T00:00:01Z",
        "2026-01-01T00:00:02+00:00",
        "yesterday",  # edited by hand: dropped, not fatal
        "2026-01-01T00:00:04",  # no zone: cannot be compared, dropped
        7,
    ]
    got = restart_history(stored, limit=2)
    assert got == [T0 + timedelta(seconds=2), T0 + timedelta(seconds=3)]
    assert restart_history(stored, limit=0) == []
    assert restart_history(None, limit=3) == []
    assert restart_history("2026-01-01T00:00:03Z", limit=3) == []


def test_a_budget_read_back_from_status_still_holds() -> None:
    # What a new operator does with the history the last one wrote: the budget stays spent.
    stored = ["2026-01-01T00:00:00Z"] * 3
    times = restart_history(stored, BUDGET.max_restarts)
    d = decide(T0 + timedelta(seconds=60), [PodView("a", OLD)], {}, restart_times=times)
    assert (d.action, d.reason) == (RestartAction.DEGRADED, "RestartBudgetExhausted")


def test_an_exhausted_budget_is_announced_once_until_pods_recover_or_a_restart_passes() -> None:
    degraded, hold, none, restart = (
        RestartAction.DEGRADED,
        RestartAction.HOLD,
        RestartAction.NONE,
        RestartAction.RESTART,
    )
    assert budget_report(degraded, reported=False, recovered=False) == (True, True)
    assert budget_report(degraded, reported=True, recovered=False) == (True, False)
    # A new operator first holds (etcd counts as recovering), then finds no pod stale *yet*
    # (it has not watched a full threshold): neither ends the reported exhaustion.
    assert budget_report(hold, reported=True, recovered=False) == (True, False)
    assert budget_report(none, reported=True, recovered=False) == (True, False)
    assert budget_report(hold, reported=False, recovered=False) == (False, False)
    # Every pod heartbeats again, or the window let a restart through: the next one is news.
    assert budget_report(none, reported=True, recovered=True) == (False, False)
    assert budget_report(restart, reported=True, recovered=False) == (False, False)
