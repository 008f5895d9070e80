"""The per-namespace storage budget: how many bytes a namespace's components may keep in etcd.

Every namespace's components share one etcd backend quota: etcd refuses every write of every
namespace (NOSPACE) once it is full. A tenant allowed to edit DefenderComponents in its own
namespace could fill it with large configs and a long spec.rollout.historyLimit; the budget
bounds what each namespace keeps, so one tenant cannot take the others' writes down with it.

Pure decisions: the caller measures (`Footprint`, read from etcd) and remembers (the operator's
memory of each component), these functions judge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

STORAGE_BUDGET_EXCEEDED = "StorageBudgetExceeded"

# What a value the operator is about to write takes in etcd beyond its JSON, at most: the
# envelope's header (fixed part, key id, registration), the AEAD nonce and tag, and the key.
# A new value is counted at its uncompressed size plus this: never less than it will take
# (compression only shrinks it; an incompressible one is stored as it is).
VALUE_OVERHEAD_BYTES = 512


@dataclass(frozen=True)
class Footprint:
    """What one component keeps under its etcd directory, in bytes (key + value of each key,
    as stored: sealed and compressed)."""

    total: int = 0
    active: int = 0
    """ACTIVE's key and value (0: absent)."""
    history: Mapping[int, int] = field(default_factory=dict)
    """Each kept history entry's bytes, by version."""


def new_value_bytes(config_json_bytes: int) -> int:
    """The most a config whose canonical JSON is `config_json_bytes` long takes as one
    stored value."""
    return config_json_bytes + VALUE_OVERHEAD_BYTES


def after_commit(
    now: Footprint, value_bytes: int, version: int, history_limit: int, schema_growth: int = 0
) -> int:
    """The component's bytes once version `version` (of `value_bytes`, see `new_value_bytes`)
    is committed with `history_limit`: ACTIVE replaced, the new history entry added and the
    entries below the oldest kept version pruned, as the library's commit does (it keeps the
    newest `history_limit` versions, the new one included). A raised historyLimit prunes
    less: what it keeps is counted. `schema_growth`: what the metadata record grows by when
    the commit records a custom schema too (one not recorded before: ACTIVE was not valid
    under it)."""
    oldest_kept = version - history_limit + 1
    pruned = sum(size for kept, size in now.history.items() if kept < oldest_kept)
    return now.total - now.active - pruned + 2 * value_bytes + max(schema_growth, 0)


def seed_bytes(config_json_bytes: int, schema_json_bytes: int = 0) -> int:
    """The most a new component's seed writes: MASTER, ACTIVE and history entry 1 of the
    config, and the metadata record (with the custom schema it records)."""
    return 3 * new_value_bytes(config_json_bytes) + new_value_bytes(schema_json_bytes)


def after_seed(kept: int, seed: int, *, purging: bool) -> int:
    """The component's bytes after a seed of `seed` bytes (`seed_bytes`) into a name that keeps
    `kept`: the seed only adds keys (it is create-only), unless the name is `purging` first (a
    re-seed after a restore), when the seed is all that is left."""
    return seed if purging else kept + seed


def schema_fits(growth: int, cap: int | None) -> bool:
    """Whether recording a changed custom schema that grows the component's metadata record by
    `growth` bytes (as stored) may be written under `cap` (None: no budget applies). A schema
    that does not grow the record (unchanged, or smaller) always may: it frees or keeps space,
    even in a namespace over its budget. The declare that records it judges with this."""
    return cap is None or growth <= 0 or growth <= cap


def namespace_budget(namespace: str, default_bytes: int, per_namespace: Mapping[str, int]) -> int:
    """The budget of `namespace` in bytes (0: unlimited): its own entry in the operator's
    settings, else the default. Never from anything a tenant can edit (its Namespace object)."""
    return per_namespace.get(namespace, default_bytes)


@dataclass(frozen=True)
class BudgetRefusal:
    """A commit, seed or schema change that would put its namespace over its storage budget
    (nothing is written): what the refusal says (`str`), raised by the caller as its typed error."""

    reason: ClassVar[str] = STORAGE_BUDGET_EXCEEDED

    namespace: str
    component: str
    usage: int
    after: int
    budget: int
    what: str

    def __str__(self) -> str:
        return (
            f"{self.what} of {self.component!r} refused: namespace {self.namespace!r} keeps"
            f" {self.usage} bytes in etcd and would keep {self.after} bytes with it, over its"
            f" storage budget of {self.budget} bytes; ACTIVE is unchanged. Lower"
            " spec.rollout.historyLimit or the size of the config (or spec.customSchema) here"
            " or on other components of the namespace, delete unused ones, or have the cluster"
            " admin raise the budget (chart: operator.storageBudget), then apply the change again"
        )


