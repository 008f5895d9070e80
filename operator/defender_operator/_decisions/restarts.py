"""Whether to restart one of a component's pods because its heartbeats stopped."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

from defender_operator._decisions.conditions import parse_rfc3339


class RestartAction(StrEnum):
    NONE = "None"  # every pod is heartbeating (or still in its grace period)
    RESTART = "Restart"  # delete `pod`; its controller recreates it
    HOLD = "Hold"  # stale pods exist but restarting now would be wrong (see reason)
    DEGRADED = "Degraded"  # restart budget spent: stop and tell a person


@dataclass(frozen=True)
class PodView:
    name: str
    created: datetime
    deleting: bool = False
    # When its containers were last all running; the startup grace counts from then, since
    # under load a kubelet may take longer than the grace to pull, create and start them.
    started: datetime | None = None
    # A kubelet is still starting it: not judged (deleting it only restarts the same wait).
    starting: bool = False

    @property
    def grace_from(self) -> datetime:
        return max(self.created, self.started) if self.started else self.created


@dataclass(frozen=True)
class EtcdView:
    """etcd health as the operator last measured it."""

    reachable: bool
    quorum: bool
    # Since when etcd has been continuously reachable with quorum (None = not healthy now).
    healthy_since: datetime | None
    # False while the NOSPACE alarm refuses writes: heartbeats cannot be written either.
    writable: bool = True


# The longest lease an instance may advertise and still be waited for: the API's largest
# spec.heartbeat (3600 s x 100 misses). A record claiming more was not written by a heartbeater
# (the library's cadence is bounded the same way) and is not trusted to postpone a restart.
MAX_HONOURED_LEASE_TTL_SECONDS = 3600 * 100


@dataclass(frozen=True)
class HeartbeatPolicy:
    interval_seconds: int
    missed_before_restart: int
    startup_grace_seconds: int

    @property
    def threshold(self) -> timedelta:
        return timedelta(seconds=self.interval_seconds * self.missed_before_restart)

    @property
    def grace(self) -> timedelta:
        return timedelta(seconds=self.startup_grace_seconds)

    def patience(self, lease_ttl_seconds: int | None) -> timedelta:
        """How long after its last heartbeat an instance is judged: the spec's threshold, or
        the lease TTL the instance advertises when that is longer (the later deadline wins).

        An instance only learns a new spec.heartbeat at its next beat; until then it beats at
        its old interval under its old, longer lease, and judging it by the new, shorter
        threshold would restart a healthy pod. A shorter advertised TTL does not shorten the
        spec's threshold: its lease expiry is seen as a delete anyway."""
        if lease_ttl_seconds is None or lease_ttl_seconds <= 0:
            return self.threshold
        ttl = timedelta(seconds=min(lease_ttl_seconds, MAX_HONOURED_LEASE_TTL_SECONDS))
        return max(self.threshold, ttl)


@dataclass(frozen=True)
class RestartBudget:
    enabled: bool
    max_restarts: int
    window_seconds: int
    backoff_base_seconds: int
    backoff_max_seconds: int


@dataclass(frozen=True)
class RestartDecision:
    action: RestartAction
    reason: str
    message: str
    pod: str | None = None
    stale_pods: tuple[str, ...] = field(default=())
    retry_after: datetime | None = None


def stale_pods(
    now: datetime,
    pods: Sequence[PodView],
    last_seen: Mapping[str, datetime],
    watch_started: datetime,
    policy: HeartbeatPolicy,
    lease_ttls: Mapping[str, int] | None = None,
) -> list[tuple[datetime, str]]:
    """Pods whose heartbeat deadline has passed, as (deadline, name), oldest deadline first.

    A pod never seen heartbeating gets its startup grace, and the operator must itself have
    watched for a full threshold: right after an operator restart, "no heartbeat seen" only
    means "not seen yet". `lease_ttls` holds the lease TTL each pod's instance last
    advertised (see `HeartbeatPolicy.patience`).
    """
    out = []
    for pod in pods:
        deadline = _deadline(pod, last_seen, watch_started, policy, lease_ttls)
        if deadline is not None and now > deadline:
            out.append((deadline, pod.name))
    return sorted(out)


