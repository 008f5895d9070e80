"""One monitoring pass over a component: heartbeats → restarts, misconfiguration, breaker,
key currency, status. A kopf daemon calls `tick` when something it judges changes (`Runtime.wake`),
and at the latest every `monitor_interval_seconds`.

All judgement is in `_decisions`; this module only gathers inputs and applies outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import kopf

from defender_config import (
    Cadence,
    ChangeKind,
    ConfigValidationError,
    DefenderConfigError,
    RegistrationReplayError,
    RolloutRecord,
    StoreError,
    config_digest,
    validate_config,
)
from defender_operator import _api, _canary
from defender_operator._backend import (
    AlertRecord,
    ComponentState,
    InstanceRecord,
    Observation,
)
from defender_operator._bodies import shed_managed_fields
from defender_operator._decisions import conditions as cond
from defender_operator._decisions.backing import (
    Backing,
    authentic,
    backing,
    unbacked_to_report,
    unverified_to_report,
)
from defender_operator._decisions.breaker import (
    BreakerPolicy,
    evaluate_breaker,
    lifted_freeze,
    recovered_change,
)
from defender_operator._decisions.cadence import (
    HEARTBEAT_CADENCE,
    InstanceBeat,
    SpecCadence,
    cadence_condition,
)
from defender_operator._decisions.keycopy import copy_condition
from defender_operator._decisions.misconfig import MISCONFIG_REASONS, Report, assess
from defender_operator._decisions.reads import ReadReason, ViewRead, must_read
from defender_operator._decisions.registration import (
    RegistrationAction,
    ReplayAction,
    anchored_registration,
    decide_registration,
    registration_fields,
)
from defender_operator._decisions.restarts import (
    HeartbeatPolicy,
    PodView,
    RestartAction,
    RestartBudget,
    RestartDecision,
    announced_pods,
    budget_report,
    decide_restart,
    next_deadline,
)
from defender_operator._decisions.restore import seen_active, went_backwards
from defender_operator._errors import KeySecretError, OperatorError
from defender_operator._executors import enter_monitor
from defender_operator._keys import keyring_digest
from defender_operator._kube import Pod
from defender_operator._metrics import (
    BREAKER_TRIPS,
    ERRORS,
    HEARTBEAT_DIRECT_READS,
    MONITOR_PASSES,
    MONITOR_READS,
    RESTARTS,
    record_heartbeats,
    record_unbacked,
    record_unverified,
)
from defender_operator._outcome import ConfigVerdict, Outcome, post_events, take, warning
from defender_operator._pods import PodIndex, held_pods, select_pods
from defender_operator._reconcile import (
    Visit,
    commit,
    drop_replayed_freeze,
    publish_status,
    recall,
    recommitted,
    refused_action,
    regression_told,
    reseed_after_restore,
    state_fields,
    wanted_cadence,
    went_back,
)
from defender_operator._runtime import ComponentMemory, Runtime, spec_key, utcnow
from defender_operator._scrub import scrub_step
from defender_operator._storage_budget import StorageBudgetExceededError

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]


def _rfc3339(when: datetime) -> str:
    return cond.rfc3339(when)


def heartbeat_condition(
    decision: RestartDecision, alive: int, expected: int, degraded: bool
) -> cond.Cond:
    if decision.reason in ("EtcdUnavailable", "EtcdNoQuorum", "EtcdRecovering", "EtcdNoSpace"):
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


def heartbeat_rider(instances: Sequence[InstanceRecord]) -> dict[str, Any]:
    """The newest heartbeat as status.lastHeartbeatTime, for a status write that happens
    anyway: it costs nothing there, while on its own it waits for the refresh interval.
    Called only when the write happens (formatting a time every pass is not free)."""
    newest = max((i.time for i in instances), default=None)
    return {} if newest is None else {"lastHeartbeatTime": _rfc3339(newest)}


def _seals_with(instance: InstanceRecord, primary: str) -> bool:
    # Older heartbeats without key_fingerprint can only say which keys they hold.
    if instance.key_fingerprint:
        return instance.key_fingerprint == primary
    return instance.holds(primary)


def key_condition(
    primary: str,
    instances: Sequence[InstanceRecord],
    copy_digest: str | None,
    source_digest: str,
    *,
    unreadable: str | None = None,
    previous: cond.Cond | None = None,
) -> cond.Cond:
    """KeyCurrent: the copy first (`keycopy.copy_condition`: `unreadable` says why it could
    not be read, `previous` is the condition shown), then the instances' keys."""
    copied = copy_condition(
        copy_digest=copy_digest,
        source_digest=source_digest,
        unreadable=unreadable,
        previous=previous,
    )
    if copied is not None:
        return copied
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


@dataclass(frozen=True)
class Pass:
    """One monitor pass over one resource: what kopf's body says, and the operator it runs in."""

    rt: Runtime
    body: Any
    namespace: str
    name: str
    generation: int
    spec: _api.DefenderComponentSpec
    status: Mapping[str, Any]
    logger: Logger
    now: datetime
    # Set when a reconcile runs this pass (`after_reconcile`): its status fields, published in
    # the same patch as the pass's, and the status as stored (`status` then includes them).
    carry: Mapping[str, Any] = field(default_factory=dict)
    stored: Mapping[str, Any] | None = None

    async def publish(
        self, fields: Mapping[str, Any], riders: Callable[[], Mapping[str, Any]] | None = None
    ) -> None:
        if self.rt.ended(_uid(self.body)):
            # Deleted, or a same-named successor handled, while this pass ran: the status by
            # that name is not this object's any more.
            self.logger.info(
                "%s/%s ended during the pass: nothing published", self.namespace, self.name
            )
            return
        shown = self.stored if self.stored is not None else self.status
        await publish_status(
            self.rt,
            self.namespace,
            self.name,
            self.generation,
            shown,
            {**self.carry, **fields},
            riders,
        )


