"""kopf's API session: the pool size rule."""

from __future__ import annotations

from defender_operator._login import connection_limit


def test_pool_leaves_room_for_watch_streams() -> None:
    # Cluster-wide: one watch per resource (DefenderComponents, pods) plus kopf's own.
    assert connection_limit(32, 0) == 32 + 2 + 4
    assert connection_limit(32, 1) == 32 + 2 + 4
    # Per namespace, two more watch streams.
    assert connection_limit(32, 10) == 32 + 20 + 4
    assert connection_limit(4, 3) > 2 * 3
