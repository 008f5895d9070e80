"""kopf's API session pool size, and the malloc arena cap."""

from __future__ import annotations

import pytest

from defender_operator._login import connection_limit


def test_pool_leaves_room_for_watch_streams() -> None:
    # Cluster-wide: one watch per resource (DefenderComponents, pods) plus kopf's own.
    assert connection_limit(32, 0) == 32 + 2 + 4
    assert connection_limit(32, 1) == 32 + 2 + 4
    # Per namespace, two more watch streams.
    assert connection_limit(32, 10) == 32 + 20 + 4
    assert connection_limit(4, 3) > 2 * 3


def test_malloc_arenas_capped_on_glibc_and_skipped_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ctypes
    import platform

    from defender_operator import __main__ as entry

    if platform.libc_ver()[0] == "glibc":
        assert entry.limit_malloc_arenas() is True

    def no_glibc(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    assert entry.limit_malloc_arenas() is False
