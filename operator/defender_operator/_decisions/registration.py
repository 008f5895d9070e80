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


def anchored_registration(status: Mapping[str, object]) -> int | None:
    """status.registration: the registration this resource's data belongs to (None: nothing
    anchored yet, or a value no operator writes)."""
    raw = status.get(REGISTRATION_FIELD)
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
        return raw
    return None


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


def registration_fields(action: RegistrationAction, stored: int | None) -> dict[str, int]:
    """The status fields to publish: the anchor, once there is one to write."""
    if action is RegistrationAction.ANCHOR and stored is not None:
        return {REGISTRATION_FIELD: stored}
    return {}


def seeded_registration(stored: int | None) -> dict[str, int]:
    """The status fields after this operator's own seed wrote the record: its registration
    is the current one, whatever was anchored before (`decide_registration(seeded=True)`)."""
    return registration_fields(decide_registration(None, stored, seeded=True), stored)


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
