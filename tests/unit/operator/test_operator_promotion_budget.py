"""A canary's promotion within the storage budget its start was judged by: the start is judged
(as the commit it is) under the spec.rollout.historyLimit then, which status.rollout keeps; a
promotion under a limit raised since is judged again, and where the namespace has no room for
what the raise keeps it keeps the most that fits instead, never fewer versions than the start
was judged with, and is never refused itself. The pure decision, then the monitor's and the
promote command's promotions through the in-memory harness."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from operator_core_support import NAME, NAMESPACE, Harness, spec
from test_operator_canary_steps import PODS, beat

from defender_config import canonical_json, config_digest, contract, validate_config
from defender_operator import _storage_budget
from defender_operator._decisions import conditions as cond
from defender_operator._decisions.canary import (
    JUDGED_HISTORY_LIMIT,
    RolloutAnchor,
    anchor_from_status,
    judged_limit,
)
from defender_operator._decisions.storage_budget import (
    STORAGE_BUDGET_EXCEEDED,
    Footprint,
    after_commit,
    new_value_bytes,
    promotion_floor,
    promotion_limit,
)

BASE = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth0"}
LIMIT = 2  # what the canary's start is judged under
RAISED = 10  # what the spec holds when it is promoted
CANDIDATE_VERSION = 5


def big(tag: str) -> dict[str, Any]:
    """A config of about 10 KB, distinct per `tag`."""
    return {**BASE, "filters": [f"port {tag}"] + ["tcp"] * 1600}


CANDIDATE = big("5")


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def budgeted(h: Harness, every: int) -> None:
    h.rt.settings = h.rt.settings.model_copy(update={"namespace_storage_budget_bytes": every})


def limited(config: dict[str, Any], limit: int, *, hold: int = 0) -> dict[str, Any]:
    canary = {"instances": 1, "holdSeconds": hold}
    return spec(config, rollout={"historyLimit": limit, "canary": canary})


def stored(config: dict[str, Any]) -> dict[str, Any]:
    return validate_config("sniffer", config, None)


# --- the decision ---------------------------------------------------------------------------

# Versions 1-4 kept, 1000 bytes each; ACTIVE 1000, MASTER and metadata 2000.
NOW = Footprint(total=7000, active=1000, history={1: 1000, 2: 1000, 3: 1000, 4: 1000})
VALUE = 1000


def after(limit: int) -> int:
    return after_commit(NOW, VALUE, CANDIDATE_VERSION, limit)


def decide(budget: int, *, floor: int = LIMIT, value: int | None = VALUE) -> Any:
    return promotion_limit(
        NOW,
        value,
        CANDIDATE_VERSION,
        floor=floor,
        limit=RAISED,
        budget=budget,
        others=0,
        namespace=NAMESPACE,
        component=NAME,
    )


def test_a_limit_no_higher_than_the_starts_needs_no_judgment() -> None:
    assert promotion_floor(LIMIT, LIMIT) == LIMIT
    assert promotion_floor(5, LIMIT) == LIMIT  # lowered meanwhile: keeps less than judged
    # Raised: the start's judgment covers its own limit only.
    assert promotion_floor(LIMIT, RAISED) == LIMIT
    # The start's not known: only one version is certain to be covered.
    assert promotion_floor(None, RAISED) == 1


def test_a_raised_limit_with_room_is_kept() -> None:
    chosen = decide(after(RAISED))
    assert (chosen.limit, chosen.wanted, chosen.refusal) == (RAISED, RAISED, None)
    assert chosen.after == after(RAISED) and not chosen.limited


def test_a_raised_limit_without_room_keeps_the_starts() -> None:
    chosen = decide(after(LIMIT + 1) - 1)
    assert chosen.limit == LIMIT and chosen.after == after(LIMIT) and chosen.limited
    refusal = chosen.refusal
    assert refusal is not None and refusal.reason == STORAGE_BUDGET_EXCEEDED
    # Counted from what the start's judgment covered, not from what the component keeps now.
    assert (refusal.usage, refusal.after) == (after(LIMIT), after(RAISED))
    message = str(chosen)
    assert f"spec.rollout.historyLimit {RAISED}" in message and "refused" in message
    assert f"keeping {LIMIT} version(s)" in message and f"{after(3) - 1} bytes" in message


def test_a_raise_is_judged_beyond_what_the_start_covered_not_from_what_is_kept_now() -> None:
    # The start's limit prunes three versions: the namespace's room since counts on that, so
    # keeping one of them is judged, though the component would still keep less than now.
    assert after(3) < NOW.total
    assert decide(after(LIMIT)).limit == LIMIT


def test_a_raised_limit_with_some_room_keeps_the_most_that_fits() -> None:
    assert decide(after(3)).limit == 3
    assert decide(after(4) - 1).limit == 3
    # Unknown start: from one version up.
    assert decide(after(1), floor=1).limit == 1
    assert decide(after(1) - 1, floor=1).limit == 1  # nothing fits: one, never a refusal


def test_a_raise_that_keeps_nothing_more_is_never_refused() -> None:
    # The namespace over its budget (lowered since): nothing kept beyond the start's limit.
    small = Footprint(total=10_000, active=5000, history={4: 1000})
    chosen = promotion_limit(
        small,
        VALUE,
        CANDIDATE_VERSION,
        floor=LIMIT,
        limit=RAISED,
        budget=100,
        others=0,
        namespace=NAMESPACE,
        component=NAME,
    )
    assert chosen.limit == RAISED and chosen.refusal is None


def test_without_the_candidates_size_a_raise_is_not_judged_and_the_start_limit_kept() -> None:
    chosen = decide(10**9, value=None)
    assert (chosen.limit, chosen.refusal, chosen.after) == (LIMIT, None, None)
    assert "not judged" in str(chosen) and f"keeping {LIMIT} version(s)" in str(chosen)


def test_no_budget_or_no_raise_keeps_the_specs_limit() -> None:
    assert decide(0).limit == RAISED
    assert decide(1, floor=RAISED).limit == RAISED


def test_status_keeps_the_limit_the_start_was_judged_under_for_its_own_rollout_only() -> None:
    raw = {"sequence": 7, "version": 5, "digest": "d", JUDGED_HISTORY_LIMIT: 3}
    anchor = anchor_from_status(raw)
    assert anchor is not None and anchor.judged_history_limit == 3
    assert judged_limit(anchor, 5, "d") == 3
    assert judged_limit(anchor, 6, "d") is None  # another version: another rollout
    assert judged_limit(anchor, 5, "e") is None  # another candidate
    assert judged_limit(None, 5, "d") is None
    for bad in (0, -1, True, "3", None):
        found = anchor_from_status({**raw, JUDGED_HISTORY_LIMIT: bad})
        assert isinstance(found, RolloutAnchor) and found.judged_history_limit is None


# --- through the operator -------------------------------------------------------------------


def value_bytes() -> int:
    return new_value_bytes(len(canonical_json(stored(CANDIDATE))))


def started(budget_at: int) -> Harness:
    """Versions 1-4 kept (limit 10, no budget yet), on three beating instances; then the
    budget is set so that the candidate's promotion keeping `budget_at` versions just fits, and
    the canary of version 5 starts under a historyLimit of 2, judged so."""
    h = Harness()
    budgeted(h, 0)
    for n in range(1, 5):
        run(h.reconcile(spec(big(str(n)), rollout={"historyLimit": RAISED})))
    for pod in PODS:
        h.add_pod(pod)
        beat(h, pod, config_digest(stored(big("4"))))
    run(h.monitor(spec(big("4"), rollout={"historyLimit": RAISED})))
    assert sorted(h.backend.components[NAME].history) == [1, 2, 3, 4]
    now = h.backend.footprint(NAME)
    budgeted(h, after_commit(now, value_bytes(), CANDIDATE_VERSION, budget_at))
    run(h.reconcile(limited(CANDIDATE, LIMIT)))
    assert NAME in h.backend.rollouts and h.reasons()[-1] == "CanaryStarted"
    assert h.kube.status["rollout"][JUDGED_HISTORY_LIMIT] == LIMIT
    # Raised while the canary runs: a pass waiting for the canary keeps the judged limit.
    run(h.monitor(limited(CANDIDATE, RAISED)))
    assert h.kube.status["rollout"]["phase"] == "Progressing"
    assert h.kube.status["rollout"][JUDGED_HISTORY_LIMIT] == LIMIT
    beat(h, h.backend.rollouts[NAME][0].canaries[0], config_digest(stored(CANDIDATE)))
    return h


def kept(h: Harness) -> list[int]:
    return sorted(h.backend.components[NAME].history)


def promoted(h: Harness) -> str:
    assert h.backend.state(NAME).active_version == CANDIDATE_VERSION
    assert NAME not in h.backend.rollouts
    assert h.condition(cond.ROLLOUT)["reason"] == "Promoted"
    assert h.condition(cond.CONFIG_SYNCED)["status"] == cond.TRUE
    return str(h.condition(cond.ROLLOUT)["message"])


def test_a_limit_raised_during_the_canary_without_room_keeps_what_the_start_was_judged_by() -> None:
    h = started(budget_at=LIMIT)
    refusals = _storage_budget.REFUSALS.labels(NAMESPACE)
    counted = refusals._value.get()
    h.backend.calls.clear()
    run(h.monitor(limited(CANDIDATE, RAISED)))
    assert kept(h) == [4, 5]
    message = promoted(h)
    assert f"keeping {LIMIT} version(s)" in message and "refused" in message
    # Said as the budget's refusals are: a Warning Event, the counter; judged with one read.
    assert [e.reason for e in h.events[-2:]] == ["CanaryPromoted", STORAGE_BUDGET_EXCEEDED]
    assert h.events[-1].type == "Warning"
    assert refusals._value.get() == counted + 1
    assert h.backend.calls.count("footprint") == 1
    # Within the budget; what the namespace counts is never less than what it keeps.
    assert h.backend.footprint(NAME).total <= budget_of(h)
    assert h.mem.stored_bytes is not None
    assert h.mem.stored_bytes >= h.backend.footprint(NAME).total


def budget_of(h: Harness) -> int:
    return h.rt.settings.namespace_storage_budget_bytes


def test_a_limit_raised_during_the_canary_with_room_is_kept_by_the_promotion() -> None:
    h = started(budget_at=RAISED)
    h.backend.calls.clear()
    run(h.monitor(limited(CANDIDATE, RAISED)))
    assert kept(h) == [1, 2, 3, 4, 5]
    assert "keeping" not in promoted(h)
    assert STORAGE_BUDGET_EXCEEDED not in h.reasons()
    assert h.backend.calls.count("footprint") == 1  # judged again, under the raised limit


def test_a_limit_raised_during_the_canary_with_some_room_keeps_the_most_that_fits() -> None:
    h = started(budget_at=3)
    run(h.monitor(limited(CANDIDATE, RAISED)))
    assert kept(h) == [3, 4, 5]
    assert "keeping 3 version(s)" in promoted(h)


def test_the_promote_command_keeps_what_the_start_was_judged_by_without_room() -> None:
    h = started(budget_at=LIMIT)
    run(h.reconcile(limited(CANDIDATE, RAISED, hold=3600), {contract.PROMOTE_ANNOTATION: "now"}))
    assert kept(h) == [4, 5]
    assert f"keeping {LIMIT} version(s)" in promoted(h)
    assert STORAGE_BUDGET_EXCEEDED in h.reasons()


def test_an_unchanged_limit_is_not_judged_again() -> None:
    h = started(budget_at=LIMIT)
    h.backend.calls.clear()
    run(h.monitor(limited(CANDIDATE, LIMIT)))
    assert kept(h) == [4, 5] and "keeping" not in promoted(h)
    assert "footprint" not in h.backend.calls


def test_a_start_whose_limit_status_does_not_hold_keeps_the_most_that_fits_from_one() -> None:
    # The start's status never written (or written by an operator before this field): its
    # limit is not known, so the promotion is judged from one version up.
    h = started(budget_at=LIMIT)
    for status in (h.kube.status, h.mem.status or {}):
        status["rollout"] = {
            k: v for k, v in status["rollout"].items() if k != JUDGED_HISTORY_LIMIT
        }
    now = h.backend.footprint(NAME)
    budgeted(h, after_commit(now, value_bytes(), CANDIDATE_VERSION, 1))  # filled meanwhile
    run(h.monitor(limited(CANDIDATE, RAISED)))
    assert kept(h) == [5]
    assert "keeping 1 version(s)" in promoted(h)


def test_a_spec_config_changed_since_keeps_the_start_limit_unjudged() -> None:
    # spec.config moved on before its reconcile: the candidate promoted is not spec.config,
    # whose size says nothing of it, so the raise is not judged.
    h = started(budget_at=RAISED)
    h.backend.calls.clear()
    run(h.monitor(limited(big("6"), RAISED)))
    assert kept(h) == [4, 5]
    assert "not judged" in promoted(h)
    assert "footprint" not in h.backend.calls and STORAGE_BUDGET_EXCEEDED not in h.reasons()


def test_a_spec_config_that_no_longer_validates_keeps_the_start_limit_unjudged() -> None:
    h = started(budget_at=RAISED)
    run(h.monitor(limited({**BASE, "interface": "not a valid interface name"}, RAISED)))
    assert kept(h) == [4, 5]
    assert "not judged" in promoted(h)
