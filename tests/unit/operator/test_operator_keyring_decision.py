"""decide_keyring / may_replace_copy / keyring_condition: which keyring the operator may use,
and when a copy may be replaced, without ever losing a key stored values need."""

from __future__ import annotations

import pytest

from defender_config import Keyring
from defender_operator._decisions import conditions as cond
from defender_operator._decisions.keyring import (
    Holder,
    KeyringAction,
    KeyringPlan,
    decide_keyring,
    describe_missing,
    keyring_condition,
    may_replace_copy,
)
from defender_operator._keys import KeyringUnavailableError, MutableKeyringSource

OLD, NEW = "k-old", "k-new"
FP = {OLD: "fp-old", NEW: "fp-new"}


def holder(name: str, *ids: str, opens: tuple[str, ...] = (), error: str | None = None) -> Holder:
    return Holder(name, {i: FP.get(i, f"fp-{i}") for i in ids}, frozenset(opens), error)


def decide(
    source: Holder | None,
    *candidates: Holder,
    referenced: tuple[str, ...] = (),
    recorded: dict[str, str] | None = None,
) -> KeyringPlan:
    return decide_keyring(
        source=source,
        candidates=candidates,
        referenced=frozenset(referenced),
        recorded=recorded or {},
    )


def test_source_that_opens_every_value_is_used() -> None:
    plan = decide(holder("source", OLD, opens=(OLD,)), referenced=(OLD,), recorded={OLD: FP[OLD]})
    assert plan.action is KeyringAction.USE_SOURCE


def test_only_a_truly_empty_store_gets_a_new_keyring() -> None:
    assert decide(None).action is KeyringAction.GENERATE
    # A copy in a namespace is not proof of anything on an empty store: still a new keyring,
    # never a planted one.
    assert decide(None, holder("copy ns1", OLD)).action is KeyringAction.GENERATE
    # The operator's own memory (it wrote or verified that keyring) is put back as it was.
    memory = Holder("memory", {OLD: FP[OLD]}, trusted=True)
    plan = decide(None, holder("copy ns1", NEW), memory)
    assert (plan.action, plan.holder) == (KeyringAction.RESTORE, "memory")
    # With data, memory wins over an equally good copy: it is what the operator last wrote.
    memory = Holder("the operator's memory", {OLD: FP[OLD]}, frozenset({OLD}), trusted=True)
    copy = holder("copy a", OLD, opens=(OLD,))
    plan = decide(None, copy, memory, referenced=(OLD,), recorded={OLD: FP[OLD]})
    assert plan.holder == "the operator's memory"


def test_missing_source_restored_from_the_copy_that_opens_the_values() -> None:
    plan = decide(
        None,
        holder("copy a", NEW, opens=()),  # a stranger's keyring: opens nothing
        holder("copy b", OLD, opens=(OLD,)),
        referenced=(OLD,),
    )
    assert plan.action is KeyringAction.RESTORE
    assert plan.holder == "copy b"
    assert plan.reason == "KeyringRestored"


def test_restore_needs_every_referenced_key_and_prefers_the_most_complete_copy() -> None:
    partial = holder("copy a", OLD, opens=(OLD,))
    full = holder("copy z", OLD, NEW, opens=(OLD, NEW))
    plan = decide(None, partial, full, referenced=(OLD, NEW), recorded=dict(FP))
    assert (plan.action, plan.holder) == (KeyringAction.RESTORE, "copy z")
    # Between two that both open everything, the one holding more recorded keys wins.
    lagging = holder("copy a", OLD, opens=(OLD,))
    current = holder("copy z", OLD, NEW, opens=(OLD,))
    plan = decide(None, lagging, current, referenced=(OLD,), recorded=dict(FP))
    assert plan.holder == "copy z"


def test_no_copy_opens_the_data_refuses_and_names_ids_and_fingerprints() -> None:
    plan = decide(None, holder("copy a", NEW, opens=()), referenced=(OLD,), recorded={OLD: FP[OLD]})
    assert plan.action is KeyringAction.REFUSE
    assert plan.reason == "KeyringMissing"
    assert dict(plan.missing) == {OLD: FP[OLD]}
    assert OLD in plan.message and FP[OLD] in plan.message
    assert "keyring import" in plan.message


