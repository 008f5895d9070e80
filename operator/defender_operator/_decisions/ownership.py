"""Who may write a component's etcd keys: one DefenderComponent per etcd name.

The etcd identity of a component is its name alone (agents and the plugin address it that
way), while DefenderComponents are namespaced. So the first resource to reconcile a name
records a claim `{namespace, name, uid}` (`<prefix>/control/<name>/owner`) before writing
anything (or in the same transaction as its seed: `pending_claim`), and every other resource
of that name is refused and writes nothing.

- No claim yet (a new name, or data seeded before claims existed): the claimant takes it.
- Same namespace and name, same uid: it is the owner.
- Same namespace and name, another uid: the owner was deleted and re-created (Kubernetes
  allows one object per namespace/name at a time), so it takes its own claim over.
- Another namespace: refused (`NameClaimedElsewhere`). After the owner was deleted with
  retention Keep the claim stays, marked released: another namespace may adopt the kept data
  only with the annotation `mldefender.io/adopt: <namespace>/<name>` naming the old owner
  (`NameRetained` until then). Retention Purge deletes the claim with the data.
- A Keep resource carries no finalizer, so it can go while no operator watches and its claim
  is then never marked released: a claim whose owner the API server no longer holds (asked
  only when the claim would refuse) counts as released.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from defender_config.contract import ADOPT_ANNOTATION, RetentionPolicy

NAME_CLAIMED_ELSEWHERE = "NameClaimedElsewhere"
NAME_RETAINED = "NameRetained"


@dataclass(frozen=True)
class Claim:
    """The owner record of one etcd name (what is stored), or a resource asking for it."""

    namespace: str
    name: str
    uid: str
    released: bool = False
    """The owner was deleted with retention Keep: its data stays, nobody holds the name."""

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


class ClaimAction(StrEnum):
    KEEP = "Keep"  # the claimant is the recorded owner: nothing to write
    CREATE = "Create"  # no claim yet: write it (create-only)
    TAKE_OVER = "TakeOver"  # same namespace/name, re-created or released: rewrite it
    ADOPT = "Adopt"  # released by another namespace and adopted by annotation: rewrite it
    REFUSE = "Refuse"  # someone else owns the name: write nothing


@dataclass(frozen=True)
class ClaimDecision:
    action: ClaimAction
    record: Claim | None = None
    """What to store (None for KEEP and REFUSE)."""
    reason: str = ""
    message: str = ""

    @property
    def allowed(self) -> bool:
        return self.action is not ClaimAction.REFUSE


def decide_claim(
    existing: Claim | None,
    claimant: Claim,
    adopt_from: str | None,
    *,
    owner_exists: bool = True,
) -> ClaimDecision:
    """May `claimant` (a DefenderComponent reconciling) write the etcd name it asks for?

    `adopt_from` is the claimant's adopt annotation (None if absent); `owner_exists` False
    when the API server no longer holds the resource `existing` names (its uid)."""
    mine = replace(claimant, released=False)
    if existing is not None and not owner_exists:
        existing = replace(existing, released=True)
    if existing is None:
        return ClaimDecision(ClaimAction.CREATE, mine)
    if existing.namespace == claimant.namespace and existing.name == claimant.name:
        if existing.uid == claimant.uid and not existing.released:
            return ClaimDecision(ClaimAction.KEEP)
        return ClaimDecision(ClaimAction.TAKE_OVER, mine)
    if existing.released:
        if adopt_from is not None and adopt_from.strip() == existing.ref:
            return ClaimDecision(ClaimAction.ADOPT, mine)
        return ClaimDecision(
            ClaimAction.REFUSE,
            reason=NAME_RETAINED,
            message=(
                f"etcd component {claimant.name!r} holds data kept (retention Keep) from"
                f" DefenderComponent {existing.ref}; this resource writes nothing. To take that"
                f" data over, annotate it with {ADOPT_ANNOTATION}={existing.ref}; to start"
                " afresh, use another name"
            ),
        )
    return ClaimDecision(
        ClaimAction.REFUSE,
        reason=NAME_CLAIMED_ELSEWHERE,
        message=(
            f"etcd component {claimant.name!r} is owned by DefenderComponent {existing.ref};"
            " this resource writes nothing. Component names are unique across namespaces:"
            " rename this resource, or delete the owner first"
        ),
    )


def owner_lookup_needed(decision: ClaimDecision, existing: Claim | None) -> bool:
    """Whether to ask the API server if the recorded owner still exists: only when the claim
    would refuse a claimant because another namespace holds the name (the owner may be gone
    without a release: no finalizer for Keep)."""
    return (
        decision.reason == NAME_CLAIMED_ELSEWHERE and existing is not None and not existing.released
    )


def pending_claim(claimant: Claim) -> Claim:
    """The claim a visit that seeds first (no command annotation, a spec that parses and
    validates, a resource never seen seeded) writes in its seed's create-only transaction, one
    replicated write and one read fewer per new component: it lands only while the name holds
    no owner record, metadata or MASTER, so it is the CREATE `decide_claim` would make of an
    empty name. Anything else found there is decided by `decide_claim` on a read, as always."""
    decision = decide_claim(None, claimant, None)
    assert decision.record is not None  # a CREATE always writes
    return decision.record


class Release(StrEnum):
    PURGE = "Purge"  # delete the data and the claim
    KEEP = "Keep"  # keep the data, mark the claim released
    NOTHING = "Nothing"  # not the owner: touch nothing


def decide_release(existing: Claim | None, deleted: Claim, retention: str) -> Release:
    """What deleting `deleted` (with spec.retention `retention`) may do to the etcd name.

    Only the owner releases: a refused resource, deleted with retention Purge, must not purge
    the owner's data. A name without a claim (data from before claims, never reconciled since)
    is left alone: nothing shows that this resource seeded it."""
    if (
        existing is None
        or existing.released
        or (existing.namespace, existing.name) != (deleted.namespace, deleted.name)
    ):
        return Release.NOTHING
    return Release.PURGE if retention == RetentionPolicy.PURGE else Release.KEEP
