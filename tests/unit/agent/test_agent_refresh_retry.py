"""A change announced by the watch whose read then fails (or is served from the cache) is read
again until etcd answers: the event is spent, and a watch resuming after the outage hands out
nothing older, so without the retry an instance kept its old config until the next commit.

`Rollouts.watch` (what the agent runs) on a store held in memory whose reads can be cut off."""

from __future__ import annotations

import threading
from typing import Any

from test_agent_memory import Alerts, MemoryStore, _client, _json

from defender_config import ActiveConfig, ConfigStore, Rollouts, StoreUnavailableError
from defender_config.store import StoredValue, WatchEvent
from defender_devcluster import wait_for


class FlakyStore(MemoryStore):
    """Reads fail while `down` is set; with `cached`, they answer what was read last instead,
    flagged stale (as EtcdStore's last-known-good cache does)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = threading.Event()
        self.cached = False
        self.last_read: dict[str, StoredValue | None] = {}
        self.failed_reads = 0

    def get(self, key: str, revision: int | None = None) -> StoredValue | None:
        if self.down.is_set():
            self.failed_reads += 1
            if not self.cached:
                raise StoreUnavailableError(["http://127.0.0.1:2379"], "connection refused")
            old = self.last_read.get(key)
            return (
                None
                if old is None
                else StoredValue(
                    old.key, old.value, old.mod_revision, old.create_revision, old.version, 0, True
                )
            )
        found = super().get(key, revision)
        self.last_read[key] = found
        return found


def _configs_at_v1(store: FlakyStore) -> tuple[ConfigStore, str]:
    """A reader on `store` with short backoffs, and ACTIVE (its key) at {"v": 1}."""
    client = _client(store, Alerts())
    client.settings.etcd.backoff_base_seconds = 0.01
    client.settings.etcd.backoff_max_seconds = 0.05
    configs = ConfigStore(client)
    active = configs.layout.active_config("demo")
    store.put(active, _json({"v": 1}))
    return configs, active


def _watched(cached: bool) -> tuple[FlakyStore, list[ActiveConfig], list[Any], Any, str]:
    store = FlakyStore()
    store.cached = cached
    configs, active = _configs_at_v1(store)
    delivered: list[ActiveConfig] = []
    errors: list[Any] = []
    watch = Rollouts(configs).watch("demo", "demo-0", delivered.append, on_error=errors.append)
    return store, delivered, errors, watch, active


def _configs(delivered: list[ActiveConfig]) -> list[dict[str, Any]]:
    return [a.config for a in delivered]


def test_a_change_whose_read_failed_is_delivered_once_etcd_answers() -> None:
    store, delivered, errors, watch, active = _watched(cached=False)
    try:
        assert _configs(delivered) == [{"v": 1}]
        store.down.set()
        store.put(active, _json({"v": 2}))  # announced; its read fails
        wait_for("reads tried again", lambda: store.failed_reads >= 3, timeout=5)
        assert _configs(delivered) == [{"v": 1}]
        # Told once for the outage, not once per attempt.
        assert [type(e) for e in errors] == [StoreUnavailableError]
        store.down.clear()
        wait_for("the change delivered", lambda: len(delivered) == 2, timeout=5)
        assert _configs(delivered) == [{"v": 1}, {"v": 2}]
    finally:
        watch.cancel()
    tries = store.failed_reads
    threading.Event().wait(0.2)
    assert store.failed_reads == tries  # nothing left reading after the cancel


def test_a_change_read_from_the_cache_is_read_again_until_etcd_answers() -> None:
    store, delivered, _errors, watch, active = _watched(cached=True)
    try:
        store.down.set()
        store.put(active, _json({"v": 2}))  # announced; the read answers the cached v1
        wait_for("reads tried again", lambda: store.failed_reads >= 3, timeout=5)
        assert _configs(delivered) == [{"v": 1}]
        store.down.clear()
        wait_for("the change delivered", lambda: len(delivered) == 2, timeout=5)
        assert _configs(delivered) == [{"v": 1}, {"v": 2}]
    finally:
        watch.cancel()


def test_a_cancelled_watch_stops_reading_again() -> None:
    store, _delivered, _errors, watch, active = _watched(cached=False)
    store.down.set()
    store.put(active, _json({"v": 2}))
    wait_for("a read tried again", lambda: store.failed_reads >= 2, timeout=5)
    watch.cancel()
    tries = store.failed_reads
    threading.Event().wait(0.2)
    assert store.failed_reads == tries


class _Handle:
    def __init__(self) -> None:
        self._stopped = threading.Event()

    def cancel(self) -> None:
        self._stopped.set()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


class FlakyWatchStore(FlakyStore):
    """Watches get the put as a `WatchEvent` (what `watch_active` reads the value from)."""

    def __init__(self) -> None:
        super().__init__()
        self.handles: list[tuple[str, Any, _Handle]] = []

    def put(self, key: str, value: bytes) -> None:
        super().put(key, value)
        stored = self.values[key]
        for watched, callback, handle in list(self.handles):
            if watched == key and not handle.wait_stopped(0):
                callback(WatchEvent("put", key, value, stored.mod_revision, stored.version))

    def watch_key(self, key: str, callback: Any, **kw: Any) -> Any:
        handle = _Handle()
        self.handles.append((key, callback, handle))
        return handle


def test_watch_active_reads_a_change_again_when_its_checks_could_not_read_etcd() -> None:
    # `ConfigStore.watch_active` (what Python components call) checks the event's value against
    # the metadata record as of its revision: a read. Failed, the change was dropped for good.
    store = FlakyWatchStore()
    configs, active = _configs_at_v1(store)
    delivered: list[ActiveConfig] = []
    errors: list[Any] = []
    watch = configs.watch_active("demo", delivered.append, on_error=errors.append)
    try:
        store.down.set()
        # The store calls watch callbacks on the writer's thread: write from another one.
        writer = threading.Thread(target=store.put, args=(active, _json({"v": 2})))
        writer.start()
        wait_for("reads tried again", lambda: store.failed_reads >= 3, timeout=5)
        assert _configs(delivered) == [{"v": 1}]
        assert [type(e) for e in errors] == [StoreUnavailableError]
        store.down.clear()
        writer.join(timeout=5)
        assert _configs(delivered) == [{"v": 1}, {"v": 2}]
    finally:
        watch.cancel()


def test_watch_active_stops_reading_again_when_cancelled() -> None:
    store = FlakyWatchStore()
    configs, active = _configs_at_v1(store)
    watch = configs.watch_active("demo", lambda _a: None, on_error=lambda _e: None)
    store.down.set()
    writer = threading.Thread(target=store.put, args=(active, _json({"v": 2})))
    writer.start()
    wait_for("a read tried again", lambda: store.failed_reads >= 2, timeout=5)
    watch.cancel()
    writer.join(timeout=5)
    assert not writer.is_alive()
