"""Settle which keyring the operator uses, without ever minting one over stored data.

`settle` gathers what `_decisions.keyring.decide_keyring` needs (the source Secret, the copies in
component namespaces, the operator's own verified keyring, the key ids in stored envelope
headers and the key ids recorded in etcd), proves each holder by opening one stored value per
key id, and applies the decision:

UseSource  use the source Secret; record its key ids in etcd
Restore    write the source Secret back from the holder that opens everything (WARNING log, an
           Event on every DefenderComponent, an alert per component)
           Either way, a key record in etcd that disagrees with the keyring taken (which opens
           every stored value) is rewritten and reported: KeyringRecordMismatch, WARNING log,
           Event and alert. Only someone with etcd write access changes the record.
Generate   first install only: a new keyring (WARNING log with its fingerprint), recorded
Refuse     write no Secret, take the keyring out of use so nothing is sealed or opened, set
           KeyUnavailable on every component (an Event naming the missing key ids and their
           fingerprints): commits, rotations, copies and restarts wait. `settle` runs again on
           every rotation tick, so a keyring a person restores is picked up without a restart.
           The keyring this process last verified is kept aside (`Runtime.keyring_kept`) and
           still offered as the operator's memory: a refused source that is then deleted is
           written back from it, so a bad edit followed by the runbook's "delete it" does not
           lose the key.

Started by `handlers.startup` and run by the key-rotation loop (`_loops.key_rotation`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from defender_config import DefenderConfigError, Keyring, KeyringError, KeyState, KeyUsage
from defender_operator._decisions.keyring import (
    Holder,
    KeyringAction,
    KeyringPlan,
    decide_keyring,
    describe_missing,
    export_lacks,
)
from defender_operator._errors import UNANSWERED, KeySecretError, OperatorError
from defender_operator._keys import A_EXPORTED, MEMORY, StoredKeyring
from defender_operator._kube import ObjectRef
from defender_operator._runtime import Runtime

log = logging.getLogger("defender_operator.keyguard")


def _holder(rt: Runtime, name: str, keyring: Keyring, usage: KeyUsage) -> Holder:
    return Holder(name, keyring.fingerprints(), rt.backend.opens(keyring, usage))


def _gather(
    rt: Runtime, stored: StoredKeyring | None, source_error: str | None
) -> tuple[KeyringPlan, dict[str, Keyring]]:
    """Blocking: read the store and the copies, decide."""
    usage = rt.backend.key_usage()
    recorded = rt.backend.keyring_record()
    secrets = rt.secrets
    source: Holder | None = None
    source_name = f"source Secret {secrets.namespace}/{secrets.name}"
    if stored is not None:
        source = _holder(rt, source_name, stored.keyring, usage)
    elif source_error is not None:
        source = Holder(source_name, error=source_error)
    keyrings: dict[str, Keyring] = {}
    # While refused, memory is the keyring set aside at the refusal: verified by this process,
    # so still the trusted candidate (it is proven again below, like every holder).
    held = rt.keyring.peek() if rt.keyring_ready else rt.keyring_kept
    if held is not None:
        keyrings[MEMORY] = held
    for ns in sorted(rt.kube.component_namespaces(rt.settings.watch_namespaces)):
        if ns == secrets.namespace:
            continue
        try:
            found = secrets.read_copy(ns)
        except KeySecretError as exc:
            if exc.status == UNANSWERED:
                # Deciding without a copy the API server may still hold could refuse the
                # keyring for everyone: this round ends, the next one asks again.
                raise
            log.warning("cannot read the keyring copy in %s: %s", ns, exc)
            continue
        if found is not None and found[0] is not None:
            keyrings[f"copy {ns}/{secrets.name}"] = found[0]
    candidates = [
        replace(_holder(rt, name, kr, usage), trusted=name == MEMORY)
        for name, kr in keyrings.items()
    ]
    plan = decide_keyring(
        source=source, candidates=candidates, referenced=usage.key_ids, recorded=recorded
    )
    return plan, keyrings


def _load(rt: Runtime) -> tuple[StoredKeyring | None, str | None]:
    try:
        return rt.secrets.load(), None
    except KeyringError as exc:
        return None, exc.message


async def settle(rt: Runtime) -> bool:
    """Decide and apply; True when the operator holds a keyring that opens every stored value.
    Raises the library's / operator's errors when etcd or the API server cannot be read (the
    state is then left as it was)."""
    return await settle_source(rt) is not None


async def settle_source(rt: Runtime) -> StoredKeyring | None:
    """`settle`, answering the source Secret as judged (its keyring the one the operator now
    holds, its resourceVersion as read or written here) instead of True: a rotation step acts
    on that object and reads none (`_rotation.step`)."""
    stored, source_error = await asyncio.to_thread(_load, rt)
    held = rt.keyring.peek()
    if rt.keyring_ready and stored is not None and held is not None and stored.keyring == held:
        # The keyring this operator verified or wrote itself (a rotation step's too: whether
        # the last export still holds every key is judged here).
        await _judge_export(rt, stored)
        return stored
    plan, keyrings = await asyncio.to_thread(_gather, rt, stored, source_error)
    if plan.action is KeyringAction.USE_SOURCE and stored is not None:
        await _use(rt, stored)
        await _report_record(rt, plan)
        return stored
    if plan.action is KeyringAction.RESTORE and plan.holder is not None:
        keyring = keyrings[plan.holder]
        written, created = await asyncio.to_thread(rt.secrets.restore, keyring, plan.holder)
        if not created:
            return None  # someone else wrote the source meanwhile: judge it next time
        log.warning(
            "%s (primary %s); take a keyring export now: kubectl defender keyring export",
            plan.message,
            keyring.primary_fingerprint,
        )
        await _tell(rt, "Warning", plan.reason, plan.message, alert=True)
        await _use(rt, written)
        await _report_record(rt, plan)
        return written
    if plan.action is KeyringAction.GENERATE:
        keyring = Keyring.generate()
        written, created = await asyncio.to_thread(rt.secrets.create, keyring)
        if not created:
            return None  # another replica generated first: its keyring is judged next time
        log.warning(
            "generated a NEW shared keyring (primary %s, key %s) in Secret %s/%s: %s. Export"
            " it and keep the file safe: kubectl defender keyring export",
            keyring.primary_fingerprint,
            keyring.primary.key_id,
            rt.secrets.namespace,
            rt.secrets.name,
            plan.message,
        )
        await _use(rt, written)
        return written
    await _refuse(rt, plan)
    return None


async def first_settle(rt: Runtime, attempts: int = 3) -> None:
    """At start-up: settle, retrying a lost create race at once. Never raises: an unreachable
    etcd or API server leaves the keyring pending for the key-rotation loop."""
    for _ in range(attempts):
        try:
            if await settle(rt):
                return
        except (DefenderConfigError, OperatorError) as exc:
            log.warning("keyring not settled yet, retrying in the background: %s", exc)
            return
        if rt.keyring_refused is not None:
            return


async def _use(rt: Runtime, stored: StoredKeyring) -> None:
    was_refused = rt.keyring_refused is not None
    rt.keyring.set(stored.keyring)
    rt.rotation_stage = stored.rotation.stage.value
    rt.keyring_ready = True
    rt.keyring_refused = None
    rt.keyring_kept = None  # in use again: memory is `rt.keyring`
    rt.keyring_announced = None
    await asyncio.to_thread(rt.backend.record_keyring, stored.keyring)
    if was_refused:
        message = (
            f"the keyring (primary {stored.keyring.primary_fingerprint}) opens every stored"
            " value again; commits, rotations and restarts resume"
        )
        log.warning("%s", message)
        await _tell(rt, "Normal", "KeyringAvailable", message, alert=False)
    await _judge_export(rt, stored)


async def _judge_export(rt: Runtime, stored: StoredKeyring) -> None:
    """Warn (log and an Event on the Secret) when no export was taken, or when the last one
    lacks a key of the keyring in use (a rotation since): once per process for each gap."""
    if stored.exported is None:
        gap, reason = "none", "NoKeyringExport"
        message = (
            "no export of the keyring was ever taken: if this Secret and its copies are lost,"
            " every stored config is unreadable. Run `kubectl defender keyring export -f FILE`"
            " and keep the file apart from etcd snapshots (docs/security.md)"
        )
    else:
        # A retired key opens nothing any more: an export without it lacks nothing.
        keys = {k.key_id: k.created for k in stored.keyring.keys if k.state is not KeyState.RETIRED}
        lacks = export_lacks(keys, stored.exported, stored.exported_keys)
        if not lacks:
            return
        gap, reason = ",".join(lacks), "KeyringExportStale"
        message = (
            f"the last keyring export ({stored.kept.get(A_EXPORTED)}) lacks key(s)"
            f" {', '.join(lacks)} (a rotation since): if this Secret and its copies are lost,"
            " what is sealed with them is unreadable. Take a new export: `kubectl defender"
            " keyring export -f FILE` (docs/key-rotation.md)"
        )
    if rt.export_warned == gap:
        return
    rt.export_warned = gap
    log.warning("%s", message)
    ref = ObjectRef("v1", "Secret", rt.secrets.namespace, rt.secrets.name)
    await asyncio.to_thread(rt.kube.post_event, ref, "Warning", reason, message)


async def _report_record(rt: Runtime, plan: KeyringPlan) -> None:
    """After `_use` rewrote the record: say that it disagreed. Not a refusal: the keyring
    taken opened every stored value, which a record (ids and fingerprints anyone with etcd
    write access can change) cannot outweigh."""
    if plan.record_mismatch is None:
        return
    message = (
        f"{plan.record_mismatch}; the operator rewrote the record from the keyring in use."
        " Only someone with etcd write access can change it: find out who"
        " (docs/troubleshooting.md#keyringrecordmismatch)"
    )
    log.warning("%s", message)
    await _tell(rt, "Warning", "KeyringRecordMismatch", message, alert=True)


async def _refuse(rt: Runtime, plan: KeyringPlan) -> None:
    held = rt.keyring.peek()
    if rt.keyring_ready and held is not None:
        # Out of use (nothing is sealed while refused) but not forgotten: it may be the only
        # holder of the key left once the refused source is deleted (see `_gather`).
        rt.keyring_kept = held
    rt.keyring.set(None)
    rt.keyring_ready = False
    rt.keyring_refused = plan
    announcement = f"{plan.reason}:{describe_missing(plan.missing)}"
    if rt.keyring_announced == announcement:
        return
    rt.keyring_announced = announcement
    log.error(
        "keyring refused, no Secret written; commits, rotations and restarts are paused: %s",
        plan.message,
    )
    await _tell(rt, "Warning", "KeyUnavailable", plan.message, alert=True)


async def _tell(rt: Runtime, type_: str, reason: str, message: str, *, alert: bool) -> None:
    """An Event on every DefenderComponent and, for what a person must act on, an alert per
    component (where rag and `kubectl defender alerts` look)."""
    refs = await asyncio.to_thread(rt.kube.components, rt.settings.watch_namespaces)
    for ref in refs:
        await asyncio.to_thread(rt.kube.post_event, ref, type_, reason, message)
    if alert:
        for name in sorted({ref.name for ref in refs}):
            await rt.write(name, rt.backend.alert, reason, name, message)
