"""kopf wiring only: each handler hands its event to a function in another module.

login     → kopf's API session, with a bounded connection pool (`_login`)
startup   → build the Runtime (settings, keyring Secret, library backend), settle the keyring
            against the store (`_keyguard`), start the etcd health and key-rotation loops
            and the heartbeat and component change watches (`_loops`); then start-up's
            objects are frozen out of garbage collection (`_heap`)
create / resume / update of a DefenderComponent → `_reconcile.reconcile`, then one
            `_monitor.after_reconcile` pass (one status patch for both)
delete    → retention Purge (its finalizer holds the object until the data is gone)
gone      → a deletion seen (the DELETED event): retention Keep releases the claim (no
            finalizer: the resource never waits for an operator), the monitor daemon ends
daemon    → `_monitor.tick` when its instances, pods or etcd keys change (`Runtime.wake`)
            and at the latest every monitor_interval_seconds (reading the component from etcd
            only when the change watch, `_loops.change_watch`, says it may have changed)
index     → `_pods.index_keys`: every pod filed by its labels, so monitor passes select a
            component's pods from memory instead of listing them; `ownership.holder_entry`:
            each DefenderComponent whose status holds its etcd name, so claims find the
            holders from memory instead of listing them
admission → with admission_enabled, `_webhook_setup.start` at start-up; the webhook handlers
            themselves are wired in `webhooks`
probe     → liveness fails when etcd has been unreachable for too long, or the heartbeat
            watch has stalled (etcd healthy, yet no event and no resync for too long), or one
            of the background loops has ended (`_loops.ended`)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import kopf
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from defender_config import contract
from defender_operator import (
    _diffbase,
    _keyguard,
    _login,
    _loops,
    _monitor,
    _pods,
    _progress,
    _reconcile,
    _storage_budget,
    _webhook_setup,
)
from defender_operator._bodies import shed_managed_fields
from defender_operator._decisions.liveness import watch_stalled
from defender_operator._decisions.ownership import Claim, holder_entry
from defender_operator._executors import RoutingExecutor
from defender_operator._heap import settle_heap
from defender_operator._keys import KeyringSecrets, MutableKeyringSource
from defender_operator._kube import Kube
from defender_operator._library_backend import LibraryBackend
from defender_operator._metrics import RECONCILES, STORAGE, forget_component
from defender_operator._runtime import Runtime, utcnow
from defender_operator._settings import load_operator_settings
from defender_operator._spawning import without_finalizer

log = logging.getLogger("defender_operator")

RESOURCE = (contract.API_GROUP, contract.API_VERSION, contract.PLURAL)
FINALIZER = contract.FINALIZER


def _api_client(connections: int) -> k8s_client.ApiClient:
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    conf = k8s_client.Configuration.get_default_copy()
    # As many pooled connections as threads that may call the API server at once.
    conf.connection_pool_maxsize = connections
    return k8s_client.ApiClient(conf)


@kopf.on.login()
async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
    ours, _ = load_operator_settings()
    limit = _login.connection_limit(ours.api_connections, len(ours.watch_namespaces))
    return await _login.pooled_login(limit, **kwargs)


def configure_persistence(settings: kopf.OperatorSettings) -> None:
    """Where kopf keeps what it knows of each object between events."""
    settings.persistence.finalizer = FINALIZER
    # kopf's diff base goes out with the reconcile's status patch, not as a write of its own.
    settings.persistence.diffbase_storage = _diffbase.DIFFBASE
    # kopf's handler progress lives in annotations any editor of the object writes: one that
    # kopf cannot decode must not leave the object unhandled for good, nor one saying "done"
    # skip a change (`_progress`: only records this process sealed are honoured).
    settings.persistence.progress_storage = _progress.CheckedProgressStorage()


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    ours, library = load_operator_settings()
    configure_persistence(settings)
    # Events are posted explicitly (kopf.event) for what a person should act on; log lines
    # are not copied into Events.
    settings.posting.loggers = False
    settings.watching.server_timeout = 300
    identity = os.environ.get("POD_NAME") or socket.gethostname()
    # Blocking calls (etcd, the Kubernetes client) run in the loop's default executor; its
    # default size (CPUs + 4) would queue a burst of reconciles behind a handful of threads,
    # and monitor passes get a pool of their own (`_executors`).
    asyncio.get_running_loop().set_default_executor(
        RoutingExecutor(ours.worker_threads, ours.monitor_threads)
    )
    api = await asyncio.to_thread(_api_client, ours.worker_threads + ours.monitor_threads)
    kube = Kube(api, settings)
    secrets = KeyringSecrets(kube.core, ours.namespace, ours.keyring_secret)
    # No keyring until one is checked against the store (`_keyguard`): the operator starts
    # and stays up either way; the key-rotation loop settles it when this first try cannot.
    keyring = MutableKeyringSource(None)
    backend = LibraryBackend(library, keyring, identity)
    rt = Runtime(ours, backend, kube, secrets, keyring, identity)
    await _keyguard.first_settle(rt)
    memo["runtime"] = rt
    if ours.admission_enabled:
        await _webhook_setup.start(rt, api, settings)
    # Each namespace's storage against its budget, read at scrape time.
    STORAGE.source = functools.partial(_storage_budget.usage, rt)
    memo["tasks"] = _loops.start(rt)
    settle_heap()
    held = keyring.peek()
    log.info(
        "operator %s started: keyring %s/%s primary %s, etcd prefix %s",
        identity,
        ours.namespace,
        ours.keyring_secret,
        held.primary_fingerprint if held is not None else "unavailable",
        library.prefix,
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    try:
        # Out of the memo first: stopped loops are no reason for the liveness probe to fail.
        await _loops.stop(memo.pop("tasks", []))
        rt: Runtime | None = memo.get("runtime")
        if rt is not None:
            await asyncio.to_thread(rt.backend.close)
    finally:
        _webhook_setup.stop()  # the webhook's private key, whatever failed before


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE)
async def reconcile_component(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    namespace: str | None,
    name: str,
    logger: kopf.Logger,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    try:
        # The reconcile's status and the first monitor pass's go out in one patch.
        first_pass = functools.partial(
            _monitor.after_reconcile,
            memo["runtime"],
            body,
            namespace or "",
            name,
            logger,
            kwargs["defender_pods"],
        )
        visit = _reconcile.Visit(
            rt=memo["runtime"],
            body=body,
            namespace=namespace or "",
            name=name,
            generation=int(meta.get("generation") or 0),
            status=dict(status),
            annotations=dict(meta.annotations),
            logger=logger,
            holders=kwargs["name_holders"],
            pods=kwargs["defender_pods"],
        )
        # The essence as `fetch` builds it for the next event (kopf's `new` has been through
        # its progress storage's clearing, which `fetch` does not repeat).
        handled = _diffbase.DIFFBASE.handled_fields(body, _diffbase.DIFFBASE.build(body=body))
        await _reconcile.reconcile(visit, dict(spec), first_pass, handled)
        _diffbase.DIFFBASE.published(body, handled[_diffbase.FIELD])
    except Exception:
        RECONCILES.labels("error").inc()
        raise
    RECONCILES.labels("ok").inc()


def _retention(spec: Mapping[str, Any]) -> str:
    return str(spec.get("retention", contract.RetentionPolicy.KEEP))


def _purges(spec: kopf.Spec, **_: Any) -> bool:
    return _retention(spec) == contract.RetentionPolicy.PURGE


# Only Purge needs a finalizer: the data must go before the resource does. Keep applies its
# release when the deletion is seen (`gone`), so a Keep resource never waits for an operator
# (one API write less per component; a namespace deletion with no operator left is not stuck).
@kopf.on.delete(*RESOURCE, when=_purges)
async def apply_retention(
    body: kopf.Body,
    spec: kopf.Spec,
    namespace: str | None,
    name: str,
    logger: kopf.Logger,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    owned = await _reconcile.apply_retention(
        memo["runtime"], body, namespace or "", name, _retention(spec), logger
    )
    _forget(body, name, owned)


def _deleted(type: str, **_: Any) -> bool:
    return type == "DELETED"


@kopf.on.event(*RESOURCE, when=_deleted)
async def gone(
    body: kopf.Body,
    namespace: str | None,
    name: str,
    logger: kopf.Logger,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    rt: Runtime | None = memo.get("runtime")
    if rt is None:
        return
    owned = await _reconcile.gone(
        rt, body, namespace or "", name, _retention(body.get("spec") or {}), logger
    )
    _forget(body, name, owned)


def _forget(body: kopf.Body, name: str, owned: bool) -> None:
    """What the operator keeps of a resource outside `Runtime`: its diff base, and its gauges
    when they are its own (`owned`): series are keyed by name, and a refused same-named
    resource in another namespace, or the old object of a re-created one, must not drop the
    owner's."""
    if owned:
        forget_component(name)
    _diffbase.DIFFBASE.forget(body)


