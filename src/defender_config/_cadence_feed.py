"""Published cadences pushed to the heartbeaters of one client by etcd watches.

A heartbeat in steady state is only a lease keep-alive, so a beat no longer reads the cadence
record in the same transaction as its put. Instead every client that runs heartbeaters keeps
one watch per component on `<prefix>/control/<component>/` (whatever the number of instances it
beats for: `_component_watches`) and hands each change of that component's `heartbeat` record
to its heartbeaters. A watch resumes from the next revision after an outage, so no change is
missed; it ends when the last heartbeater of its component stops.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from ._cadence import Cadence, decode_cadence
from ._client import DefenderClient
from ._component_watches import ComponentWatches, per_client
from ._store_types import StoredValue, WatchEvent

CadenceCallback = Callable[[Cadence | None], None]


class CadenceFeed:
    def __init__(self, client: DefenderClient) -> None:
        self._client = client
        self._watches: ComponentWatches[int, CadenceCallback] = ComponentWatches(
            client, lambda component: f"{client.layout.control_dir}{component}/", self._on_event
        )
        self._tokens = itertools.count(1)

    def subscribe(self, component: str, callback: CadenceCallback) -> int:
        """Call `callback` with every new cadence of `component` (None: deleted or unreadable)
        from now on; returns a token for `unsubscribe`. The watch starts with the first
        subscriber, before the caller reads the current record, so nothing falls in between."""
        token = next(self._tokens)
        self._watches.add(component, token, callback)
        return token

    def unsubscribe(self, component: str, token: int) -> None:
        self._watches.remove(component, token)

    def _on_event(self, event: WatchEvent) -> None:
        control = self._client.layout.control_dir
        component, _, rest = event.key.removeprefix(control).partition("/")
        if rest != "heartbeat":
            return
        callbacks = self._watches.subscribers(component).values()
        if not callbacks:
            return
        stored = (
            StoredValue(
                event.key, event.value, event.mod_revision, 0, event.version, event.lease_id
            )
            if event.kind == "put"
            else None
        )
        cadence = decode_cadence(self._client, event.key, stored)
        for callback in callbacks:
            callback(cadence)


cadence_feed = per_client(CadenceFeed)
"""The one feed of a client."""
