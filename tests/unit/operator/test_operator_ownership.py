"""Who may write an etcd name: the claim decision and what a delete may release."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from defender_config import contract
from defender_operator._decisions import conditions as cond
from defender_operator._decisions.ownership import (
    NAME_CLAIM_FIELD,
    NAME_CLAIMED_ELSEWHERE,
    NAME_RETAINED,
    OWNER_RECORD_RESTORED,
    OWNER_RECORD_UNREADABLE,
    Claim,
    ClaimAction,
    Release,
    Remembered,
    anchor_claim,
    anchored_holders,
    claim_status,
    copy_namespaces,
    decide_claim,
    decide_release,
    decide_unreadable,
    holder_entry,
    holders_lookup_needed,
    holds_name,
    owner_lookup_needed,
    pending_claim,
    release_lookup_needed,
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


# Replays across a record's lifetime: namespace tenant-x owned `firewall` (uid-old), was
# purged; tenant-y claimed the name since and its status holds it. etcd write access puts
# tenant-x's saved authentic record back.
X_OLD = Claim("tenant-x", "firewall", "uid-old")
X_NEW = Claim("tenant-x", "firewall", "uid-new")
Y = Claim("tenant-y", "firewall", "uid-y")


def _obj(c: Claim, status: dict[str, object] | None = None, **meta: object) -> dict[str, object]:
    return {
        "metadata": {"namespace": c.namespace, "name": c.name, "uid": c.uid, **meta},
        "status": {} if status is None else status,
    }


def test_a_resource_holds_a_name_only_by_a_status_naming_its_own_uid() -> None:
    held = {NAME_CLAIM_FIELD: claim_status("firewall", "uid-y")}
    assert holds_name(held, "firewall", "uid-y")
    # A status restored onto a re-created object (a backup tool) names the old uid.
    assert not holds_name(held, "firewall", "uid-other")
    assert not holds_name(held, "sniffer", "uid-y")
    assert not holds_name({}, "firewall", "uid-y") and not holds_name(None, "firewall", "uid-y")
    assert not holds_name({NAME_CLAIM_FIELD: "firewall"}, "firewall", "uid-y")
    assert not holds_name({NAME_CLAIM_FIELD: claim_status("firewall", "")}, "firewall", "")


def test_holders_are_live_resources_whose_status_holds_the_name() -> None:
    held = {NAME_CLAIM_FIELD: claim_status("firewall", "uid-y")}
    objects = [
        _obj(Y, held),
        _obj(X_NEW),  # re-created, never allowed: holds nothing
        _obj(X_OLD, {NAME_CLAIM_FIELD: claim_status("firewall", "uid-y")}),  # not its uid
    ]
    assert anchored_holders(objects, "firewall") == [Y]
    # Being deleted (a Purge finalizer runs): it is giving the name up.
    deleting = [_obj(Y, held, deletionTimestamp="2026-12-03T00:00:00Z")]
    assert anchored_holders(deleting, "firewall") == []


def test_the_holder_index_files_a_resource_under_its_name_only_while_it_holds_it() -> None:
    held = {NAME_CLAIM_FIELD: claim_status("firewall", "uid-y")}
    assert holder_entry(_obj(Y, held)) == {"firewall": Y}
    # Not (or no longer) holding: no entry, so kopf drops the one it had.
    assert holder_entry(_obj(X_NEW)) == {}
    assert holder_entry(_obj(Y, held, deletionTimestamp="2026-12-03T00:00:00Z")) == {}
    assert holder_entry({"metadata": {}, "status": held}) == {}


def test_the_holders_are_listed_before_any_claim_write_and_before_refusing_a_holder() -> None:
    keep = decide_claim(Y, Y, None)
    assert not holders_lookup_needed(keep, claimant_holds=True)  # the owner's usual visit
    refused = decide_claim(Y, X_NEW, None)
    assert not holders_lookup_needed(refused, claimant_holds=False)  # an ordinary refusal
    assert holders_lookup_needed(refused, claimant_holds=True)
    for writes in (decide_claim(None, Y, None), decide_claim(X_OLD, X_NEW, None)):
        assert holders_lookup_needed(writes, claimant_holds=False)


def test_a_replayed_record_does_not_hand_the_name_to_a_re_created_former_owner() -> None:
    # Without the status the rule "same namespace and name, another uid" would take it over.
    decision = decide_claim(X_OLD, X_NEW, None)
    assert decision.action is ClaimAction.TAKE_OVER
    d = anchor_claim(decision, X_OLD, X_NEW, [Y])
    assert d.action is ClaimAction.RESTORE and not d.allowed
    assert d.record == Y and d.restored_from == X_OLD  # the holder's record is written back
    assert d.reason == NAME_CLAIMED_ELSEWHERE and "tenant-y/firewall" in d.message


def test_the_holder_re_takes_its_name_from_a_replayed_record_whose_owner_is_gone() -> None:
    # The replayed owner's uid no longer exists: counted as released, which alone would
    # refuse the holder until it were annotated to adopt its own name.
    decision = decide_claim(X_OLD, Y, None, owner_exists=False)
    assert decision.reason == NAME_RETAINED
    d = anchor_claim(decision, X_OLD, Y, [Y])
    assert d.action is ClaimAction.RECLAIM and d.allowed
    assert d.record == Y and d.restored_from == X_OLD and d.reason == OWNER_RECORD_RESTORED
    # ... and from a record naming a live owner elsewhere, or a released one it adopted from.
    assert anchor_claim(decide_claim(X_NEW, Y, None), X_NEW, Y, [Y]).record == Y
    kept = Claim("tenant-z", "firewall", "uid-z", released=True)
    assert anchor_claim(decide_claim(kept, Y, None), kept, Y, [Y]).action is ClaimAction.RECLAIM
    # Its own record put back released (a Keep delete of itself cannot be: it is alive).
    mine_released = Claim("tenant-y", "firewall", "uid-y", released=True)
    assert anchor_claim(decide_claim(mine_released, Y, None), mine_released, Y, [Y]).record == Y


def test_a_deleted_record_is_written_again_for_the_holder() -> None:
    mine = anchor_claim(decide_claim(None, Y, None), None, Y, [Y])
    assert mine.action is ClaimAction.RECLAIM and mine.restored_from is None
    other = anchor_claim(decide_claim(None, X_NEW, None), None, X_NEW, [Y])
    assert other.action is ClaimAction.RESTORE and other.record == Y
    assert "nobody" in other.message


def test_a_record_that_agrees_with_the_status_decides_as_before() -> None:
    ordinary = decide_claim(Y, X_NEW, None)
    assert anchor_claim(ordinary, Y, X_NEW, [Y]) is ordinary
    keep = decide_claim(Y, Y, None)
    assert anchor_claim(keep, Y, Y, [Y]) is keep


@pytest.mark.parametrize(
    ("existing", "claimant", "adopt"),
    [
        (None, Y, None),  # a fresh name (two namespaces racing: the record's compare decides)
        (Claim("tenant-x", "firewall", "uid-old", released=True), X_NEW, None),  # Keep, re-created
        (Claim("tenant-x", "firewall", "uid-old", released=True), Y, "tenant-x/firewall"),
        (X_OLD, Y, "tenant-x/firewall"),  # a Keep owner deleted while no operator ran
    ],
    ids=["new", "keep-recreated", "adopt", "gone-unseen-adopt"],
)
def test_with_no_holder_the_legitimate_flows_are_unchanged(
    existing: Claim | None, claimant: Claim, adopt: str | None
) -> None:
    decision = decide_claim(existing, claimant, adopt, owner_exists=False)
    assert decision.allowed and decision.record == claimant
    assert anchor_claim(decision, existing, claimant, []) is decision


def test_two_holders_by_status_anchor_nothing_and_nothing_new_is_written() -> None:
    # Only a status written with more than the operator's rights makes two: no writes for
    # anyone, and the record's owner keeps its name as it would without the status.
    z = Claim("tenant-z", "firewall", "uid-z")
    d = anchor_claim(decide_claim(None, X_NEW, None), None, X_NEW, [Y, z])
    assert d.action is ClaimAction.REFUSE and d.record is None
    assert "tenant-y/firewall" in d.message and "tenant-z/firewall" in d.message
    # A claimant that holds too, with the record deleted or naming the other: no write.
    for record in (None, z):
        mixed = anchor_claim(decide_claim(record, Y, None), record, Y, [Y, z])
        assert mixed.action is ClaimAction.REFUSE and mixed.record is None
    keep = decide_claim(Y, Y, None)
    assert anchor_claim(keep, Y, Y, [Y, z]) is keep


@pytest.mark.parametrize(
    ("retention", "expected"), [("Purge", Release.PURGE), ("Keep", Release.KEEP)]
)
def test_the_owner_applies_its_retention(retention: str, expected: Release) -> None:
    assert decide_release(OWNER, OWNER, retention) is expected
    # A re-created owner not yet reconciled releases its predecessor's claim, once the API
    # server says that predecessor is gone (asked only then).
    recreated = Claim("default", "firewall", "uid-2")
    assert release_lookup_needed(OWNER, recreated, held=False)
    assert decide_release(OWNER, recreated, retention, owner_exists=False) is expected


@pytest.mark.parametrize("retention", ["Purge", "Keep"])
@pytest.mark.parametrize("held", [True, False])
def test_a_late_delete_leaves_a_same_named_successors_claim_alone(
    retention: str, held: bool
) -> None:
    # kubectl delete, then apply: the new object (uid-2) took the name over before the old
    # one's DELETED event was handled. The record names a live uid of the same
    # namespace/name: not the deleted object's, whether or not its status held the name.
    successor = Claim("default", "firewall", "uid-2")
    assert release_lookup_needed(successor, OWNER, held=held)
    assert decide_release(successor, OWNER, retention, held=held) is Release.NOTHING
    # Released by the successor's own Keep: its kept data is not the late delete's to purge.
    kept = Claim("default", "firewall", "uid-2", released=True)
    assert not release_lookup_needed(kept, OWNER, held=held)
    assert decide_release(kept, OWNER, retention, held=held) is Release.NOTHING


@pytest.mark.parametrize("retention", ["Purge", "Keep"])
def test_a_delete_by_anyone_but_the_owner_touches_nothing(retention: str) -> None:
    intruder = Claim("tenant-b", "firewall", "uid-9")
    assert decide_release(OWNER, intruder, retention) is Release.NOTHING
    # No claim: nothing shows this resource seeded the data.
    assert decide_release(None, OWNER, retention) is Release.NOTHING
    # Already released by a Keep: a second delete (another namespace) cannot purge it.
    kept = Claim("default", "firewall", "uid-1", released=True)
    assert decide_release(kept, intruder, retention) is Release.NOTHING


@pytest.mark.parametrize(
    ("retention", "expected"), [("Purge", Release.PURGE), ("Keep", Release.KEEP)]
)
def test_a_holder_by_status_applies_its_retention_whatever_the_record_says(
    retention: str, expected: Release
) -> None:
    # A purged owner's record put back, or the record deleted: the holder's delete still
    # purges (or releases) its own data rather than leaving it to the record's namespace.
    released = Claim("tenant-x", "firewall", "uid-old", released=True)
    for record in (None, released):
        assert not release_lookup_needed(record, Y, held=True)
        assert decide_release(record, Y, retention) is Release.NOTHING
        assert decide_release(record, Y, retention, held=True) is expected
    # Naming a resource the API server no longer holds (asked only then).
    assert release_lookup_needed(X_OLD, Y, held=True)
    assert not release_lookup_needed(X_OLD, Y, held=False)
    assert decide_release(X_OLD, Y, retention, held=True, owner_exists=False) is expected
    # Naming a live resource: the record wins, a status alone purges nobody else's data.
    assert decide_release(X_NEW, Y, retention, held=True) is Release.NOTHING
    assert decide_release(X_NEW, Y, retention) is Release.NOTHING


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


def test_only_namespaces_with_a_managed_holder_of_its_name_get_the_keyring_copy() -> None:
    def known(
        namespace: str,
        name: str = "firewall",
        *,
        monitored: bool = True,
        refused: bool = False,
        status_uid: str | None = "uid-1",
    ) -> Remembered:
        status = None if status_uid is None else {NAME_CLAIM_FIELD: claim_status(name, status_uid)}
        return Remembered(namespace, name, "uid-1", monitored, refused, status)

    components = [
        known("default"),
        known("tenant-b", refused=True),  # refused the name default/firewall holds
        known("tenant-c", refused=True),
        known("tenant-c", "honeypot"),  # holds its own name: tenant-c still needs the key
        # Not reconciled by this process yet (a restarted operator's first round): its refusal
        # may not be known yet, so it waits for its reconcile, which copies once the claim holds.
        known("tenant-d", status_uid=None),
        # Published before a re-create (another uid), or restored: not this object's claim.
        known("tenant-e", status_uid="uid-0"),
        # Remembered by a replica paused by peering: another replica manages it.
        known("tenant-f", monitored=False),
    ]
    assert copy_namespaces(components) == {"default", "tenant-c"}


def test_an_unreadable_record_is_rewritten_only_by_the_one_holder_by_status() -> None:
    me = Claim("default", "firewall", "uid-1")
    why = "owner record /p/control/firewall/owner is not readable"
    mine = decide_unreadable(me, True, [me], why)
    assert mine.action is ClaimAction.RECLAIM and mine.allowed and mine.record_unreadable
    assert mine.record == me
    assert decide_unreadable(me, True, [], why).action is ClaimAction.RECLAIM
    for holds, holders in (
        (False, []),  # no status says so: a person must repair or delete the record
        (False, [me]),  # its own status does not say so, whatever the index holds
        (True, [me, Claim("tenant-b", "firewall", "uid-b")]),  # two statuses anchor nothing
    ):
        refused = decide_unreadable(me, holds, holders, why)
        assert refused.action is ClaimAction.REFUSE and not refused.allowed
        assert (refused.reason, refused.message, refused.record) == (
            OWNER_RECORD_UNREADABLE,
            why,
            None,
        )
