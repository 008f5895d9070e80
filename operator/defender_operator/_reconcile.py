"""Reconcile one DefenderComponent: commands, seeding, commits, keyring copy, status.

Called by kopf on create, resume and spec/annotation changes (see `handlers`). Level-based: it
compares what etcd holds with the spec and writes only the difference, so running it twice, or
after an operator restart, changes nothing that is already right.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from defender_config import (
    ConfigValidationError,
    DefenderConfigError,
    StoragePolicy,
    StoreUnavailableError,
    config_digest,
    validate_config,
)
from defender_operator import _api
from defender_operator._backend import ComponentState
from defender_operator._decisions import conditions as cond
from defender_operator._decisions.breaker import ActiveChange
from defender_operator._decisions.ownership import (
    Claim,
    ClaimAction,
    ClaimDecision,
    Release,
    decide_claim,
    decide_release,
)
from defender_operator._decisions.restarts import restart_history
from defender_operator._decisions.seeding import StoredState, plan_seed
from defender_operator._errors import RETRY_KEYRING, OwnerRecordError, kopf_errors
from defender_operator._metrics import COMMITS
from defender_operator._runtime import ComponentMemory, Runtime, utcnow

UNFREEZE_ANNOTATION = f"{_api.GROUP}/unfreeze"
ADOPT_ANNOTATION = f"{_api.GROUP}/adopt"
OWNER_RECORD_UNREADABLE = "OwnerRecordUnreadable"


def storage_policy(storage: _api.StorageSpec) -> StoragePolicy:
    """spec.storage as the library's per-component policy (seal options of its values)."""
    return StoragePolicy(
        compress=storage.compression.enabled,
        encrypt=storage.encryption.enabled,
        level=storage.compression.level,
        threshold_bytes=storage.compression.threshold_bytes,
    )


def _etcd_name(name: str) -> str:
    # The resource name is the component name in etcd (what components register under).
    return name


async def publish_status(
    rt: Runtime,
    namespace: str,
    name: str,
    generation: int,
    current_status: Mapping[str, Any],
    fields: Mapping[str, Any],
) -> None:
    """Write `fields` plus freshly computed conditions to the status subresource."""
    mem = rt.memory(namespace, name)
    if mem.status is not None:
        # Ours as last written: the caller's copy may lag our previous write.
        current_status = mem.status
    obs = cond.Observation(
        config=mem.config_state,
        config_message=mem.config_message,
        config_reason=mem.config_reason,
        heartbeat=mem.heartbeat,
        key=mem.key,
        misconfig=mem.misconfig,
        keyring=rt.keyring_condition(),
        conflict=mem.conflict,
        cadence=mem.cadence_condition,
    )
    conditions = cond.merge(
        current_status.get("conditions") or [],
        cond.compute(obs),
        now=utcnow(),
        generation=generation,
    )
    patch = {**fields, "conditions": conditions}
    unchanged = all(current_status.get(k) == v for k, v in patch.items())
    if unchanged:
        mem.status = dict(current_status)
        return
    stored = await asyncio.to_thread(rt.kube.patch_status, namespace, name, patch)
    mem.status = stored


def recall(mem: ComponentMemory, status: Mapping[str, Any]) -> None:
    """Take what the last operator knew from the status, once per component: a new operator
    (restarted, or a standby taking over) shows the last known conditions until it observes
    its own instead of flapping them to Pending, and inherits the restart budget it spent."""
    if mem.history_loaded:
        return
    mem.history_loaded = True
    status = mem.status or status
    if not mem.restart_times:
        mem.restart_times = restart_history(status.get("recentRestartTimes"), limit=1000)
    conditions = status.get("conditions")
    if mem.config_state is cond.ConfigState.UNKNOWN:
        mem.config_state, mem.config_message = cond.last_config_state(conditions)
    mem.heartbeat = mem.heartbeat or cond.last_known(conditions, cond.HEARTBEATING)
    mem.key = mem.key or cond.last_known(conditions, cond.KEY_CURRENT)
    mem.misconfig = mem.misconfig or cond.last_known(conditions, cond.MISCONFIGURED)
    conflict = cond.last_known(conditions, cond.CONFLICT)
    if mem.conflict is None and conflict is not None and conflict.status == cond.TRUE:
        mem.conflict = conflict  # refused before: the monitor judges nothing until reconciled
    if mem.heartbeat is not None and mem.heartbeat.reason == "RestartBudgetExhausted":
        mem.degraded_reported = True  # already told: no second Event from a new operator


def state_fields(state: ComponentState) -> dict[str, Any]:
    return {
        "activeVersion": state.active_version or 0,
        "masterDigest": state.master_digest or "",
        "activeDigest": state.active_digest or "",
        "frozen": state.frozen,
    }


