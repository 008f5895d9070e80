"""Status conditions: what each one says, and merging without losing transition times."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

READY = "Ready"
CONFIG_SYNCED = "ConfigSynced"
HEARTBEATING = "Heartbeating"
KEY_CURRENT = "KeyCurrent"
MISCONFIGURED = "Misconfigured"
CONDITION_TYPES = (READY, CONFIG_SYNCED, HEARTBEATING, KEY_CURRENT, MISCONFIGURED)
# True while the operator refuses every keyring it can find (none opens the stored values):
# commits, rotations and restarts wait for a person (docs/troubleshooting.md#keyringmissing).
# Shown once the operator has judged the keyring (Observation.keyring), after the five above.
KEY_UNAVAILABLE = "KeyUnavailable"
# Only on a resource refused the etcd name it asks for (see `ownership`): absent otherwise.
CONFLICT = "Conflict"
# From the scrub (`_decisions.scrub`): True while a sealed value the operator owns (MASTER,
# ACTIVE, kept history) or the metadata does not verify. Absent until the first scrub.
CORRUPT = "Corrupt"
# From a canary rollout (`_decisions.canary`): Progressing, Promoted or Aborted as its reason.
# Absent until a component with spec.rollout.canary first rolls a version out.
ROLLOUT = "Rollout"

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"

# KeyCurrent's reason while the namespace's keyring copy cannot be written and a person must
# act (`keycopy`): the reconcile stops there, so Ready names it before anything else.
KEYRING_COPY_BLOCKED = "KeyringCopyBlocked"


@dataclass(frozen=True)
class Cond:
    type: str
    status: str
    reason: str
    message: str = ""


def last_known(conditions: object, ctype: str) -> Cond | None:
    """Condition `ctype` as a status holds it, None if absent or not well formed (a person can
    edit the status): what a new operator shows until its own first observation."""
    if not isinstance(conditions, list):
        return None
    for c in conditions:
        if isinstance(c, Mapping) and c.get("type") == ctype:
            status, reason = c.get("status"), c.get("reason")
            if status in (TRUE, FALSE, UNKNOWN) and isinstance(reason, str) and reason:
                message = c.get("message")
                return Cond(ctype, status, reason, message if isinstance(message, str) else "")
            return None
    return None


class ConfigState(StrEnum):
    UNKNOWN = "Unknown"  # not reconciled yet
    SYNCED = "Synced"  # ACTIVE in etcd matches what the operator intends
    INVALID = "Invalid"  # spec.config refused by validation, ACTIVE untouched
    FROZEN = "Frozen"  # breaker tripped: commits refused
    STORE_UNAVAILABLE = "StoreUnavailable"  # etcd could not be reached
    # ACTIVE differs from spec.config on purpose (rollback, breaker revert, a commit by rag):
    # in sync with what the operator intends, but worth saying.
    DIVERGED = "Diverged"
    # The library refused a write that retrying cannot fix (too large, invalid, unknown key,
    # contradictory keys): the condition's reason is the library's (`config_reason`).
    REFUSED = "Refused"
    # A canary rollout of spec.config is in progress: ACTIVE is the previous version until it
    # is promoted.
    CANARY = "Canary"


@dataclass(frozen=True)
class Observation:
    """Everything the conditions depend on, gathered by the caller."""

    config: ConfigState = ConfigState.UNKNOWN
    config_message: str = ""
    config_reason: str = ""
    """For REFUSED: the library error's reason (ValueTooLarge, ConfigInvalid, UnknownKey, ...)."""
    # Heartbeat judgement: (status, reason, message), from the restart decision or None.
    heartbeat: Cond | None = None
    key: Cond | None = None
    misconfig: Cond | None = None
    # The operator-wide keyring verdict (`_decisions.keyring.keyring_condition`); None leaves
    # the condition out (callers that do not judge the keyring).
    keyring: Cond | None = None
    conflict: Cond | None = None
    # Informational (never blocks Ready): whether instances follow spec.heartbeat's cadence.
    cadence: Cond | None = None
    # The last scrub's verdict (`_decisions.scrub.plan_scrub`); None leaves it out.
    corrupt: Cond | None = None
    # Informational: the defender etcd's own health (`_decisions.etcd`), once measured.
    etcd: Cond | None = None
    # Informational: the last canary rollout's state, once there was one.
    rollout: Cond | None = None


_CONFIG = {
    ConfigState.UNKNOWN: (UNKNOWN, "Pending", "not reconciled yet"),
    ConfigState.SYNCED: (TRUE, "Committed", "ACTIVE in etcd matches spec"),
    ConfigState.INVALID: (FALSE, "ConfigInvalid", "spec.config was refused"),
    ConfigState.FROZEN: (FALSE, "Frozen", "commits are frozen by the breaker"),
    ConfigState.STORE_UNAVAILABLE: (UNKNOWN, "StoreUnavailable", "defender etcd unreachable"),
    ConfigState.DIVERGED: (
        TRUE,
        "ActiveDiffersFromSpec",
        "ACTIVE differs from spec.config (rollback, breaker revert or a commit by rag);"
        " edit spec.config to commit it again",
    ),
    ConfigState.REFUSED: (FALSE, "Refused", "etcd refused the change; retrying cannot help"),
    ConfigState.CANARY: (UNKNOWN, "CanaryInProgress", "spec.config is tried on canaries first"),
}


def last_config_state(conditions: object) -> tuple[ConfigState, str]:
    """ConfigSynced as a status holds it, as (state, message): what a new operator shows until
    its own first reconcile. (UNKNOWN, "") when absent or not one of ours."""
    known = last_known(conditions, CONFIG_SYNCED)
    if known is not None:
        for state, (status, reason, _) in _CONFIG.items():
            if (status, reason) == (known.status, known.reason):
                return state, known.message
    return ConfigState.UNKNOWN, ""


