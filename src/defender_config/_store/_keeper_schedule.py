"""When the keep-alive keeper sends what: pure bookkeeping, no I/O, the clock passed in.

The keeper (`_keeper`) wakes on one shared tick and sends every lease that is due in one burst.
Each lease has its own grid (`next_due`: one interval after the beat just due, not after the
moment it was sent), so a lease sent late by up to a tick is not pushed later and later: its
beats stay `interval` apart, each at most half a tick from its grid point.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable
from typing import Final

# The tick is a fraction of the shortest interval kept, so a beat is never more than a small
# part of its interval off its grid; bounded below so a keeper of very short intervals does not
# spin, and above so a beat at the usual 1 s interval is at most 125 ms off (a gap p99 well
# within 1.2 s).
TICK_FRACTION: Final = 0.25
TICK_MIN_SECONDS: Final = 0.05
TICK_MAX_SECONDS: Final = 0.25
# About how many leases one tick sends, at most (until the tick is at its minimum). The answers
# of a burst come one after the other through gRPC's threads, so the last of a big burst waits
# for all before it, and on a loaded machine that wait varies from burst to burst: 250 leases a
# tick (1,000 at 1 s) gave gaps from 0.5 to 1.65 s at load ~10, smaller bursts vary less.
BURST_TARGET: Final = 50


def tick_seconds(shortest_interval: float | None, kept: int = 0) -> float:
    """The keeper's tick for the shortest interval it keeps (None: nothing kept) and the number
    of leases kept (their beats spread over the interval, so a tick sends about
    kept x tick / interval of them)."""
    if shortest_interval is None:
        return TICK_MAX_SECONDS
    tick = shortest_interval * TICK_FRACTION
    if kept > BURST_TARGET:
        tick = min(tick, shortest_interval * BURST_TARGET / kept)
    return min(TICK_MAX_SECONDS, max(TICK_MIN_SECONDS, tick))


def next_wake(
    anchor: float, tick: float, now: float, earliest: float | None, in_flight: bool
) -> float:
    """When the keeper wakes next: the first tick of its grid (`anchor` + k x `tick`) after
    `now`, and with nothing in flight, not before the first tick that sends the earliest lease
    (due within half a tick of it). Ticks between them would find nothing to do."""
    k = math.floor((now - anchor) / tick) + 1
    if earliest is not None and not in_flight:
        k = max(k, math.ceil((earliest - tick / 2 - anchor) / tick))
    return anchor + k * tick


def next_due(due: float, interval: float, now: float) -> float:
    """When a lease due at `due` (and sent at `now`) is due next: one interval on, on its grid.
    A keeper that fell a whole interval behind (a stalled process) restarts the grid from now
    instead of sending the missed beats in a burst: one keep-alive renews the lease as well as
    several."""
    following = due + interval
    return following if following > now else now + interval


class DueSchedule:
    """Lease ids by the time they are due next. Not thread-safe (the keeper holds its lock).

    A heap with lazy removal: `remove` and a re-`add` only forget the old entry, which
    `pop_due` skips when it surfaces; so each operation is O(log n) even at thousands of
    leases."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int]] = []
        self._due: dict[int, tuple[float, int]] = {}
        self._seq = itertools.count()

    def add(self, lease_id: int, due: float) -> None:
        """Schedule `lease_id` at `due` (replacing any earlier schedule of it)."""
        seq = next(self._seq)
        self._due[lease_id] = (due, seq)
        heapq.heappush(self._heap, (due, seq, lease_id))

    def remove(self, lease_id: int) -> bool:
        """Forget `lease_id`; False if it was not scheduled."""
        return self._due.pop(lease_id, None) is not None

    def pop_due(self, until: float) -> list[int]:
        """Every lease due at or before `until`, earliest first, taken out of the schedule."""
        out: list[int] = []
        heap, current = self._heap, self._due
        while heap and heap[0][0] <= until:
            due, seq, lease_id = heapq.heappop(heap)
            if current.get(lease_id) == (due, seq):
                del current[lease_id]
                out.append(lease_id)
        if len(heap) > 2 * len(current) + 64:
            # Mostly forgotten entries (many leases released): rebuild rather than carry them.
            self._heap = [(d, s, i) for i, (d, s) in current.items()]
            heapq.heapify(self._heap)
        return out

    def earliest(self) -> float | None:
        """When the next lease is due, None if none is scheduled."""
        heap, current = self._heap, self._due
        while heap and current.get(heap[0][2]) != (heap[0][0], heap[0][1]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._due

    def __len__(self) -> int:
        return len(self._due)

    def scheduled(self) -> Iterable[int]:
        return list(self._due)


class IntervalCounts:
    """How many kept leases have each interval: the shortest sets the tick (O(distinct
    intervals) to read, and there are few: one or two cadences per process)."""

    def __init__(self) -> None:
        self._counts: dict[float, int] = {}

    def add(self, interval: float) -> None:
        self._counts[interval] = self._counts.get(interval, 0) + 1

    def remove(self, interval: float) -> None:
        left = self._counts.get(interval, 0) - 1
        if left > 0:
            self._counts[interval] = left
        else:
            self._counts.pop(interval, None)

    def shortest(self) -> float | None:
        return min(self._counts) if self._counts else None