@dataclass(frozen=True)
class Observed:
    """What etcd says about the component this pass (nothing when unreachable)."""

    instances: Sequence[InstanceRecord] = ()
    alerts: Sequence[Report] = ()
    etcd_ok: bool = False
    state: ComponentState | None = None
    cadence: Cadence | None = None
    rollout: RolloutRecord | None = None
    unverified: Sequence[InstanceRecord] = ()
    """Records whose MAC does not verify: reported, left out of `instances`."""
    fresh: bool = False
    """`state` was read from etcd by this pass, not reused from an earlier one's read (which
    may come from before a restore, when the cluster that answers now is another)."""


@dataclass(frozen=True)
class Judged:
    """The heartbeat judgement the later steps build on."""

    decision: RestartDecision
    policy: HeartbeatPolicy
    expected: int
    live: Sequence[InstanceRecord]
    alive: int = 0
    """Selected pods, not being deleted, with an instance in `live`."""


async def tick(p: Pass, mem: ComponentMemory, pod_index: PodIndex) -> datetime | None:
    """One pass (the caller holds `mem.lock`); returns when the next pass should run at the
    latest to judge a pod the moment its heartbeat deadline passes (None: the regular interval
    is soon enough). Events found are posted even when a step fails."""
    found = Outcome()
    began = time.monotonic()
    try:
        due = await _steps(p, mem, pod_index, found)
    finally:
        post_events(p.rt.post_event, p.body, found)
    mem.last_pass = (began, due)
    return due


async def _steps(
    p: Pass, mem: ComponentMemory, pod_index: PodIndex, found: Outcome
) -> datetime | None:
    rt = p.rt
    recall(mem, p.status)
    if not rt.keyring_ready:
        # Paused while the keyring is unavailable (`_keyguard`): no restart, no breaker, no key
        # judgement; only the KeyUnavailable condition is published.
        await p.publish({"rotationStage": rt.rotation_stage})
        return None
    pods = select_pods(pod_index, p.namespace, p.spec.selector.match_labels)
    seen = await observe(p, mem)
    track(mem, seen.instances, pods)
    # What backs each instance record (`_decisions.backing`): only a selected pod's, not being
    # deleted, steers the breaker and the canaries or counts as alive.
    held = held_pods(pods)
    backed = backing(((i.instance, i.pod) for i in seen.instances), held)
    if seen.etcd_ok:
        take(mem, found, await cadence_step(p, seen, mem))
    judged, heard = await heartbeat_step(
        p, mem, pods, seen.instances, read_ok=seen.etcd_ok, backed=backed, forged=seen.unverified
    )
    take(mem, found, heard)
    misconfig_ages: datetime | None = None
    if seen.etcd_ok:
        restored = await scrub_step(
            rt,
            body=p.body,
            namespace=p.namespace,
            name=p.name,
            generation=p.generation,
            status=p.status,
            logger=p.logger,
        )
        misconfigured, misconfig_ages = await misconfig_step(p, mem, seen)
        take(mem, found, misconfigured)
        state, fresh = seen.state, seen.fresh
        if restored or state is None:
            # Read again: the scrub changed ACTIVE, or the pass's read failed verification
            # (the read repairs what it can, else raises).
            try:
                state = await asyncio.to_thread(
                    partial(rt.backend.state, p.name, tolerate_master=True)
                )
            except RegistrationReplayError as exc:
                # Re-seeded (else raised): what this pass read is of the purged data. Published
                # now; the next pass, right after, judges the new registration.
                take(mem, found, await reseed_step(p, pod_index, exc))
                post_events(rt.post_event, p.body, found)
                await p.publish(found.fields, partial(heartbeat_rider, seen.instances))
                return utcnow()
            fresh = True
        state, dropped = await drop_replayed_freeze(rt, p.name, p.status, state, p.logger)
        take(mem, found, dropped)
        state, regressed = await regression_step(p, mem, state, pod_index)
        take(mem, found, regressed)
        take(mem, found, unbacked_step(p, mem, seen.instances, backed, judged.policy))
        take(mem, found, unverified_step(p, mem, seen.unverified))
        state, tripped = await breaker_step(p, mem, state, seen.instances, judged, backed)
        take(mem, found, tripped)
        rolled = _canary.carried(
            await _canary.watch(
                rt,
                p.namespace,
                p.name,
                p.spec,
                p.status,
                mem,
                record=seen.rollout,
                active_version=state.active_version,
                instances=seen.instances,
                live=judged.live,
                pods=held,
                backed=backed,
                now=p.now,
                logger=p.logger,
            ),
            p.status,
        )
        if take(mem, found, rolled) and "rollout" in rolled.fields:
            state = await asyncio.to_thread(partial(rt.backend.state, p.name, tolerate_master=True))
        take(mem, found, divergence(p, mem, state, fresh=fresh))
    take(mem, found, await key_step(p, mem, judged.live))
    take(mem, found, Outcome(fields=pass_fields(p, mem, seen.instances, judged)))
    post_events(rt.post_event, p.body, found)
    await p.publish(found.fields, partial(heartbeat_rider, seen.instances))
    wake = next_deadline(
        utcnow(),
        pod_views(pods),
        mem.last_seen,
        mem.watch_started,
        judged.policy,
        mem.lease_ttls,
        announced=announced_pods(judged.live) if rt.heartbeats.trusted else (),
    )
    # A restart held back by the budget or its backoff, and a Misconfigured whose reports age
    # out of the window, change on the clock: no event announces either.
    for clock in (judged.decision.retry_after, misconfig_ages):
        if clock is not None:
            wake = min(wake, clock) if wake else clock
    if seen.rollout is not None and not seen.rollout.ended:
        # A canary's hold and progress deadline run on the clock: no event ends them.
        soon = utcnow() + timedelta(seconds=ROLLOUT_POLL_SECONDS)
        wake = min(wake, soon) if wake else soon
    return wake


