"""Apply the staged key rotation decided by `_decisions.rotation`, one step per call.

State lives on the source keyring Secret (annotations), written together with the keyring under
optimistic concurrency: with two operator replicas, the one that loses the write (HTTP 409)
re-reads and decides again, so a step is never applied twice to diverging keyrings.

A person starts a rotation with
`kubectl -n <operator ns> annotate secret <keyring secret> mldefender.io/rotate-key=now`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from datetime import datetime

from defender_config import Keyring, KeyState
from defender_operator._api import ROTATE_ANNOTATION, RotationStage
from defender_operator._decisions.rotation import (
    RotationAction,
    RotationState,
    RotationStep,
    RotationTimings,
    instance_keys,
    next_rotation_step,
    resumed_rotation,
    schedule_due,
)
from defender_operator._errors import KubeError, OperatorError
from defender_operator._keys import StoredKeyring
from defender_operator._metrics import ROTATION_STAGE
from defender_operator._runtime import Runtime, utcnow

log = logging.getLogger("defender_operator.rotation")


def _drop_retired(keyring: Keyring, referenced: frozenset[str]) -> Keyring:
    """Drop retired keys, except one a stored value is still sealed with (written by a lagging
    instance after the rewrap): dropping it would make that value unreadable for good."""
    for key in keyring.keys:
        if key.state is KeyState.RETIRED and key.key_id not in referenced:
            keyring = keyring.remove(key.key_id)
    return keyring


def _referenced(rt: Runtime) -> frozenset[str]:
    """Key ids stored values use (blocking: scans the store)."""
    return rt.backend.key_usage().key_ids


async def fan_out_everywhere(rt: Runtime, keyring: Keyring) -> None:
    """Copy the keyring to every namespace with a component this replica manages that holds
    its name (`Runtime.keyring_namespaces`): none from a replica paused by peering, none into
    a namespace whose only components are refused. One namespace failing (RBAC, a foreign
    Secret in the way) must not starve the others: try all, then report the failures."""
    namespaces = rt.keyring_namespaces()
    if not namespaces:
        return
    # Bounded by what the API server lists: the memory of a resource whose deletion this process
    # never handled would otherwise keep a copy current in a namespace that has none left.
    listed = await asyncio.to_thread(rt.kube.component_namespaces, rt.settings.watch_namespaces)
    namespaces &= set(listed)
    failed: list[str] = []
    for ns in sorted(namespaces):
        try:
            await asyncio.to_thread(
                functools.partial(
                    rt.secrets.fan_out, referenced=functools.partial(_referenced, rt)
                ),
                keyring,
                ns,
            )
        except OperatorError as exc:
            log.warning("keyring copy to namespace %s failed: %s", ns, exc)
            failed.append(ns)
    if failed:
        raise KubeError(
            f"could not copy the keyring Secret to namespace(s) {', '.join(failed)}; the other"
            " copies are current (see the warnings above)"
        )


async def step(rt: Runtime, judged: StoredKeyring) -> RotationStep:
    """Decide one step for the source Secret `judged`, as `_keyguard.settle_source` judged it
    (its keyring the one the operator holds), and apply it. Returns the step taken.

    Nothing is read again: every write carries `judged`'s resourceVersion, so a Secret
    replaced or deleted since (a stranger's keyring with a rotation request put in by hand)
    makes the write fail (409/404: KeySecretError) and the next pass judges it before any
    step; a step that writes nothing leaves it to that pass too."""
    current = judged
    now = utcnow()
    # Before the first rotation the primary key's creation time starts the schedule.
    last = current.last_rotation or current.keyring.primary.created
    requested = current.request_pending or schedule_due(
        now, last, rt.settings.rotation_every_seconds
    )
    keyring = current.keyring
    state = current.rotation
    if state.stage is RotationStage.IDLE:
        current = await _resume(rt, current, now)
        state = current.rotation
    new_fp = (
        keyring.fingerprint(state.new_key_id)
        if state.new_key_id and state.new_key_id in keyring
        else None
    )
    live: dict[str, frozenset[str]] = {}
    primaries: dict[str, str | None] = {}
    if state.stage in (RotationStage.DISTRIBUTING, RotationStage.PROMOTED):
        live, primaries = instance_keys(await asyncio.to_thread(rt.backend.all_instances))
    decided = next_rotation_step(
        now=now,
        state=state,
        requested=requested,
        new_fingerprint=new_fp,
        live_fingerprints=live,
        live_primaries=primaries,
        timings=RotationTimings(
            rt.settings.rotation_distribute_timeout_seconds, rt.settings.rotation_grace_seconds
        ),
    )
    await _apply(rt, current, decided)
    return decided


async def _resume(rt: Runtime, current: StoredKeyring, now: datetime) -> StoredKeyring:
    """A source Secret restored mid-rotation (from a copy or an export) carries no stage: take
    it from the keyring's shape and store it, so the rotation finishes (rewrap, then retire)
    instead of leaving the old key decrypt-only forever."""
    keyring = current.keyring
    resumed = resumed_rotation(
        primary=(keyring.primary.key_id, keyring.primary.created),
        decrypt_only=[
            (k.key_id, k.created)
            for k in keyring.keys
            if k.state is KeyState.DECRYPT_ONLY and k.key_id != keyring.primary.key_id
        ],
        now=now,
    )
    if resumed.stage is RotationStage.IDLE:
        return current
    saved = await asyncio.to_thread(
        rt.secrets.save,
        keyring,
        resumed,
        current.last_rotation,
        current.resource_version,
        current.kept,
    )
    log.warning(
        "the keyring Secret says Idle but holds a rotation in progress (primary %s, decrypt-only"
        " %s): resuming it at %s",
        keyring.primary.key_id,
        resumed.old_key_id if resumed.stage is RotationStage.PROMOTED else resumed.new_key_id,
        resumed.stage.value,
    )
    _publish_stage(rt, resumed.stage)
    # `save` drops a pending request: the resumed rotation covers it.
    return saved


async def _apply(rt: Runtime, current: StoredKeyring, decided: RotationStep) -> None:
    keyring = current.keyring
    state = current.rotation
    now = utcnow()
    last_rotation = current.last_rotation
    if decided.action is RotationAction.ADD_KEY:
        retired = any(k.state is KeyState.RETIRED for k in keyring.keys)
        used = await asyncio.to_thread(_referenced, rt) if retired else frozenset()
        keyring = _drop_retired(keyring, used)
        old_id = keyring.primary.key_id
        keyring = keyring.with_new_decrypt_only()
        new_id = next(k.key_id for k in keyring.keys if k.key_id not in current.keyring)
        state = RotationState(RotationStage.DISTRIBUTING, now, new_id, old_id)
    elif decided.action is RotationAction.PROMOTE and state.new_key_id:
        keyring = keyring.promote(state.new_key_id)
        state = RotationState(RotationStage.PROMOTED, now, state.new_key_id, state.old_key_id)
    elif decided.action is RotationAction.REWRAP:
        rt.keyring.set(keyring)  # seal with the new primary before rewrapping
        count = await asyncio.to_thread(rt.backend.rewrap_all)
        log.info("rewrapped %s stored value(s) under key %s", count, keyring.primary.key_id)
        state = RotationState(RotationStage.GRACE, now, state.new_key_id, state.old_key_id)
    elif decided.action is RotationAction.RETIRE:
        if state.old_key_id and state.old_key_id in keyring:
            # An instance whose keyring copy kubelet had not yet refreshed may have sealed or
            # signed with the old key since the rewrap; once it is retired nothing opens those
            # values again, so they are re-sealed first (a value nobody opens fails the step).
            count = await asyncio.to_thread(rt.backend.rewrap_all)
            if count:
                log.warning(
                    "%s value(s) were written with key %s during the grace period; rewrapped"
                    " under %s before retiring it",
                    count,
                    state.old_key_id,
                    keyring.primary.key_id,
                )
            keyring = keyring.retire(state.old_key_id)
        state = RotationState(RotationStage.IDLE, None, None, None)
        last_rotation = now
    else:
        _publish_stage(rt, state.stage)
        if decided.action is RotationAction.WAIT:
            log.info("key rotation: %s", decided.message)
        elif current.request_pending:
            # A request arrived mid-rotation: drop it, the running rotation covers it.
            await asyncio.to_thread(
                rt.secrets.save,
                keyring,
                state,
                last_rotation,
                current.resource_version,
                current.kept,
            )
        return
    if decided.lagging and decided.action in (RotationAction.PROMOTE, RotationAction.REWRAP):
        # The timeout is reported where people and rag look: the log and an alert per component.
        log.warning("key rotation went on without every instance: %s", decided.message)
        for component in sorted({lag.split("/", 1)[0] for lag in decided.lagging}):
            await rt.write(component, rt.backend.alert, decided.reason, component, decided.message)
    saved = await asyncio.to_thread(
        rt.secrets.save, keyring, state, last_rotation, current.resource_version, current.kept
    )
    rt.keyring.set(saved.keyring)
    # Later starts learn from the record which key ids exist, even with no value left.
    await asyncio.to_thread(rt.backend.record_keyring, saved.keyring)
    await fan_out_everywhere(rt, saved.keyring)
    _publish_stage(rt, state.stage)
    log.info(
        "key rotation %s → %s: %s (primary %s)",
        decided.action.value,
        state.stage.value,
        decided.message,
        saved.keyring.primary_fingerprint,
    )


def _publish_stage(rt: Runtime, stage: RotationStage) -> None:
    rt.rotation_stage = stage.value
    for s in RotationStage:
        ROTATION_STAGE.labels(s.value).set(1 if s is stage else 0)


__all__ = ["ROTATE_ANNOTATION", "fan_out_everywhere", "step"]