# Both indexes are coroutines though they never await: kopf runs a plain function handler in
# the loop's thread pool, and indexing comes before an object's handlers, so every pod and
# DefenderComponent event would wait for a thread hand-off and back (two GIL waits, tens of
# ms when the operator is busy: issue #17's thousand creates) for a dictionary lookup.
@kopf.index("", "v1", "pods")
async def defender_pods(
    namespace: str | None,
    name: str,
    meta: kopf.Meta,
    status: kopf.Status,
    memo: kopf.Memo,
    **_: Any,
) -> dict[_pods.PodKey, Any]:
    rt: Runtime | None = memo.get("runtime")
    if rt is not None:
        # A moment later: kopf files what this returns after it returns, and the woken pass
        # must find the pod filed. (kopf drops a deleted pod from the index without calling
        # this, but the API server shows a pod's deletion first as a change setting its
        # deletionTimestamp, even at grace period 0: tests/e2e test_operator_e2e_wakes.py.)
        asyncio.get_running_loop().call_later(
            _pods.WAKE_DELAY_SECONDS, rt.pod_changed, namespace, dict(meta.get("labels") or {})
        )
    return _pods.index_keys(namespace, name, meta, status)


@kopf.index(*RESOURCE)
async def name_holders(
    body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo, **_: Any
) -> dict[str, Claim]:
    # Every event of a DefenderComponent reaches this index first, with the body kopf then
    # keeps for the component's daemon: shed here, or a component's status patch brings its
    # managedFields back into memory until its next pass (up to the monitor interval); and
    # the status we last wrote is kept once, in that body, when the event shows it.
    shed_managed_fields(body)
    rt: Runtime | None = memo.get("runtime")
    if rt is not None:
        rt.adopt_status(namespace or "", name, body.get("status"))
    return holder_entry(body)