def decide_budget(
    namespace: str,
    component: str,
    *,
    budget: int,
    others: int,
    before: int,
    after: int,
    what: str = "commit",
) -> BudgetRefusal | None:
    """Whether a write that takes `component` from `before` to `after` bytes is refused, with
    the namespace's other components keeping `others` bytes. A write that does not grow the
    component is never refused (it frees or keeps space, even in a namespace over its budget
    because the budget was lowered), nor is any under an unlimited budget (0)."""
    if budget <= 0 or after <= before:
        return None
    usage_after = others + after
    if usage_after <= budget:
        return None
    return BudgetRefusal(namespace, component, others + before, usage_after, budget, what)


def promotion_floor(judged: int | None, limit: int) -> int:
    """The fewest versions a canary's promotion under the spec's historyLimit `limit` keeps
    whatever the budget says: its start was judged (as the commit it is) under `judged`, so a
    promotion keeping that many, or the spec's if lower, keeps no more than was judged. `limit`
    above it (raised during the canary) keeps versions that judgment counted as pruned, and is
    judged again (`promotion_limit`). None: the start's limit is not known (status anchors
    another rollout, or the start's status was never written), and 1 is all that is certain."""
    if judged is not None and judged >= limit:
        return limit
    return judged if judged is not None else 1


@dataclass(frozen=True)
class PromotionLimit:
    """The historyLimit a canary's promotion prunes under (`limit`), and why when it is not the
    spec's (`wanted`): what the spec's keeps beyond the start's (`floor`) would take the
    namespace over its budget (`refusal`), or could not be judged (the candidate's size is not
    known)."""

    component: str
    limit: int
    wanted: int
    floor: int
    refusal: BudgetRefusal | None = None
    after: int | None = None
    """The bytes the component keeps once promoted under `limit` (None: not judged)."""

    @property
    def limited(self) -> bool:
        return self.limit < self.wanted

    def __str__(self) -> str:
        kept = (
            f"promoted keeping {self.limit} version(s); spec.rollout.historyLimit applies from"
            " the next commit, judged then"
        )
        r = self.refusal
        if r is not None:
            return (
                f"promotion of {self.component!r} under spec.rollout.historyLimit"
                f" {self.wanted}, raised since the canary's start was judged under"
                f" {self.floor}, refused: namespace {r.namespace!r} would keep {r.usage} bytes"
                f" in etcd with the promotion under {self.floor} and {r.after} bytes under"
                f" {self.wanted}, over its storage budget of {r.budget} bytes; {kept}"
            )
        return (
            f"promotion of {self.component!r} under spec.rollout.historyLimit {self.wanted},"
            f" raised since the canary's start was judged under {self.floor}, not judged:"
            f" spec.config is no longer the candidate, whose size it needs; {kept}"
        )


def promotion_limit(
    now: Footprint,
    value_bytes: int | None,
    version: int,
    *,
    floor: int,
    limit: int,
    budget: int,
    others: int,
    namespace: str,
    component: str,
) -> PromotionLimit:
    """The most versions, between `floor` (`promotion_floor`) and the spec's `limit`, that the
    promotion of `version` (of `value_bytes`, see `new_value_bytes`) keeps within the budget,
    the namespace's other components keeping `others` bytes. What it keeps under `floor` is
    what the start's judgment covered (the other components' judgments counted it since); what
    a higher limit keeps beyond that is judged (`decide_budget`: a raise keeping nothing more is
    never refused). Never below `floor`, and never a refusal of the promotion itself: a good
    canary completes. `value_bytes` None: the candidate's size is not known, so nothing above
    `floor` can be judged."""
    if limit <= floor or budget <= 0:
        return PromotionLimit(component, limit, limit, floor)
    if value_bytes is None:
        return PromotionLimit(component, floor, limit, floor)
    covered = after_commit(now, value_bytes, version, floor)

    def judged(keep: int) -> tuple[int, BudgetRefusal | None]:
        after = after_commit(now, value_bytes, version, keep)
        refused = decide_budget(
            namespace,
            component,
            budget=budget,
            others=others,
            before=covered,
            after=after,
            what="promotion",
        )
        return after, refused

    after, refusal = judged(limit)
    if refusal is None:
        return PromotionLimit(component, limit, limit, floor, after=after)
    # A lower limit prunes more, so what it keeps is never more: the largest that fits is
    # found by halving (up to 1000 versions, so at most ten judgments).
    low, high = floor, limit - 1
    while low < high:
        mid = (low + high + 1) // 2
        if judged(mid)[1] is None:
            low = mid
        else:
            high = mid - 1
    return PromotionLimit(component, low, limit, floor, refusal, judged(low)[0])
