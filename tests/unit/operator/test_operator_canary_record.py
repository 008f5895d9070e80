"""judge_record: is the rollout record in etcd the rollout the status anchors? A saved record put
back (below the anchored sequence, or the anchored one after it ended) is ended again or, while
the anchored rollout is in progress, written over with it; a record without a sequence (from
before it existed) is issued again with one. Also the status anchor as read back, and the
sequence a writer picks."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from defender_config.contract import next_record_sequence
from defender_operator._decisions.canary import (
    ABORTED,
    PROGRESSING,
    PROMOTED,
    RecordAction,
    RecordVerdict,
    Reissue,
    RolloutAnchor,
    RolloutView,
    anchor_from_status,
    judge_record,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = T0 + timedelta(minutes=5)
NOW_MS = int(NOW.timestamp() * 1000)
OLD, NEW = "a" * 64, "b" * 64
SEQ = NOW_MS - 60_000  # the anchored rollout's, a minute before NOW

SAVED = RolloutView(5, 4, OLD, ("p-1",), T0, sequence=SEQ - 1000, by="alice")
CURRENT = RolloutView(5, 4, NEW, ("p-1",), T0 + timedelta(seconds=30), sequence=SEQ, by="bob")
ANCHOR = RolloutAnchor(
    sequence=SEQ,
    version=5,
    base_version=4,
    digest=NEW,
    canaries=("p-1",),
    since=T0 + timedelta(seconds=30),
    by="bob",
    phase=PROGRESSING,
)


def judge(record: RolloutView | None, anchor: RolloutAnchor | None = ANCHOR, **kw: Any) -> Any:
    args: dict[str, Any] = {"spec_digest": NEW, "active_version": 4, "now": NOW}
    args.update(kw)
    return judge_record(record=record, anchor=anchor, **args)


def test_no_record_the_anchored_one_or_a_newer_one_is_kept() -> None:
    assert judge(None, anchor=None).action is RecordAction.KEEP
    assert judge(CURRENT).action is RecordAction.KEEP
    # Written by the operator, which stopped before anchoring it: only key holders sign.
    newer = dataclasses.replace(CURRENT, sequence=SEQ + 1, digest=OLD)
    assert judge(newer).action is RecordAction.KEEP
    assert judge(newer, anchor=None).action is RecordAction.KEEP


def test_a_record_deleted_during_a_rollout_is_written_again_from_the_anchor() -> None:
    # The operator ends a rollout with an ended record, never by deleting it: a record gone
    # while status holds the rollout in progress was deleted in etcd (its canaries fell back
    # to ACTIVE and nothing else would resume it).
    verdict = judge(None)
    assert verdict == RecordVerdict(
        RecordAction.REISSUE,
        verdict.message,
        replayed=True,
        sequence=NOW_MS,
        reissue=Reissue(("p-1",), ANCHOR.since, "bob", NEW),
    )
    assert "deleted in etcd" in verdict.message
    # Not the rollout of this spec.config on this ACTIVE, or not in progress: nothing to resume.
    assert judge(None, spec_digest=OLD).action is RecordAction.KEEP
    assert judge(None, active_version=5).action is RecordAction.KEEP
    for phase in ("Promoted", "Aborted", "Superseded"):
        ended = dataclasses.replace(ANCHOR, phase=phase)
        assert judge(None, anchor=ended).action is RecordAction.KEEP


def test_a_saved_record_put_back_during_a_rollout_is_written_over_with_the_anchored_one() -> None:
    verdict = judge(SAVED)
    assert verdict == RecordVerdict(
        RecordAction.REISSUE,
        verdict.message,
        replayed=True,
        sequence=NOW_MS,
        reissue=Reissue(("p-1",), ANCHOR.since, "bob", NEW),
    )
    assert f"older than sequence {SEQ}" in verdict.message
    assert verdict.sequence > ANCHOR.sequence


@pytest.mark.parametrize(
    "phase",
    [PROMOTED, ABORTED, "Superseded", ""],
)
def test_the_anchored_record_back_after_its_rollout_ended_is_ended_again(phase: str) -> None:
    ended = dataclasses.replace(ANCHOR, phase=phase)
    verdict = judge(CURRENT, anchor=ended)
    assert (verdict.action, verdict.replayed, verdict.reissue) == (RecordAction.REMOVE, True, None)
    assert verdict.sequence > SEQ and "ended" in verdict.message
    assert judge(SAVED, anchor=ended).action is RecordAction.REMOVE


@pytest.mark.parametrize(
    "change",
    [
        {"spec_digest": OLD},  # spec.config moved on: its reconcile starts the next rollout
        {"spec_digest": None},
        {"active_version": 5},  # ACTIVE moved on: the anchored rollout is superseded
    ],
)
def test_a_replay_is_only_ended_when_the_anchored_rollout_is_no_longer_current(
    change: dict[str, Any],
) -> None:
    verdict = judge(SAVED, **change)
    assert (verdict.action, verdict.replayed) == (RecordAction.REMOVE, True)


def test_an_anchor_without_canaries_is_not_written_again() -> None:
    verdict = judge(SAVED, anchor=dataclasses.replace(ANCHOR, canaries=()))
    assert verdict.action is RecordAction.REMOVE


def test_a_record_without_a_sequence_is_migrated_or_ended() -> None:
    legacy = dataclasses.replace(CURRENT, sequence=0)
    verdict = judge(legacy, anchor=None)
    assert (verdict.action, verdict.replayed) == (RecordAction.REISSUE, False)
    assert verdict.reissue == Reissue(("p-1",), legacy.since, "bob", NEW)
    assert verdict.sequence == NOW_MS
    # Status from before the upgrade: a rollout without a sequence anchors nothing.
    assert judge(legacy, anchor=dataclasses.replace(ANCHOR, sequence=0)).replayed is False
    # Not this spec's rollout, or not on this ACTIVE: ended.
    for kw in ({"spec_digest": OLD}, {"active_version": 3}):
        assert judge(legacy, anchor=None, **kw).action is RecordAction.REMOVE
    # Once status anchors a sequence, a record without one can only be a saved one put back.
    assert judge(legacy).replayed is True


def test_anchor_from_status_reads_what_rollout_fields_writes() -> None:
    raw = {
        "sequence": SEQ,
        "version": 5,
        "baseVersion": 4,
        "digest": NEW,
        "since": "2026-01-01T00:00:30Z",
        "by": "bob",
        "canaries": ["p-1"],
        "phase": PROGRESSING,
        "message": "",
    }
    assert anchor_from_status(raw) == ANCHOR


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "Progressing",
        {},
        {"version": 5, "phase": PROGRESSING},  # written before sequences existed
        {"sequence": 0},
        {"sequence": True},
        {"sequence": "12"},
    ],
)
def test_a_status_without_a_usable_sequence_anchors_nothing(raw: Any) -> None:
    assert anchor_from_status(raw) is None


def test_odd_status_fields_read_as_empty() -> None:
    anchor = anchor_from_status(
        {"sequence": 7, "since": "yesterday", "canaries": "p-1", "version": "5", "by": None}
    )
    assert anchor == RolloutAnchor(7, 0, 0, "", (), None, "", "")


def test_the_next_sequence_is_above_everything_seen_and_at_least_the_clock() -> None:
    assert next_record_sequence(now=NOW) == NOW_MS
    assert next_record_sequence(3, 9, now=NOW) == NOW_MS
    # A clock behind what was anchored (another replica, a step back) still goes up.
    assert next_record_sequence(NOW_MS + 5, 2, now=NOW) == NOW_MS + 6


def test_an_ended_record_is_only_acted_on_when_it_overwrote_a_rollout_in_progress() -> None:
    ended = dataclasses.replace(SAVED, canaries=())
    verdict = judge(ended)
    assert (verdict.action, verdict.replayed) == (RecordAction.REISSUE, True)
    assert verdict.reissue == Reissue(("p-1",), ANCHOR.since, "bob", NEW)
    # Ours (above the anchor: the operator ended the anchored rollout), nothing anchored, or
    # no rollout in progress: an ended record changes nothing.
    assert judge(dataclasses.replace(ended, sequence=SEQ + 1)).action is RecordAction.KEEP
    assert judge(ended, anchor=None).action is RecordAction.KEEP
    promoted = dataclasses.replace(ANCHOR, phase=PROMOTED)
    assert judge(ended, anchor=promoted).action is RecordAction.KEEP
    # In progress, but no longer this spec's rollout: ended again (harmless, and consistent).
    assert judge(ended, spec_digest=OLD).action is RecordAction.REMOVE
