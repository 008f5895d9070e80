"""plan_seed and misconfiguration assessment."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from defender_operator._decisions.misconfig import Report, assess
from defender_operator._decisions.seeding import StoredState, plan_seed

T0 = datetime(2026, 1, 1, tzinfo=UTC)
EMPTY = StoredState(master_digest=None, active_digest=None, active_version=None)


def test_first_create_seeds_master_and_active_only() -> None:
    plan = plan_seed("d1", EMPTY, "")
    assert (plan.seed_master, plan.seed_active, plan.commit) == (True, True, False)


def test_resume_with_everything_in_place_does_nothing() -> None:
    stored = StoredState("d1", "d1", 1)
    assert plan_seed("d1", stored, "d1").nothing_to_do
    # Operator restarted and lost nothing: status digest present, still nothing.
    assert plan_seed("d1", stored, "").nothing_to_do


def test_spec_change_commits() -> None:
    plan = plan_seed("d2", StoredState("d1", "d1", 1), "d1")
    assert (plan.seed_master, plan.seed_active, plan.commit) == (False, False, True)


def test_rollback_is_not_undone_by_the_unchanged_spec() -> None:
    # After a rollback ACTIVE holds the MASTER digest while spec still says d2.
    assert plan_seed("d2", StoredState("d1", "d1", 3), "d2").nothing_to_do


def test_recreated_resource_keeps_master_and_commits_its_new_spec() -> None:
    plan = plan_seed("d9", StoredState("d1", "d4", 4), "")
    assert (plan.seed_master, plan.seed_active, plan.commit) == (False, False, True)


def test_lost_active_is_reseeded_without_touching_master() -> None:
    plan = plan_seed("d1", StoredState("d1", None, None), "d1")
    assert (plan.seed_master, plan.seed_active, plan.commit) == (False, True, False)


def test_master_gone_beside_the_metadata_is_reported_and_nothing_seeded() -> None:
    # MASTER deleted after a breaker rollback (ACTIVE version 7 is not the spec): seeding
    # would make the rejected spec MASTER and version 1 again.
    for handled in ("d2", ""):
        plan = plan_seed("d2", StoredState(None, "d1", 7), handled)
        assert plan.master_missing and plan.nothing_to_do
        assert (plan.seed_master, plan.seed_active, plan.commit) == (False, False, False)
    assert not plan_seed("d1", EMPTY, "").master_missing  # a new component is seeded


def test_no_reports_is_not_misconfigured() -> None:
    assert not assess(T0, [], 300).misconfigured


def test_network_errors_are_not_misconfiguration() -> None:
    v = assess(T0, [Report("a", "StoreUnavailable", "timeout", T0)], 300)
    assert not v.misconfigured


def test_most_frequent_reason_wins_and_names_instances() -> None:
    reports = [
        Report("a", "UnknownKey", "key k2 not in keyring [k1]", T0),
        Report("b", "UnknownKey", "key k2 not in keyring [k1]", T0),
        Report("c", "CodecMismatch", "expected zstd found none", T0),
    ]
    v = assess(T0, reports, 300)
    assert (v.misconfigured, v.reason, v.instances) == (True, "UnknownKey", ("a", "b"))
    assert "k2" in v.message


def test_old_reports_age_out() -> None:
    old = [Report("a", "SizeAnomaly", "declared 10 actual 9", T0 - timedelta(seconds=301))]
    assert not assess(T0, old, 300).misconfigured


def test_a_verdict_says_when_its_oldest_counted_report_leaves_the_window() -> None:
    reports = [
        Report("a", "UnknownKey", "k2", T0 - timedelta(seconds=100)),
        Report("b", "UnknownKey", "k2", T0 - timedelta(seconds=20)),
        Report("c", "StoreUnavailable", "timeout", T0 - timedelta(seconds=200)),  # not counted
        Report("d", "CodecMismatch", "zstd", T0 - timedelta(seconds=301)),  # out already
    ]
    assert assess(T0, reports, 300).changes_at == T0 + timedelta(seconds=200)
    # Then "a" is out and "b" is the oldest counted.
    later = T0 + timedelta(seconds=201)
    assert assess(later, reports, 300).changes_at == T0 + timedelta(seconds=280)


def test_a_verdict_with_nothing_counted_changes_at_no_set_time() -> None:
    network = [Report("a", "StoreUnavailable", "timeout", T0)]
    assert assess(T0, network, 300).changes_at is None
    assert assess(T0, [], 300).changes_at is None
