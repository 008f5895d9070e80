"""Which keyring the operator may use, and when it may replace a copy: never one that loses a key
that stored values still need.

The source Secret can vanish (a careless `kubectl delete`, a reinstalled release namespace)
while the only other holders of the key are the copies in component namespaces and, while it
runs, the operator's memory. Minting a new key then would leave every stored value unreadable,
so a new keyring is minted only for a store that is truly empty: no sealed value and no key id
recorded in etcd.

A holder (the source, a copy, memory) is trusted for the stored values only by what it opened:
the caller tries one sealed value per key id with it. Labels and key ids can be forged by anyone
who may create a Secret in a component namespace; a value sealed under our key cannot, so a
planted keyring never replaces ours.

The key record in etcd (`<prefix>/keyring/record`, ids and fingerprints) is advisory: anyone with
etcd write access can change it. Where values are stored, what a holder opens decides; the record
only tells our key ids from foreign ones, and only where it names an id in use. It can therefore
not veto a source that opens every stored value: a record that disagrees with it is reported
(`KeyringPlan.record_mismatch`) and rewritten. On a store with no sealed value the record is the
only evidence that keys existed (an etcd snapshot may still need them), so there it keeps a
holder that lacks them from being taken and keeps a keyring from being minted, until a person
imports the keys or deletes the record.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from defender_operator._decisions.conditions import FALSE, KEY_UNAVAILABLE, TRUE, UNKNOWN, Cond


class KeyringAction(enum.StrEnum):
    USE_SOURCE = "UseSource"
    """The source Secret opens every stored value: use it."""
    RESTORE = "Restore"
    """The source is gone; write it back from `holder` (a copy or memory)."""
    GENERATE = "Generate"
    """First install: nothing is stored and no key was ever recorded; mint a keyring."""
    REFUSE = "Refuse"
    """No keyring can open what is stored: write nothing and wait for a person."""


@dataclass(frozen=True)
class Holder:
    """One place that holds (or should hold) the keyring.

    `fingerprints` is key id → fingerprint of every key it holds (any state); empty when it
    could not be parsed (`error` says why). `opens` is the set of referenced key ids for which
    it actually opened a sealed value."""

    name: str
    fingerprints: Mapping[str, str] = field(default_factory=dict)
    opens: frozenset[str] = frozenset()
    error: str | None = None
    trusted: bool = False
    """Verified or written by this operator process (its memory): the only holder that counts
    on a store with nothing to prove a keyring against."""


@dataclass(frozen=True)
class KeyringPlan:
    action: KeyringAction
    reason: str
    message: str
    holder: str | None = None
    """RESTORE: the holder to copy from."""
    missing: Mapping[str, str | None] = field(default_factory=dict)
    """REFUSE: key id → recorded fingerprint (None when never recorded) that no holder opens."""
    record_mismatch: str | None = None
    """USE_SOURCE / RESTORE: how the key record in etcd disagrees with the keyring taken, which
    opens every stored value (the record is then rewritten; a person should ask who changed
    it). None when the record agrees, lags a rotation, or was never written."""


def _clashing(holder: Holder, recorded: Mapping[str, str]) -> list[str]:
    """Ids the holder holds with other material than the record names, among those it did not
    prove by opening a value (an opened value beats the record)."""
    return sorted(
        kid
        for kid, fp in holder.fingerprints.items()
        if kid in recorded and recorded[kid] != fp and kid not in holder.opens
    )


def _ids(ids: Iterable[str]) -> str:
    """At most three ids, each cut short: a record's ids are whatever was written to etcd."""
    listed = sorted(ids)
    shown = ", ".join(kid if len(kid) <= 40 else kid[:40] + "..." for kid in listed[:3])
    return shown + (f" and {len(listed) - 3} more" if len(listed) > 3 else "")


