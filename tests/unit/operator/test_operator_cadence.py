"""One cadence: the deadline is the later of spec.heartbeat's threshold and the lease TTL an
instance advertises, and an instance that beats after the cadence was published but runs
another one is named in the HeartbeatCadence condition."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from defender_operator._decisions import conditions as c
from defender_operator._decisions.cadence import (
    CLOCK_SLACK,
    HEARTBEAT_CADENCE,
    InstanceBeat,
    SpecCadence,
    cadence_condition,
    off_cadence,
)
from defender_operator._decisions.restarts import (
    MAX_HONOURED_LEASE_TTL_SECONDS,
    EtcdView,
    HeartbeatPolicy,
    PodView,
    RestartAction,
    RestartBudget,
    RestartDecision,
    decide_restart,
    next_deadline,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OLD = T0 - timedelta(hours=1)
HEALTHY = EtcdView(reachable=True, quorum=True, healthy_since=OLD)
BUDGET = RestartBudget(True, 3, 600, 10, 40)
# The scenario: spec.heartbeat patched to 5 s x 2 while the agent still beats every
# 30 s under a 90 s lease.
NEW_SPEC = HeartbeatPolicy(interval_seconds=5, missed_before_restart=2, startup_grace_seconds=5)


def decision(now: datetime, seen: datetime, ttls: dict[str, int] | None) -> RestartDecision:
    return decide_restart(
        now=now,
        pods=[PodView("a", OLD)],
        last_seen={"a": seen},
        watch_started=OLD,
        etcd=HEALTHY,
        policy=NEW_SPEC,
        budget=BUDGET,
        restart_times=[],
        lease_ttls=ttls,
    )


def decide(now: datetime, seen: datetime, ttls: dict[str, int] | None) -> RestartAction:
    return decision(now, seen, ttls).action


def test_advertised_lease_longer_than_the_spec_postpones_the_judgement() -> None:
    seen = T0 - timedelta(seconds=20)  # 20 s > the spec's 10 s, < the advertised 90 s
    assert decide(T0, seen, None) is RestartAction.RESTART  # the measured hole
    assert decide(T0, seen, {"a": 90}) is RestartAction.NONE
    # ... but not forever: past the advertised lease the pod is judged.
    assert decide(seen + timedelta(seconds=91), seen, {"a": 90}) is RestartAction.RESTART


def test_a_shorter_advertised_lease_does_not_shorten_the_spec() -> None:
    seen = T0 - timedelta(seconds=8)  # within the spec's 10 s, past an advertised 4 s
    assert decide(T0, seen, {"a": 4}) is RestartAction.NONE
    assert decide(T0 + timedelta(seconds=3), seen, {"a": 4}) is RestartAction.RESTART


def test_patience_is_the_later_deadline_and_bounded() -> None:
    assert NEW_SPEC.patience(None) == timedelta(seconds=10)
    assert NEW_SPEC.patience(0) == timedelta(seconds=10)
    assert NEW_SPEC.patience(90) == timedelta(seconds=90)
    assert NEW_SPEC.patience(10**9) == timedelta(seconds=MAX_HONOURED_LEASE_TTL_SECONDS)


def test_next_deadline_follows_the_advertised_lease() -> None:
    seen = T0 - timedelta(seconds=20)
    pods = [PodView("a", OLD)]
    assert next_deadline(T0, pods, {"a": seen}, OLD, NEW_SPEC, {"a": 90}) == seen + timedelta(
        seconds=90
    )
    # Without it the deadline is already behind: nothing ahead.
    assert next_deadline(T0, pods, {"a": seen}, OLD, NEW_SPEC) is None


def test_restart_message_says_how_long_was_waited() -> None:
    d = decision(T0, T0 - timedelta(seconds=100), {"a": 90})
    assert d.action is RestartAction.RESTART
    assert "over 90s" in d.message


SPEC = SpecCadence(interval_seconds=5, lease_ttl_seconds=10, published=T0)


def beat(name: str, after: float, interval: float | None, ttl: int | None) -> InstanceBeat:
    return InstanceBeat(name, T0 + timedelta(seconds=after), interval, ttl)


def test_instances_not_yet_beaten_since_the_change_are_not_judged() -> None:
    # Still on the old cadence, but their last beat predates the published one.
    beats = [beat("a", -20, 30, 90), beat("b", CLOCK_SLACK.total_seconds(), 30, 90)]
    assert off_cadence(beats, SPEC) == []
    cond = cadence_condition(beats, SPEC)
    assert (cond.type, cond.status, cond.reason) == (HEARTBEAT_CADENCE, c.TRUE, "FollowsSpec")


def test_an_instance_that_beat_since_and_runs_another_cadence_is_named() -> None:
    beats = [
        beat("following", 10, 5, 10),
        beat("stuck", 10, 30, 90),
        beat("other-misses", 10, 5, 15),
        beat("older-heartbeater", 10, None, None),
    ]
    assert off_cadence(beats, SPEC) == ["other-misses", "stuck"]
    cond = cadence_condition(beats, SPEC)
    assert (cond.status, cond.reason) == (c.FALSE, "CadenceMismatch")
    assert "stuck (30s, lease 90s)" in cond.message
    assert "following" not in cond.message
    assert "5s, lease 10s" in cond.message


def test_cadence_condition_is_extra_and_never_blocks_ready() -> None:
    mismatch = cadence_condition([beat("stuck", 10, 30, 90)], SPEC)
    good = c.Observation(
        config=c.ConfigState.SYNCED,
        heartbeat=c.Cond(c.HEARTBEATING, c.TRUE, "Heartbeating"),
        key=c.Cond(c.KEY_CURRENT, c.TRUE, "KeyCurrent"),
        misconfig=c.Cond(c.MISCONFIGURED, c.FALSE, "NoErrors"),
        cadence=mismatch,
    )
    conds = {x.type: x for x in c.compute(good)}
    assert conds[HEARTBEAT_CADENCE] == mismatch
    assert conds[c.READY].status == c.TRUE
    without = c.compute(c.Observation())
    assert HEARTBEAT_CADENCE not in {x.type for x in without}
