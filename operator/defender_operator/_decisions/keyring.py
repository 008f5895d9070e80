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
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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


def _covers(
    holder: Holder, referenced: frozenset[str], recorded: Mapping[str, str]
) -> tuple[bool, str]:
    """Whether `holder` may serve as the keyring, and if not, why (for the message)."""
    if holder.error is not None:
        return False, f"{holder.name} is unreadable ({holder.error})"
    # Once etcd records our key ids, a value sealed under an id never recorded is foreign (a
    # restore from another cluster, or planted by someone with etcd write access): it is that
    # component's UnknownKey refusal, not a reason to stop using the keyring for everyone.
    needed = referenced & set(recorded) if recorded else referenced
    lacking = sorted(needed - holder.opens)
    if lacking:
        return False, f"{holder.name} opens no value sealed with {', '.join(lacking)}"
    clashing = sorted(
        kid for kid, fp in holder.fingerprints.items() if kid in recorded and recorded[kid] != fp
    )
    if clashing:
        # Same id, other material: not our key, whatever its labels say.
        return False, f"{holder.name} holds other material under {', '.join(clashing)}"
    if not needed and recorded and not set(recorded) & set(holder.fingerprints):
        return False, f"{holder.name} holds none of the recorded keys"
    if not referenced and not recorded and not holder.trusted:
        # Nothing to prove it against: a Secret anyone could have planted is not taken.
        return False, f"{holder.name} cannot be proven against an empty store"
    return True, ""


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
        ok, why = _covers(source, referenced, recorded)
        if ok:
            return KeyringPlan(KeyringAction.USE_SOURCE, "SourceCurrent", "source keyring in use")
        # A present Secret was written by the operator or by a person; replacing it is for a
        # person to decide. Say which holder would do.
        usable = [c for c in candidates if _covers(c, referenced, recorded)[0]]
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
        return KeyringPlan(
            KeyringAction.REFUSE,
            "SourceLacksKeys",
            f"the source keyring cannot be used: {why}{hint}",
            missing=_missing(source, referenced, recorded),
        )
    proven = sorted(
        (c for c in candidates if _covers(c, referenced, recorded)[0]),
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
    return KeyringPlan(
        KeyringAction.REFUSE,
        "KeyringMissing",
        "the keyring Secret is missing and no copy opens the stored values; key(s) needed: "
        f"{_describe(missing)}. Restore it with `kubectl defender keyring import FILE`"
        " (docs/troubleshooting.md#keyringmissing)",
        missing=missing,
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
