"""The per-namespace storage budget at work (`_decisions.storage_budget` decides).

What each component keeps in etcd is remembered in its memory (`ComponentMemory.stored_bytes`):
measured by one range read of its directory when unknown (after a restart), and before each
commit (which prunes what it measured); a new component's is what its seed writes, so its create
path costs no read. A namespace's usage is the sum over the components this process remembers
in it: deleted ones are forgotten with their memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import kopf
from prometheus_client import Counter

from defender_config import canonical_json
from defender_operator._decisions.storage_budget import (
    StorageBudgetExceededError,
    after_commit,
    decide_budget,
    namespace_budget,
    new_value_bytes,
    seed_bytes,
)
from defender_operator._runtime import Runtime

REFUSALS = Counter(
    "defender_operator_storage_budget_refusals_total",
    "Commits and seeds refused by their namespace's storage budget",
    ["namespace"],
)


def budget(rt: Runtime, namespace: str) -> int:
    s = rt.settings
    return namespace_budget(
        namespace, s.namespace_storage_budget_bytes, s.namespace_storage_budgets
    )


def others(rt: Runtime, namespace: str, name: str) -> int:
    """The bytes the namespace's other components keep, as remembered (one not measured yet,
    right after a restart before its own reconcile ran, counts nothing)."""
    return sum(
        mem.stored_bytes or 0
        for (ns, other), mem in rt.components.items()
        if ns == namespace and other != name
    )


def _json_bytes(value: Mapping[str, Any] | None) -> int:
    return len(canonical_json(value)) if value is not None else 0


def refuse(error: StorageBudgetExceededError) -> kopf.PermanentError:
    """Not retried: a person frees space or raises the budget, then applies again. The error
    is the cause: its reason and message become ConfigSynced's and the Warning Event's (and
    the reconcile logs it, as every refusal)."""
    REFUSALS.labels(error.namespace).inc()
    exc = kopf.PermanentError(str(error))
    exc.__cause__ = error
    return exc


def check_seed(
    rt: Runtime,
    namespace: str,
    name: str,
    component: str,
    config: Mapping[str, Any],
    json_schema: Mapping[str, Any] | None,
) -> int:
    """The bytes a new component's seed would keep (0 when no budget applies); raises the
    refusal when they would take the namespace over its budget. No request to etcd."""
    limit = budget(rt, namespace)
    if limit <= 0:
        return 0
    after = seed_bytes(_json_bytes(config), _json_bytes(json_schema))
    refused = decide_budget(
        namespace,
        component,
        budget=limit,
        others=others(rt, namespace, name),
        before=0,
        after=after,
        what="seed",
    )
    if refused is not None:
        raise refuse(refused)
    # Reserved before the write, as a commit's (`check_commit`); `unreserve` when nothing
    # was written.
    rt.memory(namespace, name).stored_bytes = after
    return after


def unreserve(rt: Runtime, namespace: str, name: str) -> None:
    """A seed that wrote nothing (the name holds something, or the write failed): what the
    component keeps is measured again once the name is known to be this resource's."""
    rt.memory(namespace, name).stored_bytes = None


async def check_commit(
    rt: Runtime,
    namespace: str,
    name: str,
    component: str,
    config: Mapping[str, Any],
    *,
    version: int,
    history_limit: int,
) -> int | None:
    """The bytes the component would keep once `config` is committed as `version` (None when
    no budget applies: nothing read); raises the refusal when they would take the namespace
    over its budget. One range read of the component's keys: what the commit prunes."""
    limit = budget(rt, namespace)
    if limit <= 0:
        return None
    now = await asyncio.to_thread(rt.backend.footprint, component)
    mem = rt.memory(namespace, name)
    mem.stored_bytes = now.total
    after = after_commit(now, new_value_bytes(_json_bytes(config)), version, history_limit)
    refused = decide_budget(
        namespace,
        component,
        budget=limit,
        others=others(rt, namespace, name),
        before=now.total,
        after=after,
    )
    if refused is not None:
        raise refuse(refused)
    # Reserved before the write, with no await between the decision and here: a commit of
    # another component of the namespace decided meanwhile counts this one's too (a failed
    # write leaves the reservation until the next measurement, which errs on the safe side).
    mem.stored_bytes = max(now.total, after)
    return after


async def measure_unknown(rt: Runtime, namespace: str, name: str, component: str) -> None:
    """Measure the component when this process does not know what it keeps (after a restart),
    and only while a budget applies: one range read, once."""
    mem = rt.memory(namespace, name)
    if mem.stored_bytes is not None or budget(rt, namespace) <= 0:
        return
    mem.stored_bytes = (await asyncio.to_thread(rt.backend.footprint, component)).total
