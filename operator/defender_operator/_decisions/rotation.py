"""The next step of the staged shared-key rotation.

Stages (stored in the operator's keyring Secret, shown in every component's status):

    Idle --request--> Distributing --every live instance has the new key (or timeout)-->
    Promoted --every live instance seals with it (or timeout); every stored value rewrapped-->
    Grace --grace period over--> Idle (old key retired)

Distributing adds the new key decrypt-only, so instances learn it before anything is sealed
with it; only then does it become primary. The old key stays decrypt-only through Grace so a
reader that cached an old value, or an instance that missed the distribution, still decodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

from defender_config.contract import RotationStage

from .backing import authentic


class _KeyReport(Protocol):
    @property
    def instance(self) -> str: ...
    @property
    def key_fingerprint(self) -> str | None: ...
    @property
    def key_fingerprints(self) -> frozenset[str]: ...
    @property
    def verified(self) -> bool: ...


class RotationAction(StrEnum):
    NONE = "None"
    ADD_KEY = "AddKey"  # add a new key, decrypt-only, and fan the keyring out
    PROMOTE = "Promote"  # make the new key primary
    REWRAP = "Rewrap"  # re-seal every stored value under the new primary
    RETIRE = "Retire"  # drop the old key
    WAIT = "Wait"


@dataclass(frozen=True)
class RotationState:
    stage: RotationStage = RotationStage.IDLE
    since: datetime | None = None  # when the current stage was entered
    new_key_id: str | None = None
    old_key_id: str | None = None


@dataclass(frozen=True)
class RotationTimings:
    distribute_timeout_seconds: int
    grace_seconds: int


@dataclass(frozen=True)
class RotationStep:
    action: RotationAction
    stage_after: RotationStage
    reason: str
    message: str
    lagging: tuple[str, ...] = ()


def next_rotation_step(
    *,
    now: datetime,
    state: RotationState,
    requested: bool,
    new_fingerprint: str | None,
    live_fingerprints: Mapping[str, frozenset[str]],
    timings: RotationTimings,
    live_primaries: Mapping[str, str | None] | None = None,
) -> RotationStep:
    """Decide one step. The caller performs the action and, if it succeeds, stores stage_after.

    `live_fingerprints` maps each live instance to the fingerprints of the keys it holds, and
    `live_primaries` to the fingerprint it seals with (both from its heartbeat). `requested`
    is true when the schedule is due or a person asked.
    """
    since = state.since or now
    if state.stage is RotationStage.IDLE:
        if requested:
            return RotationStep(
                RotationAction.ADD_KEY,
                RotationStage.DISTRIBUTING,
                "RotationStarted",
                "new key added decrypt-only; waiting for every instance to load it",
            )
        return RotationStep(RotationAction.NONE, RotationStage.IDLE, "Idle", "no rotation")
    if state.stage is RotationStage.DISTRIBUTING:
        lagging = tuple(
            sorted(i for i, fps in live_fingerprints.items() if new_fingerprint not in fps)
        )
        if not lagging:
            return RotationStep(
                RotationAction.PROMOTE,
                RotationStage.PROMOTED,
                "KeyDistributed",
                f"all {len(live_fingerprints)} live instance(s) hold the new key; promoting it",
            )
        if now - since >= timedelta(seconds=timings.distribute_timeout_seconds):
            # Laggards are usually dead pods; the old key stays decrypt-only through Grace, so
            # promoting only risks them failing to read new writes until they reload.
            return RotationStep(
                RotationAction.PROMOTE,
                RotationStage.PROMOTED,
                "DistributionTimedOut",
                f"{len(lagging)} instance(s) did not report the new key within"
                f" {timings.distribute_timeout_seconds}s: {', '.join(lagging)}; promoting anyway",
                lagging=lagging,
            )
        return RotationStep(
            RotationAction.WAIT,
            RotationStage.DISTRIBUTING,
            "WaitingForInstances",
            f"waiting for {len(lagging)} instance(s) to load the new key: {', '.join(lagging)}",
            lagging=lagging,
        )
    if state.stage is RotationStage.PROMOTED:
        # Rewrap only once every instance seals with the new key too: a value an instance
        # sealed with the old key after the rewrap would become unreadable at retirement.
        behind = tuple(
            sorted(i for i, fp in (live_primaries or {}).items() if fp != new_fingerprint)
        )
        timed_out = now - since >= timedelta(seconds=timings.distribute_timeout_seconds)
        if behind and not timed_out:
            return RotationStep(
                RotationAction.WAIT,
                RotationStage.PROMOTED,
                "WaitingForPromotion",
                f"waiting for {len(behind)} instance(s) to seal with the new key:"
                f" {', '.join(behind)}",
                lagging=behind,
            )
        return RotationStep(
            RotationAction.REWRAP,
            RotationStage.GRACE,
            "Rewrapping" if not behind else "PromotionTimedOut",
            "re-sealing every stored value under the new primary key"
            + (f"; still on the old key: {', '.join(behind)}" if behind else ""),
            lagging=behind,
        )
    if now - since >= timedelta(seconds=timings.grace_seconds):
        return RotationStep(
            RotationAction.RETIRE,
            RotationStage.IDLE,
            "RotationComplete",
            "grace period over; old key retired",
        )
    return RotationStep(
        RotationAction.WAIT,
        RotationStage.GRACE,
        "GracePeriod",
        f"old key kept decrypt-only until {(since + timedelta(seconds=timings.grace_seconds))}",
    )


def instance_keys(
    records: Mapping[str, Sequence[_KeyReport]],
) -> tuple[dict[str, frozenset[str]], dict[str, str | None]]:
    """(the key fingerprints each instance holds, the one it seals with), by
    "component/instance", from the instances' records: `next_rotation_step`'s
    `live_fingerprints` and `live_primaries`. Only signed records count: one written with etcd
    write access alone could otherwise hold a stage until its timeout."""
    held: dict[str, frozenset[str]] = {}
    primaries: dict[str, str | None] = {}
    for component, found in records.items():
        for rec in authentic(found)[0]:
            name = f"{component}/{rec.instance}"
            fps = set(rec.key_fingerprints)
            if rec.key_fingerprint:
                fps.add(rec.key_fingerprint)
            held[name] = frozenset(fps)
            primaries[name] = rec.key_fingerprint
    return held, primaries


def schedule_due(now: datetime, last_rotation: datetime | None, every_seconds: int) -> bool:
    """True when the periodic rotation is due (every_seconds <= 0 disables the schedule)."""
    if every_seconds <= 0:
        return False
    if last_rotation is None:
        return False  # the first key was just generated: nothing to rotate yet
    return now - last_rotation >= timedelta(seconds=every_seconds)


def resumed_rotation(
    *,
    primary: tuple[str, datetime],
    decrypt_only: Sequence[tuple[str, datetime]],
    now: datetime,
) -> RotationState:
    """The stage a keyring's shape says a rotation was in, for a source Secret that says Idle.

    The stage lives in annotations of the source Secret; a Secret restored from a copy or an
    export has none, while its keys may be mid-rotation. `primary` and `decrypt_only` are
    (key id, created) of the keyring's keys; retired keys do not count. A decrypt-only key
    newer than the primary was being distributed; an older one is the previous primary, and the
    rotation resumes at Promoted: every value is rewrapped again (idempotent) before the old
    key can be retired, so nothing is left under it. Otherwise there is no rotation to resume.
    Waits (distribute timeout, grace) start again at `now`."""
    newer = [k for k in decrypt_only if k[1] > primary[1]]
    if newer:
        new_id = max(newer, key=lambda k: k[1])[0]
        return RotationState(RotationStage.DISTRIBUTING, now, new_id, primary[0])
    if decrypt_only:
        old_id = max(decrypt_only, key=lambda k: k[1])[0]
        return RotationState(RotationStage.PROMOTED, now, primary[0], old_id)
    return RotationState()