# Registered without kopf's finalizer (`_spawning.without_finalizer`): kopf stops it for a
# Purge resource (which has one), `gone` for a Keep resource, and the operator's exit for both.
@without_finalizer
@kopf.daemon(*RESOURCE, cancellation_timeout=10.0)
async def monitor_component(
    stopped: kopf.DaemonStopped,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    logger: kopf.Logger,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    # kopf hands every index to every handler as a keyword named after it.
    await _monitor.run(
        memo["runtime"], stopped, body, namespace or "", name, logger, kwargs["defender_pods"]
    )


@kopf.on.probe(id="etcd")
def etcd_probe(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    rt: Runtime | None = memo.get("runtime")
    if rt is None:
        return {"starting": True}
    now = utcnow()
    down = rt.etcd.unavailable_for(now).total_seconds()
    if down > rt.settings.liveness_etcd_max_unavailable_seconds:
        raise kopf.PermanentError(
            f"defender etcd unreachable for {down:.0f}s ({rt.etcd.last.detail})"
        )
    limit = rt.settings.liveness_watch_stall_seconds
    silent = rt.heartbeats.silent_for()
    if watch_stalled(
        now=now,
        started=rt.heartbeats.started,
        last_progress=rt.heartbeats.last_progress,
        etcd_healthy_since=rt.etcd.healthy_since,
        threshold=timedelta(seconds=limit),
        silent=silent,
    ):
        unheard = (
            "its stream answered nothing (no event, no progress answer)"
            if silent is not None
            else "no instance event and no resync"
        )
        raise kopf.PermanentError(
            f"heartbeat watch stalled: {unheard} for over {limit:.0f}s"
            " while defender etcd is healthy"
        )
    return {"reachable": rt.etcd.last.reachable, "quorum": rt.etcd.last.quorum}


@kopf.on.probe(id="loops")
def loops_probe(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    tasks = memo.get("tasks", [])
    dead = _loops.ended(tasks)
    if dead:
        raise kopf.PermanentError(
            f"background loop(s) ended: {', '.join(dead)}; a restart starts them again"
        )
    return {"running": len(tasks)}