def next_deadline(
    now: datetime,
    pods: Sequence[PodView],
    last_seen: Mapping[str, datetime],
    watch_started: datetime,
    policy: HeartbeatPolicy,
    lease_ttls: Mapping[str, int] | None = None,
    announced: Collection[str] = (),
) -> datetime | None:
    """The earliest future moment a pod turns stale if nothing new arrives, so the monitor can
    judge it then instead of at its next interval; None when no such moment is ahead.

    Pods in `announced` are left out: each has a live instance on a lease, in a view an etcd
    watch keeps, so its end arrives as the delete etcd makes when the lease expires. Its
    deadline cannot come first: while the lease exists, last seen + TTL is never before now
    (`patience` waits at least the TTL), so a pass at it would find the pod alive, ask etcd
    for a sighting, and plan the next such pass (at 1 s heartbeats, one pass and one lease
    request per pod every ~2 s, issue #17)."""
    ahead = []
    for pod in pods:
        if pod.name in announced:
            continue
        deadline = _deadline(pod, last_seen, watch_started, policy, lease_ttls)
        if deadline is not None and deadline >= now:
            ahead.append(deadline)
    return min(ahead, default=None)


class Leased(Protocol):
    """What `announced_pods` reads of an instance record."""

    @property
    def pod(self) -> str | None: ...
    @property
    def lease_id(self) -> int: ...
    @property
    def lease_ttl_seconds(self) -> int | None: ...


def announced_pods(live: Iterable[Leased]) -> frozenset[str]:
    """The pods of `live` instances whose end etcd announces (`next_deadline`): each bound to
    a lease whose TTL it advertises and the operator honours. A record without one (an older
    heartbeater's, or a lease longer than the operator waits out) is judged by its deadline."""
    return frozenset(
        i.pod
        for i in live
        if i.pod
        and i.lease_id
        and i.lease_ttl_seconds is not None
        and 0 < i.lease_ttl_seconds <= MAX_HONOURED_LEASE_TTL_SECONDS
    )


def _deadline(
    pod: PodView,
    last_seen: Mapping[str, datetime],
    watch_started: datetime,
    policy: HeartbeatPolicy,
    lease_ttls: Mapping[str, int] | None,
) -> datetime | None:
    """When `pod` turns stale if nothing new arrives; None for a pod already being deleted or
    still being started by its kubelet. A pod never seen heartbeating gets its startup grace
    (from when its containers started), and the operator must itself have watched for a full
    threshold first."""
    if pod.deleting or pod.starting:
        return None
    seen = last_seen.get(pod.name)
    if seen is None:
        return max(pod.grace_from + policy.grace, watch_started + policy.threshold)
    patience = policy.patience((lease_ttls or {}).get(pod.name))
    return max(seen + patience, pod.grace_from + policy.grace)


def budget_report(action: RestartAction, reported: bool, recovered: bool) -> tuple[bool, bool]:
    """(whether the exhausted budget stands reported, whether to announce it now).

    Announced once per exhaustion. It ends when a restart goes through again (the window
    moved on) or every pod heartbeats (`recovered`); a pass that merely finds no pod stale
    yet does not end it: a new operator must watch for a full threshold before judging, and
    its first passes would otherwise announce the same exhaustion again."""
    if action is RestartAction.DEGRADED:
        return True, not reported
    if action is RestartAction.RESTART or recovered:
        return False, False
    return reported, False


def restart_history(stored: object, limit: int) -> list[datetime]:
    """Restart times kept in `status.recentRestartTimes`, so the budget and the backoff survive
    an operator restart or a failover to another replica: the newest `limit`, oldest first.

    The status is ours, but a person can edit it: entries that are not RFC 3339 times with a
    zone are dropped rather than trusted or fatal."""
    if not isinstance(stored, list):
        return []
    times = [t for t in map(parse_rfc3339, stored) if t is not None]
    return sorted(times)[-limit:] if limit > 0 else []


def backoff(budget: RestartBudget, recent_restarts: int) -> timedelta:
    """Wait before the next restart: 0 for the first, then base, 2*base, 4*base... capped."""
    if recent_restarts <= 0:
        return timedelta(0)
    seconds = budget.backoff_base_seconds * 2 ** min(recent_restarts - 1, 30)
    return timedelta(seconds=min(seconds, budget.backoff_max_seconds))


