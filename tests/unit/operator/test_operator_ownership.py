"""Who may write an etcd name: the claim decision and what a delete may release."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from defender_config import contract
from defender_operator._decisions import conditions as cond
from defender_operator._decisions.ownership import (
    NAME_CLAIMED_ELSEWHERE,
    NAME_RETAINED,
    Claim,
    ClaimAction,
    Release,
    decide_claim,
    decide_release,
    owner_lookup_needed,
    pending_claim,
)

OWNER = Claim("default", "firewall", "uid-1")


def test_first_claimant_of_a_new_or_unclaimed_name_takes_it() -> None:
    # Also data seeded before claims existed: no record, so the first reconciler adopts it.
    d = decide_claim(None, OWNER, None)
    assert d.action is ClaimAction.CREATE and d.allowed
    assert d.record == OWNER


def test_the_claim_written_with_a_seed_is_the_create_of_an_empty_name() -> None:
    # Written only where the name holds nothing (the seed's compares): exactly what
    # decide_claim makes of no record, never a released claim.
    assert pending_claim(OWNER) == decide_claim(None, OWNER, None).record == OWNER
    released = Claim("default", "firewall", "uid-1", released=True)
    assert pending_claim(released) == OWNER


def test_the_owner_keeps_its_claim_without_a_write() -> None:
    d = decide_claim(OWNER, OWNER, None)
    assert d.action is ClaimAction.KEEP and d.allowed and d.record is None


def test_another_namespace_is_refused_and_told_who_owns_the_name() -> None:
    intruder = Claim("tenant-b", "firewall", "uid-9")
    d = decide_claim(OWNER, intruder, None)
    assert d.action is ClaimAction.REFUSE and not d.allowed and d.record is None
    assert d.reason == NAME_CLAIMED_ELSEWHERE
    assert "default/firewall" in d.message


def test_an_adopt_annotation_does_not_take_a_held_name() -> None:
    intruder = Claim("tenant-b", "firewall", "uid-9")
    d = decide_claim(OWNER, intruder, "default/firewall")
    assert d.action is ClaimAction.REFUSE and d.reason == NAME_CLAIMED_ELSEWHERE


def test_owner_re_created_under_the_same_namespace_and_name_takes_its_claim_over() -> None:
    again = Claim("default", "firewall", "uid-2")
    d = decide_claim(OWNER, again, None)
    assert d.action is ClaimAction.TAKE_OVER and d.record == again


def test_kept_data_is_taken_back_by_the_same_namespace_and_name() -> None:
    kept = Claim("default", "firewall", "uid-1", released=True)
    again = Claim("default", "firewall", "uid-2")
    d = decide_claim(kept, again, None)
    assert d.action is ClaimAction.TAKE_OVER
    assert d.record == again and not d.record.released


def test_kept_data_needs_the_adopt_annotation_naming_the_old_owner() -> None:
    kept = Claim("default", "firewall", "uid-1", released=True)
    other = Claim("tenant-b", "firewall", "uid-9")
    refused = decide_claim(kept, other, None)
    assert refused.action is ClaimAction.REFUSE and refused.reason == NAME_RETAINED
    assert f"{contract.ADOPT_ANNOTATION}=default/firewall" in refused.message
    wrong = decide_claim(kept, other, "tenant-c/firewall")
    assert wrong.action is ClaimAction.REFUSE
    adopted = decide_claim(kept, other, " default/firewall ")
    assert adopted.action is ClaimAction.ADOPT and adopted.record == other


def test_a_claim_whose_owner_is_gone_counts_as_released() -> None:
    # A Keep resource has no finalizer: deleted while no operator watched, its claim was
    # never marked released. Another namespace still needs the adopt annotation.
    other = Claim("tenant-b", "firewall", "uid-9")
    refused = decide_claim(OWNER, other, None, owner_exists=False)
    assert refused.action is ClaimAction.REFUSE and refused.reason == NAME_RETAINED
    adopted = decide_claim(OWNER, other, "default/firewall", owner_exists=False)
    assert adopted.action is ClaimAction.ADOPT and adopted.record == other
    # The same namespace and name take it back whatever the lookup said.
    again = Claim("default", "firewall", "uid-2")
    assert decide_claim(OWNER, again, None, owner_exists=False).action is ClaimAction.TAKE_OVER


def test_the_owner_lookup_is_asked_only_to_refuse_a_held_name() -> None:
    other = Claim("tenant-b", "firewall", "uid-9")
    held = decide_claim(OWNER, other, None)
    assert owner_lookup_needed(held, OWNER)
    released = Claim("default", "firewall", "uid-1", released=True)
    assert not owner_lookup_needed(decide_claim(released, other, None), released)
    assert not owner_lookup_needed(decide_claim(OWNER, OWNER, None), OWNER)
    assert not owner_lookup_needed(decide_claim(None, OWNER, None), None)


@pytest.mark.parametrize(
    ("retention", "expected"), [("Purge", Release.PURGE), ("Keep", Release.KEEP)]
)
def test_the_owner_applies_its_retention(retention: str, expected: Release) -> None:
    assert decide_release(OWNER, OWNER, retention) is expected
    # A re-created owner not yet reconciled is still the same namespace/name.
    assert decide_release(OWNER, Claim("default", "firewall", "uid-2"), retention) is expected


@pytest.mark.parametrize("retention", ["Purge", "Keep"])
def test_a_delete_by_anyone_but_the_owner_touches_nothing(retention: str) -> None:
    intruder = Claim("tenant-b", "firewall", "uid-9")
    assert decide_release(OWNER, intruder, retention) is Release.NOTHING
    # No claim: nothing shows this resource seeded the data.
    assert decide_release(None, OWNER, retention) is Release.NOTHING
    # Already released by a Keep: a second delete (another namespace) cannot purge it.
    kept = Claim("default", "firewall", "uid-1", released=True)
    assert decide_release(kept, intruder, retention) is Release.NOTHING


def test_a_refused_resource_shows_conflict_and_not_ready() -> None:
    conflict = cond.Cond(cond.CONFLICT, cond.TRUE, NAME_CLAIMED_ELSEWHERE, "owned by default/x")
    out = {c.type: c for c in cond.compute(cond.Observation(conflict=conflict))}
    assert out[cond.CONFLICT] == conflict
    assert (out[cond.READY].status, out[cond.READY].reason) == (
        cond.FALSE,
        NAME_CLAIMED_ELSEWHERE,
    )
    assert out[cond.CONFIG_SYNCED].status == cond.FALSE
    assert out[cond.CONFIG_SYNCED].message == "owned by default/x"


def test_a_resolved_conflict_is_dropped_from_the_status() -> None:
    conflict = cond.Cond(cond.CONFLICT, cond.TRUE, NAME_CLAIMED_ELSEWHERE, "owned elsewhere")
    now = datetime(2026, 1, 1, tzinfo=UTC)
    before = cond.merge(
        [], cond.compute(cond.Observation(conflict=conflict)), now=now, generation=1
    )
    assert cond.CONFLICT in {c["type"] for c in before}
    after = cond.merge(before, cond.compute(cond.Observation()), now=now, generation=1)
    assert cond.CONFLICT not in {c["type"] for c in after}
    # Conditions someone else set are still kept.
    foreign = [*before, {"type": "Audited", "status": "True", "reason": "x"}]
    kept = cond.merge(foreign, cond.compute(cond.Observation()), now=now, generation=1)
    assert "Audited" in {c["type"] for c in kept}


def test_only_namespaces_with_nothing_but_refused_components_lose_the_keyring_copy() -> None:
    from typing import Any

    from defender_operator._runtime import Runtime

    nothing: Any = None
    rt = Runtime(nothing, nothing, nothing, nothing, nothing, "op")
    conflict = cond.Cond(cond.CONFLICT, cond.TRUE, NAME_CLAIMED_ELSEWHERE, "owned elsewhere")
    rt.memory("default", "firewall")
    rt.memory("tenant-b", "firewall").conflict = conflict
    rt.memory("tenant-c", "firewall").conflict = conflict
    rt.memory("tenant-c", "honeypot")  # owns its own name: tenant-c still needs the key
    assert rt.refused_namespaces() == {"tenant-b"}
