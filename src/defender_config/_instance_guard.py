"""Someone else's writes to a heartbeater's own instance key, pushed to it by etcd watches.

A heartbeat record is written only when its content changes, so a record deleted or put back by
someone with etcd write access alone (an authentic older record of the same writer, say) would
stay until the instance's next change: a reader that did not see the newer record (an operator
just restarted) takes it for the instance's word. Every client that runs heartbeaters keeps
one watch per component on `<prefix>/components/<component>/instances/` and hands each change
of a key to the heartbeater that owns it, which writes its record again when the change is not
its own (`overwritten`). One watch per component, not one per key: a watch is a thread, and a
process may beat for a thousand instances (an agent's etcd role may read and write its
component's instance keys). It ends when the last heartbeater of its component stops.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

from ._client import DefenderClient
from ._store import WatchHandle
from ._store_types import WatchEvent

InstanceCallback = Callable[[WatchEvent], None]


def overwritten(
    event: WatchEvent, written_revision: int, in_flight: bytes | None, stopping: bool
) -> bool:
    """Whether `event` on a heartbeater's own key is someone else's doing: a put or delete at a
    revision after the heartbeater's last acknowledged put that is not the put it has in flight
    (whose event may arrive before etcd's answer does). A put of bytes it wrote before is
    someone else's too: that is a replay. Its own revoke at stop deletes the key: not a change
    to answer."""
    if stopping or event.mod_revision <= written_revision:
        return False
    return not (event.kind == "put" and in_flight is not None and event.value == in_flight)


class InstanceGuard:
    def __init__(self, client: DefenderClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._owners: dict[str, dict[str, InstanceCallback]] = {}
        self._handles: dict[str, WatchHandle] = {}

    def subscribe(self, component: str, key: str, callback: InstanceCallback) -> None:
        """Call `callback` with every change of `key` (an instance key of `component`) from
        now on. Subscribe before the first write: nothing falls in between."""
        with self._lock:
            if component not in self._handles:
                self._handles[component] = self._client.store.watch_prefix(
                    self._client.layout.instances_dir(component), self._on_event
                )
            self._owners.setdefault(component, {})[key] = callback

    def unsubscribe(self, component: str, key: str) -> None:
        with self._lock:
            owners = self._owners.get(component, {})
            owners.pop(key, None)
            handle = None
            if not owners:
                self._owners.pop(component, None)
                handle = self._handles.pop(component, None)
        if handle is not None:
            handle.cancel()

    def _on_event(self, event: WatchEvent) -> None:
        component = event.key.removeprefix(self._client.layout.components_dir).partition("/")[0]
        with self._lock:
            callback = self._owners.get(component, {}).get(event.key)
        if callback is not None:
            callback(event)


_guards: weakref.WeakKeyDictionary[DefenderClient, InstanceGuard] = weakref.WeakKeyDictionary()
_guards_lock = threading.Lock()


def instance_guard(client: DefenderClient) -> InstanceGuard:
    """The one guard of `client`."""
    with _guards_lock:
        guard = _guards.get(client)
        if guard is None:
            guard = _guards[client] = InstanceGuard(client)
        return guard
