"""A watch that resumes from a compacted revision (or on another cluster) hands out the current
state: a put for each key there and, since the gap's own deletes are lost, a delete for each key
it had handed out that is gone. Driven through `WatchHandle` with a stand-in store whose watch
stream is fed by the test (real pyetcd event and response types)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

from pyetcd import events as etcd_events
from pyetcd import exceptions as etcd_exc
from pyetcd.etcdrpc import ResponseHeader, kv_pb2
from pyetcd.watch import WatchResponse
from watch_support import StandInStore

from defender_config._store._watch import WatchHandle, gone_since
from defender_config.store import StoredValue, WatchEvent
from defender_devcluster import wait_for

PREFIX = "/t/"


class _Client:
    def __init__(self) -> None:
        self.streams: list[Callable[[Any], None]] = []

    def add_watch(self, key: str, callback: Callable[[Any], None], **_: Any) -> tuple[Any, int]:
        self.streams.append(callback)
        return SimpleNamespace(cancel=lambda _id: None), len(self.streams)


class _Store(StandInStore):
    client: _Client

    def __init__(self) -> None:
        super().__init__(_Client())


def _event(kind: str, key: str, value: bytes, revision: int) -> Any:
    pb = kv_pb2.Event(
        type=kv_pb2.Event.PUT if kind == "put" else kv_pb2.Event.DELETE,
        kv=kv_pb2.KeyValue(key=key.encode(), value=value, mod_revision=revision, version=1),
    )
    return (etcd_events.PutEvent if kind == "put" else etcd_events.DeleteEvent)(pb)


def _stored(key: str, value: bytes, revision: int) -> StoredValue:
    return StoredValue(key, value, revision, revision, 1, 0, False)


@contextmanager
def _watching(store: _Store) -> Iterator[list[WatchEvent]]:
    seen: list[WatchEvent] = []
    lock = threading.Lock()

    def record(event: WatchEvent) -> None:
        with lock:
            seen.append(event)

    handle = WatchHandle(store, PREFIX, True, record, 1, None, False)  # type: ignore[arg-type]
    handle._start()
    try:
        wait_for("the watch", lambda: len(store.client.streams) == 1, timeout=5)
        yield seen
    finally:
        handle.cancel()


def _send(store: _Store, *events: Any, revision: int) -> None:
    store.client.streams[-1](WatchResponse(ResponseHeader(revision=revision), list(events)))


def test_a_key_deleted_in_a_compacted_gap_is_handed_out_as_a_delete() -> None:
    store = _Store()
    with _watching(store) as seen:
        _send(store, _event("put", "/t/a", b"1", 5), _event("put", "/t/b", b"2", 6), revision=6)
        _send(store, _event("put", "/t/c", b"3", 7), revision=7)
        _send(store, _event("delete", "/t/c", b"", 8), revision=8)
        wait_for("the stream's events", lambda: len(seen) == 4, timeout=5)
        # The gap: b deleted and d put, both compacted away before the watch resumed.
        store.listing, store.revision = [_stored("/t/a", b"1", 5), _stored("/t/d", b"4", 12)], 20
        store.client.streams[-1](etcd_exc.RevisionCompactedError(15))
        wait_for("the resync", lambda: len(seen) == 7, timeout=5)
        _send(store, _event("delete", "/t/a", b"", 21), revision=21)
        wait_for("the event after the resync", lambda: len(seen) == 8, timeout=5)
    assert [(e.kind, e.key, e.resync) for e in seen[4:]] == [
        ("delete", "/t/b", True),
        ("put", "/t/a", True),
        ("put", "/t/d", True),
        ("delete", "/t/a", False),
    ]
    # c was handed out as deleted already: not again. The synthetic delete carries the
    # listing's revision (the delete happened at or before it).
    assert seen[4].mod_revision == 20 and seen[4].value == b""


def test_a_second_resync_hands_out_deletes_of_keys_the_first_one_listed() -> None:
    store = _Store()
    with _watching(store) as seen:
        store.listing, store.revision = [_stored("/t/a", b"1", 5), _stored("/t/b", b"2", 6)], 10
        store.client.streams[-1](etcd_exc.RevisionCompactedError(8))
        wait_for("the first resync", lambda: len(seen) == 2, timeout=5)
        store.listing, store.revision = [_stored("/t/b", b"2", 6)], 30
        store.client.streams[-1](etcd_exc.RevisionCompactedError(25))
        wait_for("the second resync", lambda: len(seen) == 4, timeout=5)
    assert [(e.kind, e.key) for e in seen] == [
        ("put", "/t/a"),
        ("put", "/t/b"),
        ("delete", "/t/a"),
        ("put", "/t/b"),
    ]


def test_gone_since_lists_the_missing_keys_in_key_order() -> None:
    assert gone_since({"/t/c", "/t/a", "/t/b"}, {"/t/b"}) == ["/t/a", "/t/c"]
    assert gone_since(set(), {"/t/a"}) == []
    assert gone_since({"/t/a"}, {"/t/a"}) == []
