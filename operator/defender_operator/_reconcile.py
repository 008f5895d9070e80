"""Reconcile one DefenderComponent: commands, seeding, commits, keyring copy, status.

Called by kopf on create, resume and spec/annotation changes (see `handlers`). Level-based: it
compares what etcd holds with the spec and writes only the difference, so running it twice, or
after an operator restart, changes nothing that is already right.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from defender_config import (
    ConfigValidationError,
    StoragePolicy,
    StoreUnavailableError,
    config_digest,
    validate_config,
)
from defender_operator import _api
from defender_operator._backend import ComponentState
from defender_operator._decisions import conditions as cond
from defender_operator._decisions.breaker import ActiveChange
from defender_operator._decisions.restarts import restart_history
from defender_operator._decisions.seeding import StoredState, plan_seed
from defender_operator._errors import kopf_errors
from defender_operator._metrics import COMMITS
from defender_operator._runtime import ComponentMemory, Runtime, utcnow

UNFREEZE_ANNOTATION = f"{_api.GROUP}/unfreeze"


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
        heartbeat=mem.heartbeat,
        key=mem.key,
        misconfig=mem.misconfig,
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
    # The monitor judges heartbeats, keys and Ready right away rather than at its next
    # interval: a new component is Ready as soon as its instances are seen.
    rt.heartbeats.waker(name).set()


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

    # The namespace's keyring copy comes first: pods cannot read anything without it.
    await asyncio.to_thread(
        rt.secrets.fan_out,
        rt.keyring.current(),
        namespace,
        max_age=rt.settings.secret_copy_check_seconds,
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
        kopf.event(
            body,
            type="Normal",
            reason="Seeded",
            message=f"MASTER and ACTIVE seeded in etcd for {component}",
        )
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
    namespace: str,
    name: str,
    retention: str,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> None:
    """The finalizer's work on delete: Purge removes every etcd key of the component, Keep none
    (a re-created resource then resumes with its old MASTER)."""
    if retention == _api.RetentionPolicy.PURGE.value:
        with kopf_errors():
            removed = await asyncio.to_thread(rt.backend.purge, _etcd_name(name))
        logger.info("retention Purge: deleted %s etcd key(s) of %s", removed, name)
    else:
        logger.info("retention Keep: etcd data of %s left in place", name)
    rt.forget(namespace, name)