async def _last_seen(
    rt: Runtime, component: str, instances: Sequence[InstanceRecord]
) -> list[InstanceRecord]:
    known = rt.backend.last_seen(component, instances, ask=False)
    if known is not None:
        return known
    asked = await asyncio.to_thread(rt.backend.last_seen, component, instances)
    assert asked is not None  # with `ask`, always an answer
    return asked


async def observe(p: Pass, mem: ComponentMemory) -> Observed:
    """The instances' heartbeats and recent alerts, when etcd is healthy and answers. The
    component's records are the last pass's read when nothing it read changed since
    (`_decisions.reads`), else read again. Heartbeat records whose MAC does not verify are
    left out of `instances` (`_decisions.backing.authentic`): nothing judges them."""
    seen = await _observe(p, mem)
    good, bad = authentic(seen.instances)
    if not bad:
        return seen
    return dataclasses.replace(seen, instances=good, unverified=bad)


async def _observe(p: Pass, mem: ComponentMemory) -> Observed:
    rt = p.rt
    etcd = rt.etcd.view()
    if not (etcd.reachable and etcd.quorum):
        return Observed()
    try:
        instances: Sequence[InstanceRecord] = (
            rt.heartbeats.instances(p.name) if rt.heartbeats.trusted else ()
        )
        if not rt.heartbeats.trusted or not all(i.checked for i in instances):
            # Before the first resync, after a watch outage until the next one, or records
            # the view read while no keyring was held (the view reads them all again soon).
            HEARTBEAT_DIRECT_READS.inc()
            instances = await asyncio.to_thread(rt.backend.instances, p.name)
        # Beats are lease keep-alives that leave the record alone: when each instance last
        # beat is read from its lease (a recent sighting answers without a thread).
        instances = await _last_seen(rt, p.name, instances)
    except DefenderConfigError as exc:
        # etcd went away between the health check and this read: judge nothing this pass.
        ERRORS.labels("monitor_read").inc()
        p.logger.warning("cannot read heartbeats: %s", exc)
        return Observed()
    since = p.now - timedelta(seconds=rt.settings.misconfig_window_seconds)
    facts = rt.changes.facts(p.name)
    why = must_read(
        p.now, mem.observed, facts, timedelta(seconds=rt.settings.monitor_full_read_seconds)
    )
    if why is ReadReason.UNCHANGED and mem.observation is not None:
        MONITOR_READS.labels("skipped", why.value).inc()
        # Alerts age out of the window with time, not with a change in etcd.
        mem.observation = _alerts_since(mem.observation, since)
        return _observed(instances, mem.observation)
    MONITOR_READS.labels("read", why.value).inc()
    mem.observation = mem.observed = None
    try:
        # ACTIVE/MASTER/freeze, the cadence, the rollout and the alerts: one transaction.
        seen = await asyncio.to_thread(rt.backend.observe, p.name, since)
    except StoreError as exc:
        ERRORS.labels("monitor_read").inc()
        p.logger.warning("cannot read the component: %s", exc)
        return Observed()
    except DefenderConfigError as exc:
        # A record that does not verify stops what needs it (the breaker, divergence: their
        # own read raises it again), not the heartbeat judgement: read the rest on its own.
        p.logger.warning("component records do not verify: %s", exc)
        try:
            alerts_read = await asyncio.to_thread(rt.backend.alerts, p.name, since)
            cadence = await asyncio.to_thread(rt.backend.cadence, p.name)
            rollout = await asyncio.to_thread(rt.backend.rollout, p.name)
        except DefenderConfigError as again:
            ERRORS.labels("monitor_read").inc()
            p.logger.warning("cannot read the component: %s", again)
            return Observed()
        return Observed(
            instances, _alert_reports(alerts_read), True, cadence=cadence, rollout=rollout
        )
    # Own writes counted before the read began: one that landed during it is read again.
    mem.observation, mem.observed = seen, ViewRead(p.now, seen.revision, facts.own_writes)
    return _observed(instances, seen, fresh=True)


def _observed(
    instances: Sequence[InstanceRecord], seen: Observation, *, fresh: bool = False
) -> Observed:
    return Observed(
        instances,
        _alert_reports(seen.alerts),
        etcd_ok=True,
        state=seen.state,
        cadence=seen.cadence,
        rollout=seen.rollout,
        fresh=fresh,
    )


def _alerts_since(seen: Observation, since: datetime) -> Observation:
    """`seen` with only the alerts raised at or after `since` (as the read filters them)."""
    kept = [a for a in seen.alerts if a.time >= since]
    return seen if len(kept) == len(seen.alerts) else dataclasses.replace(seen, alerts=kept)


def _alert_reports(alerts: Sequence[AlertRecord]) -> list[Report]:
    return [Report(a.instance or "?", a.reason, a.detail, a.time) for a in alerts]


def track(mem: ComponentMemory, instances: Sequence[InstanceRecord], pods: Sequence[Pod]) -> None:
    """Remember each pod's newest heartbeat and advertised lease; forget pods that are gone."""
    pod_names = {pod.name for pod in pods}
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


