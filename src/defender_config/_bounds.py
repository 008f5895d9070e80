"""The bounds of the durations and counts a person types into settings: the library's, the
agent's and the operator's, written once.

Python's sleeps, waits, socket and gRPC timeouts overflow beyond ~9e9 s, a `timedelta` beyond
~8.6e13 s, and `inf` and `nan` are floats pydantic takes as they are: accepted, such a value
crashed the running process (OverflowError) at its first sleep, call, lease or schedule check,
or silently turned a comparison off (`nan`), instead of being refused at start with the name of
the setting. A day is more than any wait of these programs needs; the heartbeat has the
DefenderComponent API's bounds (`spec.heartbeat`).
"""

from __future__ import annotations

from typing import Any, Final

from pydantic import Field

__all__ = [
    "MAX_ALLOWED_MISSES",
    "MAX_HEARTBEAT_INTERVAL_SECONDS",
    "MAX_SETTING_SECONDS",
    "MIN_ALLOWED_MISSES",
    "bounded_seconds",
]

#: The longest duration a setting may name unless its field says otherwise: a day.
MAX_SETTING_SECONDS: Final = 86400
#: `spec.heartbeat.intervalSeconds`' bound: the published cadence never exceeds it.
MAX_HEARTBEAT_INTERVAL_SECONDS: Final = 3600
#: `spec.heartbeat.missedBeforeRestart`'s bounds. A lease of one interval expires whenever a
#: renewal is late at all (a slow health check, a GC pause, a loaded etcd) and the operator
#: restarts a healthy pod: two leave a whole interval.
MIN_ALLOWED_MISSES: Final = 2
MAX_ALLOWED_MISSES: Final = 100


def bounded_seconds(
    default: float | None, *, most: float = MAX_SETTING_SECONDS, zero: bool = False
) -> Any:
    """The field of a duration setting: a finite number of seconds over 0 (or from 0 with
    `zero`, where 0 means "every time" or "off") and at most `most`; a value outside is a
    validation error naming the field. A field, not an `Annotated` alias: pydantic does not
    let a field's own `le` tighten an alias's, so each bound would need an alias of its own."""
    if zero:
        return Field(default=default, ge=0, le=most, allow_inf_nan=False)
    return Field(default=default, gt=0, le=most, allow_inf_nan=False)
