"""The operator's in-memory view of every instance key, fed by one etcd watch.

A lease expiry arrives as a delete event, so a dead instance is known as soon as etcd drops
it, without polling. A slow periodic full list (resync) repairs anything a watch can miss
(compaction), and `trusted` says when the view may replace a direct read.

Watch callbacks run on the library's watch thread; they only schedule `apply` on the event
loop (`loop.call_soon_threadsafe`), so the view is touched by one thread only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from defender_operator._backend import InstanceRecord
from defender_operator._metrics import HEARTBEAT_EVENTS, MONITOR_WAKES


@dataclass(frozen=True)
class _Entry:
    record: InstanceRecord
    seq: int


class HeartbeatView:
    def __init__(self, started: datetime) -> None:
        self.started = started
        self._entries: dict[str, dict[str, _Entry]] = {}
        # Deletes seen since the last resync began, so an older listing cannot resurrect them.
        self._tombstones: dict[tuple[str, str], int] = {}
        self._seq = 0
        self._wakers: dict[str, asyncio.Event] = {}
        self.watching = False
        self.synced = False
        self.last_progress: datetime | None = None
        self.resync_requested = asyncio.Event()

    @property
    def trusted(self) -> bool:
        """True when the view may stand in for a direct read of etcd."""
        return self.watching and self.synced

    def waker(self, component: str) -> asyncio.Event:
        return self._wakers.setdefault(component, asyncio.Event())

    def wake(self, component: str, reason: str) -> None:
        """`component`'s monitor runs a pass now (`reason` is only counted)."""
        MONITOR_WAKES.labels(reason).inc()
        self.waker(component).set()

    def apply(
        self, now: datetime, component: str, instance: str, record: InstanceRecord | None
    ) -> None:
        """One watch event: `record` None is a delete (stopped, or lease expired)."""
        self._seq += 1
        self.last_progress = now
        known = self._entries.setdefault(component, {})
        if record is None:
            HEARTBEAT_EVENTS.labels("delete").inc()
            known.pop(instance, None)
            self._tombstones[(component, instance)] = self._seq
            # Judge now rather than at the next interval.
            self.wake(component, "instance-gone")
            return
        HEARTBEAT_EVENTS.labels("put").inc()
        self._tombstones.pop((component, instance), None)
        before = known.get(instance)
        if before is None or replace(before.record, time=record.time) != record:
            # A new instance, or one whose status, version, keys or error changed: judge it
            # now. A put that only moves the time (a heartbeater from before one RPC per beat
            # writes every beat) is no news.
            self.wake(component, "instance-new" if before is None else "instance-changed")
        known[instance] = _Entry(record, self._seq)

    def wake_all(self, reason: str) -> None:
        """Every monitor runs a pass now: something all of them judge changed (etcd's health,
        the keyring)."""
        MONITOR_WAKES.labels(reason).inc(len(self._wakers))
        for event in self._wakers.values():
            event.set()

    def watch_failed(self) -> None:
        """The stream broke: the library re-creates it, but until a fresh full list has been
        read the view is not trusted."""
        self.synced = False
        self.resync_requested.set()

    def begin_resync(self) -> int:
        self.resync_requested.clear()
        return self._seq

    def resync(
        self, now: datetime, since: int, listing: Mapping[str, Sequence[InstanceRecord]]
    ) -> None:
        """Replace the view with a full listing read after `begin_resync` returned `since`.

        Events applied after `since` are newer than the listing (or as new), so they win.
        """
        fresh: dict[str, dict[str, _Entry]] = {}
        for component, records in listing.items():
            for rec in records:
                if self._tombstones.get((component, rec.instance), 0) > since:
                    continue
                fresh.setdefault(component, {})[rec.instance] = _Entry(rec, since)
        for component, known in self._entries.items():
            for instance, entry in known.items():
                if entry.seq > since:
                    fresh.setdefault(component, {})[instance] = entry
        self._entries = fresh
        self._tombstones = {k: v for k, v in self._tombstones.items() if v > since}
        self.synced = True
        self.last_progress = now

    def instances(self, component: str) -> list[InstanceRecord]:
        return [e.record for e in self._entries.get(component, {}).values()]