async def heartbeat_step(
    p: Pass,
    mem: ComponentMemory,
    pods: Sequence[Pod],
    instances: Sequence[InstanceRecord],
    *,
    read_ok: bool = True,
    backed: Backing,
    forged: Sequence[InstanceRecord] = (),
) -> tuple[Judged, Outcome]:
    """Decide whether a pod missed its heartbeats and restart it (within the budget). When
    this pass could not read etcd (`read_ok` False), etcd counts as unreachable whatever the
    last health check said: a heartbeat missing from a read that failed says nothing about
    the pod, and the newest heartbeats known may be a lease's TTL old (reused sightings).
    Alive are the selected pods not being deleted with a live instance (`backed`): a record
    naming no such pod is not one."""
    hb, rb = p.spec.heartbeat, p.spec.restart_budget
    policy = HeartbeatPolicy(
        hb.interval_seconds, hb.missed_before_restart, hb.startup_grace_seconds
    )
    budget = RestartBudget(
        rb.enabled,
        rb.max_restarts,
        rb.window_seconds,
        rb.backoff_base_seconds,
        rb.backoff_max_seconds,
    )
    etcd = p.rt.etcd.view()
    if not read_ok and etcd.reachable and etcd.quorum:
        etcd = dataclasses.replace(etcd, reachable=False, healthy_since=None)

    def decide() -> RestartDecision:
        return decide_restart(
            now=p.now,
            pods=pod_views(pods),
            last_seen=mem.last_seen,
            watch_started=mem.watch_started,
            etcd=etcd,
            policy=policy,
            budget=budget,
            restart_times=mem.restart_times,
            lease_ttls=mem.lease_ttls,
        )

    decision = decide()
    if decision.action is RestartAction.RESTART and read_ok:
        # Deleting a pod cannot be undone, and the records judged may be a moment old (the
        # view's, read before this pass's other steps): an instance that has just moved to a
        # new lease (a cadence change) left its old one revoked, which reads as a silence.
        # Judge once more on the component's records read now; a read that fails says
        # nothing about the pod, as for the pass's own read (etcd counts as unreachable).
        if not await _heard_since(p, mem, pods):
            etcd = dataclasses.replace(etcd, reachable=False, healthy_since=None)
        decision = decide()
    out = Outcome(fields={"restarts": int(p.status.get("restarts") or 0)})
    if decision.action is RestartAction.RESTART and decision.pod is not None:
        out.fields["restarts"] += await _restart(p, mem, pods, decision, out)
    expected = sum(1 for pod in pods if not pod.deleting)
    live = [i for i in instances if p.now - i.time <= policy.patience(i.lease_ttl_seconds)]
    alive = len({i.pod for i in live if i.instance in backed.serving})
    mem.degraded_reported, announce = budget_report(
        decision.action, mem.degraded_reported, recovered=0 < expected <= alive
    )
    if announce:
        out.events.append(warning("RestartBudgetExhausted", decision.message))
        p.logger.error("restart budget exhausted: %s", decision.message)
    judgement = heartbeat_condition(decision, alive, expected, mem.degraded_reported)
    if backed.unbacked:
        judgement = dataclasses.replace(
            judgement,
            message=f"{judgement.message}; {len(backed.unbacked)} heartbeat record(s) name no"
            " selected pod (ignored)",
        )
    if forged:
        judgement = dataclasses.replace(
            judgement,
            message=f"{judgement.message}; {len(forged)} heartbeat record(s) fail"
            " authentication (ignored)",
        )
    out.conditions[cond.HEARTBEATING] = judgement
    out.fields.update(instances={"alive": alive, "expected": expected})
    out.fields["instanceSummary"] = f"{alive}/{expected}"
    return Judged(decision, policy, expected, live, alive), out


async def _heard_since(p: Pass, mem: ComponentMemory, pods: Sequence[Pod]) -> bool:
    """Read the component's heartbeat records from etcd (authentic ones only) and track them;
    False when that read failed."""
    try:
        fresh = await asyncio.to_thread(p.rt.backend.instances, p.name)
        good, _ = authentic(fresh)
        track(mem, await _last_seen(p.rt, p.name, good), pods)
    except DefenderConfigError as exc:
        p.logger.warning("cannot read heartbeats again before a restart: %s", exc)
        return False
    return True


async def _restart(
    p: Pass, mem: ComponentMemory, pods: Sequence[Pod], decision: RestartDecision, out: Outcome
) -> int:
    rt = p.rt
    pod = next(pod for pod in pods if pod.name == decision.pod)
    try:
        deleted = await asyncio.to_thread(rt.kube.delete_pod, p.namespace, pod)
    except OperatorError as exc:
        ERRORS.labels("restart").inc()
        p.logger.error("restart of pod %s failed: %s", pod.name, exc)
        out.events.append(warning("RestartFailed", str(exc)))
        return 0
    if not deleted:
        return 0
    mem.restart_times.append(p.now)
    mem.last_seen.pop(pod.name, None)
    RESTARTS.labels(p.name).inc()
    p.logger.warning("restarted pod %s: %s", pod.name, decision.message)
    out.events.append(warning("PodRestarted", decision.message))
    await rt.write(p.name, rt.backend.alert, "PodRestarted", p.name, decision.message)
    return 1


