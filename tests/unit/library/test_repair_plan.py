"""`plan_repair`: what the operator's repair pass does with a component's metadata record, from
the verified record, the history entries that open and ACTIVE's digest, without a cluster."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from defender_config._configs import KeptVersion, RepairAction, plan_repair

D5, D6, D7 = "d5", "d6", "d7"
V5, V6, V7 = KeptVersion(5, D5, True), KeptVersion(6, D6, True), KeptVersion(7, D7, True)


@pytest.mark.parametrize(
    ("record", "kept", "active", "expected"),
    [
        # Sound: the record, its history entry and ACTIVE agree.
        ((7, D7), [V7, V6], D7, (RepairAction.KEEP, V7)),
        # An old sealed ACTIVE put back alone: restored from the record's entry.
        ((7, D7), [V7, V6], D6, (RepairAction.REBUILD, V7)),
        ((7, D7), [V7, V6], None, (RepairAction.REBUILD, V7)),
        # An authentic older record put back (replay): rebuilt from the newer entry.
        ((6, D6), [V7, V6], D6, (RepairAction.REBUILD, V7)),
        # Unsigned, forged or deleted record: rebuilt from the newest entry that opens.
        (None, [V7, V6], D7, (RepairAction.REBUILD, V7)),
        (None, [], D7, (RepairAction.NOTHING_TO_REBUILD, None)),
        # The newest entries deleted: the record is no replay; kept while ACTIVE is its config.
        ((7, D7), [V6, V5], D7, (RepairAction.HISTORY_MISSING, V6)),
        ((7, D7), [], D7, (RepairAction.HISTORY_MISSING, None)),
        # ... and never rolled back to an older entry when ACTIVE is not.
        ((7, D7), [V6, V5], D6, (RepairAction.ACTIVE_LOST, V6)),
        ((7, D7), [V5], None, (RepairAction.ACTIVE_LOST, V5)),
    ],
)
def test_plan(
    record: tuple[int, str] | None,
    kept: list[KeptVersion],
    active: str | None,
    expected: tuple[RepairAction, KeptVersion | None],
) -> None:
    assert plan_repair(record, kept, active) == expected


def test_an_unauthenticated_entry_newer_than_the_record_proves_nothing() -> None:
    # A plaintext entry names its version in a key anyone with etcd write can choose.
    junk = KeptVersion(9_999_999_998, "junk", False)
    plain7 = KeptVersion(7, D7, False)
    assert plan_repair((7, D7), [junk, plain7], D7) == (RepairAction.KEEP, plain7)
    assert plan_repair((7, D7), [junk], D7) == (RepairAction.HISTORY_MISSING, None)
    # Without a verified record an authenticated entry is preferred; for a plaintext
    # component the newest that opens is all there is (the caller checks it against the spec).
    assert plan_repair(None, [junk, V6], D7) == (RepairAction.REBUILD, V6)
    assert plan_repair(None, [junk, plain7], D7) == (RepairAction.REBUILD, junk)


def test_entries_are_opened_only_as_far_as_needed() -> None:
    consumed: list[int] = []

    def kept() -> Iterator[KeptVersion]:
        for entry in (V7, V6, V5):
            consumed.append(entry.version)
            yield entry

    plan_repair((7, D7), kept(), D7)
    assert consumed == [7]
