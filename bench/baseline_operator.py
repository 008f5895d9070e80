"""The benchmark's baseline operator: the least a kopf operator can do per DefenderComponent.

Same kopf, same API server, same CRD as the project's operator, watching its own namespace.
Its only work per object is one status patch (a `Ready=True` condition), from an event
handler: kopf keeps no diff-base or progress for event handlers and adds no finalizer, so the
patch is the object's only write. bench/bench_operator.py measures create → `Ready=True` seen
by a watch for this operator and for the project's, in the same run, and reports the ratio.

Run: python -m kopf run --standalone -n NAMESPACE bench/baseline_operator.py (KUBECONFIG set).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import kopf

from defender_config import contract


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
    generation = int(meta.get("generation") or 0)
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