async def misconfig_step(
    p: Pass, mem: ComponentMemory, seen: Observed
) -> tuple[Outcome, datetime | None]:
    """Misconfigured from the instances' reported errors and recent alerts; alerted (Event and
    an alert rag reads) when it starts. Also when the verdict may change with nothing new
    reported (its oldest report leaving the window), None if never."""
    verdict = assess(
        p.now, _reports(seen.instances, seen.alerts), p.rt.settings.misconfig_window_seconds
    )
    was = mem.misconfig.status if mem.misconfig else None
    out = Outcome(
        conditions={
            cond.MISCONFIGURED: cond.Cond(
                cond.MISCONFIGURED,
                cond.TRUE if verdict.misconfigured else cond.FALSE,
                verdict.reason,
                verdict.message,
            )
        }
    )
    if verdict.misconfigured and was != cond.TRUE:
        out.events.append(warning(verdict.reason, verdict.message))
        p.logger.warning("misconfigured: %s", verdict.message)
        await p.rt.write(p.name, p.rt.backend.alert, "Misconfigured", p.name, verdict.message)
    return out, verdict.changes_at


def unbacked_step(
    p: Pass,
    mem: ComponentMemory,
    instances: Sequence[InstanceRecord],
    backed: Backing,
    policy: HeartbeatPolicy,
) -> Outcome:
    """Report instance records that name no selected pod (`_decisions.backing`): they steer
    nothing (the breaker and the canaries ignore them), but one that outlives what a real
    pod's record would is a leftover or a forgery, worth a look. Exported as a gauge each
    pass; a Warning Event once per record."""
    for gone in set(mem.unbacked_since) - backed.unbacked:
        del mem.unbacked_since[gone]
    for name in backed.unbacked:
        mem.unbacked_since.setdefault(name, p.now)
    record_unbacked(p.name, len(backed.unbacked))
    patience = {
        i.instance: policy.patience(i.lease_ttl_seconds)
        for i in instances
        if i.instance in backed.unbacked
    }
    mem.unbacked_reported, new = unbacked_to_report(
        mem.unbacked_since, patience, mem.unbacked_reported, p.now
    )
    if not new:
        return Outcome()
    message = (
        f"{len(new)} heartbeat record(s) name no pod this component selects:"
        f" {_some(new, lambda name: name)};"
        " ignored by the breaker and the canaries. A record no agent keeps alive lingers until"
        " deleted; one nobody wrote means someone else can write this component's instance keys"
    )
    p.logger.warning("%s", message)
    return Outcome(events=[warning("UnbackedInstances", message)])


# Instances an Event names at most, and the characters of each name and reason shown: anyone
# with etcd write access can invent any number of them, of any length.
_NAMED = 5
_SHOWN_CHARS = 200


def _some(names: Sequence[str], show: Callable[[str], str]) -> str:
    """The first `_NAMED` of `names`, each as `show` puts it, cut to `_SHOWN_CHARS`."""
    shown = "; ".join(cond.bounded(show(name), _SHOWN_CHARS) for name in names[:_NAMED])
    return shown + (f" and {len(names) - _NAMED} more" if len(names) > _NAMED else "")


def unverified_step(p: Pass, mem: ComponentMemory, forged: Sequence[InstanceRecord]) -> Outcome:
    """Report instance records whose MAC does not verify: nothing judges them (not the
    restart decision, the breaker, the canaries, the key rotation or the alive count). An
    agent signs its record with the keyring it mounts, so one that fails was written without
    it: by someone with etcd write access alone, put back from an earlier lease, or by an agent
    older than record signing. Exported as a gauge each pass; a Warning Event once per record
    while it lasts."""
    record_unverified(p.name, len(forged))
    mem.unverified_reported, new = unverified_to_report(
        [i.instance for i in forged], mem.unverified_reported
    )
    if not new:
        return Outcome()
    why = {i.instance: i.unverified or "not verified" for i in forged}
    shown = _some(new, lambda name: f"{name} ({why[name]})")
    message = (
        f"{len(new)} heartbeat record(s) fail authentication: {shown}. Ignored: the"
        " pod they name is judged by its own signed record only. An agent"
        " older than record signing writes none (upgrade it); otherwise someone without the"
        " keyring writes this component's instance keys"
    )
    p.logger.warning("%s", message)
    return Outcome(events=[warning("UnverifiedInstances", message)])


def pod_views(pods: Sequence[Pod]) -> list[PodView]:
    """The pods as the restart decision sees them."""
    return [PodView(p.name, p.created, p.deleting, p.started, p.starting) for p in pods]


async def regression_step(
    p: Pass, mem: ComponentMemory, state: ComponentState, pod_index: PodIndex
) -> tuple[ComponentState, Outcome]:
    """ACTIVE in etcd went below the version this operator published last (an etcd restore
    under a running operator): spec.config committed again, or a person told, as the
    reconcile does (`_reconcile.went_back`); judged before this pass publishes the lower
    version, which would leave nothing to tell it from."""
    if not went_backwards(seen_active(p.status), state.active_version):
        return state, Outcome()
    spec = p.spec
    try:
        normalized = await _validated(p)
    except ConfigValidationError:
        return state, Outcome()  # an invalid spec.config is the reconcile's to report
    regression = went_back(p.status, state, config_digest(normalized))
    if regression is None:
        return state, Outcome()
    out = Outcome()
    out.add(regression_told(p.logger, regression))
    if not regression.recommit:
        return state, out
    state, committed = await commit(
        as_visit(p, pod_index), spec, normalized, state, canary=False, above=regression.seen_version
    )
    # Refused while frozen, it says which generation it judged: the reconcile's to say.
    committed.fields.pop("observedGeneration", None)
    out.add(committed)
    if not committed.done:
        out.add(recommitted(p.logger, regression, state))
    return state, out


async def _validated(p: Pass) -> dict[str, Any]:
    """The pass's spec.config validated (ConfigValidationError when it is not): off the event
    loop, as the reconcile does, since a custom schema may take its whole budget."""
    spec = p.spec
    return await asyncio.to_thread(
        partial(
            validate_config,
            spec.component_type.value,
            spec.config,
            spec.custom_schema,
            component=p.name,
        )
    )


