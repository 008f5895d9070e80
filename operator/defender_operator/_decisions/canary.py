"""Canary rollouts: who the canaries are, whether to wait, promote or abort, and whether the
rollout record in etcd is the one the operator anchored in the DefenderComponent status."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from defender_config.contract import SINGULAR, UNFREEZE_ANNOTATION, next_record_sequence

from .conditions import parse_rfc3339
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


def departed_canaries(
    canaries: Sequence[str],
    records: Mapping[str, str | None],
    remembered: Mapping[str, str],
    pods: Mapping[str, bool],
) -> frozenset[str]:
    """The canaries whose pod went away during the rollout: judged neither healthy nor failed,
    but replaced (`judge_canary`).

    `records`: the pod each instance record present names; `remembered`: the pod each canary
    was last seen in (its record is gone once its agent revoked its lease on the way out);
    `pods`: the selected pods, each with whether it is being deleted. A canary is departed when
    the pod it names (or last named) is being deleted or no longer selected, and when its record
    names no selected pod at all (it cannot be told from a forged one, so it is not judged). A
    canary whose record is gone and whose pod is unknown stays: its heartbeat is lost."""
    out: set[str] = set()
    for name in canaries:
        pod = records[name] if name in records else remembered.get(name)
        if name not in records and pod is None:
            continue
        if pod is None or pod not in pods or pods[pod]:
            out.add(name)
    return frozenset(out)


def repick(kept: Sequence[str], candidates: Sequence[str], *, wanted: int) -> tuple[str, ...]:
    """The canaries after some left: those `kept`, topped up to `wanted` with the first
    `candidates` by name (live instances of selected pods, as at the start) not already kept."""
    chosen = sorted(set(kept))
    extra = sorted(set(candidates) - set(chosen))
    return tuple(sorted(chosen + extra[: max(wanted - len(chosen), 0)]))


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
    REPLACE = "replace"  # write the rollout again naming `CanaryVerdict.canaries`


@dataclass(frozen=True)
class RolloutView:
    """The rollout record as the decision needs it."""

    version: int
    base_version: int
    digest: str
    canaries: tuple[str, ...]
    since: datetime
    sequence: int = 0
    by: str = ""


@dataclass(frozen=True)
class CanaryVerdict:
    action: Action
    reason: str
    message: str
    healthy_since: datetime | None = None
    failed: tuple[str, ...] = ()
    canaries: tuple[str, ...] = ()
    """For REPLACE: the canaries to name from now on."""


def judge_canary(
    *,
    now: datetime,
    rollout: RolloutView,
    active_version: int | None,
    beats: Mapping[str, CanaryBeat],
    healthy_since: datetime | None,
    hold_seconds: int,
    deadline_seconds: int,
    departed: frozenset[str] = frozenset(),
    candidates: Sequence[str] = (),
) -> CanaryVerdict:
    """One look at a rollout in progress.

    ABORT as soon as one canary fails (gone, or reporting a failure reason); PROMOTE once every
    canary has reported the candidate's digest, healthy, for `hold_seconds` without a break;
    ABORT when they have not all taken it within `deadline_seconds`; SUPERSEDED when ACTIVE is
    no longer the version the rollout was built on (someone rolled back or committed).

    Canaries in `departed` (their pod is being deleted or gone: `departed_canaries`) are not
    judged: a pod leaving says nothing about the candidate. Unless another canary failed, they
    are REPLACEd by the first of `candidates` (live instances of selected pods that are not
    being deleted) not already canaries; with none to take their place and no canary left, the
    rollout WAITs for one."""
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
    present = tuple(n for n in rollout.canaries if n not in departed)
    for name in present:
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
    if len(present) < len(rollout.canaries):
        gone = ", ".join(sorted(set(rollout.canaries) - set(present)))
        now_named = repick(present, candidates, wanted=len(rollout.canaries))
        if not now_named:
            return CanaryVerdict(
                Action.WAIT,
                "WaitingForInstances",
                f"canary pod(s) of {gone} left; waiting for a live instance to try version {v} on",
            )
        return CanaryVerdict(
            Action.REPLACE,
            "CanaryReplaced",
            f"canary pod(s) of {gone} left during the rollout of version {v} (not a failure);"
            f" it goes to {', '.join(now_named)} instead",
            canaries=now_named,
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


@dataclass(frozen=True)
class RolloutAnchor:
    """status.rollout as the operator last published it: the rollout it holds current. Only
    the operator writes the status subresource, so etcd write access cannot move it."""

    sequence: int
    version: int
    base_version: int
    digest: str
    canaries: tuple[str, ...]
    since: datetime | None
    by: str
    phase: str
    judged_history_limit: int | None = None
    """The spec.rollout.historyLimit the storage budget judged the rollout's start under
    (`JUDGED_HISTORY_LIMIT`; None: not recorded)."""


# status.rollout's field holding `RolloutAnchor.judged_history_limit`.
JUDGED_HISTORY_LIMIT = "judgedHistoryLimit"


def anchor_from_status(raw: Any) -> RolloutAnchor | None:
    """status.rollout read back; None when absent or written before it carried a sequence
    (then the record in etcd decides, as before)."""
    if not isinstance(raw, Mapping):
        return None
    sequence = raw.get("sequence")
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence <= 0:
        return None
    since = parse_rfc3339(raw.get("since"))
    canaries = raw.get("canaries")

    def _int(key: str) -> int:
        value = raw.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    judged = _int(JUDGED_HISTORY_LIMIT)
    return RolloutAnchor(
        sequence=sequence,
        version=_int("version"),
        base_version=_int("baseVersion"),
        digest=str(raw.get("digest") or ""),
        canaries=tuple(str(c) for c in canaries) if isinstance(canaries, list) else (),
        since=since,
        by=str(raw.get("by") or ""),
        phase=str(raw.get("phase") or ""),
        judged_history_limit=judged if judged > 0 else None,
    )


def judged_limit(anchor: RolloutAnchor | None, version: int, digest: str) -> int | None:
    """The historyLimit the start of the rollout of `version` (`digest`: its candidate) was
    judged under, as status anchors it; None when status anchors another rollout (the start of
    this one never wrote its status) or one started before the limit was recorded."""
    if anchor is None or anchor.version != version or anchor.digest != digest:
        return None
    return anchor.judged_history_limit


class RecordAction(enum.Enum):
    KEEP = "keep"  # the anchored rollout, a newer one, or none: judge it as usual
    REMOVE = "remove"  # end it: candidate deleted, an ended record under `sequence`
    REISSUE = "reissue"  # write the anchored rollout again over it, under `sequence`


@dataclass(frozen=True)
class Reissue:
    """The rollout to write again over a record that is not the current one."""

    canaries: tuple[str, ...]
    since: datetime | None
    by: str
    digest: str


@dataclass(frozen=True)
class RecordVerdict:
    action: RecordAction
    message: str = ""
    replayed: bool = False
    """True when the record is an authentic one put back, or was deleted (an attack, alerted);
    False for a record from before sequences existed (an upgrade)."""
    sequence: int = 0
    """The sequence of what REMOVE or REISSUE writes: above the record's and the anchor's."""
    reissue: Reissue | None = None


def judge_record(
    *,
    record: RolloutView | None,
    anchor: RolloutAnchor | None,
    spec_digest: str | None,
    active_version: int | None,
    now: datetime,
) -> RecordVerdict:
    """Is the authentic rollout record in etcd the current one?

    Sequences only grow, and only key holders sign: a record above the anchored sequence is
    the operator's own (written, not yet anchored: it stopped between the write and the status
    patch), and one at the anchored sequence is the anchored rollout while status says it is
    in progress. Otherwise it is a saved record put back: below the anchor, or the anchored
    rollout after status says it ended. It is ended again (so running readers learn a higher
    sequence), and when the anchored rollout is still in progress for this spec.config on this
    ACTIVE it is written again instead (the replay overwrote it), with its canaries, author
    and start, under a new sequence. A record without a sequence (written before it existed)
    is re-issued with one when it is the rollout of this spec on this ACTIVE, ended otherwise.
    An ended rollout's record (no canaries) is only acted on when it is below the anchor of a
    rollout in progress (put back over it). No record while status holds a rollout in progress
    for this spec.config on this ACTIVE: deleted in etcd (the operator ends a rollout with an
    ended record, never by deleting it), and written again."""
    if record is None:
        if (
            anchor is not None
            and anchor.phase == PROGRESSING
            and anchor.canaries
            and anchor.digest == spec_digest
            and anchor.base_version == active_version
        ):
            return RecordVerdict(
                RecordAction.REISSUE,
                f"rollout record sequence {anchor.sequence} (version {anchor.version}) is gone"
                " while status says it is in progress: deleted in etcd; written again",
                replayed=True,
                sequence=next_record_sequence(anchor.sequence, now=now),
                reissue=Reissue(anchor.canaries, anchor.since, anchor.by, anchor.digest),
            )
        return RecordVerdict(RecordAction.KEEP)
    anchored = anchor.sequence if anchor is not None else 0
    # An ended rollout's record changes nothing unless it overwrote the rollout status holds
    # in progress: then that one is written again, as below.
    in_progress = anchor is not None and anchor.phase == PROGRESSING
    if not record.canaries and (record.sequence >= anchored or not in_progress):
        return RecordVerdict(RecordAction.KEEP)
    if record.sequence > anchored or (
        record.sequence == anchored > 0 and anchor is not None and anchor.phase == PROGRESSING
    ):
        return RecordVerdict(RecordAction.KEEP)
    sequence = next_record_sequence(anchored, record.sequence, now=now)

    def current(source: RolloutView | RolloutAnchor) -> Reissue | None:
        ok = source.digest == spec_digest and source.base_version == active_version
        if source.canaries and ok:
            return Reissue(source.canaries, source.since, source.by, source.digest)
        return None

    if anchor is None or anchored == 0:  # record.sequence == 0 here
        again = current(record)
        if again is not None:
            return RecordVerdict(
                RecordAction.REISSUE,
                f"rollout record of version {record.version} has no sequence (written before"
                " it existed): issued again with one",
                sequence=sequence,
                reissue=again,
            )
        return RecordVerdict(
            RecordAction.REMOVE,
            f"rollout record of version {record.version} has no sequence and is not the"
            " rollout of spec.config on the current ACTIVE: ended",
            sequence=sequence,
        )
    if record.sequence == anchored:
        what = (
            f"rollout record sequence {record.sequence} (version {record.version}) ended"
            f" ({anchor.phase or 'unknown'} in status) and is back: a saved record put back"
        )
    else:
        what = (
            f"rollout record sequence {record.sequence} (version {record.version}) is older"
            f" than sequence {anchored} in status: a saved record put back"
        )
    again = current(anchor) if anchor.phase == PROGRESSING else None
    if again is not None:
        return RecordVerdict(
            RecordAction.REISSUE,
            f"{what}; the rollout of version {anchor.version} is written again",
            replayed=True,
            sequence=sequence,
            reissue=again,
        )
    return RecordVerdict(RecordAction.REMOVE, f"{what}; ended", replayed=True, sequence=sequence)