def test_refusal_names_unrecorded_ids_too() -> None:
    plan = decide(None, referenced=(OLD,))
    assert plan.action is KeyringAction.REFUSE
    assert dict(plan.missing) == {OLD: None}
    assert "fingerprint not recorded" in describe_missing(plan.missing)


def test_recorded_keys_without_values_still_forbid_generation() -> None:
    plan = decide(None, recorded={OLD: FP[OLD]})
    assert plan.action is KeyringAction.REFUSE
    assert dict(plan.missing) == {OLD: FP[OLD]}
    # A copy holding the recorded key (same fingerprint) restores it.
    plan = decide(None, holder("copy a", OLD), recorded={OLD: FP[OLD]})
    assert (plan.action, plan.holder) == (KeyringAction.RESTORE, "copy a")


def test_same_id_other_material_is_not_our_key() -> None:
    forged = Holder("copy evil", {OLD: "fp-forged"}, frozenset())
    plan = decide(None, forged, recorded={OLD: FP[OLD]})
    assert plan.action is KeyringAction.REFUSE
    # Even when it somehow opened a value, a clashing fingerprint disqualifies it.
    forged = Holder("copy evil", {OLD: "fp-forged", NEW: FP[NEW]}, frozenset({NEW}))
    plan = decide(None, forged, referenced=(NEW,), recorded=dict(FP))
    assert plan.action is KeyringAction.REFUSE


def test_present_source_lacking_keys_is_refused_not_overwritten() -> None:
    plan = decide(
        holder("source", NEW, opens=()),
        holder("copy b", OLD, opens=(OLD,)),
        referenced=(OLD,),
    )
    assert plan.action is KeyringAction.REFUSE
    assert plan.reason == "SourceLacksKeys"
    assert "copy b opens everything" in plan.message
    assert dict(plan.missing) == {OLD: None}


def test_a_refused_source_names_memory_as_deletable_not_importable() -> None:
    # Memory cannot be imported: the way back is deleting the Secret, which the next round
    # restores from memory (the keyring the operator verified, kept aside while refused).
    memory = Holder("the operator's memory", {OLD: FP[OLD]}, frozenset({OLD}), trusted=True)
    plan = decide(
        holder("source", error="not valid JSON"),
        memory,
        referenced=(OLD,),
        recorded={OLD: FP[OLD]},
    )
    assert plan.reason == "SourceLacksKeys"
    assert "memory opens everything: delete the Secret" in plan.message
    assert "memory opens everything: import" not in plan.message
    assert "import a keyring export" not in plan.message
    # A copy beside it is still named for import.
    plan = decide(
        holder("source", error="not valid JSON"),
        memory,
        holder("copy b", OLD, opens=(OLD,)),
        referenced=(OLD,),
        recorded={OLD: FP[OLD]},
    )
    assert "copy b opens everything: import it" in plan.message
    assert "delete the Secret" in plan.message


def test_a_value_under_a_never_recorded_id_does_not_stop_the_keyring() -> None:
    # Foreign data (restored from another cluster, or planted with etcd write access) next to
    # ours: the source still serves every recorded key; the stray value is its component's
    # UnknownKey, not a reason to refuse the keyring for everyone.
    source = holder("source", OLD, opens=(OLD,))
    plan = decide(source, referenced=(OLD, "k-foreign"), recorded={OLD: FP[OLD]})
    assert plan.action is KeyringAction.USE_SOURCE
    # A missing source is restored from a copy that opens every recorded key.
    plan = decide(
        None,
        holder("copy a", OLD, opens=(OLD,)),
        referenced=(OLD, "k-foreign"),
        recorded={OLD: FP[OLD]},
    )
    assert (plan.action, plan.holder) == (KeyringAction.RESTORE, "copy a")
    # Only foreign values: a holder must still hold a recorded key to be taken.
    plan = decide(None, holder("copy a", NEW), referenced=("k-foreign",), recorded={OLD: FP[OLD]})
    assert plan.action is KeyringAction.REFUSE
    # A recorded key the source lacks still refuses it (the record is what etcd knows of ours).
    plan = decide(holder("source", NEW, opens=(NEW,)), referenced=(OLD, NEW), recorded=dict(FP))
    assert plan.action is KeyringAction.REFUSE
    # With no record (a store from before the record existed), every referenced id counts.
    plan = decide(holder("source", OLD, opens=(OLD,)), referenced=(OLD, "k-foreign"))
    assert plan.action is KeyringAction.REFUSE


