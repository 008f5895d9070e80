"""Misconfiguration from what instances report: heartbeat `last_error` and alert records."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

# EnvelopeError / config reasons (the library's stable `.reason` words) that mean the
# component is set up wrong, as opposed to a passing network problem.
MISCONFIG_REASONS = frozenset(
    {
        "UnknownKey",
        "AuthenticationFailed",
        "CodecError",
        "UnknownCodec",
        "CodecMismatch",
        "SizeAnomaly",
        "UnsupportedFormat",
        "NotAnEnvelope",
        "UnexpectedEnvelope",
        "ValueTooLarge",
        "KeyringInvalid",
        "ConfigInvalid",
    }
)


@dataclass(frozen=True)
class Report:
    """One instance's complaint: from a heartbeat's last_error or from an alert record."""

    instance: str
    reason: str
    detail: str
    time: datetime


@dataclass(frozen=True)
class MisconfigVerdict:
    misconfigured: bool
    reason: str
    message: str
    instances: tuple[str, ...] = ()
    # When the oldest report counted leaves the window: the verdict may change then with
    # nothing new reported (None when no report counts).
    changes_at: datetime | None = None


def assess(now: datetime, reports: Sequence[Report], window_seconds: int) -> MisconfigVerdict:
    """Misconfigured when any recent report carries a misconfiguration reason.

    The condition reason is the most frequent such reason (ties broken by name, so the result
    does not flap between equal counts).
    """
    cutoff = now - timedelta(seconds=window_seconds)
    hits = [r for r in reports if r.reason in MISCONFIG_REASONS and r.time >= cutoff]
    if not hits:
        return MisconfigVerdict(False, "NoErrorsReported", "no instance reports a decode error")
    counts = Counter(r.reason for r in hits)
    reason = min(counts, key=lambda k: (-counts[k], k))
    instances = tuple(sorted({r.instance for r in hits if r.reason == reason}))
    sample = next(r.detail for r in hits if r.reason == reason)
    return MisconfigVerdict(
        True,
        reason,
        f"{len(instances)} instance(s) report {reason}: {', '.join(instances)} (e.g. {sample})",
        instances,
        min(r.time for r in hits) + timedelta(seconds=window_seconds),
    )
