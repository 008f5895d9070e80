"""ACTIVE went backwards: whether spec.config is committed again.

Every change of ACTIVE made on purpose is a new, higher version: a commit (the operator's, rag's,
a script's), a rollback to MASTER or to a kept version, a breaker revert, an invalid-config
revert (`ConfigStore._write_version`: versions only grow). The operator publishes the version
and digest of ACTIVE it saw last in the status (`status.activeVersion`, `status.activeDigest`),
where etcd write access cannot reach. So a version in etcd LOWER than the published one was
made by nobody's commit: the data went back (an etcd snapshot restore), or the newer versions
were deleted and an older authentic record put back with etcd write access alone (values
cannot be forged without the keyring, only removed or replayed).

What was lost decides what is done:
- the version the operator saw last was spec.config, as handled (`status.specConfigDigest`):
  the operator's own commit is gone, so it commits spec.config again (RECOMMIT). That writes
  only what the resource says, through the same commit as any edit (attributed, refused
  while frozen), above the version the operator saw last (readers may have accepted it): the
  safe direction whoever did it;
- it was a deliberate difference (a rollback, a breaker revert, a commit by rag), or commits
  were frozen when the operator saw it last: not the operator's to redo; a person is told
  (KEEP), and ACTIVE stays as found.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class SeenActive:
    """What the status says the operator saw of ACTIVE when it last published."""

    version: int
    digest: str
    frozen: bool = False


def seen_active(status: Mapping[str, object]) -> SeenActive | None:
    """status.activeVersion, activeDigest and frozen; None when no version is published (a new
    resource, or a value no operator writes)."""
    version = status.get("activeVersion")
    digest = status.get("activeDigest")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return None
    if not isinstance(digest, str) or not digest:
        return None
    return SeenActive(version, digest, frozen=status.get("frozen") is True)


def went_backwards(seen: SeenActive | None, found_version: int | None) -> bool:
    """Whether ACTIVE's version in etcd is below the one the operator saw last: the cheap test
    a monitor pass makes before it validates spec.config for `judge_regression`."""
    return seen is not None and found_version is not None and found_version < seen.version


class RegressionAction(StrEnum):
    RECOMMIT = "Recommit"  # the operator's own commit of spec.config was lost: commit it again
    KEEP = "Keep"  # a deliberate difference (or a frozen component) was lost: tell a person


# The Event reasons of each action.
RECOMMITTED = "SpecRecommittedAfterRestore"
WENT_BACK = "ActiveWentBack"


@dataclass(frozen=True)
class Regression:
    action: RegressionAction
    seen_version: int
    found_version: int
    message: str

    @property
    def recommit(self) -> bool:
        return self.action is RegressionAction.RECOMMIT


def judge_regression(
    seen: SeenActive | None,
    found_version: int | None,
    found_digest: str | None,
    spec_digest: str,
    handled_spec_digest: str,
) -> Regression | None:
    """What to do about ACTIVE in etcd (`found_*`, None: no metadata record) given what the
    operator published last (`seen`) and spec.config's digest (normalized) beside the one the
    operator handled last. None: nothing went backwards, or nothing of what went back matters
    here (the same config, or a new spec.config edit, which is committed as any edit is)."""
    if seen is None or found_version is None or found_digest is None:
        return None
    if found_version >= seen.version:
        return None  # every deliberate change is a new, higher version
    if spec_digest != handled_spec_digest:
        return None  # an edit not handled yet: the reconcile commits it as usual
    if found_digest == seen.digest:
        return None  # the config the operator saw, under an older number: nothing lost
    went = (
        f"ACTIVE in etcd is version {found_version}, older than version {seen.version} the"
        " operator saw last (the defender etcd was restored from a snapshot, or its newer"
        " versions were deleted)"
    )
    if seen.digest == spec_digest and not seen.frozen:
        return Regression(
            RegressionAction.RECOMMIT,
            seen.version,
            found_version,
            f"{went}; version {seen.version} was spec.config, committed again",
        )
    if seen.digest == spec_digest:
        why = (
            "commits were frozen then, so spec.config is not committed again: lift the freeze"
            " and edit spec.config, or roll back to a kept version"
        )
    else:
        why = (
            f"version {seen.version} was not spec.config but a deliberate difference (a"
            " rollback, a breaker revert or a commit by rag), which the operator does not"
            " redo: roll back or commit it again if it is still wanted"
        )
    return Regression(RegressionAction.KEEP, seen.version, found_version, f"{went}; {why}")