UNREADABLE = {"unreadable-record": "unknown"}  # what the library reads an unparsable record as


@pytest.mark.parametrize(
    ("recorded", "mismatch"),
    [
        ({OLD: FP[OLD]}, None),  # agrees
        ({OLD: FP[OLD], NEW: FP[NEW]}, None),  # lags a rotation stage: no alarm
        (UNREADABLE, "names none of the key ids stored values use"),
        ({"bogus": "x"}, "names none of the key ids stored values use"),
        ({OLD: "fp-forged"}, f"other fingerprints for {OLD}"),  # the opened value beats it
    ],
)
def test_a_record_never_vetoes_a_source_that_opens_every_stored_value(
    recorded: dict[str, str], mismatch: str | None
) -> None:
    plan = decide(holder("source", OLD, opens=(OLD,)), referenced=(OLD,), recorded=recorded)
    assert plan.action is KeyringAction.USE_SOURCE
    if mismatch is None:
        assert plan.record_mismatch is None
    else:
        assert plan.record_mismatch is not None and mismatch in plan.record_mismatch


def test_a_record_clashing_on_a_key_not_in_use_does_not_veto_the_source_or_memory() -> None:
    # The source holds our key in use (opened) and another id the forged record gives another
    # fingerprint: used, and the disagreement reported.
    source = holder("source", OLD, NEW, opens=(OLD,))
    forged = {OLD: FP[OLD], NEW: "fp-forged"}
    plan = decide(source, referenced=(OLD,), recorded=forged)
    assert plan.action is KeyringAction.USE_SOURCE
    assert plan.record_mismatch is not None and NEW in plan.record_mismatch
    # The same for the operator's memory when the source is gone.
    memory = Holder("memory", {OLD: FP[OLD], NEW: FP[NEW]}, frozenset({OLD}), trusted=True)
    plan = decide(None, memory, referenced=(OLD,), recorded=forged)
    assert (plan.action, plan.holder) == (KeyringAction.RESTORE, "memory")
    assert plan.record_mismatch is not None
    # A copy (plantable) that contradicts the record is still not restored from.
    plan = decide(
        None, holder("copy a", OLD, NEW, opens=(OLD,)), referenced=(OLD,), recorded=forged
    )
    assert plan.action is KeyringAction.REFUSE


def test_a_junk_record_restores_from_a_holder_that_opens_everything_and_says_so() -> None:
    plan = decide(None, holder("copy a", OLD, opens=(OLD,)), referenced=(OLD,), recorded=UNREADABLE)
    assert (plan.action, plan.holder) == (KeyringAction.RESTORE, "copy a")
    assert plan.record_mismatch is not None and "names none" in plan.record_mismatch


def test_a_record_naming_none_of_the_ids_in_use_cannot_excuse_a_missing_key() -> None:
    # Only a record that names an id in use tells ours from foreign; a junk one does not, so a
    # foreign-looking value counts as ours (as with no record): refused, never minted.
    plan = decide(
        holder("source", OLD, opens=(OLD,)), referenced=(OLD, "k-foreign"), recorded={"bogus": "x"}
    )
    assert plan.action is KeyringAction.REFUSE
    assert "k-foreign" in plan.message


def test_an_empty_store_with_a_record_no_holder_matches_is_refused_never_minted() -> None:
    # A forged record or a genuine one whose keys only an etcd snapshot still needs: the
    # operator cannot tell, so it mints nothing and says how to clear a wrong record.
    for recorded in ({OLD: FP[OLD]}, {"bogus": "x"}, UNREADABLE):
        plan = decide(None, holder("copy a", NEW), recorded=recorded)
        assert plan.action is KeyringAction.REFUSE
        assert plan.reason == "KeyringMissing"
        assert "holds no sealed value" in plan.message
        assert "keyring/record" in plan.message and "keyring import" in plan.message
        plan = decide(holder("source", NEW), recorded=recorded)
        assert plan.action is KeyringAction.REFUSE
        assert plan.reason == "SourceLacksKeys"
        assert "key record in etcd names" in plan.message and "keyring/record" in plan.message
    # An unreadable Secret is refused for itself: deleting the record would not help.
    plan = decide(holder("source", error="not valid JSON"), recorded={OLD: FP[OLD]})
    assert plan.reason == "SourceLacksKeys" and "keyring/record" not in plan.message
    # Once a person deletes the record, the genuinely empty install gets its keyring.
    assert decide(None, holder("copy a", NEW)).action is KeyringAction.GENERATE
    # A holder that agrees with the record on an empty store is taken, as before.
    plan = decide(holder("source", OLD), recorded={OLD: FP[OLD]})
    assert (plan.action, plan.record_mismatch) == (KeyringAction.USE_SOURCE, None)


