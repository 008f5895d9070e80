"""Canary rollouts in the operator: start one instead of a commit, the promote/abort commands,
and the monitor's look at a rollout in progress. Decisions are in `_decisions.canary`; the
library (`defender_config.Rollouts`) writes the sealed candidate and the signed record."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from defender_config import RolloutRecord, config_digest
from defender_config.contract import ABORT_ANNOTATION, PROMOTE_ANNOTATION
from defender_operator import _api
from defender_operator._backend import InstanceRecord
from defender_operator._decisions import conditions as cond
from defender_operator._decisions.breaker import ActiveChange
from defender_operator._decisions.canary import (
    ABORTED,
    PROGRESSING,
    PROMOTED,
    Action,
    CanaryBeat,
    RolloutView,
    judge_canary,
    pick_canaries,
)
from defender_operator._metrics import count_canary_abort
from defender_operator._outcome import ConfigVerdict, Outcome, normal, warning
from defender_operator._runtime import ComponentMemory, Runtime, utcnow

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]

SUPERSEDED = "Superseded"


def rollout_fields(
    record: RolloutRecord, phase: str, message: str, healthy_since: datetime | None = None
) -> dict[str, Any]:
    """status.rollout."""
    return {
        "rollout": {
            "version": record.version,
            "baseVersion": record.base_version,
            "canaries": list(record.canaries),
            "phase": phase,
            "healthySince": cond.rfc3339(healthy_since) if healthy_since else None,
            "message": message,
        }
    }


def _condition(phase: str, message: str) -> dict[str, cond.Cond | None]:
    status = cond.FALSE if phase in (ABORTED, SUPERSEDED) else cond.TRUE
    return {cond.ROLLOUT: cond.Cond(cond.ROLLOUT, status, phase, message)}


def _progressing(record: RolloutRecord, message: str) -> Outcome:
    return Outcome(
        config=ConfigVerdict(cond.ConfigState.CANARY, message),
        conditions=_condition(PROGRESSING, message),
        fields=rollout_fields(record, PROGRESSING, message),
    )


async def start(
    rt: Runtime,
    component: str,
    canary: _api.CanarySpec,
    normalized: Mapping[str, Any],
    *,
    by: str,
    logger: Logger,
) -> Outcome | None:
    """Start (or keep) the canary rollout of `normalized`, instead of a commit. None when the
    component has no instance to try it on: the caller commits as usual."""
    current = await asyncio.to_thread(rt.backend.rollout, component)
    digest = config_digest(normalized)
    if current is not None and current.digest == digest:
        return _progressing(current, f"canary of version {current.version} in progress")
    instances = await asyncio.to_thread(rt.backend.instances, component)
    canaries = pick_canaries(
        [i.instance for i in instances], count=canary.instances, percent=canary.percent
    )
    if not canaries:
        logger.info("no live instance to try spec.config on: committed without a canary")
        return None
    record = await rt.write(
        component, rt.backend.start_rollout, component, normalized, canaries, by=by
    )
    message = (
        f"version {record.version} goes to {', '.join(record.canaries)} first; promoted after"
        f" {canary.hold_seconds}s healthy"
    )
    logger.info("canary rollout started: %s", message)
    out = _progressing(record, message)
    out.events.append(normal("CanaryStarted", message))
    return out


async def command(
    rt: Runtime,
    namespace: str,
    name: str,
    annotations: Mapping[str, str],
    *,
    by: str,
    logger: Logger,
) -> Outcome:
    """`kubectl defender promote|abort`: the annotation is acted on once, then removed."""
    out = Outcome()
    for annotation, promote in ((PROMOTE_ANNOTATION, True), (ABORT_ANNOTATION, False)):
        if annotation not in annotations:
            continue
        record = await asyncio.to_thread(rt.backend.rollout, name)
        if record is None:
            out.events.append(
                warning("RolloutCommandIgnored", f"{annotation}: no canary rollout in progress")
            )
        elif promote:
            version = await rt.write(name, rt.backend.promote_rollout, name, by=by)
            message = f"canary of version {record.version} promoted by command as {version}"
            logger.info(message)
            out.add(_promoted(record, version, message))
        else:
            message = (
                f"canary of version {record.version} aborted by command; commits are frozen"
                " until unfreeze"
            )
            await rt.write(name, rt.backend.abort_rollout, name, message, by=by)
            count_canary_abort(name, "Command")
            logger.warning(message)
            out.add(_aborted(record, message))
        await asyncio.to_thread(rt.kube.remove_annotation, namespace, name, annotation)
    return out


def _promoted(record: RolloutRecord, version: int, message: str) -> Outcome:
    return Outcome(
        events=[normal("CanaryPromoted", message)],
        config=ConfigVerdict(cond.ConfigState.SYNCED),
        conditions=_condition(PROMOTED, message),
        fields=rollout_fields(record, PROMOTED, message),
        change=ActiveChange(version=version, previous_version=record.base_version, time=utcnow()),
    )


def _aborted(record: RolloutRecord, message: str) -> Outcome:
    return Outcome(
        events=[warning("CanaryAborted", message)],
        config=ConfigVerdict(cond.ConfigState.FROZEN, message),
        conditions=_condition(ABORTED, message),
        fields=rollout_fields(record, ABORTED, message),
    )


def _beats(
    instances: Sequence[InstanceRecord], live: Sequence[InstanceRecord]
) -> dict[str, CanaryBeat]:
    alive = {i.instance for i in live}
    return {
        i.instance: CanaryBeat(
            alive=i.instance in alive,
            digest=i.config_digest,
            error_reason=i.last_error_reason,
            error_detail=i.last_error_detail,
        )
        for i in instances
    }


async def watch(
    rt: Runtime,
    name: str,
    spec: _api.DefenderComponentSpec,
    status: Mapping[str, Any],
    mem: ComponentMemory,
    *,
    record: RolloutRecord | None,
    active_version: int | None,
    instances: Sequence[InstanceRecord],
    live: Sequence[InstanceRecord],
    now: datetime,
    logger: Logger,
) -> Outcome:
    """The monitor's look at a rollout in progress (`record`, as the pass read it): wait,
    promote, abort or end it."""
    if record is None:
        mem.canary_healthy = None
        return Outcome()
    by = f"operator:{rt.identity}"
    handled = status.get("specConfigDigest")
    if handled and handled != record.digest:
        await rt.write(name, rt.backend.end_rollout, name)
        message = f"spec.config changed: canary of version {record.version} ended"
        return Outcome(
            conditions=_condition(SUPERSEDED, message),
            fields=rollout_fields(record, SUPERSEDED, message),
        )
    canary = spec.rollout.canary or _api.CanarySpec(instances=1, hold_seconds=0)
    healthy = mem.canary_healthy
    verdict = judge_canary(
        now=now,
        rollout=RolloutView(
            record.version, record.base_version, record.digest, record.canaries, record.since
        ),
        active_version=active_version,
        beats=_beats(instances, live),
        healthy_since=healthy[1] if healthy and healthy[0] == record.digest else None,
        hold_seconds=canary.hold_seconds,
        deadline_seconds=canary.progress_deadline_seconds,
    )
    mem.canary_healthy = (
        (record.digest, verdict.healthy_since) if verdict.healthy_since is not None else None
    )
    if verdict.action is Action.WAIT:
        out = _progressing(record, verdict.message)
        out.fields = rollout_fields(record, PROGRESSING, verdict.message, verdict.healthy_since)
        return out
    if verdict.action is Action.PROMOTE:
        version = await rt.write(name, rt.backend.promote_rollout, name, by=by)
        logger.info("canary promoted as ACTIVE version %s: %s", version, verdict.message)
        return _promoted(record, version, verdict.message)
    if verdict.action is Action.SUPERSEDED:
        await rt.write(name, rt.backend.end_rollout, name)
        return Outcome(
            conditions=_condition(SUPERSEDED, verdict.message),
            fields=rollout_fields(record, SUPERSEDED, verdict.message),
        )
    await rt.write(name, rt.backend.abort_rollout, name, verdict.message, by=by)
    count_canary_abort(name, verdict.reason)
    await rt.write(name, rt.backend.alert, "CanaryAborted", name, verdict.message)
    logger.error("canary aborted (%s): %s", verdict.reason, verdict.message)
    return _aborted(record, verdict.message)
