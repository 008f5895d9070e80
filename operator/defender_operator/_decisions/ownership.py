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

The owner record is in etcd, so anyone with etcd write access can put back a saved authentic
record of an earlier owner (or delete the record): the MAC says "a key holder wrote this", not
"this is current". The anchor that write access cannot move is Kubernetes: once a resource's
claim is allowed, the operator writes `status.nameClaim {component, uid}` on it (the status
subresource, written only by the operator; a restored status carries another uid and does not
count). Before writing a claim, or before refusing a resource whose own status says it holds
the name, the operator looks up the live resources of that name whose status holds it (kopf's
index of DefenderComponents, filled by `holder_entry`, which keeps `anchored_holders`), and
`anchor_claim` lets that status overrule the record: the live holder keeps or re-takes the name
(its record is written again), every other claimant is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from defender_config.contract import ADOPT_ANNOTATION, RetentionPolicy

NAME_CLAIMED_ELSEWHERE = "NameClaimedElsewhere"
NAME_RETAINED = "NameRetained"
OWNER_RECORD_UNREADABLE = "OwnerRecordUnreadable"
OWNER_RECORD_RESTORED = "OwnerRecordRestored"
"""Alert and Event reason: the owner record did not name the resource whose status holds the
name (put back, forged with a key, or deleted in etcd), and was written again for it."""

NAME_CLAIM_FIELD = "nameClaim"
"""The status field that anchors a claim in Kubernetes: `{component, uid}`."""


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
    RECLAIM = "Reclaim"  # the claimant's status holds the name, the record disagrees: rewrite it
    RESTORE = "Restore"  # another live resource's status holds it: rewrite its record, refuse


@dataclass(frozen=True)
class ClaimDecision:
    action: ClaimAction
    record: Claim | None = None
    """What to store (None for KEEP and REFUSE)."""
    reason: str = ""
    message: str = ""
    restored_from: Claim | None = None
    """RECLAIM/RESTORE: what the record named instead (None: it was missing). For the alert."""
    record_unreadable: bool = False
    """RECLAIM over a record that did not verify (`decide_unreadable`). For the alert."""

    @property
    def allowed(self) -> bool:
        return self.action not in (ClaimAction.REFUSE, ClaimAction.RESTORE)


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


def claim_status(component: str, uid: str) -> dict[str, str]:
    """`status.nameClaim` of a resource whose claim of `component` was allowed."""
    return {"component": component, "uid": uid}


def holds_name(status: Mapping[str, Any] | None, component: str, uid: str) -> bool:
    """Whether a resource's status says it holds `component`. The uid must be the resource's
    own: a status restored onto a re-created object (a backup tool) names the old one."""
    held = (status or {}).get(NAME_CLAIM_FIELD)
    return (
        bool(uid)
        and isinstance(held, Mapping)
        and held.get("component") == component
        and held.get("uid") == uid
    )


@dataclass(frozen=True)
class Remembered:
    """What this operator process knows of one DefenderComponent, for the keyring copies."""

    namespace: str
    name: str
    uid: str
    """The uid its reconcile or monitor daemon last handled ("" before either)."""
    monitored: bool
    """Its monitor daemon runs in this process: none in a replica paused by peering."""
    refused: bool
    """Its last reconcile here refused it its name (or its status said so: `recall`)."""
    status: Mapping[str, Any] | None
    """Its status as this process last wrote it (None before its first reconcile here)."""


def copy_namespaces(components: Iterable[Remembered]) -> set[str]:
    """The namespaces the keyring is copied into by the periodic and rotation fan-out: those
    with a component this process manages whose status, as this process published it, holds
    its name. A refused resource needs no key, and its namespace gets no copy; what only the
    API server lists cannot tell one from the other (a restarted operator's first round, before
    any reconcile ran; a paused replica, which never reconciles), so such namespaces wait for
    their components' reconciles, which copy into their own namespace once the claim holds."""
    return {
        c.namespace
        for c in components
        if c.monitored and not c.refused and holds_name(c.status, c.name, c.uid)
    }


def anchored_holders(objects: Iterable[Mapping[str, Any]], component: str) -> list[Claim]:
    """The resources among `objects` (DefenderComponents as the API server returns them)
    whose status holds `component`. One being deleted holds nothing any more: a Purge
    finalizer deletes the record before the object goes, and a new claimant must not be
    refused for a name that is being given up."""
    found = []
    for obj in objects:
        meta = obj.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        if meta.get("deletionTimestamp") or not holds_name(obj.get("status"), component, uid):
            continue
        found.append(Claim(str(meta.get("namespace") or ""), str(meta.get("name") or ""), uid))
    return found


HolderIndex = Mapping[str, Iterable[Claim]]
"""kopf's index of DefenderComponents as claims read it: etcd name -> the resources whose status
holds it (`holder_entry`)."""


def holder_entry(obj: Mapping[str, Any]) -> dict[str, Claim]:
    """The index entry of one DefenderComponent: its etcd name (its resource name) -> itself,
    when its status holds that name (`anchored_holders`), else nothing. Only holders are filed,
    as bare claims: the index keeps no bodies, and a name nobody holds has no key at all."""
    name = str((obj.get("metadata") or {}).get("name") or "")
    held = anchored_holders([obj], name)
    # {} rather than None: kopf keeps an object's earlier entries when its index function
    # returns None, and a holder being deleted must stop holding.
    return {name: held[0]} if held else {}


def holders_lookup_needed(decision: ClaimDecision, claimant_holds: bool) -> bool:
    """Whether to look up who holds the name by status before acting on `decision`: before any
    claim is written for the claimant (etcd may have lost or replaced the holder's record),
    and before refusing a claimant whose own status says it holds the name. The usual visit
    of the owner (KEEP) and an ordinary refusal ask nothing."""
    if decision.record is not None:
        return True
    return not decision.allowed and claimant_holds


