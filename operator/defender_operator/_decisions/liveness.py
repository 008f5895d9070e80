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
    silent: float | None = None,
) -> bool:
    """True when etcd is healthy yet the watch was not heard from for longer than `threshold`.

    Heard from: when its stream answered, `silent` seconds ago (an event or a progress answer:
    a working stream asked for progress answers within seconds); not known (progress requests
    off, or the watch between streams), a watch event or a successful resync (`last_progress`).
    A resync does not count once the stream's silence is known: it shows etcd answers reads,
    not that the watch delivers, and a stream stalled without an error is only replaced by a
    restart.

    While etcd is unhealthy nothing can arrive; that has its own, separate liveness limit.
    Time before etcd last became healthy is not held against the watch either.
    """
    if etcd_healthy_since is None:
        return False
    heard = now - timedelta(seconds=silent) if silent is not None else last_progress
    marks = [started, etcd_healthy_since]
    if heard is not None:
        marks.append(heard)
    return now - max(marks) > threshold
