"""One monitoring pass over a component: heartbeats → restarts, misconfiguration, breaker,
key currency, status. A kopf daemon calls `tick` every `monitor_interval_seconds`.

All judgement is in `_decisions`; this module only gathers inputs and applies outcomes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import kopf

from defender_config import Cadence, DefenderConfigError
from defender_operator import _api
from defender_operator._backend import ComponentState, InstanceRecord
from defender_operator._decisions import conditions as cond
from defender_operator._decisions.breaker import (
    BreakerPolicy,
    evaluate_breaker,
    recovered_change,
)
from defender_operator._decisions.cadence import (
    InstanceBeat,
    SpecCadence,
    cadence_condition,
)
from defender_operator._decisions.misconfig import MISCONFIG_REASONS, Report, assess
from defender_operator._decisions.restarts import (
    HeartbeatPolicy,
    PodView,
    RestartAction,
    RestartBudget,
    RestartDecision,
    budget_report,
    decide_restart,
    next_deadline,
)
from defender_operator._errors import OperatorError
from defender_operator._keys import keyring_digest
from defender_operator._kube import Pod
from defender_operator._metrics import (
    BREAKER_TRIPS,
    ERRORS,
    HEARTBEAT_AGE,
    HEARTBEAT_DIRECT_READS,
    INSTANCES_ALIVE,
    RESTARTS,
)
from defender_operator._pods import PodIndex, select_pods
from defender_operator._reconcile import publish_status, recall, state_fields
from defender_operator._runtime import ComponentMemory, Runtime, utcnow

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]


def _rfc3339(when: datetime) -> str:
    return cond.rfc3339(when)


def heartbeat_condition(
    decision: RestartDecision, alive: int, expected: int, degraded: bool
) -> cond.Cond:
    if decision.reason in ("EtcdUnavailable", "EtcdNoQuorum", "EtcdRecovering"):
        return cond.Cond(cond.HEARTBEATING, cond.UNKNOWN, decision.reason, decision.message)
    if degraded or decision.action is RestartAction.DEGRADED:
        return cond.Cond(cond.HEARTBEATING, cond.FALSE, "RestartBudgetExhausted", decision.message)
    if expected == 0:
        return cond.Cond(
            cond.HEARTBEATING, cond.FALSE, "NoPods", "no pod matches spec.selector.matchLabels"
        )
    if decision.stale_pods:
        return cond.Cond(
            cond.HEARTBEATING,
            cond.FALSE,
            "MissedHeartbeats",
            f"{len(decision.stale_pods)} pod(s) missed heartbeats: {', '.join(decision.stale_pods)}"
            f" ({decision.reason})",
        )
    if alive == 0:
        return cond.Cond(cond.HEARTBEATING, cond.UNKNOWN, "Starting", "pods in startup grace")
    return cond.Cond(cond.HEARTBEATING, cond.TRUE, "Heartbeating", f"{alive}/{expected} alive")


def heartbeat_time_field(published: Any, newest: datetime, refresh_seconds: float) -> str:
    """status.lastHeartbeatTime to publish: the newest heartbeat, or the published value while
    it is less than `refresh_seconds` behind (so a quiet component costs no status write)."""
    shown = cond.parse_rfc3339(published)
    if shown is None or refresh_seconds <= 0:
        return _rfc3339(newest)
    if timedelta(0) <= newest - shown < timedelta(seconds=refresh_seconds):
        return str(published)
    return _rfc3339(newest)


def _seals_with(instance: InstanceRecord, primary: str) -> bool:
    # Older heartbeats without key_fingerprint can only say which keys they hold.
    if instance.key_fingerprint:
        return instance.key_fingerprint == primary
    return instance.holds(primary)


def key_condition(
    primary: str, instances: Sequence[InstanceRecord], copy_digest: str | None, source_digest: str
) -> cond.Cond:
    if copy_digest != source_digest:
        return cond.Cond(
            cond.KEY_CURRENT,
            cond.FALSE,
            "CopyOutOfSync",
            "the namespace's keyring Secret differs from the source; the operator is updating it",
        )
    behind = sorted(i.instance for i in instances if not _seals_with(i, primary))
    if behind:
        return cond.Cond(
            cond.KEY_CURRENT,
            cond.FALSE,
            "InstancesBehind",
            f"{len(behind)} instance(s) do not seal with primary key {primary}:"
            f" {', '.join(behind)}",
        )
    return cond.Cond(cond.KEY_CURRENT, cond.TRUE, "KeyCurrent", f"primary key {primary}")


def _reports(instances: Sequence[InstanceRecord], alerts: Sequence[Report]) -> list[Report]:
    out = list(alerts)
    for inst in instances:
        if inst.last_error_reason:
            out.append(
                Report(inst.instance, inst.last_error_reason, inst.last_error_detail, inst.time)
            )
    return out


async def tick(
    rt: Runtime,
    *,
    body: Any,
    namespace: str,
    name: str,
    generation: int,
    raw_spec: Mapping[str, Any],
    status: Mapping[str, Any],
    logger: Logger,
    pod_index: PodIndex,
) -> datetime | None:
    """One pass; returns when the next pass should run at the latest to judge a pod the moment
    its heartbeat deadline passes (None: the regular interval is soon enough)."""
    mem = rt.memory(namespace, name)
    spec = _api.parse_spec(dict(raw_spec))
    now = utcnow()
    recall(mem, status)
    if not rt.keyring_ready:
        # Paused while the keyring is unavailable (`_keyguard`): no restart, no breaker, no key
        # judgement; only the KeyUnavailable condition is published.
        await publish_status(
            rt, namespace, name, generation, status, {"rotationStage": rt.rotation_stage}
        )
        return None
    pods = select_pods(pod_index, namespace, spec.selector.match_labels)
    etcd = rt.etcd.view()
    instances: Sequence[InstanceRecord] = ()
    alerts: list[Report] = []
    etcd_ok = etcd.reachable and etcd.quorum
    if etcd_ok:
        try:
            if rt.heartbeats.trusted:
                instances = rt.heartbeats.instances(name)
            else:
                # Before the first resync, or after a watch outage until the next one.
                HEARTBEAT_DIRECT_READS.inc()
                instances = await asyncio.to_thread(rt.backend.instances, name)
            # Beats are lease keep-alives that leave the record alone: when each instance
            # last beat is read from its lease.
            instances = await asyncio.to_thread(rt.backend.last_seen, instances)
            window = timedelta(seconds=rt.settings.misconfig_window_seconds)
            alerts = [
                Report(a.instance or "?", a.reason, a.detail, a.time)
                for a in await asyncio.to_thread(rt.backend.alerts, name, now - window)
            ]
        except DefenderConfigError as exc:
            # etcd went away between the health check and this read: judge nothing this pass.
            ERRORS.labels("monitor_read").inc()
            logger.warning("cannot read heartbeats: %s", exc)
            etcd_ok = False
    pod_names = {p.name for p in pods}
    for inst in instances:
        if inst.pod in pod_names:
            previous = mem.last_seen.get(inst.pod)
            if previous is None or inst.time > previous:
                mem.last_seen[inst.pod] = inst.time
                if inst.lease_ttl_seconds is not None:
                    mem.lease_ttls[inst.pod] = inst.lease_ttl_seconds
    for gone in set(mem.last_seen) - pod_names:
        del mem.last_seen[gone]
    for gone in set(mem.lease_ttls) - pod_names:
        del mem.lease_ttls[gone]

    hb = spec.heartbeat
    policy = HeartbeatPolicy(
        hb.interval_seconds, hb.missed_before_restart, hb.startup_grace_seconds
    )
    if etcd_ok:
        await _publish_cadence(rt, body, name, hb, instances, mem, logger)
    rb = spec.restart_budget
    budget = RestartBudget(
        rb.enabled,
        rb.max_restarts,
        rb.window_seconds,
        rb.backoff_base_seconds,
        rb.backoff_max_seconds,
    )
    decision = decide_restart(
        now=now,
        pods=[PodView(p.name, p.created, p.deleting) for p in pods],
        last_seen=mem.last_seen,
        watch_started=mem.watch_started,
        etcd=etcd,
        policy=policy,
        budget=budget,
        restart_times=mem.restart_times,
        lease_ttls=mem.lease_ttls,
    )
    restarts = int(status.get("restarts") or 0)
    if decision.action is RestartAction.RESTART and decision.pod is not None:
        restarts += await _restart(rt, body, namespace, name, pods, decision, mem, now, logger)
    expected = sum(1 for p in pods if not p.deleting)
    live = [i for i in instances if now - i.time <= policy.patience(i.lease_ttl_seconds)]
    alive = len({i.pod or i.instance for i in live})
    mem.degraded_reported, announce = budget_report(
        decision.action, mem.degraded_reported, recovered=0 < expected <= alive
    )
    if announce:
        kopf.event(body, type="Warning", reason="RestartBudgetExhausted", message=decision.message)
        logger.error("restart budget exhausted: %s", decision.message)
    mem.heartbeat = heartbeat_condition(decision, alive, expected, mem.degraded_reported)

    stored_fields: dict[str, Any] = {}
    if etcd_ok:
        verdict = assess(now, _reports(instances, alerts), rt.settings.misconfig_window_seconds)
        was = mem.misconfig.status if mem.misconfig else None
        mem.misconfig = cond.Cond(
            cond.MISCONFIGURED,
            cond.TRUE if verdict.misconfigured else cond.FALSE,
            verdict.reason,
            verdict.message,
        )
        if verdict.misconfigured and was != cond.TRUE:
            kopf.event(body, type="Warning", reason=verdict.reason, message=verdict.message)
            logger.warning("misconfigured: %s", verdict.message)
            await asyncio.to_thread(rt.backend.alert, "Misconfigured", name, verdict.message)
        state = await _breaker(
            rt, body, name, spec, instances, decision, expected, mem, now, logger
        )
        stored_fields = state_fields(state)
        handled = status.get("specConfigDigest")
        if mem.config_state in (cond.ConfigState.SYNCED, cond.ConfigState.DIVERGED) and handled:
            diverged = state.active_digest != handled
            mem.config_state = cond.ConfigState.DIVERGED if diverged else cond.ConfigState.SYNCED

    copy_digest = await asyncio.to_thread(
        rt.secrets.copy_digest, namespace, max_age=rt.settings.secret_copy_check_seconds
    )
    source_digest = keyring_digest(rt.keyring.current())
    if namespace == rt.secrets.namespace:
        copy_digest = source_digest
    primary = rt.keyring.current().primary_fingerprint
    mem.key = key_condition(primary, live, copy_digest, source_digest)

    newest = max((i.time for i in instances), default=None)
    fields: dict[str, Any] = {
        "instances": {"alive": alive, "expected": expected},
        "instanceSummary": f"{alive}/{expected}",
        "restarts": restarts,
        **_history_fields(mem, rb.max_restarts),
        "rotationStage": rt.rotation_stage,
        "keyFingerprint": rt.keyring.current().primary_fingerprint,
        **stored_fields,
    }
    if newest is not None:
        fields["lastHeartbeatTime"] = heartbeat_time_field(
            status.get("lastHeartbeatTime"), newest, rt.settings.status_heartbeat_refresh_seconds
        )
        HEARTBEAT_AGE.labels(name).set((now - newest).total_seconds())
    INSTANCES_ALIVE.labels(name).set(alive)
    await publish_status(rt, namespace, name, generation, status, fields)
    wake = next_deadline(
        utcnow(),
        [PodView(p.name, p.created, p.deleting) for p in pods],
        mem.last_seen,
        mem.watch_started,
        policy,
        mem.lease_ttls,
    )
    if decision.retry_after is not None:
        wake = min(wake, decision.retry_after) if wake else decision.retry_after
    return wake


async def _publish_cadence(
    rt: Runtime,
    body: Any,
    name: str,
    hb: _api.HeartbeatSpec,
    instances: Sequence[InstanceRecord],
    mem: ComponentMemory,
    logger: Logger,
) -> None:
    """Publish spec.heartbeat as the component's cadence (only when the record says something
    else: one read per pass, a write per change) and judge whether the instances follow it."""
    want = Cadence(
        interval_seconds=hb.interval_seconds,
        allowed_misses=hb.missed_before_restart,
        by=f"operator:{rt.identity}",
    )
    try:
        # Read every pass rather than trusting memory: a record deleted or overwritten by hand
        # is put right within one pass.
        current = await asyncio.to_thread(rt.backend.cadence, name)
        if want.same_rhythm(current):
            mem.cadence = current
        else:
            await asyncio.to_thread(rt.backend.publish_cadence, name, want)
            if mem.cadence is not None:
                logger.info(
                    "heartbeat cadence now %ss x %s (lease %ss); instances follow it from"
                    " their next beat",
                    want.interval_seconds,
                    want.allowed_misses,
                    want.lease_ttl_seconds,
                )
            mem.cadence = want
    except (DefenderConfigError, OperatorError) as exc:
        ERRORS.labels("cadence").inc()
        logger.warning("cannot publish the heartbeat cadence: %s", exc)
        return
    published = mem.cadence
    assert published is not None
    spec = SpecCadence(published.interval_seconds, published.lease_ttl_seconds, published.since)
    beats = [
        InstanceBeat(i.instance, i.time, i.interval_seconds, i.lease_ttl_seconds) for i in instances
    ]
    was = mem.cadence_condition
    mem.cadence_condition = cadence_condition(beats, spec)
    if mem.cadence_condition.status == cond.FALSE and (was is None or was.status != cond.FALSE):
        message = mem.cadence_condition.message
        kopf.event(body, type="Warning", reason="CadenceMismatch", message=message)
        logger.warning("heartbeat cadence mismatch: %s", message)


def _history_fields(mem: ComponentMemory, limit: int) -> dict[str, Any]:
    """`recentRestartTimes`: the newest `limit` restarts, all the budget needs. Absent until
    the first restart, so a component never restarted costs no status field."""
    del mem.restart_times[: max(len(mem.restart_times) - max(limit, 1), 0)]
    if not mem.restart_times:
        return {}
    return {"recentRestartTimes": [_rfc3339(t) for t in mem.restart_times]}


async def _restart(
    rt: Runtime,
    body: Any,
    namespace: str,
    name: str,
    pods: Sequence[Pod],
    decision: RestartDecision,
    mem: ComponentMemory,
    now: datetime,
    logger: Logger,
) -> int:
    pod = next(p for p in pods if p.name == decision.pod)
    try:
        deleted = await asyncio.to_thread(rt.kube.delete_pod, namespace, pod)
    except OperatorError as exc:
        ERRORS.labels("restart").inc()
        logger.error("restart of pod %s failed: %s", pod.name, exc)
        kopf.event(body, type="Warning", reason="RestartFailed", message=str(exc))
        return 0
    if not deleted:
        return 0
    mem.restart_times.append(now)
    mem.last_seen.pop(pod.name, None)
    RESTARTS.labels(name).inc()
    logger.warning("restarted pod %s: %s", pod.name, decision.message)
    kopf.event(body, type="Warning", reason="PodRestarted", message=decision.message)
    await asyncio.to_thread(rt.backend.alert, "PodRestarted", name, decision.message)
    return 1


async def _breaker(
    rt: Runtime,
    body: Any,
    name: str,
    spec: _api.DefenderComponentSpec,
    instances: Sequence[InstanceRecord],
    decision: RestartDecision,
    expected: int,
    mem: ComponentMemory,
    now: datetime,
    logger: Logger,
) -> ComponentState:
    unhealthy = {i.instance for i in instances if i.last_error_reason in MISCONFIG_REASONS}
    unhealthy |= set(decision.stale_pods)
    for key in list(mem.unhealthy_since):
        if key not in unhealthy:
            del mem.unhealthy_since[key]
    for key in unhealthy:
        mem.unhealthy_since.setdefault(key, now)
    state = await asyncio.to_thread(rt.backend.state, name)
    ro = spec.rollout
    if not mem.change_recovered:
        mem.change_recovered = True
        mem.last_change = mem.last_change or recovered_change(
            state.active_version,
            state.active_modified,
            now,
            ro.window_seconds,
            rollback=state.active_rollback,
        )
    verdict = evaluate_breaker(
        now=now,
        change=mem.last_change,
        unhealthy_since=mem.unhealthy_since,
        expected=expected,
        policy=BreakerPolicy(
            ro.max_unhealthy_instances, ro.max_unhealthy_percent, ro.window_seconds
        ),
        frozen=state.frozen,
    )
    if not verdict.trip or verdict.revert_to is None:
        return state
    await asyncio.to_thread(rt.backend.freeze, name, verdict.message)
    version = await asyncio.to_thread(
        rt.backend.rollback, name, verdict.revert_to, modified_by=f"operator:{rt.identity}"
    )
    mem.last_change = None
    BREAKER_TRIPS.labels(name).inc()
    logger.error("breaker tripped: %s (ACTIVE now version %s)", verdict.message, version)
    kopf.event(body, type="Warning", reason=verdict.reason, message=verdict.message)
    mem.config_state = cond.ConfigState.FROZEN
    mem.config_message = verdict.message
    return await asyncio.to_thread(rt.backend.state, name)


async def _pause(stopped: Any, wake: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less when `wake` is set (a heartbeat watch event) or the daemon
    is stopped."""

    async def until_stopped() -> None:
        await stopped.wait()

    waits = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(until_stopped())]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


