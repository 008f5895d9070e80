"""When the keep-alive keeper sends which lease: the tick, each lease's grid, the due set (plain
numbers, no clock, no cluster)."""

from __future__ import annotations

import pytest

from defender_config._store._keeper_schedule import (
    DueSchedule,
    IntervalCounts,
    next_due,
    next_wake,
    tick_seconds,
)


@pytest.mark.parametrize(
    ("shortest", "tick"),
    [
        (1.0, 0.25),  # the usual 1 s cadence: four ticks a second
        (0.5, 0.125),
        (0.1, 0.05),  # never below 50 ms: a keeper of tiny intervals does not spin
        (30.0, 0.25),  # never above 250 ms: a beat is at most 125 ms off its grid
        (None, 0.25),
    ],
)
def test_the_tick_is_a_quarter_of_the_shortest_interval_within_bounds(
    shortest: float | None, tick: float
) -> None:
    assert tick_seconds(shortest) == pytest.approx(tick)


@pytest.mark.parametrize(
    ("kept", "tick"),
    [
        (10, 0.25),
        (100, 0.25),  # 25 leases a tick
        (500, 0.1),  # 50 a tick rather than 125
        (1000, 0.05),
        (5000, 0.05),  # the floor holds: 250 a tick
    ],
)
def test_many_leases_shorten_the_tick_so_a_burst_stays_small(kept: int, tick: float) -> None:
    assert tick_seconds(1.0, kept) == pytest.approx(tick)


def test_the_keeper_wakes_on_its_next_tick_while_answers_are_outstanding() -> None:
    assert next_wake(100.0, 0.25, 100.3, earliest=130.0, in_flight=True) == 100.5
    assert next_wake(100.0, 0.25, 100.3, earliest=None, in_flight=False) == 100.5


def test_the_keeper_sleeps_through_ticks_that_would_send_nothing() -> None:
    # A lone lease due at 130 (a 30 s interval): the tick at 130.0 sends it (130 - 0.125 ≤ 130).
    assert next_wake(100.0, 0.25, 100.3, earliest=130.0, in_flight=False) == 130.0
    # Due within half a tick of the next tick: that tick.
    assert next_wake(100.0, 0.25, 100.3, earliest=100.6, in_flight=False) == 100.5
    # Overdue (the keeper fell behind): the next tick, no catch-up ticks in the past.
    assert next_wake(100.0, 0.25, 103.1, earliest=101.0, in_flight=False) == 103.25


def test_a_lease_sent_late_stays_on_its_grid() -> None:
    # Due at 10.0, sent at 10.1 (a tick later): next due 11.0, not 11.1.
    assert next_due(10.0, 1.0, now=10.1) == 11.0
    # Beats one interval apart, whenever in the tick they were sent.
    assert next_due(11.0, 1.0, now=10.95) == 12.0


def test_a_keeper_an_interval_behind_restarts_the_grid_instead_of_catching_up() -> None:
    # Stalled for 2.5 s: one keep-alive now, the next one interval later, no burst of three.
    assert next_due(10.0, 1.0, now=12.5) == 13.5


def test_pop_due_takes_every_lease_due_by_then_earliest_first() -> None:
    s = DueSchedule()
    s.add(3, 1.3)
    s.add(1, 1.1)
    s.add(2, 1.2)
    s.add(4, 2.0)
    assert s.earliest() == 1.1
    assert s.pop_due(1.25) == [1, 2]
    assert 1 not in s and 3 in s and len(s) == 2
    assert s.pop_due(1.25) == []
    assert s.pop_due(5.0) == [3, 4]
    assert s.earliest() is None and len(s) == 0


def test_a_removed_or_rescheduled_lease_is_popped_only_at_its_current_time() -> None:
    s = DueSchedule()
    s.add(1, 1.0)
    s.add(2, 1.0)
    s.add(1, 3.0)  # rescheduled: its old entry is forgotten
    assert s.remove(2) and not s.remove(2)
    assert s.earliest() == 3.0
    assert s.pop_due(2.0) == []
    assert s.pop_due(3.0) == [1]


def test_a_schedule_of_mostly_removed_leases_is_compacted() -> None:
    s = DueSchedule()
    for lease in range(1000):
        s.add(lease, 100.0 + lease)
    for lease in range(999):
        s.remove(lease)
    assert s.pop_due(0.0) == []  # nothing due, but the forgotten entries are dropped
    assert len(s._heap) == 1 and list(s.scheduled()) == [999]
    assert s.pop_due(2000.0) == [999]


def test_the_shortest_kept_interval_follows_adds_and_removes() -> None:
    counts = IntervalCounts()
    assert counts.shortest() is None
    counts.add(1.0)
    counts.add(0.5)
    counts.add(0.5)
    assert counts.shortest() == 0.5
    counts.remove(0.5)
    assert counts.shortest() == 0.5
    counts.remove(0.5)
    assert counts.shortest() == 1.0
    counts.remove(1.0)
    counts.remove(1.0)  # not there: no negative count
    assert counts.shortest() is None