async def reconcile(
    rt: Runtime,
    *,
    body: Any,
    namespace: str,
    name: str,
    generation: int,
    raw_spec: Mapping[str, Any],
    status: Mapping[str, Any],
    annotations: Mapping[str, str],
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> None:
    mem = rt.memory(namespace, name)
    async with mem.lock:
        recall(mem, status)
        try:
            with kopf_errors():
                if not rt.keyring_ready:
                    # No keyring that opens the stored values (`_keyguard`): nothing is read,
                    # claimed, committed, seeded or copied until a person restores it (the owner
                    # record's MAC cannot be checked either); the status shows KeyUnavailable.
                    raise kopf.TemporaryError(
                        f"paused, keyring unavailable: {rt.keyring_condition().message}",
                        delay=RETRY_KEYRING,
                    )
                if not await _claim(rt, mem, body, namespace, name, annotations, logger):
                    await publish_status(rt, namespace, name, generation, status, {})
                    return
                await _reconcile(
                    rt,
                    mem,
                    body,
                    namespace,
                    name,
                    generation,
                    raw_spec,
                    status,
                    annotations,
                    logger,
                )
        except kopf.TemporaryError as exc:
            if isinstance(exc.__cause__, StoreUnavailableError):
                mem.config_state = cond.ConfigState.STORE_UNAVAILABLE
                mem.config_message = str(exc)
            # Conditions appear even when the first visit fails, saying why where known.
            await publish_status(rt, namespace, name, generation, status, {})
            raise
        except kopf.PermanentError as exc:
            # Not retried: a person must act, so the resource says what and why.
            cause = exc.__cause__
            reason = cause.reason if isinstance(cause, DefenderConfigError) else "SpecRefused"
            mem.config_state = cond.ConfigState.REFUSED
            mem.config_reason = reason
            mem.config_message = str(exc)
            kopf.event(body, type="Warning", reason=reason, message=str(exc))
            logger.error("refused, not retried: %s", exc)
            await publish_status(rt, namespace, name, generation, status, {})
            raise
    # The monitor judges heartbeats, keys and Ready right away rather than at its next
    # interval: a new component is Ready as soon as its instances are seen.
    rt.heartbeats.waker(name).set()


def _uid(body: Any) -> str:
    return str((body.get("metadata") or {}).get("uid") or "")


async def _claim(
    rt: Runtime,
    mem: ComponentMemory,
    body: Any,
    namespace: str,
    name: str,
    annotations: Mapping[str, str],
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> bool:
    """Make sure this resource owns its etcd name before anything is written (see
    `_decisions.ownership`); False, with the Conflict condition and a Warning Event, when
    another resource owns it."""
    component = _etcd_name(name)
    claimant = Claim(namespace, name, _uid(body))
    # A lost compare means someone wrote the record meanwhile: decide again on what is there.
    for _ in range(3):
        try:
            existing, revision = await asyncio.to_thread(rt.backend.read_claim, component)
        except OwnerRecordError as exc:
            decision = ClaimDecision(
                ClaimAction.REFUSE, reason=OWNER_RECORD_UNREADABLE, message=str(exc)
            )
        else:
            decision = decide_claim(existing, claimant, annotations.get(ADOPT_ANNOTATION))
        if decision.record is not None and not await asyncio.to_thread(
            rt.backend.write_claim, component, decision.record, revision=revision
        ):
            continue
        if decision.allowed:
            _claimed(body, component, decision, existing, logger)
            mem.conflict = None
            return True
        mem.conflict = cond.Cond(cond.CONFLICT, cond.TRUE, decision.reason, decision.message)
        kopf.event(body, type="Warning", reason=decision.reason, message=decision.message)
        logger.warning("refused, nothing written: %s", decision.message)
        return False
    raise kopf.TemporaryError(f"the owner record of {component} keeps changing", delay=1.0)


def _claimed(
    body: Any,
    component: str,
    decision: ClaimDecision,
    existing: Claim | None,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> None:
    if decision.action is ClaimAction.CREATE:
        logger.info("claimed etcd component %s", component)
    elif decision.action in (ClaimAction.TAKE_OVER, ClaimAction.ADOPT) and existing is not None:
        message = f"etcd component {component} taken over from {existing.ref} (uid {existing.uid})"
        logger.info(message)
        kopf.event(body, type="Normal", reason="NameAdopted", message=message)


async def _reconcile(
    rt: Runtime,
    mem: ComponentMemory,
    body: Any,
    namespace: str,
    name: str,
    generation: int,
    raw_spec: Mapping[str, Any],
    status: Mapping[str, Any],
    annotations: Mapping[str, str],
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> None:
    component = _etcd_name(name)
    try:
        spec = _api.parse_spec(dict(raw_spec))
    except ValueError as exc:
        # The API server's schema should have refused this; an old CRD version may not have.
        raise kopf.PermanentError(
            f"spec does not match the DefenderComponent schema: {exc}"
        ) from exc
    who = f"operator:{rt.identity}"
    # Before anything is read: whether this reader accepts the component unencrypted comes
    # from its spec, never from etcd.
    await asyncio.to_thread(
        rt.backend.declare,
        component,
        spec.component_type.value,
        json_schema=spec.custom_schema,
        storage=storage_policy(spec.storage),
        digest=None,
        modified_by=who,
    )

    # The namespace's keyring copy comes first: pods cannot read anything without it.
    await asyncio.to_thread(
        functools.partial(
            rt.secrets.fan_out,
            max_age=rt.settings.secret_copy_check_seconds,
            referenced=lambda: rt.backend.key_usage().key_ids,
        ),
        rt.keyring.current(),
        namespace,
    )

    fields: dict[str, Any] = {}
    if UNFREEZE_ANNOTATION in annotations:
        await asyncio.to_thread(rt.backend.unfreeze, component)
        await asyncio.to_thread(rt.kube.remove_annotation, namespace, name, UNFREEZE_ANNOTATION)
        kopf.event(
            body,
            type="Normal",
            reason="Unfrozen",
            message="commits allowed again (unfreeze command)",
        )
        logger.info("unfrozen by command")

    target = annotations.get(_api.ROLLBACK_ANNOTATION)
    if target is not None:
        await _rollback_command(rt, body, component, namespace, name, target, who, logger)

    raw_digest = config_digest(spec.config)
    try:
        normalized = validate_config(
            spec.component_type.value, spec.config, spec.custom_schema, component=component
        )
    except ConfigValidationError as exc:
        mem.config_state = cond.ConfigState.INVALID
        mem.config_message = str(exc)
        kopf.event(
            body, type="Warning", reason="ConfigInvalid", message=f"spec.config refused: {exc}"
        )
        logger.warning("spec.config refused, ACTIVE untouched: %s", exc)
        first_time = status.get("specConfigDigest") != raw_digest
        # Only when this invalid spec is new: a resume must not roll back once more.
        if (
            first_time
            and spec.rollout.on_invalid_config is _api.InvalidConfigPolicy.REVERT_TO_MASTER
        ):
            version = await asyncio.to_thread(rt.backend.rollback, component, None, modified_by=who)
            kopf.event(
                body,
                type="Warning",
                reason="RevertedToMaster",
                message=f"ACTIVE reverted to MASTER as version {version} (onInvalidConfig)",
            )
        state = await asyncio.to_thread(rt.backend.state, component)
        fields.update(state_fields(state), specConfigDigest=raw_digest)
        fields["observedGeneration"] = generation
        await publish_status(rt, namespace, name, generation, status, fields)
        return

    digest = config_digest(normalized)
    storage = storage_policy(spec.storage)
    resigned = await asyncio.to_thread(
        rt.backend.declare,
        component,
        spec.component_type.value,
        json_schema=spec.custom_schema,
        storage=storage,
        digest=digest,
        modified_by=who,
    )
    if resigned:
        kopf.event(
            body,
            type="Warning",
            reason="MetadataResigned",
            message="the metadata record in etcd did not verify (unsigned or forged); it was "
            "rebuilt from the newest authenticated config and signed",
        )
    state = await asyncio.to_thread(rt.backend.state, component)
    plan = plan_seed(
        digest,
        StoredState(state.master_digest, state.active_digest, state.active_version),
        str(status.get("specConfigDigest") or ""),
    )
    if plan.seed_master or plan.seed_active:
        state = await asyncio.to_thread(
            rt.backend.seed,
            component,
            spec.component_type.value,
            normalized,
            json_schema=spec.custom_schema,
            modified_by=who,
            storage=storage,
        )
        logger.info(
            "seeded %s (MASTER %s, ACTIVE version %s)",
            component,
            "created" if plan.seed_master else "kept",
            state.active_version,
        )
        # No Event: a routine success on every create, one API write per component for what
        # status.activeVersion and the ConfigSynced condition already show.
    mem.config_state = cond.ConfigState.SYNCED
    mem.config_message = ""
    if plan.commit:
        if state.frozen:
            mem.config_state = cond.ConfigState.FROZEN
            mem.config_message = (
                "commits are frozen by the blast-radius breaker; fix spec.config and run"
                f" `kubectl annotate defendercomponent {name} {UNFREEZE_ANNOTATION}=now`"
            )
            kopf.event(body, type="Warning", reason="CommitFrozen", message=mem.config_message)
            fields.update(state_fields(state), observedGeneration=generation)
            await publish_status(rt, namespace, name, generation, status, fields)
            return
        previous = state.active_version or 0
        version = await asyncio.to_thread(
            rt.backend.commit,
            component,
            spec.component_type.value,
            normalized,
            json_schema=spec.custom_schema,
            modified_by=who,
            history_limit=spec.rollout.history_limit,
            storage=storage,
        )
        COMMITS.labels(component).inc()
        mem.last_change = ActiveChange(version=version, previous_version=previous, time=utcnow())
        logger.info("committed ACTIVE version %s (was %s)", version, previous)
        kopf.event(
            body, type="Normal", reason="Committed", message=f"ACTIVE version {version} committed"
        )
        state = await asyncio.to_thread(rt.backend.state, component)
    if state.active_version is not None and state.storage != storage:
        # spec.storage changed alone (or MASTER was adopted from before): re-seal what is
        # stored under the new policy; the config and its version stay as they are.
        await asyncio.to_thread(rt.backend.set_storage, component, storage, modified_by=who)
        logger.info("storage policy of %s is now %s", component, storage)
        kopf.event(
            body,
            type="Normal",
            reason="StorageChanged",
            message=(
                f"stored values re-sealed: compression {'on' if storage.compress else 'off'}"
                f" (level {storage.level}), encryption {'on' if storage.encrypt else 'off'}"
            ),
        )
        state = await asyncio.to_thread(rt.backend.state, component)
    fields.update(
        state_fields(state),
        specConfigDigest=digest,
        observedGeneration=generation,
        keyFingerprint=rt.keyring.current().primary_fingerprint,
    )
    await publish_status(rt, namespace, name, generation, status, fields)


async def _rollback_command(
    rt: Runtime,
    body: Any,
    component: str,
    namespace: str,
    name: str,
    target: str,
    who: str,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> None:
    to_version: int | None
    if target.strip().lower() in ("master", ""):
        to_version = None
    elif target.strip().isdigit():
        to_version = int(target.strip())
    else:
        await asyncio.to_thread(
            rt.kube.remove_annotation, namespace, name, _api.ROLLBACK_ANNOTATION
        )
        kopf.event(
            body,
            type="Warning",
            reason="RollbackRefused",
            message=f"{_api.ROLLBACK_ANNOTATION}={target!r}: use `master` or a version number",
        )
        return
    version = await asyncio.to_thread(rt.backend.rollback, component, to_version, modified_by=who)
    # The command is done: remove it so a later reconcile does not roll back again.
    await asyncio.to_thread(rt.kube.remove_annotation, namespace, name, _api.ROLLBACK_ANNOTATION)
    what = "MASTER" if to_version is None else f"version {to_version}"
    logger.info("rolled back to %s as ACTIVE version %s", what, version)
    kopf.event(
        body,
        type="Normal",
        reason="RolledBack",
        message=f"ACTIVE is {what} again (version {version})",
    )


async def apply_retention(
    rt: Runtime,
    body: Any,
    namespace: str,
    name: str,
    retention: str,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> None:
    """The finalizer's work on delete, by the owner only: Purge removes every etcd key of the
    component and its claim; Keep leaves the data and marks the claim released (a resource
    re-created under the same namespace/name takes it back; another namespace only by the
    adopt annotation). A resource that does not own the name touches nothing."""
    component = _etcd_name(name)
    with kopf_errors():
        try:
            existing, revision = await asyncio.to_thread(rt.backend.read_claim, component)
        except OwnerRecordError as exc:
            logger.warning("retention skipped, etcd untouched: %s", exc)
            existing, revision = None, 0
        release = decide_release(existing, Claim(namespace, name, _uid(body)), retention)
        if release is Release.PURGE:
            removed = await asyncio.to_thread(rt.backend.purge, component)
            logger.info("retention Purge: deleted %s etcd key(s) of %s", removed, component)
        elif release is Release.KEEP and existing is not None:
            released = Claim(existing.namespace, existing.name, existing.uid, released=True)
            if not await asyncio.to_thread(
                rt.backend.write_claim, component, released, revision=revision
            ):
                raise kopf.TemporaryError(f"owner record of {component} changed", delay=1.0)
            logger.info("retention Keep: etcd data of %s left in place, claim released", component)
        else:
            logger.info("not the owner of etcd component %s: etcd untouched", component)
    rt.forget(namespace, name)
