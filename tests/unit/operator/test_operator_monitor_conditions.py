"""The Heartbeating and KeyCurrent conditions the monitor derives from its inputs."""

from __future__ import annotations

from datetime import UTC, datetime

from defender_operator._backend import InstanceRecord
from defender_operator._decisions import conditions as c
from defender_operator._decisions.restarts import RestartAction, RestartDecision
from defender_operator._monitor import heartbeat_condition, key_condition

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NONE = RestartDecision(RestartAction.NONE, "Heartbeating", "ok")


def test_heartbeating_cases() -> None:
    assert heartbeat_condition(NONE, 2, 2, False).status == c.TRUE
    assert heartbeat_condition(NONE, 0, 0, False).reason == "NoPods"
    assert heartbeat_condition(NONE, 0, 1, False).status == c.UNKNOWN  # still in grace
    stale = RestartDecision(RestartAction.RESTART, "MissedHeartbeats", "m", "p1", ("p1",))
    got = heartbeat_condition(stale, 1, 2, False)
    assert (got.status, got.reason) == (c.FALSE, "MissedHeartbeats")
    assert "p1" in got.message
    quorum = RestartDecision(RestartAction.HOLD, "EtcdNoQuorum", "no quorum")
    assert heartbeat_condition(quorum, 0, 2, False).status == c.UNKNOWN
    spent = RestartDecision(RestartAction.DEGRADED, "RestartBudgetExhausted", "spent")
    assert heartbeat_condition(spent, 0, 1, False).reason == "RestartBudgetExhausted"
    # Stays degraded while reported, even when this pass only holds.
    hold = RestartDecision(RestartAction.HOLD, "RestartBackoff", "wait", stale_pods=("p1",))
    assert heartbeat_condition(hold, 0, 1, True).reason == "RestartBudgetExhausted"


def _inst(name: str, primary: str, held: set[str]) -> InstanceRecord:
    return InstanceRecord(name, name, T0, key_fingerprint=primary, key_fingerprints=frozenset(held))


def test_key_current_cases() -> None:
    ok = key_condition("fp2", [_inst("a", "fp2", {"fp1", "fp2"})], "d", "d")
    assert (ok.status, ok.reason) == (c.TRUE, "KeyCurrent")
    stale_copy = key_condition("fp2", [], "old", "d")
    assert (stale_copy.status, stale_copy.reason) == (c.FALSE, "CopyOutOfSync")
    behind = key_condition("fp2", [_inst("a", "fp1", {"fp1"}), _inst("b", "fp2", set())], "d", "d")
    assert (behind.status, behind.reason) == (c.FALSE, "InstancesBehind")
    assert "a" in behind.message and "b" not in behind.message.split(":")[-1]


def test_holding_the_primary_is_not_enough_sealing_with_it_is() -> None:
    holds_only = key_condition("fp2", [_inst("a", "fp1", {"fp1", "fp2"})], "d", "d")
    assert holds_only.reason == "InstancesBehind"
    legacy = InstanceRecord("a", "a", T0, key_fingerprints=frozenset({"fp2"}))
    assert key_condition("fp2", [legacy], "d", "d").status == c.TRUE