def as_visit(p: Pass, pod_index: PodIndex) -> Visit:
    """The pass as a reconcile's visit, for the reconcile's own steps a pass takes."""
    return Visit(
        rt=p.rt,
        body=p.body,
        namespace=p.namespace,
        name=p.name,
        generation=p.generation,
        status=p.status,
        annotations=(p.body.get("metadata") or {}).get("annotations") or {},
        logger=p.logger,
        # Neither a commit nor a re-seed consults it: the name is this resource's (it has a
        # status), and a re-seed writes its claim create-only, beside the seed.
        holders={},
        pods=pod_index,
    )


async def reseed_step(p: Pass, pod_index: PodIndex, refused: RegistrationReplayError) -> Outcome:
    """The library refused the metadata record as another registration's. An older one on
    another etcd cluster than status.registrationCluster is a snapshot from before a purge
    and re-creation, restored under this running operator (kopf sees no change of the
    resource, so no reconcile comes): re-seeded as the reconcile does, by the same decision
    (`_reconcile.refused_action`) and the same step (`_reconcile.reseed_after_restore`).
    Anything else is raised: a replay, refused as before (the pass fails)."""
    visit = as_visit(p, pod_index)
    if refused_action(visit, refused) is not ReplayAction.RESEED:
        raise refused
    spec = p.spec
    try:
        normalized = await _validated(p)
    except ConfigValidationError:
        raise refused from None  # nothing valid to seed: the reconcile reports the spec
    try:
        _, _, reseeded = await reseed_after_restore(visit, spec, normalized, refused.found)
    except kopf.TemporaryError:
        # Written meanwhile by someone else: a failed pass (not the daemon's end), and the
        # next one decides again on what is there.
        raise refused from None
    except kopf.PermanentError as exc:
        if not isinstance(exc.__cause__, StorageBudgetExceededError):
            raise
        # Refused by the namespace's storage budget, nothing written: the pass fails on the
        # replay as it would without a re-seed, and says why it was not re-seeded.
        p.logger.warning("not re-seeded after a restore: %s", exc)
        raise refused from None
    return reseeded


def divergence(
    p: Pass, mem: ComponentMemory, state: ComponentState, *, fresh: bool = False
) -> Outcome:
    """What etcd holds, and whether ACTIVE still is what the last reconcile handled. `fresh`:
    `state` was read by this pass (not reused), so the cluster that answered last holds it."""
    out = Outcome(fields=state_fields(state))
    kept = decide_registration(anchored_registration(p.status), state.registration)
    if fresh and kept is RegistrationAction.KEEP:
        # etcd holds the anchored registration: on the cluster that answers now (a restore of
        # a snapshot of it, run through, moves it there), so that a restore of an older
        # lifetime is told from a replay without waiting for a reconcile. Never from a read
        # reused from an earlier pass: it may be of the cluster before a restore, which would
        # record the new cluster beside the older lifetime restored there.
        out.fields.update(registration_fields(kept, state.registration, p.rt.backend.cluster_id))
    handled = p.status.get("specConfigDigest")
    if mem.config_state in (cond.ConfigState.SYNCED, cond.ConfigState.DIVERGED) and handled:
        diverged = state.active_digest != handled
        out.config = ConfigVerdict(
            cond.ConfigState.DIVERGED if diverged else cond.ConfigState.SYNCED,
            mem.config_message,
            mem.config_reason,
        )
    return out


async def key_step(p: Pass, mem: ComponentMemory, live: Sequence[InstanceRecord]) -> Outcome:
    """KeyCurrent: the namespace's keyring copy matches the source and the live instances seal
    with the primary key. A copy that cannot be read (403, an API server that fails) is judged
    Unknown rather than failing the pass: the pass has acted already (restarts), and its
    status, `recentRestartTimes` with it, must still be published."""
    rt = p.rt
    source_digest = keyring_digest(rt.keyring.current())
    max_age = rt.settings.secret_copy_check_seconds
    copy_digest: str | None
    unreadable = None
    if p.namespace == rt.secrets.namespace:
        copy_digest = source_digest  # the source itself
    else:
        copy_digest, fresh = rt.secrets.known_copy_digest(p.namespace, max_age=max_age)
        if not fresh:
            try:
                copy_digest = await asyncio.to_thread(
                    rt.secrets.copy_digest, p.namespace, max_age=max_age
                )
            except KeySecretError as exc:
                ERRORS.labels("key_copy_read").inc()
                p.logger.warning("cannot read the keyring copy: %s", exc)
                unreadable = str(exc)
    primary = rt.keyring.current().primary_fingerprint
    judged = key_condition(
        primary, live, copy_digest, source_digest, unreadable=unreadable, previous=mem.key
    )
    return Outcome(conditions={cond.KEY_CURRENT: judged})


def pass_fields(
    p: Pass, mem: ComponentMemory, instances: Sequence[InstanceRecord], judged: Judged
) -> dict[str, Any]:
    """The status fields every pass publishes (besides the steps' own)."""
    rt = p.rt
    alive = judged.alive
    fields: dict[str, Any] = {
        **_history_fields(mem, p.spec.restart_budget.max_restarts),
        "rotationStage": rt.rotation_stage,
        "keyFingerprint": rt.keyring.current().primary_fingerprint,
    }
    newest = max((i.time for i in instances), default=None)
    if newest is not None:
        fields["lastHeartbeatTime"] = heartbeat_time_field(
            p.status.get("lastHeartbeatTime"),
            newest,
            rt.settings.status_heartbeat_refresh_seconds,
        )
    record_heartbeats(
        p.name, (p.now - newest).total_seconds() if newest is not None else None, alive
    )
    return fields