def _covers(
    holder: Holder, referenced: frozenset[str], recorded: Mapping[str, str], *, copy: bool
) -> tuple[bool, str]:
    """Whether `holder` may serve as the keyring, and if not, why (for the message). `copy`:
    a Secret in a component namespace, where anyone who may create Secrets can plant one."""
    if holder.error is not None:
        return False, f"{holder.name} is unreadable ({holder.error})"
    if referenced:
        # A value sealed under an id the record never named is foreign (a restore from another
        # cluster, or planted with etcd write access): that component's UnknownKey refusal, not
        # a reason to stop using the keyring for everyone. But a record naming none of the ids
        # in use (unreadable, stale, forged) tells ours from nothing: every id in use counts, as
        # with no record, and the holder stands or falls by what it opens.
        needed = (referenced & set(recorded)) or referenced
        lacking = sorted(needed - holder.opens)
        if lacking:
            return False, f"{holder.name} opens no value sealed with {', '.join(lacking)}"
        clashing = _clashing(holder, recorded)
        if clashing and copy:
            # A planted copy with our key plus other material under a recorded id: not taken
            # while another holder or an import can do. The source and the operator's memory
            # are not vetoed by the record: they opened every value; the record is reported.
            return False, f"{holder.name} holds other material under {', '.join(clashing)}"
        return True, ""
    # No sealed value: nothing to open, the record is the only evidence.
    if recorded:
        clashing = _clashing(holder, recorded)
        if clashing:
            # Same id, other material: not our key, whatever its labels say.
            return False, f"{holder.name} holds other material under {', '.join(clashing)}"
        if not set(recorded) & set(holder.fingerprints):
            return False, (
                f"{holder.name} holds none of the key ids the key record in etcd names"
                f" ({_ids(recorded)}) and no stored value proves it"
            )
        return True, ""
    if not holder.trusted:
        # Nothing to prove it against: a Secret anyone could have planted is not taken.
        return False, f"{holder.name} cannot be proven against an empty store"
    return True, ""


def _record_mismatch(
    holder: Holder, referenced: frozenset[str], recorded: Mapping[str, str]
) -> str | None:
    """How the record disagrees with a holder that opens every stored value; None when it
    agrees or merely lags (a rotation stage between the Secret and the record write)."""
    if not referenced or not recorded:
        return None  # an empty store only takes a holder that agrees; no record: written now
    if not referenced & set(recorded):
        return (
            f"the key record in etcd names none of the key ids stored values use (it names"
            f" {_ids(recorded)}); {holder.name} opens every stored value"
        )
    clashing = sorted(
        kid for kid, fp in holder.fingerprints.items() if kid in recorded and recorded[kid] != fp
    )
    if clashing:
        return (
            f"the key record in etcd gives other fingerprints for {', '.join(clashing)} than"
            f" {holder.name}, which opens every stored value"
        )
    return None


def _rank(holder: Holder, recorded: Mapping[str, str]) -> tuple[bool, int, int, str]:
    # Prefer the operator's own keyring (it is what it last wrote), then the holder closest to
    # the last recorded keyring, then the one with most keys (a copy that missed the end of a
    # rotation holds fewer), then a stable order.
    known = sum(1 for kid in holder.fingerprints if kid in recorded)
    return (not holder.trusted, -known, -len(holder.fingerprints), holder.name)


def _describe(missing: Mapping[str, str | None]) -> str:
    return ", ".join(
        f"{kid} (fingerprint {fp})" if fp else f"{kid} (fingerprint not recorded)"
        for kid, fp in sorted(missing.items())
    )


def decide_keyring(
    *,
    source: Holder | None,
    candidates: Sequence[Holder],
    referenced: frozenset[str],
    recorded: Mapping[str, str],
) -> KeyringPlan:
    """What to do about the source keyring.

    `source` is the source Secret (None when absent), `candidates` the copies and the operator's
    memory, `referenced` every key id found in a sealed value's header, `recorded` the key ids
    and fingerprints etcd records for the keyring (empty when never recorded).
    """
    if source is not None:
        ok, why = _covers(source, referenced, recorded, copy=False)
        if ok:
            return KeyringPlan(
                KeyringAction.USE_SOURCE,
                "SourceCurrent",
                "source keyring in use",
                record_mismatch=_record_mismatch(source, referenced, recorded),
            )
        # A present Secret was written by the operator or by a person; replacing it is for a
        # person to decide. Say which holder would do.
        usable = [c for c in candidates if _covers(c, referenced, recorded, copy=not c.trusted)[0]]
        copies = [c.name for c in usable if not c.trusted]
        hint = f"; {', '.join(copies)} opens everything: import it" if copies else ""
        if any(c.trusted for c in usable):
            # Memory cannot be imported; deleting the Secret makes the next round restore it
            # from memory, which only this running process holds.
            hint += (
                "; the operator's memory opens everything: delete the Secret and the operator"
                " writes it back from memory (do it before the operator restarts)"
            )
        hint = hint or "; import a keyring export that holds them"
        if not referenced and recorded and not usable and source.error is None:
            # Refused only on the record's word: it may be the record that is wrong.
            hint += _RECORD_HINT
        return KeyringPlan(
            KeyringAction.REFUSE,
            "SourceLacksKeys",
            f"the source keyring cannot be used: {why}{hint}",
            missing=_missing(source, referenced, recorded),
        )
    proven = sorted(
        (c for c in candidates if _covers(c, referenced, recorded, copy=not c.trusted)[0]),
        key=lambda c: _rank(c, recorded),
    )
    if proven:
        best = proven[0]
        return KeyringPlan(
            KeyringAction.RESTORE,
            "KeyringRestored",
            f"the source keyring Secret was missing; restored from {best.name}, which opens"
            f" every stored value ({len(referenced)} key id(s) in use)",
            holder=best.name,
            record_mismatch=_record_mismatch(best, referenced, recorded),
        )
    if not referenced and not recorded:
        return KeyringPlan(
            KeyringAction.GENERATE,
            "KeyringGenerated",
            "the store holds no sealed value and records no key: first install, new keyring",
        )
    opened: set[str] = set()
    for c in candidates:
        opened |= c.opens
    missing = _missing(Holder("any", opens=frozenset(opened)), referenced, recorded)
    if not referenced:
        # Only the record says keys existed. It may be forged, but minting over keys an etcd
        # snapshot may still need is what must never happen: a person decides.
        return KeyringPlan(
            KeyringAction.REFUSE,
            "KeyringMissing",
            "the keyring Secret is missing, the store holds no sealed value and no copy holds"
            f" the key(s) the key record in etcd names: {_describe(missing)}. Restore them"
            f" with `kubectl defender keyring import FILE`{_RECORD_HINT}",
            missing=missing,
        )
    return KeyringPlan(
        KeyringAction.REFUSE,
        "KeyringMissing",
        "the keyring Secret is missing and no copy opens the stored values; key(s) needed: "
        f"{_describe(missing)}. Restore it with `kubectl defender keyring import FILE`"
        " (docs/troubleshooting.md#keyringmissing)",
        missing=missing,
    )


