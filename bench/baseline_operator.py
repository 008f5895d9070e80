"""The benchmark's baseline operator: the least a kopf operator can do per DefenderComponent.

Same kopf, same API server, same CRD as the project's operator, watching its own namespace.
Its only work per object is one status patch (a `Ready=True` condition), from an event
handler: kopf keeps no diff-base or progress for event handlers and adds no finalizer, so the
patch is the object's only write. bench/bench_operator.py measures create → `Ready=True` seen
by a watch for this operator and for the project's, in the same run, and reports the ratio.

With `BASELINE_ETCD_PLAN` set (a JSON file: etcd endpoints, a key prefix, value sizes), it is
the *floor* operator instead: before the status patch, one create-only etcd transaction on the
project's 3-member cluster, through the project's etcd access layer, writing as many values of the
sizes a real seed writes (MASTER, ACTIVE, history, metadata, owner record, cadence: measured on
the warm-up component) and making the reads the seed's transaction makes. No key, no compression,
no checks: the least any operator that stores a component in etcd before saying Ready must do.
Its ratio to the baseline is the part of ours no operator code can remove on this machine.
With a `status` in the plan (the status our operator showed for its warm-up component), it is
the *status floor*: the same transaction, then that status (every field and condition of ours)
as its one patch, instead of the baseline's one condition: what storing a component and saying
Ready the way ours says it costs, without kopf's change detection, sealing or checks.

Run: python -m kopf run --standalone -n NAMESPACE bench/baseline_operator.py (KUBECONFIG set).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

import kopf
from prometheus_client import CollectorRegistry

from defender_config import EtcdSettings, contract
from defender_config.store import Compare, EtcdStore, GetOp, PutOp

_PLAN: dict[str, Any] | None = None
_STORE: EtcdStore | None = None
if os.environ.get("BASELINE_ETCD_PLAN"):
    with open(os.environ["BASELINE_ETCD_PLAN"]) as _f:
        _PLAN = json.load(_f)
    _STORE = EtcdStore(EtcdSettings.model_validate(_PLAN["etcd"]), registry=CollectorRegistry())


def _store_component(namespace: str, name: str) -> None:
    """The floor's etcd work: one transaction, puts only if the first two keys are absent."""
    assert _PLAN is not None and _STORE is not None
    base = f"{_PLAN['prefix']}/{namespace}/{name}"
    keys = [f"{base}/v{i}" for i in range(len(_PLAN["sizes"]))]
    _STORE.txn(
        [Compare.absent(k) for k in keys[:2]],
        [
            *(PutOp(k, os.urandom(size)) for k, size in zip(keys, _PLAN["sizes"], strict=True)),
            GetOp(f"{base}/cadence"),
            GetOp(f"{base}/rollout"),
            GetOp(f"{base}/alerts/", prefix=True),
        ],
    )


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.enabled = False
    settings.watching.server_timeout = 300


@kopf.on.event(contract.API_GROUP, contract.API_VERSION, contract.PLURAL)
def mark_ready(
    type: str | None,
    status: kopf.Status,
    meta: kopf.Meta,
    patch: kopf.Patch,
    **_: Any,
) -> None:
    if type == "DELETED":
        return
    if any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    ):
        return
    if _PLAN is not None:
        _store_component(str(meta.get("namespace")), str(meta.get("name")))
    generation = int(meta.get("generation") or 0)
    if _PLAN is not None and _PLAN.get("status"):
        _our_status(patch, generation, _PLAN["status"])
        return
    patch.status["observedGeneration"] = generation
    patch.status["conditions"] = [
        {
            "type": "Ready",
            "status": "True",
            "reason": "Baseline",
            "message": "one status patch",
            "lastTransitionTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "observedGeneration": generation,
        }
    ]


def _our_status(patch: kopf.Patch, generation: int, shown: dict[str, Any]) -> None:
    """`shown` (our operator's status of a Ready component) as this object's, in one patch:
    its conditions stamped with this generation and the time now."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for field, value in shown.items():
        patch.status[field] = value
    patch.status["observedGeneration"] = generation
    patch.status["conditions"] = [
        {**c, "lastTransitionTime": now, "observedGeneration": generation}
        for c in shown.get("conditions") or []
    ]
