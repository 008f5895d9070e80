"""A stand-in for what `WatchHandle` uses of `EtcdStore`, shared by the watch unit tests so a
change to that surface is made in one place. The test supplies the client (whose `add_watch`
hands out the stream it drives). Imported by name (pytest puts this folder on sys.path)."""

from __future__ import annotations

import random
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from defender_config._store._watch import WatchHandle
from defender_config.store import StoredValue


class StandInStore:
    """`listing` and `revision` are what etcd holds when the watch re-reads its prefix."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.listing: list[StoredValue] = []
        self.revision = 100
        self.cluster_changes = 0
        # Short backoffs: a restarted watch is back within the tests' waits.
        self.settings = SimpleNamespace(backoff_base_seconds=0.01, backoff_max_seconds=0.05)
        self.metrics = SimpleNamespace(watch_restarts=Count(), watch_stalls=Count())
        self._rng = random.Random(0)
        # The streams given up as stalled (`_drop_stream`), in order; a stream given up twice
        # is given up by the first only, as the real client's.
        self.dropped: list[Any] = []

    def _call(self, _op: str, fn: Callable[[Any], Any], **_: Any) -> Any:
        return fn(self.client)

    def _list(self, _prefix: str) -> tuple[list[StoredValue], int]:
        return list(self.listing), self.revision

    def current_revision(self, _key: str) -> int:
        return self.revision

    def observe_cluster(self, _cluster_id: int) -> None:
        pass

    def _forget(self, _handle: WatchHandle) -> None:
        pass

    def _drop_stream(self, watcher: Any) -> bool:
        if any(w is watcher for w in self.dropped):
            return False
        self.dropped.append(watcher)
        return True


class Count:
    """A prometheus Counter as the watch uses one."""

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1