# Floor between passes, so a burst of watch events costs a few passes, not one each.
_MIN_PAUSE_SECONDS = 0.2


async def run(
    rt: Runtime,
    stopped: Any,
    body: Any,
    namespace: str,
    name: str,
    logger: Logger,
    pod_index: PodIndex,
) -> None:
    """The per-component daemon: `tick` every monitor_interval_seconds until `stopped`, and
    sooner when the heartbeat watch says an instance of this component appeared or vanished,
    or a pod's heartbeat deadline comes first."""
    wake = rt.heartbeats.waker(name)
    mem = rt.memory(namespace, name)
    while not stopped:
        wake.clear()
        pause = rt.settings.monitor_interval_seconds
        try:
            # kopf keeps `body` current from its watch (no read per pass); the status is ours
            # as last written when we wrote it, since the body lags our own writes.
            status = mem.status if mem.status is not None else dict(body.get("status") or {})
            if status:
                recall(mem, status)  # a Conflict shown before this operator started counts
            # Before the first reconcile there is nothing to judge (and no status to merge);
            # before etcd's health is first measured, a pass would report an outage that
            # is only "not measured yet" and flap the conditions a restarted operator kept.
            # A resource refused its etcd name (another owns it) has no instances of its
            # own to judge, and its pods must not be restarted for the owner's heartbeats.
            judge = mem.conflict is None and bool(status.get("observedGeneration"))
            if judge and rt.etcd.measured:
                due = await tick(
                    rt,
                    body=body,
                    namespace=namespace,
                    name=name,
                    generation=int(body.get("metadata", {}).get("generation") or 0),
                    raw_spec=dict(body.get("spec") or {}),
                    status=status,
                    logger=logger,
                    pod_index=pod_index,
                )
                if due is not None:
                    # A hair past the deadline, so the pass sees it passed.
                    until = (due - utcnow()).total_seconds() + 0.05
                    pause = min(pause, max(until, _MIN_PAUSE_SECONDS))
        except (DefenderConfigError, OperatorError, ValueError) as exc:
            ERRORS.labels("monitor").inc()
            logger.warning("monitor pass failed, next pass in %ss: %s", pause, exc)
        await asyncio.sleep(_MIN_PAUSE_SECONDS)
        await _pause(stopped, wake, pause)
