"""The per-namespace storage budget at work (`_decisions.storage_budget` decides).

What each component keeps in etcd is remembered in its memory (`ComponentMemory.stored_bytes`):
measured by one range read of its directory when unknown (after a restart), and before each
commit, seed beside data already there or spec.customSchema change that grows its metadata
record (a commit prunes what it measured; a schema is judged in the declare that records it,
`Backend.declare`'s schema_cap, a re-sign of the record with it included); a new component's
is what its seed writes, so its create path costs no read. A namespace's usage is the sum over
the components this process remembers in it, and the data its resources deleted with retention
Keep left in etcd (`retain`); those deleted with Purge are forgotten with their memory.

A restart forgets both: before its first decision in a namespace, this process measures every
component whose owner record names the namespace and that it does not remember yet
(`measure_namespace`), and charges it there until its resource takes it over or it is purged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

import kopf
from prometheus_client import Counter

from defender_config import DefenderConfigError, canonical_json
from defender_operator._backend import Declared
from defender_operator._decisions.storage_budget import (
    STORAGE_BUDGET_EXCEEDED,
    BudgetRefusal,
    Footprint,
    PromotionLimit,
    after_commit,
    after_seed,
    decide_budget,
    namespace_budget,
    new_value_bytes,
    promotion_floor,
    promotion_limit,
    seed_bytes,
)
from defender_operator._runtime import Runtime

REFUSALS = Counter(
    "defender_operator_storage_budget_refusals_total",
    "Commits, seeds, spec.customSchema changes and canary promotions' raised historyLimits"
    " refused by their namespace's storage budget",
    ["namespace"],
)


def budget(rt: Runtime, namespace: str) -> int:
    s = rt.settings
    return namespace_budget(
        namespace, s.namespace_storage_budget_bytes, s.namespace_storage_budgets
    )


def others(rt: Runtime, namespace: str, name: str, component: str) -> int:
    """The bytes the namespace's other components keep, as remembered, those its deleted
    resources left with retention Keep, and those `measure_namespace` found for components not
    measured by their own resource yet, included."""
    own = rt.components.get((namespace, name))
    live = rt.storage_used.get(namespace, 0) - ((own.stored_bytes or 0) if own else 0)
    kept = sum(
        size
        for kept_name, (ns, size) in rt.storage_retained.items()
        if ns == namespace and kept_name != component
    )
    return live + kept


def usage(rt: Runtime) -> dict[str, tuple[int, int]]:
    """namespace -> (bytes its components keep, as `others` counts them; its budget): each
    namespace keeping bytes or with a budget of its own, for the metrics (`_metrics.STORAGE`). Read
    from the metrics server's thread: copies first (each copy is one step under the GIL)."""
    used = dict(rt.storage_used)
    for namespace, size in list(rt.storage_retained.values()):
        used[namespace] = used.get(namespace, 0) + size
    # A namespace keeping nothing known has no series unless it has a budget of its own.
    shown = {ns for ns, size in used.items() if size} | set(rt.settings.namespace_storage_budgets)
    return {ns: (used.get(ns, 0), budget(rt, ns)) for ns in sorted(shown)}


def _known(rt: Runtime, namespace: str, name: str, component: str, size: int | None) -> None:
    """What the component keeps, as this resource's: a charge left by a Keep deletion of the
    name (this namespace's or another's, which this resource took over) ends here."""
    rt.memory(namespace, name).stored_bytes = size
    rt.storage_retained.pop(component, None)


def retain(rt: Runtime, namespace: str, name: str, component: str) -> None:
    """The resource was deleted with retention Keep: its data stays in etcd, and is charged to
    its namespace until a resource takes the name again (or this process ends: not persisted)."""
    size = rt.memory(namespace, name).stored_bytes
    if size:
        rt.storage_retained[component] = (namespace, size)


def purged(rt: Runtime, component: str) -> None:
    """The name's keys were deleted: a charge an earlier Keep deletion of it left goes too (and
    one a measurement under way read before the purge is not made)."""
    rt.storage_retained.pop(component, None)
    if rt.storage_purged is not None:
        rt.storage_purged.add(component)


def _charged(rt: Runtime, component: str) -> bool:
    """Whether this process counts what the component keeps: measured or written by its
    resource, or left by a Keep deletion or a measurement."""
    return component in rt.storage_retained or rt.counts_stored(component)


