"""Which components changed in etcd, from one watch over the deployment's prefix: an informer
that lets a monitor pass reuse the view it read before (`_decisions.reads.must_read`).

For every component it keeps only the highest mod revision of a put or delete of a key its
view reads (library `viewed_component`; the instances' heartbeats, ACTIVE, history and status
are none of them), plus a count of the operator's own writes to it. A view read at revision R is
current while no change above R was seen, provided the watch delivers every change after R.
That holds after a resync at a revision <= R and until the watch loses events: a compaction
(the library then replays the current keys, marked `resync`, but not the deletes in the gap)
or an outage it reports. Until the next resync the view is not trusted, like `HeartbeatView`,
and every pass reads. A resync needs no listing: it only says from which revision on the watch
is complete again; views read before it are read again. Nor is it trusted while the watch's
stream is silent past its limit (`StreamSilence`): a stream that stalled without an error
delivers no change, and a view trusted meanwhile would be reused for up to
monitor_full_read_seconds after etcd changed under it.

Watch callbacks run on the library's watch thread; they only schedule `apply` on the event loop
(`loop.call_soon_threadsafe`), so the view is touched by one thread only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from defender_operator._decisions.reads import ChangeFacts
from defender_operator._metrics import CHANGE_EVENTS
from defender_operator._stream_silence import StreamSilence


class ChangeView(StreamSilence):
    def __init__(self) -> None:
        super().__init__()
        # By component name (the etcd name, one resource's at a time), never dropped when a
        # resource is deleted: another resource of that name may hold a view. `_changed` is
        # pruned at each resync; `_own_writes` is one int per name ever written.
        self._changed: dict[str, int] = {}
        self._own_writes: dict[str, int] = {}
        self._failures = 0
        self.watching = False
        self.synced = False
        self.synced_at = 0
        self.resync_requested = asyncio.Event()
        # Told of every change (`Runtime.changed`: wakes the component's monitor when the
        # change is newer than its last read).
        self.on_change: Callable[[str, int], None] | None = None

    @property
    def trusted(self) -> bool:
        """True when a view the watch vouches for may stand in for a read of etcd: watching,
        resynced, and its stream live when last judged (`judge_stream`)."""
        return self.watching and self.synced and self._stream_live

    def apply(self, component: str, revision: int, replayed: bool = False) -> None:
        """A put or delete, at `revision`, of a key `component`'s view reads. `replayed`: the
        watch resumed past a compaction and hands out the current keys again; deletes in the gap
        are lost, so nothing is trusted until the next resync."""
        CHANGE_EVENTS.labels("replayed" if replayed else "change").inc()
        if revision > self._changed.get(component, 0):
            self._changed[component] = revision
        if replayed:
            self.watch_failed()
        if self.on_change is not None:
            self.on_change(component, revision)

    def watch_failed(self) -> None:
        """The stream broke (the library re-creates it) or lost events: not trusted until the
        next resync."""
        self._failures += 1
        self.synced = False
        self.resync_requested.set()

    def begin_resync(self) -> int:
        self.resync_requested.clear()
        return self._failures

    def resync(self, since: int, revision: int) -> bool:
        """Trust the watch from `revision` (etcd's current revision, read after `begin_resync`
        returned `since`, with the watch connected) on. False, and nothing changes, when the
        watch failed again meanwhile: that failure asked for another resync."""
        if self._failures != since:
            return False
        self.synced_at = max(self.synced_at, revision)
        # A change at or below the resync revision can only matter to a view read before it,
        # which is read again anyway: forget it, so the map holds recent changes only.
        self._changed = {c: r for c, r in self._changed.items() if r > self.synced_at}
        self.synced = True
        return True

    def wrote(self, component: str) -> None:
        """The operator wrote (or tried to write) to `component`'s records: its next pass reads,
        whether or not the watch has delivered the write yet."""
        self._own_writes[component] = self._own_writes.get(component, 0) + 1

    def facts(self, component: str) -> ChangeFacts:
        return ChangeFacts(
            trusted=self.trusted,
            synced_at=self.synced_at,
            changed_at=self._changed.get(component, 0),
            own_writes=self._own_writes.get(component, 0),
        )
