"""The blast-radius breaker: stop a bad ACTIVE change before it spreads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from defender_config.contract import SINGULAR, UNFREEZE_ANNOTATION


@dataclass(frozen=True)
class ActiveChange:
    """The last ACTIVE commit and the version it replaced (the revert target)."""

    version: int
    previous_version: int
    time: datetime


def recovered_change(
    version: int | None,
    committed: datetime | None,
    now: datetime,
    window_seconds: int,
    *,
    rollback: bool = False,
) -> ActiveChange | None:
    """The ACTIVE change a new operator still has to guard, from what etcd says about ACTIVE.

    The operator that committed it kept the change in memory; a restarted operator, or a
    standby taking over, inside the change's window would otherwise stop guarding it exactly
    while the new config spreads. Versions are sequential, so the one it replaced is the
    previous number. A rollback is not guarded (as when the operator keeps it in memory): it
    returns to a known-good config, and its "previous" version may be the bad one."""
    if rollback or version is None or version <= 1 or committed is None:
        return None
    if committed.tzinfo is None or now > committed + timedelta(seconds=window_seconds):
        return None
    return ActiveChange(version=version, previous_version=version - 1, time=committed)


@dataclass(frozen=True)
class BreakerPolicy:
    max_unhealthy_instances: int
    max_unhealthy_percent: int
    window_seconds: int


@dataclass(frozen=True)
class BreakerVerdict:
    trip: bool
    reason: str
    message: str
    revert_to: int | None = None
    unhealthy: tuple[str, ...] = ()


def evaluate_breaker(
    *,
    now: datetime,
    change: ActiveChange | None,
    unhealthy_since: Mapping[str, datetime],
    expected: int,
    policy: BreakerPolicy,
    frozen: bool,
) -> BreakerVerdict:
    """Trip when, within the window after an ACTIVE change, more than N instances (or more than
    X % of the expected instances) turned unhealthy.

    Only instances that turned unhealthy *after* the change count: ones already broken before it
    were not broken by it.
    """
    if frozen:
        return BreakerVerdict(False, "Frozen", "commits already frozen")
    if change is None or change.previous_version <= 0:
        return BreakerVerdict(False, "NoChange", "no ACTIVE change to guard")
    if now > change.time + timedelta(seconds=policy.window_seconds):
        return BreakerVerdict(False, "WindowClosed", f"version {change.version} has settled")
    hit = tuple(sorted(i for i, t in unhealthy_since.items() if t >= change.time))
    over_count = len(hit) > policy.max_unhealthy_instances
    over_percent = expected > 0 and len(hit) * 100 > policy.max_unhealthy_percent * expected
    if hit and (over_count or over_percent):
        return BreakerVerdict(
            True,
            "BlastRadiusExceeded",
            f"{len(hit)} of {expected} instance(s) turned unhealthy within"
            f" {policy.window_seconds}s of ACTIVE version {change.version}"
            f" ({', '.join(hit)}); froze commits and reverted to version"
            f" {change.previous_version}. Fix spec.config, then lift the freeze with"
            f" `kubectl annotate {SINGULAR} <name> {UNFREEZE_ANNOTATION}=now`",
            revert_to=change.previous_version,
            unhealthy=hit,
        )
    return BreakerVerdict(False, "WithinLimits", f"{len(hit)} instance(s) unhealthy since change")


def lifted_freeze(status: Mapping[str, object]) -> int | None:
    """status.freezeLiftedSequence: the sequence of the freeze marker the operator lifted last
    (None: no freeze lifted since the field existed)."""
    raw = status.get("freezeLiftedSequence")
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return raw
    return None


def freeze_replayed(freeze_sequence: int | None, lifted: int | None) -> bool:
    """Is the authentic freeze marker in etcd a saved one put back? Every freeze written after
    a lift takes a sequence above the lifted one (`ConfigStore.freeze(after=...)`), and only
    key holders sign: a marker at or below it (one without a sequence included, 0) is the lifted
    freeze or an older one. Without a lifted sequence in status nothing is known: kept."""
    return freeze_sequence is not None and lifted is not None and freeze_sequence <= lifted


def observed_freeze(status: Mapping[str, object]) -> int | None:
    """status.freezeSequence: the sequence of the authentic freeze marker etcd held when the
    operator last published what etcd holds (None: no marker then)."""
    raw = status.get("freezeSequence")
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return raw
    return None


def freeze_lifted_elsewhere(
    observed: int | None, freeze_sequence: int | None, lifted: int | None
) -> int | None:
    """The sequence to anchor as lifted (status.freezeLiftedSequence) because the marker the
    operator saw last is no longer in etcd; None: nothing new to anchor.

    A key holder's `ConfigStore.unfreeze` (a plugin, a script) deletes the marker without the
    operator's unfreeze command, and so does anyone with etcd write access. Either way the
    freeze the operator saw is over: anchoring it as lifted makes a saved copy put back later a
    replay (`freeze_replayed`). A marker with another sequence in its place ends it as well: a
    higher one is a new freeze (written above the one in place), a lower one a saved marker put
    over it, removed in the same pass once this one is anchored. An anchor is never lowered."""
    if observed is None or freeze_sequence == observed:
        return None
    if lifted is not None and observed <= lifted:
        return None
    return observed
