"""pick_canaries and judge_canary: who tries a new version, and wait / promote / abort."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from defender_operator._decisions.canary import (
    Action,
    CanaryBeat,
    CanaryVerdict,
    RolloutView,
    departed_canaries,
    judge_canary,
    pick_canaries,
    repick,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NEW = "b" * 64
OLD = "a" * 64
ROLLOUT = RolloutView(version=5, base_version=4, digest=NEW, canaries=("p-1", "p-2"), since=T0)


def judge(beats: dict[str, CanaryBeat], **kw: Any) -> CanaryVerdict:
    args: dict[str, Any] = {
        "now": T0 + timedelta(seconds=10),
        "rollout": ROLLOUT,
        "active_version": 4,
        "beats": beats,
        "healthy_since": None,
        "hold_seconds": 30,
        "deadline_seconds": 120,
    }
    args.update(kw)
    return judge_canary(**args)


ON_NEW = CanaryBeat(alive=True, digest=NEW)


# --- pick_canaries ------------------------------------------------------------------------------


def test_count_picks_the_first_instances_by_name() -> None:
    assert pick_canaries(["c", "a", "b"], count=2) == ("a", "b")


def test_percent_rounds_up_and_keeps_at_least_one() -> None:
    assert pick_canaries(["a", "b", "c"], percent=34) == ("a", "b")
    assert pick_canaries(["a", "b", "c"], percent=1) == ("a",)
    assert pick_canaries([f"i{n:02d}" for n in range(10)], percent=20) == ("i00", "i01")


def test_never_more_canaries_than_instances_and_none_without_instances() -> None:
    assert pick_canaries(["a", "b"], count=5) == ("a", "b")
    assert pick_canaries([], count=1) == ()
    assert pick_canaries(["a", "a", "b"], count=2) == ("a", "b")


def test_count_or_percent_is_required() -> None:
    with pytest.raises(ValueError, match="count or percent"):
        pick_canaries(["a"])


# --- judge_canary -------------------------------------------------------------------------------


def test_waits_until_every_canary_reports_the_new_version() -> None:
    v = judge({"p-1": ON_NEW, "p-2": CanaryBeat(alive=True, digest=OLD)})
    assert v.action is Action.WAIT
    assert v.reason == "WaitingForCanaries" and "p-2" in v.message
    assert v.healthy_since is None


def test_holds_then_promotes_after_the_hold() -> None:
    beats = {"p-1": ON_NEW, "p-2": ON_NEW}
    first = judge(beats)
    assert first.action is Action.WAIT and first.reason == "Holding"
    assert first.healthy_since == T0 + timedelta(seconds=10)
    later = judge(beats, now=T0 + timedelta(seconds=39), healthy_since=first.healthy_since)
    assert later.action is Action.WAIT
    done = judge(beats, now=T0 + timedelta(seconds=40), healthy_since=first.healthy_since)
    assert done.action is Action.PROMOTE and done.reason == "CanaryHealthy"


def test_zero_hold_promotes_as_soon_as_all_report_it() -> None:
    assert judge({"p-1": ON_NEW, "p-2": ON_NEW}, hold_seconds=0).action is Action.PROMOTE


def test_a_lost_canary_aborts() -> None:
    v = judge({"p-1": ON_NEW})
    assert v.action is Action.ABORT and v.failed == ("p-2",)
    assert "heartbeat lost" in v.message and "unfreeze" in v.message
    dead = judge({"p-1": ON_NEW, "p-2": CanaryBeat(alive=False, digest=NEW)})
    assert dead.action is Action.ABORT and dead.failed == ("p-2",)


@pytest.mark.parametrize("reason", ["HealthCheckFailed", "ConfigInvalid", "CodecMismatch"])
def test_a_canary_reporting_a_failure_aborts_even_during_the_hold(reason: str) -> None:
    beats = {"p-1": ON_NEW, "p-2": CanaryBeat(True, NEW, reason, "boom")}
    v = judge(beats, healthy_since=T0)
    assert v.action is Action.ABORT and v.reason == "CanaryFailed"
    assert f"p-2: {reason} boom" in v.message


def test_an_error_that_is_no_failure_does_not_abort() -> None:
    beats = {"p-1": ON_NEW, "p-2": CanaryBeat(True, NEW, "SomethingInformational")}
    assert judge(beats).action is Action.WAIT


def test_canaries_that_never_take_the_version_abort_at_the_deadline() -> None:
    beats = {"p-1": ON_NEW, "p-2": CanaryBeat(alive=True, digest=OLD)}
    assert judge(beats, now=T0 + timedelta(seconds=119)).action is Action.WAIT
    v = judge(beats, now=T0 + timedelta(seconds=120))
    assert v.action is Action.ABORT and v.reason == "CanaryNotAdopted" and v.failed == ("p-2",)


def test_an_active_that_moved_on_supersedes_the_rollout() -> None:
    v = judge({"p-1": ON_NEW, "p-2": ON_NEW}, active_version=6)
    assert v.action is Action.SUPERSEDED


# --- canaries whose pod left --------------------------------------------------------------------

SELECTED = {"p-1": False, "p-2": False, "p-3": False}


def test_a_canary_whose_pod_is_being_deleted_has_departed() -> None:
    pods = {**SELECTED, "p-1": True}
    assert departed_canaries(("p-1", "p-2"), {"p-1": "p-1", "p-2": "p-2"}, {}, pods) == {"p-1"}


def test_a_canary_whose_record_and_pod_are_gone_has_departed_by_its_remembered_pod() -> None:
    pods = {"p-2": False, "p-3": False}
    assert departed_canaries(("p-1", "p-2"), {"p-2": "p-2"}, {"p-1": "p-1"}, pods) == {"p-1"}


def test_a_canary_whose_record_is_gone_but_whose_pod_lives_has_not_departed() -> None:
    # Its heartbeat is lost (judged a failure), as before: the pod did not go away.
    assert departed_canaries(("p-1",), {}, {"p-1": "p-1"}, SELECTED) == frozenset()
    # Nothing known of its pod: judged as lost too, never guessed departed.
    assert departed_canaries(("p-1",), {}, {}, SELECTED) == frozenset()


def test_a_canary_whose_record_names_no_selected_pod_is_not_judged() -> None:
    records: dict[str, str | None] = {"p-1": None, "p-2": "elsewhere"}
    assert departed_canaries(("p-1", "p-2"), records, {}, SELECTED) == {"p-1", "p-2"}


def test_repick_keeps_the_canaries_left_and_tops_up_by_name() -> None:
    assert repick(("p-2",), ["p-4", "p-3", "p-2"], wanted=2) == ("p-2", "p-3")
    assert repick((), ["p-4", "p-3"], wanted=1) == ("p-3",)
    assert repick(("p-2",), [], wanted=2) == ("p-2",)
    assert repick((), [], wanted=1) == ()


def test_departed_canaries_are_replaced_not_judged_failed() -> None:
    verdict = judge({"p-2": ON_NEW}, departed=frozenset({"p-1"}), candidates=["p-3", "p-2"])
    assert verdict.action is Action.REPLACE
    assert verdict.canaries == ("p-2", "p-3")
    assert "p-1" in verdict.message and "not a failure" in verdict.message


def test_departed_canaries_with_no_one_to_take_over_leave_the_others() -> None:
    verdict = judge({"p-2": ON_NEW}, departed=frozenset({"p-1"}), candidates=["p-2"])
    assert (verdict.action, verdict.canaries) == (Action.REPLACE, ("p-2",))


def test_every_canary_departed_and_no_live_instance_waits() -> None:
    # Past the progress deadline too: nothing was tried, so nothing is aborted.
    verdict = judge(
        {},
        departed=frozenset({"p-1", "p-2"}),
        candidates=[],
        now=T0 + timedelta(seconds=500),
    )
    assert (verdict.action, verdict.reason) == (Action.WAIT, "WaitingForInstances")


def test_a_failing_canary_still_aborts_when_another_departed() -> None:
    failing = CanaryBeat(alive=True, digest=NEW, error_reason="HealthCheckFailed")
    verdict = judge({"p-2": failing}, departed=frozenset({"p-1"}), candidates=["p-3"])
    assert verdict.action is Action.ABORT
    assert verdict.failed == ("p-2",)
