"""One etcd watch per component, shared by everything of one client that follows it.

A watch is a thread and a stream; a process may beat for a thousand instances of a few
components. So the heartbeaters of a client share one watch per component and prefix: the
first subscriber starts it (before the subscriber reads what it watches, so no change falls in
between), the last one's leave cancels it. Per component, not one watch over every component:
a locked-down agent's etcd role may read only its own component's keys, and a range watch needs
read on the whole range.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from ._client import DefenderClient
from ._store import WatchHandle
from ._store_types import WatchEvent

K = TypeVar("K", bound=Hashable)
C = TypeVar("C")
T = TypeVar("T")


class ComponentWatches(Generic[K, C]):
    """Subscribers (`K` → callback `C`) per component, and the component's one watch on
    `prefix_of(component)`, whose events go to `on_event`."""

    def __init__(
        self,
        client: DefenderClient,
        prefix_of: Callable[[str], str],
        on_event: Callable[[WatchEvent], None],
    ) -> None:
        self._client = client
        self._prefix_of = prefix_of
        self._on_event = on_event
        self._lock = threading.Lock()
        self._subscribers: dict[str, dict[K, C]] = {}
        self._handles: dict[str, WatchHandle] = {}

    def add(self, component: str, ident: K, callback: C) -> None:
        with self._lock:
            if component not in self._handles:
                self._handles[component] = self._client.store.watch_prefix(
                    self._prefix_of(component), self._on_event
                )
            self._subscribers.setdefault(component, {})[ident] = callback

    def remove(self, component: str, ident: K) -> None:
        with self._lock:
            subscribers = self._subscribers.get(component, {})
            subscribers.pop(ident, None)
            handle = None
            if not subscribers:
                self._subscribers.pop(component, None)
                handle = self._handles.pop(component, None)
        if handle is not None:
            handle.cancel()

    def subscribers(self, component: str) -> dict[K, C]:
        """A copy: callbacks run outside the lock."""
        with self._lock:
            return dict(self._subscribers.get(component, {}))

    def subscriber(self, component: str, ident: K) -> C | None:
        """One subscriber's callback, without copying the component's others: an instance key's
        event concerns one heartbeater of perhaps a thousand."""
        with self._lock:
            return self._subscribers.get(component, {}).get(ident)


def per_client(make: Callable[[DefenderClient], T]) -> Callable[[DefenderClient], T]:
    """`make(client)` once per client, kept as long as the client lives."""
    made: weakref.WeakKeyDictionary[DefenderClient, T] = weakref.WeakKeyDictionary()
    lock = threading.Lock()

    def of(client: DefenderClient) -> T:
        with lock:
            found = made.get(client)
            if found is None:
                found = made[client] = make(client)
            return found

    return of