_RECORD_HINT = (
    "; if the store is meant to be empty and the record is stale or forged, delete"
    " <prefix>/keyring/record (docs/troubleshooting.md#a-key-record-with-no-stored-value)"
)


def _missing(
    holder: Holder, referenced: frozenset[str], recorded: Mapping[str, str]
) -> dict[str, str | None]:
    if referenced:
        return {kid: recorded.get(kid) for kid in sorted(referenced - holder.opens)} or {
            kid: recorded.get(kid) for kid in sorted(referenced)
        }
    return {kid: fp for kid, fp in sorted(recorded.items())}


@dataclass(frozen=True)
class CopyVerdict:
    replace: bool
    dropped: frozenset[str] = frozenset()
    """Key ids the replacement would drop although stored values still use them."""


def may_replace_copy(
    held: frozenset[str] | None, new: frozenset[str], referenced: frozenset[str] | None
) -> CopyVerdict:
    """Whether a copy holding key ids `held` (None: unreadable, it holds nothing usable) may be
    replaced by a keyring holding `new`. `referenced` (None: not looked up) are the key ids the
    stored values use; it is only needed when the replacement drops a key."""
    if held is None:
        return CopyVerdict(True)
    dropped = held - new
    if not dropped:
        return CopyVerdict(True)
    if referenced is None:
        raise ValueError("the replacement drops keys: pass the key ids stored values use")
    still_used = dropped & referenced
    return CopyVerdict(not still_used, frozenset(still_used))


def describe_missing(missing: Mapping[str, str | None]) -> str:
    """Key ids and fingerprints as one line, for Events and conditions (never material)."""
    return _describe(missing)


def export_lacks(
    keys: Mapping[str, datetime], exported: datetime | None, exported_keys: frozenset[str] | None
) -> tuple[str, ...]:
    """The key ids (of `keys`: id -> created) that the last keyring export does not hold, in
    id order: a rotation adds a key, and an export taken before it cannot open what is sealed
    with it once the cluster and its Secrets are lost. `exported_keys` is the export's own list;
    an export stamped without it (by hand, or by an older plugin) is judged by time: a key
    created after the export is not in it. No export at all: empty (NoKeyringExport says so)."""
    if exported is None:
        return ()
    if exported_keys is not None:
        return tuple(sorted(k for k in keys if k not in exported_keys))
    return tuple(sorted(k for k, created in keys.items() if created > exported))


def keyring_condition(ready: bool, refused: KeyringPlan | None) -> Cond:
    """The KeyUnavailable condition every component shows: True while the operator refuses
    every keyring it found, Unknown until it has checked one against the store."""
    if refused is not None:
        return Cond(KEY_UNAVAILABLE, TRUE, refused.reason, refused.message)
    if ready:
        return Cond(
            KEY_UNAVAILABLE, FALSE, "KeyringVerified", "the keyring opens every stored value"
        )
    return Cond(KEY_UNAVAILABLE, UNKNOWN, "Pending", "keyring not yet checked against the store")