async def measure_namespace(rt: Runtime, namespace: str, besides: str = "") -> None:
    """Before the namespace's first budget decision in this process: charge it what a restart
    forgot, the data of each component whose owner record names it (held by a resource not
    reconciled yet, or released by a Keep deletion) that this process does not count yet, as
    measured now, until a resource takes the name over (`_known`) or it is purged. One range
    read of every owner record, once per process (`Runtime.storage_owners`), and one of each
    such component's directory, once per namespace; a failed read leaves the namespace
    unmeasured (the decision waiting on it fails, and the next one measures again). Data no
    owner record names is charged to no namespace. `besides`: the component deciding, which
    its decision measures (or knows empty) itself: not read twice."""
    if namespace in rt.storage_measured:
        return
    # One at a time: the decisions of a burst of creates in the namespace wait for it.
    async with rt.storage_lock:
        if namespace in rt.storage_measured:
            return
        purged_meanwhile: set[str] = set()
        rt.storage_purged = purged_meanwhile
        try:
            if rt.storage_owners is None:
                owners = await asyncio.to_thread(rt.backend.owners)
                grouped: dict[str, list[str]] = {}
                for component, owner in owners.items():
                    grouped.setdefault(owner, []).append(component)
                rt.storage_owners = grouped
            for component in rt.storage_owners.get(namespace, ()):
                if component == besides or _charged(rt, component):
                    continue
                size = (await asyncio.to_thread(rt.backend.footprint, component)).total
                # Measured by its resource, kept or purged while this was read: that counts.
                if size and not (_charged(rt, component) or component in purged_meanwhile):
                    rt.storage_retained[component] = (namespace, size)
        finally:
            rt.storage_purged = None
        rt.storage_measured.add(namespace)


def _json_bytes(value: Mapping[str, Any] | None) -> int:
    return len(canonical_json(value)) if value is not None else 0


class StorageBudgetExceededError(DefenderConfigError):
    """A commit, seed or spec.customSchema change would put its namespace over its storage
    budget: nothing written."""

    reason: ClassVar[str] = STORAGE_BUDGET_EXCEEDED

    def __init__(self, refusal: BudgetRefusal) -> None:
        self.namespace, self.component = refusal.namespace, refusal.component
        self.usage, self.after, self.budget = refusal.usage, refusal.after, refusal.budget
        super().__init__(str(refusal))


def refuse(refusal: BudgetRefusal) -> kopf.PermanentError:
    """Not retried: a person frees space or raises the budget, then applies again. The error
    is the cause: its reason and message become ConfigSynced's and the Warning Event's (and
    the reconcile logs it, as every refusal)."""
    error = StorageBudgetExceededError(refusal)
    REFUSALS.labels(error.namespace).inc()
    exc = kopf.PermanentError(str(error))
    exc.__cause__ = error
    return exc


async def check_seed(
    rt: Runtime,
    namespace: str,
    name: str,
    component: str,
    config_json_bytes: int,
    json_schema: Mapping[str, Any] | None,
) -> int:
    """The bytes a new component's seed would keep (0 when no budget applies); raises the
    refusal when they would take the namespace over its budget. No request to etcd once the
    namespace is measured (`measure_namespace`)."""
    limit = budget(rt, namespace)
    if limit <= 0:
        return 0
    await measure_namespace(rt, namespace, component)
    after = seed_bytes(config_json_bytes, _json_bytes(json_schema))
    return _decide(rt, namespace, name, component, limit, before=0, after=after, what="seed")


async def check_seed_in_place(
    rt: Runtime,
    namespace: str,
    name: str,
    component: str,
    config_json_bytes: int,
    json_schema: Mapping[str, Any] | None,
    *,
    purging: bool,
) -> None:
    """As `check_seed`, for a name that may hold data already (a seed where MASTER is absent,
    or a re-seed after a restore): one range read of what it keeps. The seed adds to it, or,
    `purging`, replaces it (it is purged first). Nothing reserved when no budget applies."""
    limit = budget(rt, namespace)
    if limit <= 0:
        return
    before = (await _measured(rt, namespace, name, component)).total
    written = seed_bytes(config_json_bytes, _json_bytes(json_schema))
    after = after_seed(before, written, purging=purging)
    _decide(rt, namespace, name, component, limit, before=before, after=after, what="seed")


async def _measured(rt: Runtime, namespace: str, name: str, component: str) -> Footprint:
    """What the component keeps now, read from etcd (one range read of its keys), after its
    namespace was measured once; remembered as this resource's."""
    await measure_namespace(rt, namespace, component)
    now = await asyncio.to_thread(rt.backend.footprint, component)
    _known(rt, namespace, name, component, now.total)
    return now


