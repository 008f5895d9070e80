"""Retention for DefenderComponents whose CRD is being deleted (`kubectl delete crd`).

kopf serves no resource whose CRD is terminating (`_decisions.crd_deletion`), so the Purge
finalizer of a resource deleted with its CRD would never be removed: the CRD, and any namespace
holding such a resource, would stay Terminating for good with nothing saying why. This loop
applies the retention kopf no longer can, through the same step (`_reconcile.apply_retention`),
then removes the finalizer."""

from __future__ import annotations

import asyncio
import logging

from defender_config import contract
from defender_operator import _diffbase, _reconcile
from defender_operator._decisions.crd_deletion import Held, crd_deleting, held_by_retention
from defender_operator._kube import ObjectRef
from defender_operator._metrics import forget_component
from defender_operator._runtime import Runtime

log = logging.getLogger("defender_operator.crd_deletion")

CRD_NAME = f"{contract.PLURAL}.{contract.API_GROUP}"
REASON = "RetentionAppliedOnCrdDeletion"


async def finalize_round(rt: Runtime) -> int:
    """One look: when the CRD is being deleted, finalize every resource still held by the
    retention finalizer. Returns how many were released."""
    crd = await asyncio.to_thread(rt.kube.crd, CRD_NAME)
    if not crd_deleting(crd):
        return 0
    items = await asyncio.to_thread(rt.kube.component_items, rt.settings.watch_namespaces)
    held = held_by_retention(True, items, contract.FINALIZER)
    if not held:
        return 0
    log.warning(
        "the CRD %s is being deleted: kopf serves no DefenderComponent any more, so the"
        " operator applies the retention of the %d resource(s) its finalizer holds and"
        " releases them",
        CRD_NAME,
        len(held),
        extra={"held": len(held)},
    )
    released = 0
    for one in held:
        try:
            released += await _finalize(rt, one)
        except Exception as exc:  # one resource must not hold up the others
            log.warning(
                "retention of %s/%s during the CRD's deletion failed, retried next round (%s)",
                one.namespace,
                one.name,
                type(exc).__name__,
            )
    return released


async def _finalize(rt: Runtime, one: Held) -> int:
    retention = str((one.body.get("spec") or {}).get("retention", contract.RetentionPolicy.KEEP))
    owned = await _reconcile.apply_retention(rt, one.body, one.namespace, one.name, retention, log)
    if not await asyncio.to_thread(
        rt.kube.set_finalizers,
        one.namespace,
        one.name,
        one.resource_version,
        one.remaining(contract.FINALIZER),
    ):
        return 0
    if owned:
        forget_component(one.name)
    _diffbase.DIFFBASE.forget(one.body)
    message = (
        f"the CRD {CRD_NAME} is being deleted: retention {retention} applied by the operator"
        " (kopf serves no resource of a terminating CRD) and the finalizer removed"
    )
    log.info("%s/%s: %s", one.namespace, one.name, message)
    # Outlives the resource (Events stay about an hour): says what became of its data.
    ref = ObjectRef(contract.GROUP_VERSION, contract.KIND, one.namespace, one.name, one.uid)
    await asyncio.to_thread(rt.kube.post_event, ref, "Warning", REASON, message)
    return 1
