"""defragment_cluster against a scripted store: the order of its calls, and every way it stops
or reports instead of claiming success (a member that has not applied the compaction, one still
over its quota, NOSPACE back right after its disarm)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from defender_config import (
    CompactionLagError,
    DefragIncompleteError,
    StoreUnavailableError,
    defragment_cluster,
)
from defender_config.store import EtcdStore, HealthReport, MemberHealth

QUOTA = 1000
ORDER = ["m1:2379", "m2:2379", "m0:2379"]  # followers first, the leader (m0) last
NOSPACE_ID = 0xA1


@dataclass
class ScriptedStore:
    """Three members, m0 the leader, all over the quota until defragmented. `after_defrag`
    lists the sizes a member has after each of its defrags (default: well under the quota)."""

    after_defrag: dict[str, list[int]] = field(default_factory=dict)
    lagging: frozenset[str] = frozenset()
    # A member whose file grows over its quota again right after the disarm (a big write).
    refills_after_disarm: str | None = None
    # How many alarm GETs still list NOSPACE after its disarm: the client reached a member that
    # has not applied it yet; -1: for ever.
    alarm_get_lag: int = 0
    disarmed: list[tuple[int, str]] = field(default_factory=list)
    # What each member reports in use (none reported: unknown).
    in_use: dict[str, int] = field(default_factory=dict)
    # How many more health() calls a member keeps listing NOSPACE once it is disarmed (it has
    # not applied the disarm yet); -1: for ever.
    slow_view: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ORDER, 2 * QUOTA))
    active: list[tuple[int, str]] = field(default_factory=lambda: [(NOSPACE_ID, "NOSPACE")])
    calls: list[tuple[str, ...]] = field(default_factory=list)

    def reports_nospace(self, ep: str) -> bool:
        if self.active:
            return True
        left = self.slow_view.get(ep, 0)
        if left > 0:
            self.slow_view[ep] = left - 1
        return left != 0

    def health(self) -> HealthReport:
        members = tuple(
            MemberHealth(
                endpoint=ep,
                healthy=True,
                member_id=i,
                is_leader=ep == "m0:2379",
                db_size_bytes=self.sizes[ep],
                db_size_quota_bytes=QUOTA,
                db_size_in_use_bytes=self.in_use.get(ep),
                alarms=("NOSPACE",) if self.reports_nospace(ep) else (),
                serving=True,
            )
            for i, ep in enumerate(sorted(self.sizes))
        )
        return HealthReport(members=members, cluster_size=3, leader_id=0, quorum=True)

    def current_revision(self) -> int:
        return 42

    def compact(self, revision: int) -> None:
        self.calls.append(("compact", str(revision)))

    def wait_compacted(self, endpoint: str, revision: int, timeout: float) -> None:
        self.calls.append(("wait", endpoint, str(revision)))
        if endpoint in self.lagging:
            raise StoreUnavailableError([endpoint], "the call timed out", attempts=2)

    def defragment(self, endpoint: str) -> None:
        self.calls.append(("defrag", endpoint))
        script = self.after_defrag.get(endpoint)
        self.sizes[endpoint] = script.pop(0) if script else QUOTA // 10

    def alarms(self) -> list[tuple[int, str]]:
        if self.disarmed and self.alarm_get_lag != 0:
            self.alarm_get_lag -= 1
            return [*self.active, *self.disarmed]
        return list(self.active)

    def disarm_alarm(self, member_id: int, alarm: str) -> None:
        self.calls.append(("disarm", f"{member_id:x}"))
        self.active.remove((member_id, alarm))
        self.disarmed.append((member_id, alarm))
        if self.refills_after_disarm is not None:
            self.sizes[self.refills_after_disarm] = 2 * QUOTA
            self.active.append((member_id, alarm))

    def defrags(self) -> list[str]:
        return [c[1] for c in self.calls if c[0] == "defrag"]


def run(store: ScriptedStore, **kw: Any) -> Any:
    kw.setdefault("settle_timeout", 1.0)
    return defragment_cluster(cast(EtcdStore, store), **kw)


def test_each_member_waits_for_the_compaction_before_its_defrag() -> None:
    store = ScriptedStore()
    result = run(store, compact=True, disarm_nospace=True)
    assert store.calls[0] == ("compact", "42")
    expected: list[tuple[str, ...]] = [("compact", "42")]
    for ep in ORDER:
        expected += [("wait", ep, "42"), ("defrag", ep)]
    assert store.calls[: len(expected)] == expected
    assert result.disarmed == (f"{NOSPACE_ID:x}",) and result.alarms_left == ()
    assert result.over_quota == ()


def test_without_compaction_nothing_is_waited_for() -> None:
    store = ScriptedStore()
    run(store)
    assert not [c for c in store.calls if c[0] == "wait"]
    assert store.defrags() == ORDER


def test_a_member_that_has_not_applied_the_compaction_stops_the_defrag_before_it() -> None:
    store = ScriptedStore(lagging=frozenset({"m2:2379"}))
    with pytest.raises(CompactionLagError) as caught:
        run(store, compact=True, disarm_nospace=True, settle_timeout=0.2)
    assert caught.value.endpoint == "m2:2379" and caught.value.revision == 42
    assert caught.value.reason == "CompactionLag"
    assert ("wait", "m2:2379", "42") in store.calls
    # m1 was done; neither m2 nor the leader after it were touched, nothing disarmed.
    assert store.defrags() == ["m1:2379"]
    assert not [c for c in store.calls if c[0] == "disarm"]


def test_a_member_still_over_its_quota_is_defragmented_once_more() -> None:
    # Its compaction landed after its defrag (an auto-compaction in flight): the second pass
    # brings it under.
    store = ScriptedStore(after_defrag={"m2:2379": [2 * QUOTA, QUOTA // 10]})
    result = run(store, compact=True, disarm_nospace=True)
    assert store.defrags() == [*ORDER, "m2:2379"]
    assert [s.endpoint for s in result.steps] == [*ORDER, "m2:2379"]
    assert result.over_quota == () and result.alarms_left == ()


def test_a_member_over_its_quota_with_that_much_in_use_is_not_defragmented_again() -> None:
    # Live data (no compaction): another defrag would give nothing back.
    store = ScriptedStore(after_defrag={"m1:2379": [2 * QUOTA]}, in_use={"m1:2379": 2 * QUOTA})
    result = run(store)
    assert store.defrags() == ORDER
    assert result.over_quota == ("m1:2379",)


def test_disarming_is_refused_while_a_member_stays_over_its_quota() -> None:
    store = ScriptedStore(after_defrag={"m1:2379": [2 * QUOTA, 2 * QUOTA]})
    with pytest.raises(DefragIncompleteError) as caught:
        run(store, compact=True, disarm_nospace=True)
    assert caught.value.members == ("m1:2379",)
    assert "m1:2379 holds 2000 bytes, quota 1000" in str(caught.value)
    assert not [c for c in store.calls if c[0] == "disarm"]
    assert store.active == [(NOSPACE_ID, "NOSPACE")]


def test_without_disarm_a_member_over_its_quota_is_reported_not_raised() -> None:
    store = ScriptedStore(after_defrag={"m1:2379": [2 * QUOTA, 2 * QUOTA]})
    result = run(store)
    assert result.over_quota == ("m1:2379",)
    assert result.alarms_left == ("NOSPACE",) and result.disarmed == ()


def test_nospace_back_right_after_its_disarm_is_an_error_not_a_success() -> None:
    store = ScriptedStore(refills_after_disarm="m1:2379")
    with pytest.raises(DefragIncompleteError) as caught:
        run(store, compact=True, disarm_nospace=True, settle_timeout=30.0)
    assert caught.value.members == ("m1:2379",)
    assert "raised again right after it was disarmed" in str(caught.value)
    assert "m1:2379 holds 2000 bytes, quota 1000" in str(caught.value)
    assert ("disarm", f"{NOSPACE_ID:x}") in store.calls


def test_an_alarm_get_answered_by_a_member_behind_the_disarm_is_waited_out() -> None:
    # etcd answers an alarm GET from the member the client reaches, without raft: right after
    # the disarm it can still list NOSPACE. That is not the alarm coming back.
    store = ScriptedStore(alarm_get_lag=2)
    result = run(store, compact=True, disarm_nospace=True, settle_timeout=30.0)
    assert result.disarmed == (f"{NOSPACE_ID:x}",) and result.alarms_left == ()
    assert store.alarm_get_lag == 0


def test_an_alarm_get_that_keeps_listing_nospace_is_an_error_at_the_deadline() -> None:
    store = ScriptedStore(alarm_get_lag=-1)
    with pytest.raises(DefragIncompleteError) as caught:
        run(store, compact=True, disarm_nospace=True, settle_timeout=0.2)
    assert caught.value.members == (f"{NOSPACE_ID:x}",)
    assert f"member {NOSPACE_ID:x} still report(s) it" in str(caught.value)


def test_the_defrag_returns_once_every_member_applied_the_disarm() -> None:
    store = ScriptedStore(slow_view={"m2:2379": 2})
    result = run(store, compact=True, disarm_nospace=True)
    assert result.alarms_left == ()
    assert store.slow_view["m2:2379"] == 0


def test_a_member_that_keeps_reporting_nospace_after_the_disarm_is_an_error() -> None:
    store = ScriptedStore(slow_view={"m2:2379": -1})
    with pytest.raises(DefragIncompleteError) as caught:
        run(store, compact=True, disarm_nospace=True, settle_timeout=0.2)
    assert caught.value.members == ("m2:2379",)
    assert "m2:2379 still report(s) it" in str(caught.value)
    assert "have not applied the disarm" in str(caught.value)


# --- room for the largest write ------------------------------------------------------------------


def test_a_member_left_short_of_room_for_the_largest_write_is_reported() -> None:
    # 950 of 1000 after each defrag, with that much live data: small writes fit, a write of
    # 100 bytes would raise NOSPACE again. Another defrag would not help.
    store = ScriptedStore(after_defrag={"m1:2379": [950, 950]}, in_use={"m1:2379": 940})
    result = run(store, compact=True, disarm_nospace=True, room_bytes=100)
    assert store.defrags() == ORDER
    assert result.short_of_room == ("m1:2379",)
    # Not over the quota: NOSPACE is disarmed, the writes that fit go through.
    assert result.over_quota == () and result.alarms_left == ()
    assert result.disarmed == (f"{NOSPACE_ID:x}",)


def test_a_member_short_of_room_is_defragmented_once_more_when_that_gives_the_room() -> None:
    # Its compaction landed after its first defrag: 940 bytes of file, 40 in use.
    store = ScriptedStore(after_defrag={"m2:2379": [940, 40]}, in_use={"m2:2379": 40})
    result = run(store, compact=True, room_bytes=100)
    assert store.defrags() == [*ORDER, "m2:2379"]
    assert result.short_of_room == ()


def test_without_room_asked_for_a_nearly_full_member_is_not_judged() -> None:
    store = ScriptedStore(after_defrag={"m1:2379": [999]}, in_use={"m1:2379": 999})
    result = run(store)
    assert store.defrags() == ORDER
    assert result.short_of_room == () and result.over_quota == ()
