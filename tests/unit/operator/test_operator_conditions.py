"""Conditions: all five always present, transition time kept while status holds."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

from defender_operator._decisions import conditions as c

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def by_type(conds: list[c.Cond]) -> dict[str, c.Cond]:
    return {x.type: x for x in conds}


def all_good(**changes: Any) -> c.Observation:
    """A component with nothing wrong, but for ``changes``."""
    healthy = c.Observation(
        config=c.ConfigState.SYNCED,
        heartbeat=c.Cond(c.HEARTBEATING, c.TRUE, "Heartbeating"),
        key=c.Cond(c.KEY_CURRENT, c.TRUE, "KeyCurrent"),
        misconfig=c.Cond(c.MISCONFIGURED, c.FALSE, "NoErrorsReported"),
    )
    return dataclasses.replace(healthy, **changes)


def test_first_visit_sets_every_condition_unknown() -> None:
    conds = c.compute(c.Observation())
    assert [x.type for x in conds] == list(c.CONDITION_TYPES)
    assert all(x.status == c.UNKNOWN for x in conds)


def test_ready_when_everything_is_true() -> None:
    ready = by_type(c.compute(all_good()))[c.READY]
    assert (ready.status, ready.reason) == (c.TRUE, "AllGood")


def test_invalid_config_makes_ready_false_with_its_reason() -> None:
    obs = all_good(config=c.ConfigState.INVALID, config_message="threshold must be > 0")
    got = by_type(c.compute(obs))
    assert (got[c.CONFIG_SYNCED].status, got[c.CONFIG_SYNCED].reason) == (c.FALSE, "ConfigInvalid")
    assert (got[c.READY].status, got[c.READY].reason) == (c.FALSE, "ConfigInvalid")
    assert "threshold" in got[c.READY].message


def test_misconfigured_wins_ready_reason() -> None:
    obs = all_good(
        misconfig=c.Cond(c.MISCONFIGURED, c.TRUE, "UnknownKey", "pod-a holds the wrong key")
    )
    ready = by_type(c.compute(obs))[c.READY]
    assert (ready.status, ready.reason) == (c.FALSE, "UnknownKey")


def test_etcd_outage_makes_ready_unknown_not_false() -> None:
    obs = all_good(
        config=c.ConfigState.STORE_UNAVAILABLE,
        heartbeat=c.Cond(c.HEARTBEATING, c.UNKNOWN, "EtcdNoQuorum"),
    )
    ready = by_type(c.compute(obs))[c.READY]
    assert (ready.status, ready.reason) == (c.UNKNOWN, "StoreUnavailable")


def test_merge_keeps_transition_time_while_status_holds() -> None:
    first = c.merge([], [c.Cond(c.READY, c.FALSE, "Pending")], now=T0, generation=1)
    assert first[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    later = T0 + timedelta(minutes=5)
    same = c.merge(first, [c.Cond(c.READY, c.FALSE, "Other", "m")], now=later, generation=2)
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert same[0]["reason"] == "Other"
    assert same[0]["observedGeneration"] == 2
    flipped = c.merge(same, [c.Cond(c.READY, c.TRUE, "AllGood")], now=later, generation=2)
    assert flipped[0]["lastTransitionTime"] == "2026-01-01T00:05:00Z"


def test_a_message_over_what_the_crd_allows_is_cut_to_fit() -> None:
    # One longer than the CRD's maxLength makes the API server refuse the whole status patch.
    long = "x" * (c.MESSAGE_MAX_CHARS + 10)
    (cut,) = c.merge([], [c.Cond(c.READY, c.FALSE, "Big", long)], now=T0, generation=1)
    assert len(cut["message"]) == c.MESSAGE_MAX_CHARS and cut["message"].endswith("x…")
    exact = "y" * c.MESSAGE_MAX_CHARS
    (kept,) = c.merge([], [c.Cond(c.READY, c.FALSE, "Big", exact)], now=T0, generation=1)
    assert kept["message"] == exact


def test_merge_keeps_foreign_conditions() -> None:
    foreign = {"type": "Custom", "status": "True", "reason": "X", "lastTransitionTime": "t"}
    out = c.merge([foreign], [c.Cond(c.READY, c.TRUE, "AllGood")], now=T0, generation=1)
    assert out[-1] == foreign


def test_diverged_active_is_synced_but_says_so() -> None:
    obs = c.Observation(config=c.ConfigState.DIVERGED)
    synced = by_type(c.compute(obs))[c.CONFIG_SYNCED]
    assert (synced.status, synced.reason) == (c.TRUE, "ActiveDiffersFromSpec")


def test_last_known_reads_a_condition_back_from_status() -> None:
    stored = [
        {"type": c.READY, "status": "True", "reason": "AllGood"},
        {
            "type": c.HEARTBEATING,
            "status": "False",
            "reason": "RestartBudgetExhausted",
            "message": "3 restarts",
        },
    ]
    got = c.last_known(stored, c.HEARTBEATING)
    assert got == c.Cond(c.HEARTBEATING, c.FALSE, "RestartBudgetExhausted", "3 restarts")
    assert c.last_known(stored, c.KEY_CURRENT) is None
    assert c.last_known(None, c.READY) is None


def test_last_known_ignores_a_hand_edited_condition() -> None:
    for bad in (
        {"type": c.HEARTBEATING, "status": "Maybe", "reason": "X"},
        {"type": c.HEARTBEATING, "status": "True", "reason": ""},
        {"type": c.HEARTBEATING, "status": "True"},
    ):
        assert c.last_known([bad], c.HEARTBEATING) is None
    assert c.last_known(["not a mapping"], c.HEARTBEATING) is None
    odd = {"type": c.HEARTBEATING, "status": "True", "reason": "Ok", "message": 3}
    assert c.last_known([odd], c.HEARTBEATING) == c.Cond(c.HEARTBEATING, c.TRUE, "Ok", "")


def test_last_config_state_reads_config_synced_back_from_status() -> None:
    for state in c.ConfigState:
        (shown,) = [
            x
            for x in c.compute(c.Observation(config=state, config_message="m"))
            if x.type == c.CONFIG_SYNCED
        ]
        stored = [
            {
                "type": shown.type,
                "status": shown.status,
                "reason": shown.reason,
                "message": shown.message,
            }
        ]
        assert c.last_config_state(stored) == (state, "m")
    odd = [{"type": c.CONFIG_SYNCED, "status": "True", "reason": "SomethingElse"}]
    assert c.last_config_state(odd) == (c.ConfigState.UNKNOWN, "")
    assert c.last_config_state(None) == (c.ConfigState.UNKNOWN, "")


def test_config_synced_and_ready_are_stamped_with_the_generation_judged() -> None:
    judged = c.config_generations(3, 1, conflict=False)
    assert judged == {c.CONFIG_SYNCED: 1, c.READY: 1}
    assert c.config_generations(3, None, conflict=False) == {}
    assert c.config_generations(3, 1, conflict=True) == {}  # the refusal is judged now
    now = datetime(2026, 1, 1, tzinfo=UTC)
    merged = c.merge([], c.compute(c.Observation()), now=now, generation=3, judged=judged)
    stamped = {m["type"]: m["observedGeneration"] for m in merged}
    assert stamped[c.CONFIG_SYNCED] == stamped[c.READY] == 1
    assert stamped[c.HEARTBEATING] == stamped[c.KEY_CURRENT] == 3
    assert c.observed_generation(merged, c.CONFIG_SYNCED) == 1
    assert (
        c.observed_generation(
            [{"type": c.CONFIG_SYNCED, "observedGeneration": "1"}], c.CONFIG_SYNCED
        )
        is None
    )
