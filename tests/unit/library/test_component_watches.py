"""One watch per component, shared by a client's subscribers: started by the first, cancelled
with the last, each event's callback looked up by its subscriber."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from defender_config._client import DefenderClient
from defender_config._component_watches import ComponentWatches
from defender_config._store_types import WatchEvent


class Handle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Store:
    def __init__(self) -> None:
        self.watches: dict[str, Handle] = {}

    def watch_prefix(self, prefix: str, on_event: Callable[[WatchEvent], None]) -> Handle:
        self.watches[prefix] = handle = Handle()
        return handle


class Client:
    def __init__(self) -> None:
        self.store = Store()


def watches() -> tuple[ComponentWatches[str, str], Store]:
    client = Client()
    made: ComponentWatches[str, str] = ComponentWatches(
        cast(DefenderClient, client), lambda component: f"/c/{component}/", lambda _: None
    )
    return made, client.store


def test_one_watch_per_component_for_all_its_subscribers() -> None:
    made, store = watches()
    made.add("sniffer", "/c/sniffer/a", "beat a")
    made.add("sniffer", "/c/sniffer/b", "beat b")
    made.add("firewall", "/c/firewall/a", "beat f")
    assert sorted(store.watches) == ["/c/firewall/", "/c/sniffer/"]

    assert made.subscriber("sniffer", "/c/sniffer/b") == "beat b"
    assert made.subscriber("sniffer", "/c/firewall/a") is None
    assert made.subscriber("rag", "/c/rag/a") is None
    assert made.subscribers("sniffer") == {"/c/sniffer/a": "beat a", "/c/sniffer/b": "beat b"}


def test_the_last_leave_cancels_the_components_watch_and_no_one_else_s() -> None:
    made, store = watches()
    made.add("sniffer", "/c/sniffer/a", "beat a")
    made.add("sniffer", "/c/sniffer/b", "beat b")
    made.add("firewall", "/c/firewall/a", "beat f")
    made.remove("sniffer", "/c/sniffer/a")
    assert not store.watches["/c/sniffer/"].cancelled
    assert made.subscriber("sniffer", "/c/sniffer/a") is None
    made.remove("sniffer", "/c/sniffer/b")
    assert store.watches["/c/sniffer/"].cancelled
    assert not store.watches["/c/firewall/"].cancelled
    assert made.subscribers("sniffer") == {}
    # A second leave, or one of a component never watched, is harmless.
    made.remove("sniffer", "/c/sniffer/b")
    made.remove("rag", "/c/rag/a")
    # Subscribing again starts a new watch.
    made.add("sniffer", "/c/sniffer/a", "beat a")
    assert not store.watches["/c/sniffer/"].cancelled
