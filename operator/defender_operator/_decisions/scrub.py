"""What a scrub of one component's sealed values means: which failures to announce, whether
ACTIVE may be restored (and from which history version), and the `Corrupt` condition.

Pure: the caller (`_scrub`) reads the values with the library and applies the plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from defender_operator._decisions import conditions as cond


@dataclass(frozen=True)
class Finding:
    """One value as the scrub found it (`defender_config.ValueCheck`, reshaped). `kind` is
    master, active, history or metadata; `version` the history entry's, or for ACTIVE and
    metadata the version the metadata names."""

    path: str
    kind: str
    ok: bool
    version: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class ScrubPlan:
    restore_from: int | None
    """Restore ACTIVE from this history version (it verified against the metadata)."""
    failures: tuple[Finding, ...]
    new_failures: tuple[Finding, ...]
    """Failures not seen by the previous scrub: announced once (Event and alert)."""
    condition: cond.Cond
    unrepairable: str = ""
    """Why a broken ACTIVE is not restored (empty when it is, or is not broken)."""


def scrub_due(last: datetime | None, now: datetime, interval_seconds: float) -> bool:
    """Rate limit: a component is scrubbed at most once per `interval_seconds`; 0 disables."""
    if interval_seconds <= 0:
        return False
    return last is None or now - last >= timedelta(seconds=interval_seconds)


def failure_keys(findings: Iterable[Finding]) -> frozenset[tuple[str, str]]:
    """(path, reason) of every failure: what the next scrub compares with to announce only new
    ones."""
    return frozenset((f.path, f.reason) for f in findings if not f.ok)


def describe(f: Finding) -> str:
    """A failure for people: the key and the reason, never contents."""
    return f"{f.path}: {f.reason}"


def plan_scrub(findings: Sequence[Finding], announced: frozenset[tuple[str, str]]) -> ScrubPlan:
    """ACTIVE is restored only from the history entry of the version the authenticated metadata
    names, and only when that entry itself verified (opened, with the metadata's digest).
    MASTER, history and metadata failures are reported, never rewritten here (a metadata
    record that does not verify is re-signed by the reconcile, from authenticated values)."""
    failures = tuple(f for f in findings if not f.ok)
    new = tuple(f for f in failures if (f.path, f.reason) not in announced)
    if not failures:
        return ScrubPlan(
            None,
            (),
            (),
            cond.Cond(
                cond.CORRUPT, cond.FALSE, "Verified", "every sealed value opens and verifies"
            ),
        )
    active = next((f for f in findings if f.kind == "active"), None)
    meta = next((f for f in findings if f.kind == "metadata"), None)
    restore_from: int | None = None
    unrepairable = ""
    if active is not None and not active.ok:
        source = next(
            (
                f
                for f in findings
                if f.kind == "history"
                and active.version is not None
                and f.version == active.version
            ),
            None,
        )
        if meta is None or not meta.ok or active.version is None:
            unrepairable = "its metadata record does not verify, so no version can vouch for it"
        elif source is None:
            unrepairable = f"history version {active.version} is not kept"
        elif not source.ok:
            unrepairable = f"history version {active.version} does not verify ({source.reason})"
        else:
            restore_from = active.version
    order = ("active", "metadata", "master", "history")
    first = min(failures, key=lambda f: order.index(f.kind) if f.kind in order else len(order))
    reason = {
        "active": "ActiveCorrupt",
        "metadata": "MetadataCorrupt",
        "master": "MasterCorrupt",
        "history": "HistoryCorrupt",
    }.get(first.kind, "ValueCorrupt")
    listed = "; ".join(describe(f) for f in failures)
    if restore_from is not None:
        action = f"ACTIVE restored from history version {restore_from}"
    elif unrepairable:
        action = f"ACTIVE not restored: {unrepairable}"
    else:
        action = "reported only (MASTER and history are never rewritten)"
    message = f"{len(failures)} value(s) fail verification: {listed}. {action}"
    return ScrubPlan(
        restore_from,
        failures,
        new,
        cond.Cond(cond.CORRUPT, cond.TRUE, reason, message),
        unrepairable,
    )
