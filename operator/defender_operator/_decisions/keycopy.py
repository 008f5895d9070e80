"""The namespace's keyring copy as KeyCurrent says it: why the operator cannot write or read it,
and what a person does about it.

A component's pods mount the keyring Secret of their own namespace, which the operator copies
there before anything else of a reconcile (`_reconcile.prepare`). When that copy cannot be
written, every retry fails the same way: the failure is shown on the resource (KeyCurrent False,
and Ready names it first) with one Warning Event, and retried, so fixing the cause heals the
component without an edit.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from defender_operator._decisions.conditions import (
    FALSE,
    KEY_CURRENT,
    KEYRING_COPY_BLOCKED,
    UNKNOWN,
    Cond,
)

KEYRING_COPY_FAILED = "KeyringCopyFailed"
COPY_UNREADABLE = "CopyUnreadable"
COPY_OUT_OF_SYNC = "CopyOutOfSync"
# KeyCurrent reasons the reconcile sets (a copy it could not write), cleared once it writes it.
BLOCKED_REASONS = (KEYRING_COPY_BLOCKED, KEYRING_COPY_FAILED)


class CopyBlock(enum.StrEnum):
    FOREIGN = "Foreign"
    """A Secret of the keyring's name exists that the operator does not manage: never
    overwritten (it may be someone's keyring, or anything else a person named so)."""
    FORBIDDEN = "Forbidden"
    """The API server refused the operator (401/403): its RBAC lacks secrets there."""
    KEY_DROP = "KeyDrop"
    """The copy holds key ids stored values still use that the source lacks (`may_replace_copy`)."""
    FAILED = "Failed"
    """Anything else (the API server failed or did not answer): transient, retried."""


def classify(status: int | None, *, foreign: bool = False, key_drop: bool = False) -> CopyBlock:
    """The kind of a failed copy from the error's HTTP status (None: not an HTTP failure)."""
    if foreign:
        return CopyBlock.FOREIGN
    if key_drop:
        return CopyBlock.KEY_DROP
    if status in (401, 403):
        return CopyBlock.FORBIDDEN
    return CopyBlock.FAILED


@dataclass(frozen=True)
class CopyFailure:
    kind: CopyBlock
    namespace: str
    secret: str
    detail: str
    """The error's own message (HTTP status and reason only: never a Secret's body)."""


def blocked_condition(failure: CopyFailure) -> Cond:
    """KeyCurrent for a copy that could not be written: False with what to do when a person
    must act, Unknown for a failure that retrying may fix by itself."""
    where = f"{failure.namespace}/{failure.secret}"
    if failure.kind is CopyBlock.FOREIGN:
        message = (
            f"Secret {where} exists but is not managed by the operator (it lacks the label"
            " app.kubernetes.io/managed-by of the operator's keyring copies), and this"
            " namespace's pods read their keyring from that name: the operator will not"
            " overwrite it. Rename or delete it (the operator then writes its copy within"
            " the retry interval), or create the DefenderComponent and its pods in another"
            " namespace (docs/troubleshooting.md#keyringcopyblocked)"
        )
    elif failure.kind is CopyBlock.FORBIDDEN:
        message = (
            f"the API server refused the operator the keyring copy {where} ({failure.detail}):"
            f" its ServiceAccount needs create on Secrets in {failure.namespace}, and get and"
            f" update on the Secret named {failure.secret}"
            " (docs/troubleshooting.md#keyringcopyblocked)"
        )
    elif failure.kind is CopyBlock.KEY_DROP:
        message = failure.detail
    else:
        return Cond(
            KEY_CURRENT,
            UNKNOWN,
            KEYRING_COPY_FAILED,
            f"the keyring copy {where} could not be written, retrying: {failure.detail}",
        )
    return Cond(
        KEY_CURRENT, FALSE, KEYRING_COPY_BLOCKED, f"{message}; the reconcile stops here, retrying"
    )


def announce(announced: str | None, now: Cond) -> bool:
    """Whether `now` deserves a Warning Event: a block a person must act on, not the one
    announced last (`announced`: its message; kopf retries every few seconds, and a restarted
    operator takes it from the status)."""
    return now.reason == KEYRING_COPY_BLOCKED and now.message != announced


def copy_condition(
    *,
    copy_digest: str | None,
    source_digest: str,
    unreadable: str | None,
    previous: Cond | None,
) -> Cond | None:
    """KeyCurrent as the copy alone decides it (None: the copy is current, the instances
    decide). A block the reconcile found stands until the copy is current: a monitor pass
    reading the foreign Secret must not call it "being updated", nor a copy it cannot read
    replace the reason a person must act on."""
    if (
        previous is not None
        and previous.reason in BLOCKED_REASONS
        and (unreadable is not None or copy_digest != source_digest)
    ):
        return previous
    if unreadable is not None:
        return Cond(
            KEY_CURRENT,
            UNKNOWN,
            COPY_UNREADABLE,
            f"cannot read the namespace's keyring copy: {unreadable}",
        )
    if copy_digest != source_digest:
        return Cond(
            KEY_CURRENT,
            FALSE,
            COPY_OUT_OF_SYNC,
            "the namespace's keyring Secret differs from the source; the operator is updating it",
        )
    return None