def _decide(
    rt: Runtime,
    namespace: str,
    name: str,
    component: str,
    limit: int,
    *,
    before: int,
    after: int,
    what: str,
) -> int:
    """Refuse a write taking the component from `before` to `after` bytes over the budget,
    or reserve what it will keep: with no await between the decision and the reservation, a
    write of another component of the namespace decided meanwhile counts this one's too (one
    that wrote nothing is `unreserve`d or measured again; until then it errs on the safe side,
    and a re-seed keeps what it purges)."""
    refused = decide_budget(
        namespace,
        component,
        budget=limit,
        others=others(rt, namespace, name, component),
        before=before,
        after=after,
        what=what,
    )
    if refused is not None:
        raise refuse(refused)
    _known(rt, namespace, name, component, max(before, after))
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
    mem = rt.memory(namespace, name)
    # Counted by this judgment only: the next visit's declare judges the schema again.
    schema_growth, mem.schema_unrecorded = mem.schema_unrecorded, 0
    limit = budget(rt, namespace)
    if limit <= 0:
        return None
    now = await _measured(rt, namespace, name, component)
    value = new_value_bytes(_json_bytes(config))
    after = after_commit(now, value, version, history_limit, schema_growth)
    return _decide(
        rt, namespace, name, component, limit, before=now.total, after=after, what="commit"
    )


def first_schema_cap(rt: Runtime, namespace: str) -> int | None:
    """The cap of a reconcile's declare (`Backend.declare`): no growth of the component's
    metadata record by spec.customSchema is written before `check_schema` judged it (None: no
    budget applies). A schema that does not grow the record is recorded at once, so an
    unchanged or smaller one costs no request more than before."""
    return 0 if budget(rt, namespace) > 0 else None


async def check_schema(
    rt: Runtime, namespace: str, name: str, component: str, growth: int
) -> int | None:
    """The cap to declare again with (`growth` itself: the bytes recording spec.customSchema
    grows the metadata record by, as the declare capped at `first_schema_cap` measured it), or
    the refusal when it would take the namespace over its budget. One range read of the
    component's keys, as a commit's (`check_commit`). None: the budget was lifted meanwhile."""
    limit = budget(rt, namespace)
    if limit <= 0:
        return None
    before = (await _measured(rt, namespace, name, component)).total
    after = before + growth
    _decide(
        rt,
        namespace,
        name,
        component,
        limit,
        before=before,
        after=after,
        what="spec.customSchema change",
    )
    return growth


def schema_unrecorded(
    rt: Runtime, namespace: str, name: str, judged: int, declared: Declared
) -> None:
    """After the declare: a schema judged to grow the record by `judged` bytes (`check_schema`)
    that the declare did not record (ACTIVE is not valid under it) is recorded by the commit of
    spec.config, whose judgment counts it (`check_commit`)."""
    rt.memory(namespace, name).schema_unrecorded = judged if not declared.schema_growth else 0


def schema_recorded(rt: Runtime, namespace: str, name: str, growth: int) -> None:
    """A declare recorded a schema `growth` bytes larger (negative: smaller) without
    `check_schema` (which reserved what it judged): what the component keeps moves with it."""
    mem = rt.memory(namespace, name)
    if growth and mem.stored_bytes is not None:
        mem.stored_bytes = max(mem.stored_bytes + growth, 0)


async def measure_unknown(rt: Runtime, namespace: str, name: str, component: str) -> None:
    """Measure the component when this process does not know what it keeps (after a restart),
    and only while a budget applies: one range read, once."""
    if rt.memory(namespace, name).stored_bytes is not None or budget(rt, namespace) <= 0:
        return
    footprint = await asyncio.to_thread(rt.backend.footprint, component)
    _known(rt, namespace, name, component, footprint.total)


async def check_promotion(
    rt: Runtime,
    namespace: str,
    name: str,
    component: str,
    *,
    version: int,
    judged: int | None,
    limit: int,
    candidate_bytes: Callable[[], Awaitable[int | None]],
) -> PromotionLimit:
    """The historyLimit the promotion of a canary's `version` prunes under: the spec's `limit`,
    unless that is above the one its start was judged under (`judged`, see `promotion_floor`)
    and what it keeps beyond would take the namespace over its budget; then the most that
    fits, never below the start's (`promotion_limit`). Never a refusal: a good canary is
    promoted. Only then, and while a budget applies, one range read of the component's keys,
    as a commit's (`check_commit`), and the candidate's size (`candidate_bytes`: the length of
    its canonical JSON, None when it is not known). What it will keep is reserved, as a
    commit's."""
    floor = promotion_floor(judged, limit)
    cap = budget(rt, namespace)
    if limit <= floor or cap <= 0:
        return PromotionLimit(component, limit, limit, floor)
    value = await candidate_bytes()
    if value is None:
        return PromotionLimit(component, floor, limit, floor)
    now = await _measured(rt, namespace, name, component)
    chosen = promotion_limit(
        now,
        new_value_bytes(value),
        version,
        floor=floor,
        limit=limit,
        budget=cap,
        others=others(rt, namespace, name, component),
        namespace=namespace,
        component=component,
    )
    if chosen.refusal is not None:
        REFUSALS.labels(namespace).inc()
    if chosen.after is not None:
        _known(rt, namespace, name, component, max(now.total, chosen.after))
    return chosen
