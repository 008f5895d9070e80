"""evaluate_breaker: trips on too many instances turning unhealthy after an ACTIVE change."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from defender_operator._decisions.breaker import (
    ActiveChange,
    BreakerPolicy,
    evaluate_breaker,
    recovered_change,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CHANGE = ActiveChange(version=5, previous_version=4, time=T0)
POLICY = BreakerPolicy(max_unhealthy_instances=1, max_unhealthy_percent=50, window_seconds=300)
AFTER = T0 + timedelta(seconds=30)


def ev(unhealthy: dict[str, datetime], expected: int = 10, **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "now": AFTER,
        "change": CHANGE,
        "unhealthy_since": unhealthy,
        "expected": expected,
        "policy": POLICY,
        "frozen": False,
    }
    args.update(kw)
    return evaluate_breaker(**args)  # type: ignore[arg-type]


def test_more_than_n_trips_and_reverts_to_previous() -> None:
    v = ev({"a": AFTER, "b": AFTER})
    assert v.trip
    assert v.revert_to == 4
    assert v.unhealthy == ("a", "b")
    assert v.reason == "BlastRadiusExceeded"


def test_n_or_fewer_does_not_trip() -> None:
    assert not ev({"a": AFTER}).trip


def test_percent_trips_even_under_n() -> None:
    policy = BreakerPolicy(max_unhealthy_instances=5, max_unhealthy_percent=50, window_seconds=300)
    assert ev({"a": AFTER}, expected=1, policy=policy).trip
    assert not ev({"a": AFTER}, expected=2, policy=policy).trip


def test_instances_broken_before_the_change_do_not_count() -> None:
    before = T0 - timedelta(seconds=1)
    assert not ev({"a": before, "b": before, "c": before}).trip


def test_outside_window_no_change_or_frozen_does_not_trip() -> None:
    two = {"a": AFTER, "b": AFTER}
    assert ev(two, now=T0 + timedelta(seconds=301)).reason == "WindowClosed"
    assert ev(two, change=None).reason == "NoChange"
    first = ActiveChange(version=1, previous_version=0, time=T0)
    assert not ev(two, change=first).trip
    assert ev(two, frozen=True).reason == "Frozen"


def test_a_new_operator_keeps_guarding_a_change_inside_its_window() -> None:
    # What etcd says about ACTIVE (version 5 committed at T0) stands in for the memory of the
    # operator that committed it.
    got = recovered_change(5, T0, AFTER, POLICY.window_seconds)
    assert got == CHANGE
    trip = ev({"a": AFTER, "b": AFTER}, change=got)
    assert trip.trip and trip.revert_to == 4


def test_nothing_to_guard_after_the_window_for_a_first_version_or_a_rollback() -> None:
    late = T0 + timedelta(seconds=POLICY.window_seconds + 1)
    assert recovered_change(5, T0, late, POLICY.window_seconds) is None
    assert recovered_change(1, T0, AFTER, POLICY.window_seconds) is None
    assert recovered_change(None, T0, AFTER, POLICY.window_seconds) is None
    assert recovered_change(5, None, AFTER, POLICY.window_seconds) is None
    # A rollback returns to known-good; its "previous" version may be the bad one.
    assert recovered_change(5, T0, AFTER, POLICY.window_seconds, rollback=True) is None
    # A time without a zone cannot be compared: not guessed.
    naive = T0.replace(tzinfo=None)
    assert recovered_change(5, naive, AFTER, POLICY.window_seconds) is None