async def cadence_step(p: Pass, seen: Observed, mem: ComponentMemory) -> Outcome:
    """Publish spec.heartbeat as the component's cadence (only when the record, as this pass
    read it, says something else: a write per change) and judge whether the instances follow
    it."""
    rt, instances = p.rt, seen.instances
    want = wanted_cadence(rt, p.spec)
    try:
        # As this pass read it rather than what memory says was published: a record deleted or
        # overwritten by hand is put right on the first pass after the change watch delivers
        # it (the pass then reads it again).
        current = seen.cadence
        if want.same_rhythm(current):
            mem.cadence = current
        else:
            await rt.write(p.name, rt.backend.publish_cadence, p.name, want)
            if mem.cadence is not None:
                p.logger.info(
                    "heartbeat cadence now %ss x %s (lease %ss); instances follow it from"
                    " their next beat",
                    want.interval_seconds,
                    want.allowed_misses,
                    want.lease_ttl_seconds,
                )
            mem.cadence = want
    except (DefenderConfigError, OperatorError) as exc:
        ERRORS.labels("cadence").inc()
        p.logger.warning("cannot publish the heartbeat cadence: %s", exc)
        return Outcome()
    published = mem.cadence
    assert published is not None
    spec = SpecCadence(published.interval_seconds, published.lease_ttl_seconds, published.since)
    beats = [
        InstanceBeat(i.instance, i.time, i.interval_seconds, i.lease_ttl_seconds) for i in instances
    ]
    judged = cadence_condition(beats, spec)
    out = Outcome(conditions={HEARTBEAT_CADENCE: judged})
    was = mem.cadence_condition
    if judged.status == cond.FALSE and (was is None or was.status != cond.FALSE):
        out.events.append(warning("CadenceMismatch", judged.message))
        p.logger.warning("heartbeat cadence mismatch: %s", judged.message)
    return out


def _history_fields(mem: ComponentMemory, limit: int) -> dict[str, Any]:
    """`recentRestartTimes`: the newest `limit` restarts, all the budget needs. Absent until
    the first restart, so a component never restarted costs no status field."""
    del mem.restart_times[: max(len(mem.restart_times) - max(limit, 1), 0)]
    if not mem.restart_times:
        return {}
    return {"recentRestartTimes": [_rfc3339(t) for t in mem.restart_times]}


async def breaker_step(
    p: Pass,
    mem: ComponentMemory,
    state: ComponentState,
    instances: Sequence[InstanceRecord],
    judged: Judged,
    backed: Backing,
) -> tuple[ComponentState, Outcome]:
    """Trip the blast-radius breaker when too many instances turned unhealthy soon after a
    change of ACTIVE: freeze commits and revert ACTIVE to the version before the change.

    Only errors reported by instances of selected pods not being deleted count (`backed`):
    a record naming no such pod is plaintext anyone with etcd write access can plant, and
    counting it would let one revert ACTIVE and freeze commits."""
    rt, now = p.rt, p.now
    unhealthy = {
        i.instance
        for i in instances
        if i.instance in backed.serving and i.last_error_reason in MISCONFIG_REASONS
    }
    unhealthy |= set(judged.decision.stale_pods)
    for key in list(mem.unhealthy_since):
        if key not in unhealthy:
            del mem.unhealthy_since[key]
    for key in unhealthy:
        mem.unhealthy_since.setdefault(key, now)
    ro = p.spec.rollout
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
        expected=judged.expected,
        policy=BreakerPolicy(
            ro.max_unhealthy_instances, ro.max_unhealthy_percent, ro.window_seconds
        ),
        frozen=state.frozen,
    )
    if not verdict.trip or verdict.revert_to is None:
        return state, Outcome()
    await rt.write(
        p.name, rt.backend.freeze, p.name, verdict.message, after=lifted_freeze(p.status) or 0
    )
    version = await rt.write(
        p.name,
        rt.backend.rollback,
        p.name,
        verdict.revert_to,
        modified_by=f"operator:{rt.identity}",
        change=ChangeKind.BREAKER_REVERT,
        history_limit=ro.history_limit,
    )
    BREAKER_TRIPS.labels(p.name).inc()
    p.logger.error("breaker tripped: %s (ACTIVE now version %s)", verdict.message, version)
    state = await asyncio.to_thread(partial(rt.backend.state, p.name, tolerate_master=True))
    return state, Outcome(
        events=[warning(verdict.reason, verdict.message)],
        config=ConfigVerdict(cond.ConfigState.FROZEN, verdict.message),
        settled=True,
    )


def _uid(body: Any) -> str:
    return str((body.get("metadata") or {}).get("uid") or "")


