"""Someone else's writes to a heartbeater's own instance key, pushed to it by etcd watches.

A heartbeat record is written only when its content changes, so a record deleted or put back by
someone with etcd write access alone (an authentic older record of the same writer, say) would
stay until the instance's next change: a reader that did not see the newer record (an operator
just restarted) takes it for the instance's word. Every client that runs heartbeaters keeps
one watch per component on `<prefix>/components/<component>/instances/` and hands each change
of a key to the heartbeater that owns it, which writes its record again when the change is not
its own (`overwritten`). One watch per component, not one per key: a watch is a thread, and a
process may beat for a thousand instances (an agent's etcd role may read and write its
component's instance keys; `_component_watches`). It ends when the last heartbeater of its
component stops.
"""

from __future__ import annotations

from collections.abc import Callable

from ._client import DefenderClient
from ._component_watches import ComponentWatches, per_client
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
        self._watches: ComponentWatches[str, InstanceCallback] = ComponentWatches(
            client, client.layout.instances_dir, self._on_event
        )

    def subscribe(self, component: str, key: str, callback: InstanceCallback) -> None:
        """Call `callback` with every change of `key` (an instance key of `component`) from
        now on. Subscribe before the first write: nothing falls in between."""
        self._watches.add(component, key, callback)

    def unsubscribe(self, component: str, key: str) -> None:
        self._watches.remove(component, key)

    def _on_event(self, event: WatchEvent) -> None:
        component = event.key.removeprefix(self._client.layout.components_dir).partition("/")[0]
        callback = self._watches.subscriber(component, event.key)
        if callback is not None:
            callback(event)


instance_guard = per_client(InstanceGuard)
"""The one guard of a client."""
