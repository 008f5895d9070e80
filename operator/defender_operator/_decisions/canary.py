"""Canary rollouts: who the canaries are, and whether to wait, promote or abort."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from defender_config.contract import SINGULAR, UNFREEZE_ANNOTATION

from .misconfig import MISCONFIG_REASONS

# What an instance reports (heartbeat last_error.reason) when it cannot run a config: the
# decode errors the breaker watches, a refused config, and the component's own health check.
FAILURE_REASONS = MISCONFIG_REASONS | {"ConfigInvalid", "HealthCheckFailed", "ReloadFailed"}

PROGRESSING, PROMOTED, ABORTED = "Progressing", "Promoted", "Aborted"


def pick_canaries(
    instances: Sequence[str], *, count: int | None = None, percent: int | None = None
) -> tuple[str, ...]:
    """The first instances by name (stable: the same instances stay canaries while the rollout
    lasts): `count` of them, or `percent` of them rounded up; at least one, at most all."""
    names = sorted(set(instances))
    if not names:
        return ()
    if count is not None:
        wanted = count
    elif percent is not None:
        wanted = math.ceil(len(names) * percent / 100)
    else:
        raise ValueError("pick_canaries needs count or percent")
    return tuple(names[: max(1, min(wanted, len(names)))])


@dataclass(frozen=True)
class CanaryBeat:
    """What a canary's heartbeat says this pass; `alive` False when its key is gone (lease
    lost) or it is past its patience."""

    alive: bool
    digest: str | None = None
    error_reason: str | None = None
    error_detail: str = ""


class Action(enum.Enum):
    WAIT = "wait"
    PROMOTE = "promote"
    ABORT = "abort"
    SUPERSEDED = "superseded"


@dataclass(frozen=True)
class RolloutView:
    """The rollout record as the decision needs it."""

    version: int
    base_version: int
    digest: str
    canaries: tuple[str, ...]
    since: datetime


@dataclass(frozen=True)
class CanaryVerdict:
    action: Action
    reason: str
    message: str
    healthy_since: datetime | None = None
    failed: tuple[str, ...] = ()


def judge_canary(
    *,
    now: datetime,
    rollout: RolloutView,
    active_version: int | None,
    beats: Mapping[str, CanaryBeat],
    healthy_since: datetime | None,
    hold_seconds: int,
    deadline_seconds: int,
) -> CanaryVerdict:
    """One look at a rollout in progress.

    ABORT as soon as one canary fails (gone, or reporting a failure reason); PROMOTE once every
    canary has reported the candidate's digest, healthy, for `hold_seconds` without a break;
    ABORT when they have not all taken it within `deadline_seconds`; SUPERSEDED when ACTIVE is
    no longer the version the rollout was built on (someone rolled back or committed)."""
    v = rollout.version
    if active_version != rollout.base_version:
        return CanaryVerdict(
            Action.SUPERSEDED,
            "Superseded",
            f"ACTIVE is version {active_version}, not {rollout.base_version} the canary of"
            f" version {v} was built on; rollout ended",
        )
    failed: list[str] = []
    why: list[str] = []
    for name in rollout.canaries:
        beat = beats.get(name)
        if beat is None or not beat.alive:
            failed.append(name)
            why.append(f"{name}: heartbeat lost")
        elif beat.error_reason in FAILURE_REASONS:
            failed.append(name)
            why.append(f"{name}: {beat.error_reason} {beat.error_detail}".rstrip())
    if failed:
        return CanaryVerdict(
            Action.ABORT,
            "CanaryFailed",
            f"canary of version {v} failed ({'; '.join(why)}); the canaries are back on"
            f" version {rollout.base_version}'s config and commits are frozen. Fix spec.config,"
            f" then `kubectl annotate {SINGULAR} <name> {UNFREEZE_ANNOTATION}=now`",
            failed=tuple(failed),
        )
    waiting = sorted(n for n in rollout.canaries if beats[n].digest != rollout.digest)
    if waiting:
        if now - rollout.since >= timedelta(seconds=deadline_seconds):
            return CanaryVerdict(
                Action.ABORT,
                "CanaryNotAdopted",
                f"canaries {', '.join(waiting)} did not report version {v} within"
                f" {deadline_seconds}s; commits are frozen",
                failed=tuple(waiting),
            )
        return CanaryVerdict(
            Action.WAIT,
            "WaitingForCanaries",
            f"waiting for {', '.join(waiting)} to report version {v}",
        )
    since = healthy_since or now
    held = now - since
    if held >= timedelta(seconds=hold_seconds):
        return CanaryVerdict(
            Action.PROMOTE,
            "CanaryHealthy",
            f"{len(rollout.canaries)} canary instance(s) ran version {v} healthy for"
            f" {int(held.total_seconds())}s; promoted to all instances",
            healthy_since=since,
        )
    left = timedelta(seconds=hold_seconds) - held
    return CanaryVerdict(
        Action.WAIT,
        "Holding",
        f"canaries healthy on version {v}; promotion in {math.ceil(left.total_seconds())}s",
        healthy_since=since,
    )
