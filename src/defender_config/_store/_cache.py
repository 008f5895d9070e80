"""The last-known-good read cache (pure: no etcd)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Final

from .._store_types import StoredValue


class _Absent:
    """Cache marker: the key was read and did not exist."""


_ABSENT: Final = _Absent()


class _LastKnownGood:
    """Bounded LRU of the latest values read or written, for reads while etcd is unreachable."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._keys: OrderedDict[str, StoredValue | _Absent] = OrderedDict()
        self._lists: OrderedDict[str, tuple[StoredValue, ...]] = OrderedDict()

    def _remember(self, table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self._max:
            table.popitem(last=False)

    def set(self, key: str, value: StoredValue | _Absent) -> None:
        if self._max <= 0:
            return
        with self._lock:
            self._remember(self._keys, key, value)

    def set_list(self, prefix: str, values: Sequence[StoredValue]) -> None:
        if self._max <= 0:
            return
        with self._lock:
            self._remember(self._lists, prefix, tuple(values))
            for v in values[: self._max]:
                self._remember(self._keys, v.key, v)

    def get(self, key: str) -> StoredValue | _Absent | None:
        with self._lock:
            return self._keys.get(key)

    def get_list(self, prefix: str) -> tuple[StoredValue, ...] | None:
        with self._lock:
            return self._lists.get(prefix)
