"""Whether the heartbeat watch has stalled (a liveness failure)."""

from __future__ import annotations

from datetime import datetime, timedelta


def watch_stalled(
    *,
    now: datetime,
    started: datetime,
    last_progress: datetime | None,
    etcd_healthy_since: datetime | None,
    threshold: timedelta,
) -> bool:
    """True when etcd is healthy yet neither a watch event nor a successful resync arrived
    for longer than `threshold`.

    While etcd is unhealthy nothing can arrive; that has its own, separate liveness limit.
    Time before etcd last became healthy is not held against the watch either.
    """
    if etcd_healthy_since is None:
        return False
    marks = [started, etcd_healthy_since]
    if last_progress is not None:
        marks.append(last_progress)
    return now - max(marks) > threshold
