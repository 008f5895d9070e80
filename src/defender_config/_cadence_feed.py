"""Published cadences pushed to the heartbeaters of one client by etcd watches.

A heartbeat in steady state is only a lease keep-alive, so a beat no longer reads the cadence
record in the same transaction as its put. Instead every client that runs heartbeaters keeps
one watch per component on `<prefix>/control/<component>/` (whatever the number of instances it
beats for) and hands each change of that component's `heartbeat` record to its heartbeaters.
One watch per component, not one on `control/`: a locked-down agent's etcd role may read only
its own component's control records (`defender_operator.etcd_access`), and a range watch needs
read on the whole range. A watch resumes from the next revision after an outage, so no change is
missed; it ends when the last heartbeater of its component stops.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable

from ._cadence import Cadence, decode_cadence
from ._client import DefenderClient
from ._store import WatchHandle
from ._store_types import StoredValue, WatchEvent

CadenceCallback = Callable[[Cadence | None], None]


class CadenceFeed:
    def __init__(self, client: DefenderClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._subscribers: dict[str, dict[int, CadenceCallback]] = {}
        self._handles: dict[str, WatchHandle] = {}
        self._tokens = itertools.count(1)

    def subscribe(self, component: str, callback: CadenceCallback) -> int:
        """Call `callback` with every new cadence of `component` (None: deleted or unreadable)
        from now on; returns a token for `unsubscribe`. The watch starts with the first
        subscriber, before the caller reads the current record, so nothing falls in between."""
        with self._lock:
            token = next(self._tokens)
            if component not in self._handles:
                self._handles[component] = self._client.store.watch_prefix(
                    f"{self._client.layout.control_dir}{component}/", self._on_event
                )
            self._subscribers.setdefault(component, {})[token] = callback
        return token

    def unsubscribe(self, component: str, token: int) -> None:
        with self._lock:
            callbacks = self._subscribers.get(component, {})
            callbacks.pop(token, None)
            handle = None
            if not callbacks:
                self._subscribers.pop(component, None)
                handle = self._handles.pop(component, None)
        if handle is not None:
            handle.cancel()

    def _on_event(self, event: WatchEvent) -> None:
        control = self._client.layout.control_dir
        component, _, rest = event.key.removeprefix(control).partition("/")
        if rest != "heartbeat":
            return
        with self._lock:
            callbacks = list(self._subscribers.get(component, {}).values())
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


_feeds: weakref.WeakKeyDictionary[DefenderClient, CadenceFeed] = weakref.WeakKeyDictionary()
_feeds_lock = threading.Lock()


def cadence_feed(client: DefenderClient) -> CadenceFeed:
    """The one feed of `client`."""
    with _feeds_lock:
        feed = _feeds.get(client)
        if feed is None:
            feed = _feeds[client] = CadenceFeed(client)
        return feed
