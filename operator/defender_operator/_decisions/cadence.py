"""Whether the instances run the heartbeat cadence the spec asks for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from defender_operator._decisions import conditions as cond

# Condition type: do the instances beat at spec.heartbeat's cadence?
HEARTBEAT_CADENCE = "HeartbeatCadence"

# Clocks of nodes differ a little: a heartbeat stamped this soon after the cadence was
# published may have been written before its instance read it.
CLOCK_SLACK = timedelta(seconds=2)


@dataclass(frozen=True)
class InstanceBeat:
    """What one instance's latest heartbeat says about its cadence."""

    instance: str
    time: datetime
    interval_seconds: float | None
    lease_ttl_seconds: int | None


@dataclass(frozen=True)
class SpecCadence:
    interval_seconds: float
    lease_ttl_seconds: int
    published: datetime
    """When the operator published this cadence (the record's `since`)."""


def off_cadence(instances: Sequence[InstanceBeat], spec: SpecCadence) -> list[str]:
    """The instances that beat after the cadence was published and still run another one, in
    name order. Instances that have not beaten since are not judged: they learn the cadence at
    their next beat, and until then the operator waits for the lease they advertise. Records
    that advertise no cadence (older heartbeaters) cannot be judged either."""
    out = []
    for beat in instances:
        if beat.time <= spec.published + CLOCK_SLACK or beat.lease_ttl_seconds is None:
            continue
        interval_differs = (
            beat.interval_seconds is not None and beat.interval_seconds != spec.interval_seconds
        )
        if interval_differs or beat.lease_ttl_seconds != spec.lease_ttl_seconds:
            out.append(beat.instance)
    return sorted(out)


def _describe(beat: InstanceBeat) -> str:
    interval = f"{beat.interval_seconds:g}s" if beat.interval_seconds is not None else "?"
    return f"{beat.instance} ({interval}, lease {beat.lease_ttl_seconds}s)"


def cadence_condition(instances: Sequence[InstanceBeat], spec: SpecCadence) -> cond.Cond:
    """HeartbeatCadence: True when every judged instance follows the spec's cadence."""
    wanted = f"{spec.interval_seconds:g}s, lease {spec.lease_ttl_seconds}s"
    off = set(off_cadence(instances, spec))
    if not off:
        return cond.Cond(
            HEARTBEAT_CADENCE,
            cond.TRUE,
            "FollowsSpec",
            f"instances beat at spec.heartbeat's cadence ({wanted})",
        )
    described = [
        _describe(b) for b in sorted(instances, key=lambda b: b.instance) if b.instance in off
    ]
    return cond.Cond(
        HEARTBEAT_CADENCE,
        cond.FALSE,
        "CadenceMismatch",
        f"{len(off)} instance(s) beat at another cadence than spec.heartbeat ({wanted}):"
        f" {', '.join(described[:10])}. The operator waits for the lease each instance"
        " advertises; check that their heartbeaters can read the published cadence",
    )
