"""The operator's collector settings (`_heap`): start-up's objects are frozen out of every
collection, the thresholds are the measured ones, and cycles made afterwards are still freed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from defender_operator._heap import GC_THRESHOLDS, settle_heap


@pytest.fixture
def restored() -> Iterator[None]:
    before = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def test_start_up_is_frozen_and_later_cycles_are_still_collected(restored: None) -> None:
    settle_heap()
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > 0
    node = Node()
    gone = weakref.ref(node)
    del node
    gc.collect()
    assert gone() is None
