"""What one step of a reconcile or a monitor pass found: the conditions to show and the Events to
post. Steps return an `Outcome` instead of writing to the component's memory or posting Events
themselves, so a step can be tested by what it returns, and one place (`remember`, `post`)
applies them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import kopf

from defender_operator._decisions import conditions as cond
from defender_operator._decisions.breaker import ActiveChange
from defender_operator._decisions.cadence import HEARTBEAT_CADENCE

if TYPE_CHECKING:
    from defender_operator._runtime import ComponentMemory


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event on the resource: something a person should see."""

    type: str  # "Normal" | "Warning"
    reason: str
    message: str


def normal(reason: str, message: str) -> Event:
    return Event("Normal", reason, message)


def warning(reason: str, message: str) -> Event:
    return Event("Warning", reason, message)


@dataclass(frozen=True)
class ConfigVerdict:
    """What ConfigSynced is computed from (see `conditions.compute`)."""

    state: cond.ConfigState
    message: str = ""
    reason: str = ""


@dataclass
class Outcome:
    """What a step found. `conditions` by type; None clears one (a resolved Conflict).
    `fields` are status fields to publish; `done` says the steps after this one must not run
    (refused, invalid or frozen: the visit ends by publishing what it has)."""

    events: list[Event] = field(default_factory=list)
    config: ConfigVerdict | None = None
    conditions: dict[str, cond.Cond | None] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    # A change of ACTIVE the breaker should watch (a commit), or `settled` when the breaker
    # acted on the last one (it reverted it) and has nothing left to watch.
    change: ActiveChange | None = None
    settled: bool = False

    def add(self, other: Outcome) -> Outcome:
        """Fold a later step's outcome into this one (later verdicts win); returns `other`."""
        self.events.extend(other.events)
        if other.config is not None:
            self.config = other.config
        self.conditions.update(other.conditions)
        self.fields.update(other.fields)
        self.done = self.done or other.done
        if other.change is not None or other.settled:
            self.change, self.settled = other.change, other.settled
        return other


# Which memory slot holds each condition a step can judge.
_SLOTS = {
    cond.HEARTBEATING: "heartbeat",
    cond.KEY_CURRENT: "key",
    cond.MISCONFIGURED: "misconfig",
    cond.CONFLICT: "conflict",
    HEARTBEAT_CADENCE: "cadence_condition",
    cond.ROLLOUT: "rollout_condition",
}


def remember(mem: ComponentMemory, outcome: Outcome) -> None:
    """Apply a step's verdicts to the component's memory (the caller holds `mem.lock`)."""
    if outcome.config is not None:
        mem.config_state = outcome.config.state
        mem.config_message = outcome.config.message
        mem.config_reason = outcome.config.reason
    for ctype, value in outcome.conditions.items():
        setattr(mem, _SLOTS[ctype], value)
    if outcome.change is not None or outcome.settled:
        mem.last_change = outcome.change


def take(mem: ComponentMemory, found: Outcome, step: Outcome) -> bool:
    """Take one step's outcome: into memory now (a later step may read it) and into what the
    visit or pass publishes. True when the steps after it may run."""
    found.add(step)
    remember(mem, step)
    return not step.done


# Posts one Event on the resource `body`; the Runtime holds the one in use (tests record them).
EventPoster = Callable[[Any, Event], None]


def kopf_post(body: Any, event: Event) -> None:
    # kopf queues the Event and posts it from its own task (asynchronously).
    kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def post_events(post: EventPoster, body: Any, found: Outcome) -> None:
    """Post the Events found so far, each once (`found` forgets them)."""
    events, found.events = found.events, []
    for event in events:
        post(body, event)
