"""Operator errors, and the ONE place library errors become kopf errors.

```
OperatorError
├── OperatorConfigurationError   bad DEFENDER_OPERATOR_* settings (fail at start-up)
├── KeySecretError               the keyring Secret cannot be read or written
│   └── ForeignSecretError       a copy's name is taken by a Secret the operator does not manage
├── KeyDropRefusedError          a copy would lose a key that stored values still use
├── OwnerRecordError             a component's owner record in etcd is not one of ours
├── KubeError                    another Kubernetes API call failed
└── AdmissionSetupError          the admission webhook's Secret, certificate or configuration
```

Kubernetes calls reach these through `api_errors_only`: a request the API server never answered
fails with the same ApiException the modules already convert, not with urllib3's errors.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import kopf
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

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
        self.namespace = namespace
        self.name = name
        # No status: not a refused request (`ForeignSecretError`), so no HTTP code or RBAC hint.
        failure = why if status is None else _api_failure(status, why, "secrets in that namespace")
        super().__init__(f"cannot {action} Secret {namespace}/{name}: {failure}")


class ForeignSecretError(KeySecretError):
    """A Secret of the keyring copy's name exists in a component namespace without the
    operator's label: never overwritten (see `_decisions.keycopy`)."""

    def __init__(self, namespace: str, name: str) -> None:
        super().__init__(
            "update",
            namespace,
            name,
            None,
            "it exists but is not managed by the operator; rename or delete it, or move the"
            " DefenderComponent to another namespace",
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
    may write the component until a person removes or repairs it, except the resource whose
    status holds the name (`_decisions.ownership.decide_unreadable`). `revision`: the record's
    mod_revision, what a rewrite compares."""

    def __init__(self, message: str, *, revision: int = 0) -> None:
        super().__init__(message)
        self.revision = revision


class KubeError(OperatorError):
    """A Kubernetes API call other than on Secrets failed."""


class AdmissionSetupError(OperatorError):
    """The admission webhook could not be set up: its Secret, certificate files or webhook
    configurations could not be read or written. Built from HTTP status and reason only (the
    Secret holds a private key and the stamp key)."""


# The status of an ApiException for a request the API server never answered: what the
# kubernetes client itself uses for a failed TLS handshake.
UNANSWERED = 0

_Api = TypeVar("_Api")


class _ApiErrorsOnly:
    """A kubernetes API object whose calls fail with ApiException only.

    urllib3 raises its own errors when the API server cannot be reached, resets the connection
    or stops answering (a restart, a network partition). Callers convert ApiException into
    their typed errors; anything else would escape them, and end a background loop for good.
    """

    def __init__(self, api: object) -> None:
        self._api = api

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._api, name)
        if not callable(found):
            return found
        return _answered(found)


def _answered(call: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(call)
    def answered(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except urllib3.exceptions.HTTPError as exc:
            # Class names only: urllib3's text names URLs, and a broken chunk quotes the bytes
            # it read, which may be a Secret's.
            raise ApiException(status=UNANSWERED, reason=_unanswered(exc)) from None

    return answered


def _unanswered(exc: urllib3.exceptions.HTTPError) -> str:
    kind = type(exc).__name__
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        kind = f"{kind}: {type(exc.reason).__name__}"
    return f"no answer from the API server ({kind})"


def api_errors_only(api: _Api) -> _Api:
    """`api` (a kubernetes `CoreV1Api`, `CustomObjectsApi`, ...) with every failed call raised
    as ApiException: an unanswered request with status UNANSWERED."""
    if isinstance(api, _ApiErrorsOnly):
        return api
    return cast(_Api, _ApiErrorsOnly(api))


def api_failure(exc: ApiException, rbac: str) -> str:
    """A failed call for an error message: the HTTP status and reason, and which RBAC rules
    to check, or that the API server never answered. Never the body: it may echo the object
    sent, and for a Secret that is key material."""
    return _api_failure(exc.status, str(exc.reason), rbac)


def _api_failure(status: int | None, why: str, rbac: str) -> str:
    if status == UNANSWERED:
        return why
    return f"HTTP {status} {why}; check the operator's RBAC for {rbac}"


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
