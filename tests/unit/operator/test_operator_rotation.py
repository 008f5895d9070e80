"""next_rotation_step: the staged key rotation, one step at a time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from defender_operator._api import RotationStage
from defender_operator._decisions.rotation import (
    RotationAction,
    RotationState,
    RotationTimings,
    next_rotation_step,
    resumed_rotation,
    schedule_due,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TIMINGS = RotationTimings(distribute_timeout_seconds=120, grace_seconds=300)
NEW, OLD = "fp-new", "fp-old"


def step(state: RotationState, *, requested: bool = False, live=None, now=T0, primaries=None):  # type: ignore[no-untyped-def]
    return next_rotation_step(
        now=now,
        state=state,
        requested=requested,
        new_fingerprint=NEW,
        live_fingerprints=live or {},
        timings=TIMINGS,
        live_primaries=primaries,
    )


def test_idle_stays_idle_until_requested() -> None:
    assert step(RotationState()).action is RotationAction.NONE
    s = step(RotationState(), requested=True)
    assert (s.action, s.stage_after) == (RotationAction.ADD_KEY, RotationStage.DISTRIBUTING)


def test_distributing_waits_for_every_live_instance() -> None:
    state = RotationState(RotationStage.DISTRIBUTING, since=T0)
    live = {"a": frozenset({OLD, NEW}), "b": frozenset({OLD})}
    s = step(state, live=live, now=T0 + timedelta(seconds=10))
    assert (s.action, s.stage_after, s.lagging) == (
        RotationAction.WAIT,
        RotationStage.DISTRIBUTING,
        ("b",),
    )
    live["b"] = frozenset({OLD, NEW})
    s = step(state, live=live, now=T0 + timedelta(seconds=10))
    assert (s.action, s.stage_after, s.reason) == (
        RotationAction.PROMOTE,
        RotationStage.PROMOTED,
        "KeyDistributed",
    )


def test_distribution_timeout_promotes_and_names_laggards() -> None:
    state = RotationState(RotationStage.DISTRIBUTING, since=T0)
    s = step(state, live={"b": frozenset({OLD})}, now=T0 + timedelta(seconds=120))
    assert (s.action, s.reason, s.lagging) == (
        RotationAction.PROMOTE,
        "DistributionTimedOut",
        ("b",),
    )
    assert "b" in s.message


def test_promoted_waits_until_every_instance_seals_with_the_new_key() -> None:
    promoted = RotationState(RotationStage.PROMOTED, since=T0)
    s = step(promoted, primaries={"a": NEW, "b": OLD}, now=T0 + timedelta(seconds=5))
    assert (s.action, s.stage_after, s.lagging) == (
        RotationAction.WAIT,
        RotationStage.PROMOTED,
        ("b",),
    )
    s = step(promoted, primaries={"a": NEW, "b": OLD}, now=T0 + timedelta(seconds=120))
    assert (s.action, s.reason, s.lagging) == (RotationAction.REWRAP, "PromotionTimedOut", ("b",))


def test_promoted_rewraps_then_grace_then_retire() -> None:
    s = step(RotationState(RotationStage.PROMOTED, since=T0), primaries={"a": NEW})
    assert (s.action, s.stage_after) == (RotationAction.REWRAP, RotationStage.GRACE)
    grace = RotationState(RotationStage.GRACE, since=T0)
    assert step(grace, now=T0 + timedelta(seconds=299)).action is RotationAction.WAIT
    s = step(grace, now=T0 + timedelta(seconds=300))
    assert (s.action, s.stage_after) == (RotationAction.RETIRE, RotationStage.IDLE)


def test_schedule() -> None:
    assert not schedule_due(T0, None, 3600)
    assert not schedule_due(T0, T0 - timedelta(seconds=10), 3600)
    assert schedule_due(T0, T0 - timedelta(seconds=3600), 3600)
    assert not schedule_due(T0, T0 - timedelta(days=9), 0)


def test_a_keyring_restored_without_a_stage_resumes_the_rotation_its_keys_show() -> None:
    """A Secret restored from a copy or an export says Idle; its keys say where it was."""
    now = T0 + timedelta(hours=1)
    before, after = T0 - timedelta(days=1), T0
    # One primary (or only retired keys besides it): nothing to resume.
    assert resumed_rotation(primary=("k1", before), decrypt_only=[], now=now) == RotationState()
    # A decrypt-only key newer than the primary was being distributed.
    distributing = resumed_rotation(primary=("k1", before), decrypt_only=[("k2", after)], now=now)
    assert distributing == RotationState(RotationStage.DISTRIBUTING, now, "k2", "k1")
    # An older decrypt-only key is the previous primary: Promoted or Grace, resumed at Promoted
    # so every value is rewrapped (again) before that key is retired.
    promoted = resumed_rotation(primary=("k2", after), decrypt_only=[("k1", before)], now=now)
    assert promoted == RotationState(RotationStage.PROMOTED, now, "k2", "k1")
    # The resumed stage goes on as any other: Promoted rewraps once no instance seals with the
    # old key, and only Grace's end retires it.
    nxt = next_rotation_step(
        now=now,
        state=promoted,
        requested=False,
        new_fingerprint=NEW,
        live_fingerprints={},
        timings=TIMINGS,
        live_primaries={},
    )
    assert (nxt.action, nxt.stage_after) == (RotationAction.REWRAP, RotationStage.GRACE)
    # Of several, the newest decrypt-only key counts.
    older = T0 - timedelta(days=2)
    several = resumed_rotation(
        primary=("k2", after), decrypt_only=[("k0", older), ("k1", before)], now=now
    )
    assert (several.new_key_id, several.old_key_id) == ("k2", "k1")
