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
from defender_operator._stream_silence import StreamSilence


def _replayed(before: InstanceRecord | None, record: InstanceRecord) -> bool:
    """An authentic record older than the authentic one of the same writer it replaces, by
    the writer's count of its writes (under the MAC), which no clock step moves. Records of
    another writer (a restarted agent) are not ordered: each is taken as it comes."""
    return (
        before is not None
        and before.verified
        and record.verified
        and before.writer is not None
        and record.writer == before.writer
        and record.seq is not None
        and before.seq is not None
        and record.seq < before.seq
    )


@dataclass(frozen=True)
class _Entry:
    record: InstanceRecord
    seq: int


@dataclass(frozen=True, eq=False)
class _Waker:
    """One monitor daemon's event, and the namespace of the resource it monitors."""

    namespace: str
    event: asyncio.Event


class HeartbeatView(StreamSilence):
    def __init__(self, started: datetime) -> None:
        super().__init__()
        self.started = started
        self._entries: dict[str, dict[str, _Entry]] = {}
        # Deletes seen since the last resync began, so an older listing cannot resurrect them.
        self._tombstones: dict[tuple[str, str], int] = {}
        self._seq = 0
        # Only while a monitor daemon of the component runs: names come and go with components
        # (and anyone who can write etcd can invent instance keys), so none is kept for good.
        # One event per daemon, with the namespace of its resource: see `attach`.
        self._wakers: dict[str, list[_Waker]] = {}
        self.watching = False
        self.synced = False
        self.last_progress: datetime | None = None
        self.resync_requested = asyncio.Event()

    @property
    def trusted(self) -> bool:
        """True when the view may stand in for a direct read of etcd: watching, resynced, and
        its stream live when last judged (`StreamSilence.judge_stream`). Monitors plan no pass
        at a live leased instance's deadline while the view is trusted: its expiry is a delete
        only the watch delivers, and a view trusted while its stream stalled left a dead
        instance to the next interval pass."""
        return self.watching and self.synced and self._stream_live

    def attach(self, component: str, namespace: str) -> asyncio.Event:
        """A new event for one monitor daemon of `component` in `namespace` to pause on, until
        it calls `detach` with it.

        Several daemons may run under one name: a same-named component re-created at once has
        its daemon started before the old one's has ended, and a resource refused in another
        namespace (`Conflict`) has one for as long as it exists. Each gets an event of its own:
        a daemon clears its event at the start of every round, and on a shared one the refused
        resource's quick rounds cleared a wake meant for the owner's daemon, still busy with its
        pass, which then slept through the change for up to a monitor interval."""
        event = asyncio.Event()
        self._wakers.setdefault(component, []).append(_Waker(namespace, event))
        return event

    def detach(self, component: str, event: asyncio.Event | None = None) -> None:
        """The daemon that waited on `event` (without one: the oldest) has ended."""
        wakers = self._wakers.get(component)
        if not wakers:
            return
        if event is None:
            wakers.pop(0)
        else:
            wakers[:] = [w for w in wakers if w.event is not event]
        if not wakers:
            del self._wakers[component]

    def waker(self, component: str, namespace: str | None = None) -> asyncio.Event | None:
        """The event the oldest daemon of `component` (in `namespace`, if given) pauses on;
        None while none runs."""
        for w in self._wakers.get(component, ()):
            if namespace is None or w.namespace == namespace:
                return w.event
        return None

    def wake(self, component: str, reason: str, namespace: str | None = None) -> None:
        """`component`'s monitors run a pass now (`reason` is only counted): with `namespace`,
        only the daemons of that namespace's resource.

        A wake about one namespace's objects (its pods, its resource's reconcile) is not news
        to a same-named resource elsewhere (refused with `Conflict`, or not yet gone): woken
        too, any tenant's pod churn would make another namespace's monitor spin. A wake about
        the name's data in etcd (instances, keys) passes no namespace: that data is the name's.

        Without a daemon running there is nothing to wake, and nothing is kept: a daemon's
        first pass comes right after it starts, and reads everything a wake could be about."""
        woken = [
            w.event
            for w in self._wakers.get(component, ())
            if namespace is None or w.namespace == namespace
        ]
        if not woken:
            return
        MONITOR_WAKES.labels(reason).inc()
        for event in woken:
            event.set()

    def apply(
        self, now: datetime, component: str, instance: str, record: InstanceRecord | None
    ) -> None:
        """One watch event: `record` None is a delete (stopped, or lease expired)."""
        self._seq += 1
        self.last_progress = now
        if record is None:
            HEARTBEAT_EVENTS.labels("delete").inc()
            known = self._entries.get(component, {})
            known.pop(instance, None)
            if not known:
                # Its last instance: no empty entry per component name ever seen.
                self._entries.pop(component, None)
            self._tombstones[(component, instance)] = self._seq
            # Judge now rather than at the next interval.
            self.wake(component, "instance-gone")
            return
        known = self._entries.setdefault(component, {})
        self._tombstones.pop((component, instance), None)
        before = known.get(instance)
        if _replayed(before.record if before is not None else None, record):
            # An authentic record older than the one it replaces, with no delete in between:
            # put back by someone with etcd write access (an agent numbers and stamps every
            # record it writes, so its own come in order). The newer one stays.
            HEARTBEAT_EVENTS.labels("replayed").inc()
            return
        HEARTBEAT_EVENTS.labels("put").inc()
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
        for wakers in self._wakers.values():
            for w in wakers:
                w.event.set()

    def watch_failed(self) -> None:
        """The stream broke: the library re-creates it, but until a fresh full list has been
        read the view is not trusted."""
        self.synced = False
        self.resync_requested.set()

    def reverify(self) -> None:
        """The keyring changed: each record was verified with the one held when it was read,
        so the view is not trusted until a full list has read every record with this one."""
        self.watch_failed()

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
            known = self._entries.get(component, {})
            for rec in records:
                if self._tombstones.get((component, rec.instance), 0) > since:
                    continue
                held = known.get(rec.instance)
                if held is not None and _replayed(held.record, rec):
                    # What etcd holds is an older record put back: the newer one stays.
                    fresh.setdefault(component, {})[rec.instance] = held
                    continue
                fresh.setdefault(component, {})[rec.instance] = _Entry(rec, since)
        for component, known in self._entries.items():
            for instance, entry in known.items():
                if entry.seq > since:
                    fresh.setdefault(component, {})[instance] = entry
        before, self._entries = self._entries, fresh
        self._tombstones = {k: v for k, v in self._tombstones.items() if v > since}
        self.synced = True
        self.last_progress = now
        # An instance that came or went while the watch was down sent no event: its pass
        # runs now. Monitors plan no pass for a live leased instance's deadline while the
        # view is trusted (`next_deadline`): its expiry is a delete only a watch delivers.
        for component in before.keys() | fresh.keys():
            if before.get(component, {}).keys() != fresh.get(component, {}).keys():
                self.wake(component, "resync")

    def instances(self, component: str) -> list[InstanceRecord]:
        return [e.record for e in self._entries.get(component, {}).values()]