def anchor_claim(
    decision: ClaimDecision, existing: Claim | None, claimant: Claim, holders: Iterable[Claim]
) -> ClaimDecision:
    """`decision` (made on the owner record) checked against `holders`, the live resources
    whose status holds the name (`anchored_holders`), which write access to etcd cannot
    change. A record that disagrees with them was put back, forged with a key, or deleted."""
    holders = list(holders)
    if len({h.uid for h in holders}) > 1:
        # The operator writes one holder's status at a time: more than one means a status
        # written by someone with more than the operator's rights, which is no anchor. Nothing
        # is written; the record's owner keeps its name (KEEP), as without the status.
        if decision.action is ClaimAction.KEEP:
            return decision
        refs = ", ".join(sorted(h.ref for h in holders))
        return ClaimDecision(
            ClaimAction.REFUSE,
            reason=NAME_CLAIMED_ELSEWHERE,
            message=(
                f"etcd component {claimant.name!r}: the status of several DefenderComponents"
                f" ({refs}) says each holds it; this resource writes nothing until only one does"
            ),
        )
    others = [h for h in holders if h.uid != claimant.uid]
    if others:
        holder = others[0]
        if existing == holder:
            return decision  # the record agrees: an ordinary refusal
        return ClaimDecision(
            ClaimAction.RESTORE,
            holder,
            reason=NAME_CLAIMED_ELSEWHERE,
            message=(
                f"etcd component {claimant.name!r} is owned by DefenderComponent {holder.ref}"
                f" (its status holds the name); the owner record in etcd named"
                f" {describe_record(existing)} and was written again for the owner; this resource"
                " writes nothing"
            ),
            restored_from=existing,
        )
    mine = replace(claimant, released=False)
    if mine not in holders or existing == mine:
        return decision  # the status says nothing the record does not
    return ClaimDecision(
        ClaimAction.RECLAIM,
        mine,
        reason=OWNER_RECORD_RESTORED,
        message=(
            f"etcd component {claimant.name!r} is held by this resource (its status says so),"
            f" but the owner record in etcd named {describe_record(existing)}: written again"
            " for this resource"
        ),
        restored_from=existing,
    )


def decide_unreadable(
    claimant: Claim, claimant_holds: bool, holders: Sequence[Claim], why: str
) -> ClaimDecision:
    """The owner record does not verify (forged without the key, or damaged): `why` says so.
    Nobody may take the name on such a record, but the resource whose status holds it (and no
    other live resource's does: two such statuses anchor nothing) is its owner whatever etcd
    says, so it writes its record again rather than stay locked out until a person acts."""
    if claimant_holds and all(h.uid == claimant.uid for h in holders):
        return ClaimDecision(
            ClaimAction.RECLAIM, replace(claimant, released=False), record_unreadable=True
        )
    return ClaimDecision(ClaimAction.REFUSE, reason=OWNER_RECORD_UNREADABLE, message=why)


def describe_record(record: Claim | None) -> str:
    if record is None:
        return "nobody (it was missing)"
    released = ", released" if record.released else ""
    return f"{record.ref} (uid {record.uid}{released})"


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


def release_lookup_needed(existing: Claim | None, deleted: Claim, held: bool) -> bool:
    """Whether to ask the API server if the record's owner exists before `decide_release`:
    when the record (not released) names another object of the deleted resource's own
    namespace/name, a predecessor never released or a successor that took the name over
    before this deletion was handled (kopf handles each uid in its own worker); and when the
    deleted resource's status holds the name and the record names another resource (the
    record of a live resource is not overruled)."""
    if existing is None or existing.released:
        return False
    if (existing.namespace, existing.name) == (deleted.namespace, deleted.name):
        return existing.uid != deleted.uid
    return held


def decide_release(
    existing: Claim | None,
    deleted: Claim,
    retention: str,
    *,
    held: bool = False,
    owner_exists: bool = True,
) -> Release:
    """What deleting `deleted` (with spec.retention `retention`) may do to the etcd name.

    Only the owner releases: a refused resource, deleted with retention Purge, must not purge
    the owner's data. A name without a claim (data from before claims, never reconciled since)
    is left alone: nothing shows that this resource seeded it.

    A record naming another uid of the same namespace/name is a predecessor's (the deleted
    resource was re-created and never took the claim over) only while the API server no
    longer holds that uid (`owner_exists` False); a live one is a successor that took the name
    over before this deletion was handled, and its claim and data are not the deleted one's.
    A released record of another uid of the same name is left alone too: it may be a
    successor's kept data.

    `held`: the deleted resource's status holds the name (`holds_name`). Then a record that is
    missing, released by another namespace, or names a resource the API server no longer holds
    (`owner_exists` False: a purged owner's record put back) does not keep its retention from
    being applied. A record naming another live resource still wins: a status alone, written
    by someone with more than the operator's rights, must not purge another resource's data."""
    apply = Release.PURGE if retention == RetentionPolicy.PURGE else Release.KEEP
    if existing is None:
        return apply if held else Release.NOTHING
    if (existing.namespace, existing.name) == (deleted.namespace, deleted.name):
        if existing.uid == deleted.uid:
            # Already released by its own Keep: a second delete changes nothing, unless its
            # status holds the name (the record may have been put back in etcd).
            return apply if held or not existing.released else Release.NOTHING
        return apply if not existing.released and not owner_exists else Release.NOTHING
    if held and (existing.released or not owner_exists):
        return apply
    return Release.NOTHING