async def _pause(wake: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less when `wake` is set (a heartbeat watch event, or the daemon
    being stopped: `_relay_stop`). No task per pause: a sleeping component costs one waiter."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await wake.wait()


async def _relay_stop(stopped: Any, wake: asyncio.Event) -> None:
    """Wake the daemon's pause when kopf stops it (the object is deleted, or the operator
    pauses or exits): one waiting task for the daemon's lifetime."""
    await stopped.wait()
    wake.set()


# Floor between passes, so a burst of watch events costs a few passes, not one each.
_MIN_PAUSE_SECONDS = 0.2
# How often a component with a canary rollout in progress is looked at, at the latest.
ROLLOUT_POLL_SECONDS = 5.0


async def run(
    rt: Runtime,
    stopped: Any,
    body: Any,
    namespace: str,
    name: str,
    logger: Logger,
    pod_index: PodIndex,
) -> None:
    """The per-component daemon: `tick` until `stopped`, whenever the operator wakes it (an
    instance, pod or etcd key of this component changed, or etcd's health or the keyring:
    `Runtime.wake`), when a pod's heartbeat deadline comes, and at the latest every
    monitor_interval_seconds."""
    uid = _uid(body)
    mem = rt.memory_of(namespace, name, uid)
    if mem is None:
        return  # deleted, or a same-named successor is handled already
    # This daemon's blocking calls take the monitor pool, never a reconcile's thread.
    enter_monitor()
    wake = rt.heartbeats.attach(name, namespace)
    relay = asyncio.ensure_future(_relay_stop(stopped, wake))
    mem.monitors += 1
    trigger = "first"
    try:
        while not stopped and not rt.ended(uid):
            wake.clear()
            began = time.monotonic()
            pause = rt.settings.monitor_interval_seconds
            timed = "interval"
            # kopf keeps the body; the newest event's brought managedFields back (`_bodies`).
            shed_managed_fields(body)
            try:
                due = await _pass(
                    rt, body, namespace, name, logger, pod_index, began=began, trigger=trigger
                )
                if due is not None:
                    # A hair past the deadline, so the pass sees it passed.
                    until = (due - utcnow()).total_seconds() + 0.05
                    if until < pause:
                        pause, timed = max(until, _MIN_PAUSE_SECONDS), "due"
            except (DefenderConfigError, OperatorError, ValueError) as exc:
                ERRORS.labels("monitor").inc()
                logger.warning("monitor pass failed, next pass in %ss: %s", pause, exc)
            await asyncio.sleep(_MIN_PAUSE_SECONDS)
            if not stopped and not rt.ended(uid):
                await _pause(wake, pause)
            trigger = "wake" if wake.is_set() else timed
    finally:
        mem.monitors -= 1
        rt.heartbeats.detach(name, wake)
        relay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay


async def _pass(
    rt: Runtime,
    body: Any,
    namespace: str,
    name: str,
    logger: Logger,
    pod_index: PodIndex,
    *,
    began: float | None = None,
    trigger: str = "wake",
) -> datetime | None:
    """One pass under the component's lock (a reconcile of it waits, and vice versa). With
    `began` (when the daemon cleared its wake-up), none when a pass that began since then
    completed meanwhile (a reconcile's, while this one waited for the lock): that pass saw
    every change that woke this one, and its answer of when the next is due stands."""
    if rt.ended(_uid(body)):
        return None  # not even a memory of it again
    mem = rt.memory(namespace, name)
    async with mem.lock:
        if rt.ended(_uid(body)):
            return None  # deleted while this pass waited for the lock: nothing to judge
        if began is not None and mem.last_pass is not None and mem.last_pass[0] >= began:
            return mem.last_pass[1]
        # kopf keeps `body` current from its watch (no read per pass); the status is ours as
        # last written when we wrote it, since the body lags our own writes.
        status = mem.status if mem.status is not None else dict(body.get("status") or {})
        if status:
            recall(mem, status)  # a Conflict shown before this operator started counts
        # Before the first reconcile there is nothing to judge (and no status to merge);
        # before etcd's health is first measured, a pass would report an outage that is only
        # "not measured yet" and flap the conditions a restarted operator kept. A resource
        # refused its etcd name (another owns it) has no instances of its own to judge, and
        # its pods must not be restarted for the owner's heartbeats.
        if mem.conflict is not None or not status.get("observedGeneration"):
            return None
        if not rt.etcd.measured:
            return None
        MONITOR_PASSES.labels(trigger).inc()
        return await tick(_visit(rt, body, namespace, name, logger, status), mem, pod_index)


def _visit(
    rt: Runtime,
    body: Any,
    namespace: str,
    name: str,
    logger: Logger,
    status: Mapping[str, Any],
    **extra: Any,
) -> Pass:
    """A pass over `body` as kopf keeps it, judging from `status`."""
    mem = rt.memory(namespace, name)
    key = spec_key(body)
    if mem.spec is None or mem.spec[0] != key:
        # Parsed once per spec, not per pass (a thousand components pass every few seconds),
        # by whichever comes first, the reconcile or a pass. An older object's values this API
        # refuses run as its bounds (`lift_legacy`; the reconcile says so).
        mem.spec = (key, _api.parse_stored_spec(body.get("spec") or {})[0])
    return Pass(
        rt=rt,
        body=body,
        namespace=namespace,
        name=name,
        generation=int(body.get("metadata", {}).get("generation") or 0),
        spec=mem.spec[1],
        status=status,
        logger=logger,
        now=utcnow(),
        **extra,
    )


async def after_reconcile(
    rt: Runtime,
    body: Any,
    namespace: str,
    name: str,
    logger: Logger,
    pod_index: PodIndex,
    stored: Mapping[str, Any],
    fields: Mapping[str, Any],
) -> bool:
    """A monitor pass run by a successful reconcile under its lock, publishing the reconcile's
    status `fields` and the pass's judgement (heartbeats, keys, Ready) in ONE status patch
    instead of two (the reconcile's, then the pass it woke). False when no pass can judge yet
    (the reconcile then publishes its fields alone) or the pass failed."""
    mem = rt.memory(namespace, name)
    if mem.conflict is not None or not rt.etcd.measured or not rt.keyring_ready:
        return False
    visit = _visit(
        rt, body, namespace, name, logger, {**stored, **fields}, carry=fields, stored=stored
    )
    MONITOR_PASSES.labels("reconcile").inc()
    try:
        await tick(visit, mem, pod_index)
    except (DefenderConfigError, OperatorError, ValueError) as exc:
        ERRORS.labels("monitor").inc()
        logger.warning("monitor pass after reconcile failed, publishing the reconcile's: %s", exc)
        return False
    return True