def compute(obs: Observation) -> list[Cond]:
    """The five conditions, each always present (Unknown until known); KeyUnavailable when
    the keyring has been judged; Conflict while the resource is refused its etcd name; the
    cadence condition once it has been judged."""
    status, reason, default_msg = _CONFIG[obs.config]
    if obs.config is ConfigState.REFUSED and obs.config_reason:
        reason = obs.config_reason
    config = Cond(CONFIG_SYNCED, status, reason, obs.config_message or default_msg)
    heartbeat = obs.heartbeat or Cond(HEARTBEATING, UNKNOWN, "Pending", "not observed yet")
    key = obs.key or Cond(KEY_CURRENT, UNKNOWN, "Pending", "not observed yet")
    misconfig = obs.misconfig or Cond(MISCONFIGURED, UNKNOWN, "Pending", "not observed yet")
    # Ready is True only when everything a person cares about is fine; its reason names the
    # first thing that is not, in order of how much it matters.
    blockers = [c for c in (config, heartbeat, key) if c.status != TRUE]
    if key.reason == KEYRING_COPY_BLOCKED:
        # Nothing else of the reconcile ran: ConfigSynced and Heartbeating wait for it.
        blockers.remove(key)
        blockers.insert(0, key)
    if misconfig.status == TRUE:
        blockers.insert(0, misconfig)
    corrupt = obs.corrupt if obs.corrupt is not None and obs.corrupt.status == TRUE else None
    if corrupt is not None:
        blockers.insert(0, corrupt)
    if obs.keyring is not None and obs.keyring.status != FALSE:
        # Nothing can be read or written without the keyring: it is named first.
        blockers.insert(0, obs.keyring)
    if not blockers:
        ready = Cond(READY, TRUE, "AllGood", "config synced, instances heartbeating, key current")
    else:
        first = blockers[0]
        refused = obs.keyring is not None and obs.keyring.status == TRUE
        status = (
            FALSE
            if refused or any(c.status == FALSE or c is misconfig or c is corrupt for c in blockers)
            else UNKNOWN
        )
        ready = Cond(READY, status, first.reason, f"{first.type}: {first.message}")
    if obs.conflict is not None:
        # The refusal is the only thing worth reading: the rest is not judged for it.
        config = Cond(CONFIG_SYNCED, FALSE, obs.conflict.reason, obs.conflict.message)
        ready = Cond(READY, FALSE, obs.conflict.reason, f"{CONFLICT}: {obs.conflict.message}")
        return [ready, config, heartbeat, key, misconfig, obs.conflict]
    extra = [
        c for c in (obs.keyring, obs.cadence, obs.corrupt, obs.etcd, obs.rollout) if c is not None
    ]
    return [ready, config, heartbeat, key, misconfig, *extra]


def rfc3339(when: datetime) -> str:
    """Kubernetes' time format: UTC, whole seconds, `Z` suffix."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: object) -> datetime | None:
    """A time as Kubernetes writes it (`Z` or an offset); None when `text` is not one with a
    zone (a status is ours, but a person can edit it)."""
    if not isinstance(text, str):
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


MESSAGE_MAX_CHARS = 32768
"""What the CRD lets a condition's message hold: one longer makes the API server refuse the
whole status patch, and every other field of it with the message."""


def bounded(text: str, limit: int = MESSAGE_MAX_CHARS) -> str:
    """`text` cut to `limit` characters (its last one an ellipsis when cut)."""
    if len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def merge(
    existing: Sequence[Mapping[str, Any]],
    desired: Sequence[Cond],
    *,
    now: datetime,
    generation: int,
    judged: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """New condition list in wire form. lastTransitionTime changes only when status changes;
    conditions of other types (set by someone else) are kept, a Conflict no longer desired is
    dropped. observedGeneration is `generation`, or for a type in `judged` the generation it
    was judged on (`config_generations`)."""
    judged = judged or {}
    by_type = {c.get("type"): c for c in existing}
    out: list[dict[str, Any]] = []
    for cond in desired:
        old = by_type.pop(cond.type, None)
        if old is None or old.get("status") != cond.status or "lastTransitionTime" not in old:
            when = rfc3339(now)
        else:
            when = old["lastTransitionTime"]
        out.append(
            {
                "type": cond.type,
                "status": cond.status,
                "reason": cond.reason,
                "message": bounded(cond.message),
                "lastTransitionTime": when,
                "observedGeneration": judged.get(cond.type, generation),
            }
        )
    out.extend(dict(c) for c in by_type.values() if c.get("type") != CONFLICT)
    return out


def config_generations(
    generation: int, config_generation: int | None, *, conflict: bool
) -> dict[str, int]:
    """The generation ConfigSynced, and Ready with it, were judged on: the one the last
    reconcile that gave a verdict handled (`config_generation`), not the newest the body has
    (a failed reconcile or a monitor pass before kopf retries judged nothing of that one). A
    Conflict, or no verdict yet, is judged on `generation`."""
    if conflict or config_generation is None:
        return {}
    judged = min(config_generation, generation)
    return {CONFIG_SYNCED: judged, READY: judged}


def observed_generation(conditions: object, ctype: str) -> int | None:
    """observedGeneration of condition `ctype` as a status holds it (None: absent, or not an
    int: a person can edit the status)."""
    if not isinstance(conditions, list):
        return None
    for c in conditions:
        if isinstance(c, Mapping) and c.get("type") == ctype:
            found = c.get("observedGeneration")
            return found if type(found) is int else None
    return None