def decide_restart(
    *,
    now: datetime,
    pods: Sequence[PodView],
    last_seen: Mapping[str, datetime],
    watch_started: datetime,
    etcd: EtcdView,
    policy: HeartbeatPolicy,
    budget: RestartBudget,
    restart_times: Sequence[datetime],
    lease_ttls: Mapping[str, int] | None = None,
) -> RestartDecision:
    """Pick at most one pod to restart, or say why not.

    etcd health is checked first: when etcd is unreachable or without quorum, heartbeats cannot
    be written, so their absence says nothing about the pods, and restarting would turn one
    outage into two. After etcd recovers, restarts wait one full heartbeat threshold so
    instances have time to re-register.
    """
    if not etcd.reachable:
        return RestartDecision(
            RestartAction.HOLD,
            "EtcdUnavailable",
            "defender etcd is unreachable: heartbeats cannot be judged, no pod is restarted",
        )
    if not etcd.quorum:
        return RestartDecision(
            RestartAction.HOLD,
            "EtcdNoQuorum",
            "defender etcd has lost quorum: heartbeats cannot be judged, no pod is restarted",
        )
    if not etcd.writable:
        return RestartDecision(
            RestartAction.HOLD,
            "EtcdNoSpace",
            "defender etcd refuses writes (NOSPACE alarm): heartbeats cannot be written, no pod"
            " is restarted",
        )
    stale = stale_pods(now, pods, last_seen, watch_started, policy, lease_ttls)
    names = tuple(name for _, name in stale)
    if not stale:
        return RestartDecision(RestartAction.NONE, "Heartbeating", "every pod is heartbeating")
    if etcd.healthy_since is None or now - etcd.healthy_since < policy.threshold:
        return RestartDecision(
            RestartAction.HOLD,
            "EtcdRecovering",
            "defender etcd recovered recently: waiting one heartbeat threshold before judging",
            stale_pods=names,
        )
    if not budget.enabled:
        return RestartDecision(
            RestartAction.HOLD,
            "RestartsDisabled",
            f"{len(names)} pod(s) missed heartbeats; restartBudget.enabled is false",
            stale_pods=names,
        )
    window_start = now - timedelta(seconds=budget.window_seconds)
    recent = sorted(t for t in restart_times if t > window_start)
    if len(recent) >= budget.max_restarts:
        # A restart is allowed again once enough of these leave the window.
        freed = recent[len(recent) - budget.max_restarts] if budget.max_restarts > 0 else None
        return RestartDecision(
            RestartAction.DEGRADED,
            "RestartBudgetExhausted",
            f"{len(recent)} restarts within {budget.window_seconds}s did not bring the pods"
            f" back; stopped restarting. Check the pods' logs: {', '.join(names)}",
            stale_pods=names,
            retry_after=(
                freed + timedelta(seconds=budget.window_seconds) if freed is not None else None
            ),
        )
    if any(p.deleting for p in pods):
        return RestartDecision(
            RestartAction.HOLD,
            "RestartInProgress",
            "a pod of this component is still terminating; one restart at a time",
            stale_pods=names,
        )
    if recent:
        last = recent[-1]
        replacement_starting = any(
            p.created >= last and p.name not in last_seen and now < p.created + policy.grace
            for p in pods
        )
        if replacement_starting:
            return RestartDecision(
                RestartAction.HOLD,
                "RestartInProgress",
                "the last restarted pod's replacement is still starting; one restart at a time",
                stale_pods=names,
            )
        not_before = last + backoff(budget, len(recent))
        if now < not_before:
            return RestartDecision(
                RestartAction.HOLD,
                "RestartBackoff",
                f"waiting until {not_before.isoformat()} before the next restart",
                stale_pods=names,
                retry_after=not_before,
            )
    pod = names[0]
    waited = policy.patience((lease_ttls or {}).get(pod))
    return RestartDecision(
        RestartAction.RESTART,
        "MissedHeartbeats",
        f"pod {pod} missed {policy.missed_before_restart} heartbeats"
        f" ({policy.interval_seconds}s interval, no heartbeat for over"
        f" {int(waited.total_seconds())}s); restarting it",
        pod=pod,
        stale_pods=names,
    )
