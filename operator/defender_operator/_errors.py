"""Operator errors, and the ONE place library errors become kopf errors.

```
OperatorError
├── OperatorConfigurationError   bad DEFENDER_OPERATOR_* settings (fail at start-up)
├── KeySecretError               the keyring Secret cannot be read or written
├── KeyDropRefusedError          a copy would lose a key that stored values still use
├── OwnerRecordError             a component's owner record in etcd is not one of ours
├── KubeError                    another Kubernetes API call failed
└── AdmissionSetupError          the admission webhook's Secret, certificate or configuration
```
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import kopf

from defender_config import (
    ConfigFrozenError,
    ConfigValidationError,
    ConflictError,
    DefenderConfigError,
    EnvelopeError,
    KeyringError,
    MasterMissingError,
    RecordAuthError,
    RecordReplayError,
    StoreAuthError,
    StoreUnavailableError,
    UnknownKeyError,
    ValueTooLargeError,
)


class OperatorError(Exception):
    """Root of the operator's own errors."""


class OperatorConfigurationError(OperatorError):
    """Settings are invalid; the message names each bad variable."""


class KeySecretError(OperatorError):
    """The keyring Secret could not be read or written.

    Built from the HTTP status and reason only: an API error body may echo the object sent,
    and for a Secret that is key material.
    """

    def __init__(self, action: str, namespace: str, name: str, status: int | None, why: str):
        self.status = status
        super().__init__(
            f"cannot {action} Secret {namespace}/{name}: HTTP {status} {why}; check the"
            " operator's RBAC for secrets in that namespace"
        )


class KeyDropRefusedError(OperatorError):
    """A keyring copy was left alone: the keyring meant to replace it lacks key ids that stored
    values are still sealed with, and the copy may be their last holder."""

    def __init__(self, namespace: str, name: str, key_ids: list[str]) -> None:
        self.namespace = namespace
        self.key_ids = tuple(key_ids)
        super().__init__(
            f"left the keyring copy {namespace}/{name} as it is: the keyring meant to replace"
            f" it lacks key id(s) {', '.join(key_ids)} that stored values are still sealed"
            " with; see docs/troubleshooting.md#keyringmissing"
        )


class OwnerRecordError(OperatorError):
    """`<prefix>/control/<name>/owner` exists but cannot be read as an owner record: nobody
    may write the component until a person removes or repairs it."""


class KubeError(OperatorError):
    """A Kubernetes API call other than on Secrets failed."""


class AdmissionSetupError(OperatorError):
    """The admission webhook could not be set up: its Secret, certificate files or webhook
    configurations could not be read or written. Built from HTTP status and reason only (the
    Secret holds a private key and the stamp key)."""


# Seconds before kopf retries, per kind of failure: an unreachable store gets a longer pause so
# a reconcile storm does not hammer it while it recovers.
RETRY_STORE_UNAVAILABLE = 15.0
RETRY_CONFLICT = 1.0
RETRY_DEFAULT = 10.0
# While the keyring is unavailable a reconcile waits for a person; retried often enough that a
# restored keyring is acted on soon.
RETRY_KEYRING = 5.0


def is_permanent(exc: DefenderConfigError) -> bool:
    """A refusal that retrying cannot fix until a person changes something: the spec (too
    large, invalid), the freeze, credentials, keys the operator does not hold, or stored keys
    that contradict each other (MASTER gone beside the rest). Only outages and lost
    compare-and-swaps are transient."""
    if isinstance(exc, ConflictError):
        return not exc.retryable
    if isinstance(exc, RecordAuthError) and not isinstance(exc, RecordReplayError):
        # A control record the operator could neither verify nor rebuild from the sealed
        # history (`repair_metadata` ran first): foreign or forged, a person must act. A
        # replayed record is left to the next pass, which repairs it.
        return True
    return isinstance(
        exc,
        ValueTooLargeError
        | UnknownKeyError
        | ConfigValidationError
        | ConfigFrozenError
        | StoreAuthError
        | MasterMissingError,
    )


@contextlib.contextmanager
def kopf_errors() -> Iterator[None]:
    """Translate library and operator errors into kopf's retry semantics. A PermanentError's
    `__cause__` is the library's error (its `.reason` and message go to the condition and the
    Event, see `_reconcile`)."""
    try:
        yield
    except DefenderConfigError as exc:
        if is_permanent(exc):
            # The next spec change (or annotation) triggers a new attempt anyway.
            raise kopf.PermanentError(str(exc)) from exc
        if isinstance(exc, StoreUnavailableError):
            raise kopf.TemporaryError(str(exc), delay=RETRY_STORE_UNAVAILABLE) from exc
        if isinstance(exc, ConflictError):
            raise kopf.TemporaryError(str(exc), delay=RETRY_CONFLICT) from exc
        if isinstance(exc, EnvelopeError | KeyringError):
            # Stored data or keyring unreadable; retry slowly in case a rotation is completing.
            raise kopf.TemporaryError(str(exc), delay=60.0) from exc
        raise kopf.TemporaryError(str(exc), delay=RETRY_DEFAULT) from exc
    except (KeySecretError, KubeError, KeyDropRefusedError) as exc:
        raise kopf.TemporaryError(str(exc), delay=RETRY_STORE_UNAVAILABLE) from exc