def test_unreadable_source_is_refused() -> None:
    plan = decide(holder("source", error="not valid JSON"), referenced=(OLD,))
    assert plan.action is KeyringAction.REFUSE
    assert "unreadable" in plan.message


def test_unreadable_copy_is_never_a_candidate() -> None:
    plan = decide(None, holder("copy a", error="broken"), referenced=(OLD,))
    assert plan.action is KeyringAction.REFUSE


@pytest.mark.parametrize(
    ("held", "new", "referenced", "replace", "dropped"),
    [
        (None, {NEW}, None, True, set()),  # unreadable copy holds nothing usable
        ({OLD}, {OLD, NEW}, None, True, set()),  # superset: nothing dropped, no lookup
        ({OLD}, {NEW}, {OLD}, False, {OLD}),  # the deleted-source hole
        ({OLD, NEW}, {NEW}, {NEW}, True, set()),  # rotation finished: OLD no longer used
        ({OLD, NEW}, {NEW}, set(), True, set()),
    ],
)
def test_copy_replacement(
    held: set[str] | None,
    new: set[str],
    referenced: set[str] | None,
    replace: bool,
    dropped: set[str],
) -> None:
    verdict = may_replace_copy(
        frozenset(held) if held is not None else None,
        frozenset(new),
        frozenset(referenced) if referenced is not None else None,
    )
    assert verdict.replace is replace
    assert verdict.dropped == dropped


def test_copy_replacement_that_drops_keys_needs_the_referenced_ids() -> None:
    with pytest.raises(ValueError, match="drops keys"):
        may_replace_copy(frozenset({OLD}), frozenset({NEW}), None)


def test_keyring_condition_and_ready() -> None:
    refused = decide(None, referenced=(OLD,))
    c = keyring_condition(False, refused)
    assert (c.type, c.status, c.reason) == (cond.KEY_UNAVAILABLE, cond.TRUE, "KeyringMissing")
    assert keyring_condition(True, None).status == cond.FALSE
    assert keyring_condition(False, None).status == cond.UNKNOWN
    got = cond.compute(cond.Observation(config=cond.ConfigState.SYNCED, keyring=c))
    ready = got[0]
    assert (ready.status, ready.reason) == (cond.FALSE, "KeyringMissing")
    assert got[-1] == c
    # Without a keyring verdict the five conditions stay as they were.
    assert len(cond.compute(cond.Observation())) == 5
    fine = cond.compute(
        cond.Observation(
            config=cond.ConfigState.SYNCED,
            heartbeat=cond.Cond(cond.HEARTBEATING, cond.TRUE, "ok"),
            key=cond.Cond(cond.KEY_CURRENT, cond.TRUE, "ok"),
            misconfig=cond.Cond(cond.MISCONFIGURED, cond.FALSE, "ok"),
            keyring=keyring_condition(True, None),
        )
    )
    assert fine[0].status == cond.TRUE


def test_without_a_keyring_nothing_is_sealed() -> None:
    source = MutableKeyringSource(None)
    with pytest.raises(KeyringUnavailableError) as info:
        source.current()
    assert info.value.reason == "KeyUnavailable"
    assert "troubleshooting.md#keyringmissing" in str(info.value)
    assert repr(source) == "MutableKeyringSource(primary=None)"


def test_rotation_keeps_a_retired_key_that_a_stored_value_still_uses() -> None:
    from defender_operator._rotation import _drop_retired

    first = Keyring.generate()
    staged = first.with_new_decrypt_only()
    new_id = staged.keys[-1].key_id
    retired = staged.promote(new_id).retire(first.primary.key_id)
    kept = _drop_retired(retired, frozenset({first.primary.key_id}))
    assert first.primary.key_id in kept
    dropped = _drop_retired(retired, frozenset({new_id}))
    assert dropped.key_ids == (new_id,)
