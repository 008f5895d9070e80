"""Canary rollouts in the operator: start one instead of a commit, the promote/abort commands,
and the monitor's look at a rollout in progress. Decisions are in `_decisions.canary`; the
library (`defender_config.Rollouts`) writes the sealed candidate and the signed record."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from defender_config import (
    ConfigFrozenError,
    ConfigValidationError,
    ConflictError,
    RolloutRecord,
    canonical_json,
    config_digest,
    next_record_sequence,
    validate_config,
)
from defender_config.contract import ABORT_ANNOTATION, PROMOTE_ANNOTATION
from defender_operator import _api, _storage_budget
from defender_operator._backend import InstanceRecord
from defender_operator._decisions import conditions as cond
from defender_operator._decisions.backing import Backing, authentic, backing
from defender_operator._decisions.breaker import ActiveChange, lifted_freeze
from defender_operator._decisions.canary import (
    ABORTED,
    JUDGED_HISTORY_LIMIT,
    PROGRESSING,
    PROMOTED,
    Action,
    CanaryBeat,
    RecordAction,
    RolloutView,
    anchor_from_status,
    departed_canaries,
    judge_canary,
    judge_record,
    judged_limit,
    pick_canaries,
)
from defender_operator._decisions.storage_budget import STORAGE_BUDGET_EXCEEDED, PromotionLimit
from defender_operator._metrics import count_canary_abort
from defender_operator._outcome import ConfigVerdict, Outcome, normal, warning
from defender_operator._runtime import ComponentMemory, Runtime, utcnow

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]

SUPERSEDED = "Superseded"


def rollout_fields(
    record: RolloutRecord, phase: str, message: str, healthy_since: datetime | None = None
) -> dict[str, Any]:
    """status.rollout. Its sequence, digest, author and start are the anchor a replayed record
    is told from (`judge_record`), and what the rollout is written again from."""
    return {
        "rollout": {
            "sequence": record.sequence,
            "version": record.version,
            "baseVersion": record.base_version,
            "digest": record.digest,
            "since": cond.rfc3339(record.since),
            "by": record.by,
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
    status: Mapping[str, Any],
    by: str,
    logger: Logger,
    pods: Mapping[str, bool],
    mem: ComponentMemory,
    history_limit: int,
) -> Outcome | None:
    """Start (or keep) the canary rollout of `normalized`, instead of a commit. None when the
    component has no instance to try it on: the caller commits as usual.

    `history_limit`: the spec.rollout.historyLimit the storage budget judged this start under
    (the commit it is), kept in status.rollout: a promotion under a higher one is judged again
    (`_promote`).

    `pods`: the selected pods, each with whether it is being deleted. Canaries are picked only
    among instances whose record names one that is not (`_decisions.backing`): a record alone
    is plaintext anyone with etcd write access can plant, and a pod being deleted would end the
    rollout it was picked for as it goes."""
    current = await asyncio.to_thread(rt.backend.rollout, component)
    anchor = anchor_from_status(status.get("rollout"))
    anchored = anchor.sequence if anchor is not None else 0
    digest = config_digest(normalized)
    if current is not None and current.digest == digest and current.sequence >= max(anchored, 1):
        kept = _progressing(current, f"canary of version {current.version} in progress")
        return _judged_under(kept, history_limit)
    instances, _ = authentic(await asyncio.to_thread(rt.backend.instances, component))
    serving = backing(((i.instance, i.pod) for i in instances), pods).serving
    canaries = pick_canaries(sorted(serving), count=canary.instances, percent=canary.percent)
    if not canaries:
        logger.info("no live instance to try spec.config on: committed without a canary")
        return None
    # Above what status anchors and what etcd holds: readers refuse a record below the
    # highest they saw, so the sequence must never go back.
    sequence = next_record_sequence(
        anchored, current.sequence if current is not None else 0, now=utcnow()
    )
    record = await rt.write(
        component,
        rt.backend.start_rollout,
        component,
        normalized,
        canaries,
        by=by,
        sequence=sequence,
    )
    named = {i.instance: i.pod for i in instances}
    mem.canary_pods = _pods_of(record.canaries, named)
    message = (
        f"version {record.version} goes to {', '.join(record.canaries)} first; promoted after"
        f" {canary.hold_seconds}s healthy"
    )
    logger.info("canary rollout started: %s", message)
    out = _judged_under(_progressing(record, message), history_limit)
    out.events.append(normal("CanaryStarted", message))
    return out


def _judged_under(out: Outcome, history_limit: int | None) -> Outcome:
    """status.rollout names the historyLimit its start was judged under (None: not known)."""
    written = out.fields.get("rollout")
    if isinstance(written, dict) and history_limit is not None:
        written[JUDGED_HISTORY_LIMIT] = history_limit
    return out


def carried(out: Outcome, status: Mapping[str, Any]) -> Outcome:
    """status.rollout is written from the record each time (and compared whole with the status
    stored, before a write): a write of the rollout status anchors (its candidate on the same
    base: waiting, written again, its canaries replaced, promoted, aborted or ended) keeps the
    limit its start was judged under; a write of another rollout names none."""
    written = out.fields.get("rollout")
    if not isinstance(written, dict) or JUDGED_HISTORY_LIMIT in written:
        return out
    anchor = anchor_from_status(status.get("rollout"))
    version, digest = written.get("version"), written.get("digest")
    if isinstance(version, int) and isinstance(digest, str):
        _judged_under(out, judged_limit(anchor, version, digest))
    return out


async def command(
    rt: Runtime,
    namespace: str,
    name: str,
    annotations: Mapping[str, str],
    *,
    status: Mapping[str, Any],
    by: str,
    spec: _api.DefenderComponentSpec,
    logger: Logger,
) -> Outcome:
    """`kubectl defender promote|abort`: the annotation is acted on once, then removed.
    An abort keeps spec.rollout.historyLimit as the spec holds it now; a promotion too, within
    the storage budget (`_promote`)."""
    history_limit = spec.rollout.history_limit
    out = Outcome()
    for annotation, promote in ((PROMOTE_ANNOTATION, True), (ABORT_ANNOTATION, False)):
        if annotation not in annotations:
            continue
        record = await asyncio.to_thread(rt.backend.rollout, name)
        stale = record is not None and _replaced(record, status)
        if record is None or stale:
            # A saved record put back is never promoted (its candidate would become ACTIVE
            # everywhere) nor aborted on: the monitor's next pass puts the current one back.
            why = (
                "the rollout record in etcd is not the current one (a saved record put back);"
                " ask again after the operator's next pass"
                if stale
                else "no canary rollout in progress"
            )
            out.events.append(warning("RolloutCommandIgnored", f"{annotation}: {why}"))
        elif promote:
            version, chosen = await _promote(
                rt, namespace, name, spec, status, record, by=by, logger=logger
            )
            message = f"canary of version {record.version} promoted by command as {version}"
            logger.info(message)
            out.add(_promoted(record, version, message, chosen))
        else:
            message = (
                f"canary of version {record.version} aborted by command; commits are frozen"
                " until unfreeze"
            )
            await rt.write(
                name,
                rt.backend.abort_rollout,
                name,
                message,
                by=by,
                history_limit=history_limit,
                freeze_after=lifted_freeze(status) or 0,
            )
            count_canary_abort(name, "Command")
            logger.warning(message)
            out.add(_aborted(record, message))
        await asyncio.to_thread(rt.kube.remove_annotation, namespace, name, annotation)
    return carried(out, status)


async def _promote(
    rt: Runtime,
    namespace: str,
    name: str,
    spec: _api.DefenderComponentSpec,
    status: Mapping[str, Any],
    record: RolloutRecord,
    *,
    by: str,
    logger: Logger,
) -> tuple[int, PromotionLimit]:
    """Promote `record`'s candidate; the version now ACTIVE, and the historyLimit it kept.
    The spec's now, not the one the rollout started under (a limit edited meanwhile is what the
    person wants kept from this commit on), within the storage budget: its start was judged
    under the limit then (status.rollout), so a limit raised since, which keeps versions that
    judgment counted as pruned, is judged again here, and where the namespace has no room for
    them the promotion keeps what fits instead (`_storage_budget.check_promotion`). Never
    refused for it: a good canary completes."""

    async def candidate_bytes() -> int | None:
        # spec.config is the candidate unless it changed since (its reconcile supersedes the
        # rollout) or no longer validates: then its size is not the candidate's.
        try:
            normalized = await asyncio.to_thread(
                validate_config,
                spec.component_type.value,
                spec.config,
                spec.custom_schema,
                component=name,
            )
        except ConfigValidationError:
            return None
        return (
            len(canonical_json(normalized)) if config_digest(normalized) == record.digest else None
        )

    chosen = await _storage_budget.check_promotion(
        rt,
        namespace,
        name,
        name,
        version=record.version,
        judged=judged_limit(
            anchor_from_status(status.get("rollout")), record.version, record.digest
        ),
        limit=spec.rollout.history_limit,
        candidate_bytes=candidate_bytes,
    )
    if chosen.limited:
        logger.warning("%s", chosen)
    version = await rt.write(
        name, rt.backend.promote_rollout, name, by=by, history_limit=chosen.limit
    )
    return version, chosen


def _promoted(record: RolloutRecord, version: int, message: str, chosen: PromotionLimit) -> Outcome:
    """The promotion's outcome; one that kept fewer versions than the spec asks says why: in
    the Rollout condition, and as a Warning Event when the storage budget refused the rest."""
    if chosen.limited:
        message = f"{message}; {chosen}"
    out = Outcome(
        events=[normal("CanaryPromoted", message)],
        config=ConfigVerdict(cond.ConfigState.SYNCED),
        conditions=_condition(PROMOTED, message),
        fields=rollout_fields(record, PROMOTED, message),
        change=ActiveChange(version=version, previous_version=record.base_version, time=utcnow()),
    )
    if chosen.refusal is not None:
        out.events.append(warning(STORAGE_BUDGET_EXCEEDED, str(chosen)))
    return out


def _aborted(record: RolloutRecord, message: str) -> Outcome:
    return Outcome(
        events=[warning("CanaryAborted", message)],
        config=ConfigVerdict(cond.ConfigState.FROZEN, message),
        conditions=_condition(ABORTED, message),
        fields=rollout_fields(record, ABORTED, message),
    )


def _view(record: RolloutRecord) -> RolloutView:
    return RolloutView(
        record.version,
        record.base_version,
        record.digest,
        record.canaries,
        record.since,
        sequence=record.sequence,
        by=record.by,
    )


def _replaced(record: RolloutRecord, status: Mapping[str, Any]) -> bool:
    """True when `record` is not the rollout status anchors (`judge_record`)."""
    verdict = judge_record(
        record=_view(record),
        anchor=anchor_from_status(status.get("rollout")),
        spec_digest=None,
        active_version=None,
        now=utcnow(),
    )
    return verdict.action is not RecordAction.KEEP


async def _check_record(
    rt: Runtime,
    name: str,
    spec: _api.DefenderComponentSpec,
    status: Mapping[str, Any],
    record: RolloutRecord | None,
    *,
    active_version: int | None,
    now: datetime,
    logger: Logger,
) -> Outcome | None:
    """None when `record` is the rollout status anchors (or a newer one of ours, or none and
    status holds none in progress); else the outcome of removing it, or of writing the
    anchored rollout again over it (or where it was deleted)."""
    verdict = judge_record(
        record=_view(record) if record is not None else None,
        anchor=anchor_from_status(status.get("rollout")),
        spec_digest=status.get("specConfigDigest"),
        active_version=active_version,
        now=now,
    )
    if verdict.action is RecordAction.KEEP:
        return None
    out = Outcome()
    if verdict.replayed:
        logger.warning("%s", verdict.message)
        await rt.write(name, rt.backend.alert, "RecordReplayed", name, verdict.message)
        out.events.append(warning("RolloutRecordReplayed", verdict.message))
    else:
        logger.info("%s", verdict.message)
    again = verdict.reissue
    if verdict.action is RecordAction.REMOVE or again is None:
        await rt.write(name, rt.backend.end_rollout, name, sequence=verdict.sequence)
        return out
    # Written in one transaction over what is there, guarded on ACTIVE's metadata, and only
    # when spec.config is still the config the anchor names (the digest check).
    try:
        reissued = await rt.write(
            name,
            rt.backend.start_rollout,
            name,
            spec.config,
            again.canaries,
            by=again.by,
            sequence=verdict.sequence,
            since=again.since,
            digest=again.digest,
        )
    except (ConflictError, ConfigFrozenError, ConfigValidationError) as exc:
        # spec.config changed (or no longer validates) since status anchored the rollout (its
        # reconcile handles the new one), or commits were frozen meanwhile: the replay is
        # ended, nothing written again.
        logger.info("anchored rollout not written again (%s): the replay is ended", exc.reason)
        await rt.write(name, rt.backend.end_rollout, name, sequence=verdict.sequence)
        return out
    out.add(_progressing(reissued, f"canary of version {reissued.version} in progress"))
    if not verdict.replayed:
        out.events.append(normal("RolloutReissued", verdict.message))
    return out


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
    namespace: str,
    name: str,
    spec: _api.DefenderComponentSpec,
    status: Mapping[str, Any],
    mem: ComponentMemory,
    *,
    record: RolloutRecord | None,
    active_version: int | None,
    instances: Sequence[InstanceRecord],
    live: Sequence[InstanceRecord],
    pods: Mapping[str, bool],
    backed: Backing,
    now: datetime,
    logger: Logger,
) -> Outcome:
    """The monitor's look at a rollout in progress (`record`, as the pass read it): wait,
    promote, abort, end it, or name other canaries in place of those whose pod left.

    `pods`: the selected pods, each with whether it is being deleted; `backed`: the pass's
    instances by what backs them (`_decisions.backing`). The caller passes the outcome
    through `carried` (status.rollout keeps the historyLimit its start was judged under)."""
    checked = await _check_record(
        rt, name, spec, status, record, active_version=active_version, now=now, logger=logger
    )
    if checked is not None:
        return checked
    if record is None or record.ended:
        mem.canary_healthy = None
        mem.canary_pods.clear()
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
    named = {i.instance: i.pod for i in instances}
    # The pod a canary's record names while that pod is selected, else the one remembered:
    # once its pod left, its record may be gone too (its agent revoked its lease).
    remembered: dict[str, str] = {}
    for c in record.canaries:
        pod = named.get(c)
        if pod is not None and pod in pods:
            remembered[c] = pod
        elif c in mem.canary_pods:
            remembered[c] = mem.canary_pods[c]
    mem.canary_pods = remembered
    departed = departed_canaries(record.canaries, named, mem.canary_pods, pods)
    alive = {i.instance for i in live}
    healthy = mem.canary_healthy
    verdict = judge_canary(
        now=now,
        rollout=_view(record),
        active_version=active_version,
        beats=_beats(instances, live),
        healthy_since=healthy[1] if healthy and healthy[0] == record.digest else None,
        hold_seconds=canary.hold_seconds,
        deadline_seconds=canary.progress_deadline_seconds,
        departed=departed,
        candidates=sorted(backed.serving & alive),
    )
    mem.canary_healthy = (
        (record.digest, verdict.healthy_since) if verdict.healthy_since is not None else None
    )
    if verdict.action is Action.WAIT:
        out = _progressing(record, verdict.message)
        out.fields = rollout_fields(record, PROGRESSING, verdict.message, verdict.healthy_since)
        return out
    if verdict.action is Action.PROMOTE:
        version, chosen = await _promote(
            rt, namespace, name, spec, status, record, by=by, logger=logger
        )
        logger.info("canary promoted as ACTIVE version %s: %s", version, verdict.message)
        return _promoted(record, version, verdict.message, chosen)
    if verdict.action is Action.REPLACE:
        return await _replace(
            rt,
            name,
            spec,
            status,
            mem,
            record,
            verdict.canaries,
            named,
            now=now,
            message=verdict.message,
            logger=logger,
        )
    if verdict.action is Action.SUPERSEDED:
        await rt.write(name, rt.backend.end_rollout, name)
        return Outcome(
            conditions=_condition(SUPERSEDED, verdict.message),
            fields=rollout_fields(record, SUPERSEDED, verdict.message),
        )
    await rt.write(
        name,
        rt.backend.abort_rollout,
        name,
        verdict.message,
        by=by,
        history_limit=spec.rollout.history_limit,
        freeze_after=lifted_freeze(status) or 0,
    )
    count_canary_abort(name, verdict.reason)
    await rt.write(name, rt.backend.alert, "CanaryAborted", name, verdict.message)
    logger.error("canary aborted (%s): %s", verdict.reason, verdict.message)
    return _aborted(record, verdict.message)


def lifetime_ended(mem: ComponentMemory, status: Mapping[str, Any], message: str) -> Outcome:
    """The name's data was purged and seeded again (`_reconcile.reseed_after_restore`): a
    rollout status anchors in progress went with the purged lifetime. Shown ended
    (Superseded), or the monitor would write that lifetime's candidate again over the new
    registration (`judge_record`: a record gone while status says in progress). Its sequence
    stays anchored, so a saved record put back is still a replay; the new lifetime's rollouts
    take sequences above it from the clock."""
    mem.canary_healthy = None
    mem.canary_pods.clear()
    anchored = status.get("rollout")
    if not isinstance(anchored, Mapping) or anchored.get("phase") != PROGRESSING:
        return Outcome()
    ended = {**anchored, "phase": SUPERSEDED, "healthySince": None, "message": message}
    return Outcome(conditions=_condition(SUPERSEDED, message), fields={"rollout": ended})


async def _replace(
    rt: Runtime,
    name: str,
    spec: _api.DefenderComponentSpec,
    status: Mapping[str, Any],
    mem: ComponentMemory,
    record: RolloutRecord,
    canaries: tuple[str, ...],
    named: Mapping[str, str | None],
    *,
    now: datetime,
    message: str,
    logger: Logger,
) -> Outcome:
    """Write the rollout again naming `canaries` (some canaries' pods left): the same candidate
    and author, a sequence above the record's and the anchored one, and a new start, so the
    new canaries get the whole progress deadline and hold."""
    anchor = anchor_from_status(status.get("rollout"))
    sequence = next_record_sequence(
        anchor.sequence if anchor is not None else 0, record.sequence, now=now
    )
    try:
        replaced = await rt.write(
            name,
            rt.backend.start_rollout,
            name,
            spec.config,
            canaries,
            by=record.by,
            sequence=sequence,
            digest=record.digest,
        )
    except (ConflictError, ConfigFrozenError, ConfigValidationError) as exc:
        # As when a replayed rollout cannot be written again (`_check_record`): spec.config
        # changed or no longer validates (its reconcile handles it), or commits were frozen
        # meanwhile. The canaries left are no failure of the candidate: ended, not aborted.
        ended = (
            f"canary of version {record.version} ended: its canary pod(s) left and it could"
            f" not be written again ({exc.reason})"
        )
        logger.info("%s", ended)
        await rt.write(name, rt.backend.end_rollout, name)
        mem.canary_healthy = None
        return Outcome(
            conditions=_condition(SUPERSEDED, ended),
            fields=rollout_fields(record, SUPERSEDED, ended),
        )
    mem.canary_healthy = None
    mem.canary_pods = _pods_of(replaced.canaries, named)
    logger.info("canaries replaced: %s", message)
    out = _progressing(replaced, message)
    out.events.append(normal("CanaryReplaced", message))
    return out


def _pods_of(canaries: Iterable[str], named: Mapping[str, str | None]) -> dict[str, str]:
    """The pod each canary's record names (none: not remembered)."""
    return {c: pod for c in canaries if (pod := named.get(c)) is not None}
