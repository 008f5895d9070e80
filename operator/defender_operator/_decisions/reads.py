"""Whether a monitor pass must read its component from etcd, or may reuse the view it read
before (issue 17: at 1,000 components the passes' reads are most of the operator's etcd cost,
and most passes find nothing changed).

The view is reused only when the change watch (`_changes.ChangeView`) vouches that none of the
keys the view reads changed since it was read, the operator itself wrote nothing to the
component since, and the view is younger than a bound: the bound caps what an unforeseen gap
(a lost event, a key ring change that makes MASTER open or not) can hide.

Pure: the caller gathers the facts and counts the outcome (`_monitor.observe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


class ReadReason(StrEnum):
    """Why a pass reads (or `UNCHANGED`: why it does not); the metric's label."""

    UNTRUSTED = "WatchUntrusted"
    """The change watch is not running, or lost events and has not resynced since."""
    NO_VIEW = "NoView"
    """Nothing read yet (a new component, an operator restart, or the last read failed)."""
    BEFORE_RESYNC = "ReadBeforeResync"
    """The view was read before the watch's last resync: a change between may be lost."""
    CHANGED = "Changed"
    """The watch saw a put or delete of a key the view reads, after it was read."""
    OWN_WRITE = "OwnWrite"
    """The operator wrote to the component since (its own write may not be delivered yet)."""
    STALE = "Stale"
    """The view is as old as the bound (or from the future: the clock moved back)."""
    UNCHANGED = "Unchanged"
    """Nothing changed: the pass reuses the view."""


@dataclass(frozen=True)
class ViewRead:
    """When and at which etcd revision a component's view was read, and how many of the
    operator's own writes to the component were counted before the read began."""

    at: datetime
    revision: int
    own_writes: int


@dataclass(frozen=True)
class ChangeFacts:
    """What the change watch knows about one component, now."""

    trusted: bool
    synced_at: int
    """The revision of the watch's last resync: it delivers every change after it."""
    changed_at: int
    """The highest mod revision of a change to the component's viewed keys seen (0: none)."""
    own_writes: int
    """The operator's own writes to the component counted so far."""


def must_read(
    now: datetime, read: ViewRead | None, facts: ChangeFacts, max_age: timedelta
) -> ReadReason:
    """Why the pass must read the component, or `UNCHANGED` when it may reuse `read`'s view.
    A `max_age` of zero reads every pass."""
    if not facts.trusted:
        return ReadReason.UNTRUSTED
    if read is None:
        return ReadReason.NO_VIEW
    if read.revision < facts.synced_at:
        return ReadReason.BEFORE_RESYNC
    if facts.changed_at > read.revision:
        return ReadReason.CHANGED
    if facts.own_writes != read.own_writes:
        return ReadReason.OWN_WRITE
    if not timedelta(0) <= now - read.at < max_age:
        return ReadReason.STALE
    return ReadReason.UNCHANGED
