"""Which registration of a component name is the current one: anchored in the
DefenderComponent's status (`status.registration`), where etcd write access cannot reach.

A component purged (retention Purge) and registered again under the same name is a new
registration: the seed stamps a number above the clock into its signed metadata and into the
header of every encrypted value (`ConfigMetadata.registration`). Values and records of the
earlier registration stay authentic under the same paths, so only an anchor outside etcd tells
them apart once they are put back: the operator writes the registration it saw seeded (or, for
data from before registrations, the one its next commit stamps) into the status, and from then
on refuses anything else as a repair's source (`ConfigStore.repair_metadata(registration=)`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from enum import StrEnum

REGISTRATION_FIELD = "registration"
# The etcd cluster id (hex) the registration was anchored on: what tells a restored snapshot
# (a new cluster, which only etcd members can make) from a replay by etcd write access.
REGISTRATION_CLUSTER_FIELD = "registrationCluster"
# The Warning Event of a re-seed over a restored snapshot of an older registration.
RESEEDED_AFTER_RESTORE = "ReseededAfterRestore"


def anchored_registration(status: Mapping[str, object]) -> int | None:
    """status.registration: the registration this resource's data belongs to (None: nothing
    anchored yet, or a value no operator writes)."""
    raw = status.get(REGISTRATION_FIELD)
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
        return raw
    return None


def anchored_cluster(status: Mapping[str, object]) -> int | None:
    """status.registrationCluster: the etcd cluster the anchor was last taken on (None: not
    recorded, by an operator from before the field, or a value no operator writes)."""
    raw = status.get(REGISTRATION_CLUSTER_FIELD)
    if not isinstance(raw, str) or not 1 <= len(raw) <= 16:
        return None
    try:
        cluster = int(raw, 16)
    except ValueError:
        return None
    return cluster or None


def cluster_fields(cluster: int | None) -> dict[str, str]:
    """The status field recording the cluster an anchor is taken on (none while unknown)."""
    return {REGISTRATION_CLUSTER_FIELD: f"{cluster:x}"} if cluster else {}


class RegistrationAction(StrEnum):
    KEEP = "Keep"  # the record is of the anchored registration
    ANCHOR = "Anchor"  # nothing anchored yet: anchor the record's registration
    LEGACY = "Legacy"  # neither has one: data from before registrations, read as before
    REPLAYED = "Replayed"  # the record is of another registration than the anchored one


def decide_registration(
    anchored: int | None, stored: int | None, *, seeded: bool = False
) -> RegistrationAction:
    """What the registration of the verified metadata record in etcd (`stored`, after the
    repair: None for a record from before registrations) means next to the anchor.

    Nothing anchored: the record's registration is anchored (trust on first sight: the seed's
    own, or a Retain'd name adopted as it is), and a record without one stays readable until a
    commit stamps one. Anchored: any other registration, none included, is a replay the repair
    could not undo (nothing of the anchored registration is left to rebuild from): refused,
    never anchored over, so a saved registration put back never becomes the current one.

    `seeded`: this operator's own seed wrote the record just now (the name held nothing: a
    new resource, or etcd lost the data): its registration is anchored whatever was before,
    so an accident that empties etcd does not lock the resource out of its own data."""
    if seeded and stored is not None:
        return RegistrationAction.ANCHOR
    if anchored is None:
        return RegistrationAction.LEGACY if stored is None else RegistrationAction.ANCHOR
    if stored == anchored:
        return RegistrationAction.KEEP
    return RegistrationAction.REPLAYED


def registration_fields(
    action: RegistrationAction, stored: int | None, cluster: int | None = None
) -> dict[str, int | str]:
    """The status fields to publish: the anchor, once there is one to write, and the etcd
    cluster it holds on (`cluster`, the store's current id) whenever etcd holds the anchored
    registration: a restore of a snapshot of this registration moves it to the new cluster."""
    if stored is None or action not in (RegistrationAction.ANCHOR, RegistrationAction.KEEP):
        return {}
    fields: dict[str, int | str] = dict(cluster_fields(cluster))
    if action is RegistrationAction.ANCHOR:
        fields[REGISTRATION_FIELD] = stored
    return fields


def seeded_registration(stored: int | None, cluster: int | None = None) -> dict[str, int | str]:
    """The status fields after this operator's own seed wrote the record: its registration
    is the current one, whatever was anchored before (`decide_registration(seeded=True)`)."""
    return registration_fields(decide_registration(None, stored, seeded=True), stored, cluster)


class ReplayAction(StrEnum):
    REFUSE = "Refuse"  # a replay (or nothing tells otherwise): refused, alerted, retried
    RESEED = "Reseed"  # a restored snapshot of an earlier lifetime: seeded again from spec


def decide_replayed(
    anchored: int | None,
    stored: int | None,
    *,
    anchored_on: int | None,
    cluster: int | None,
) -> ReplayAction:
    """What to do about a record in etcd of another registration (`stored`, None: from before
    registrations) than the anchored one, that the declare's repair could not rebuild from
    the anchored registration's own values.

    RESEED only for an OLDER registration found on ANOTHER etcd cluster than the one the
    anchor was last taken on (`anchored_on`, status.registrationCluster; `cluster`, the
    store's current id): etcd was restored from a snapshot taken before the name was purged
    and registered again. Only etcd members make a new cluster id, so etcd write access alone
    never gets here; and a re-seed writes what the resource's spec says as a registration
    above both, which is what deleting the name's keys (in reach of etcd write access) leads
    to anyway: nothing of the older registration becomes current.

    REFUSE otherwise, as before: the same cluster (an older registration put back by etcd
    write access), a cluster not recorded (a status written before the field) or not known
    yet, or a NEWER registration than the anchored one (no restore makes one)."""
    if anchored is None or anchored_on is None or cluster is None or cluster == anchored_on:
        return ReplayAction.REFUSE
    if stored is not None and stored >= anchored:
        return ReplayAction.REFUSE
    return ReplayAction.RESEED


def decide_refused_record(
    component: str,
    path: str | None,
    anchored: int | None,
    stored: int | None,
    *,
    anchored_on: int | None,
    cluster: int | None,
) -> ReplayAction:
    """What to do about a refusal (`RegistrationReplayError`) of `path`, a value of registration
    `stored`, met by a reconcile's declare or by a monitor pass's read alike: one decision, so
    an operator that ran through a restore re-seeds at its next pass as a reconcile would.

    Only a refusal of the component's metadata record can be an older lifetime restored
    (`decide_replayed`). A value of another registration beside a record of the anchored one
    (a MASTER or history entry put back) is no lifetime: refused, as before."""
    if not (path or "").endswith(f"/{component}/metadata"):
        return ReplayAction.REFUSE
    return decide_replayed(anchored, stored, anchored_on=anchored_on, cluster=cluster)


def registrations_to_publish(
    on_file: Mapping[str, int], known: Mapping[str, int], removed: Collection[str]
) -> dict[str, int]:
    """What a namespace's `registrations.json` (in its keyring Secret) should hold: what it
    holds, less the components deleted since (`removed`), with the registration the operator
    anchors for each component it knows (`known`: from `status.registration`).

    An entry of a component the operator has not visited yet (just restarted) is kept, not
    dropped: readers only ever hold a registration higher than the one they hold, so an entry
    left behind never makes one refuse the current registration, while a missing one leaves a
    reader started after a replay with nothing to refuse it by."""
    desired = {name: reg for name, reg in on_file.items() if name not in removed}
    desired.update(known)
    return desired
