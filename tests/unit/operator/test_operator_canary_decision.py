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
    judge_canary,
    pick_canaries,
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
