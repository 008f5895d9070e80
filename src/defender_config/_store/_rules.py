"""The one table that maps gRPC status codes and pyetcd exceptions to our typed errors, and
what is retried."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import grpc
from pyetcd import exceptions as etcd_exc

_Kind = Literal["unavailable", "auth", "not_found", "compacted", "nospace", "error"]


@dataclass(frozen=True, slots=True)
class ErrorRule:
    """How one failure is handled: which typed error, whether to retry, the metrics reason."""

    kind: _Kind
    transient: bool
    reason: str
    hint: str


_UNAVAILABLE = ErrorRule("unavailable", True, "unavailable", "no member answered")
_TIMEOUT = ErrorRule("unavailable", True, "deadline_exceeded", "the call timed out")

_RULES: Final[dict[type[BaseException] | grpc.StatusCode, ErrorRule]] = {
    # pyetcd turns some gRPC codes into its own exceptions (cause kept in __context__).
    etcd_exc.ConnectionFailedError: _UNAVAILABLE,
    etcd_exc.ConnectionTimeoutError: _TIMEOUT,
    etcd_exc.NoServerAvailableError: _UNAVAILABLE,
    etcd_exc.WatchTimedOut: _TIMEOUT,
    etcd_exc.InternalServerError: ErrorRule("error", False, "internal", "etcd internal error"),
    etcd_exc.PreconditionFailedError: ErrorRule(
        "error", False, "failed_precondition", "etcd refused the request"
    ),
    etcd_exc.RevisionCompactedError: ErrorRule(
        "compacted", False, "compacted", "the requested revision was compacted"
    ),
    # Raw gRPC codes pyetcd lets through.
    grpc.StatusCode.UNAVAILABLE: _UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: _TIMEOUT,
    grpc.StatusCode.UNAUTHENTICATED: ErrorRule(
        "auth", False, "unauthenticated", "etcd did not accept the credentials"
    ),
    grpc.StatusCode.PERMISSION_DENIED: ErrorRule(
        "auth", False, "permission_denied", "the etcd user lacks permission"
    ),
    grpc.StatusCode.NOT_FOUND: ErrorRule("not_found", False, "not_found", "not found"),
    grpc.StatusCode.OUT_OF_RANGE: ErrorRule(
        "compacted", False, "compacted", "the requested revision was compacted"
    ),
    grpc.StatusCode.INVALID_ARGUMENT: ErrorRule(
        "error", False, "invalid_argument", "etcd rejected the request"
    ),
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorRule(
        "error", False, "resource_exhausted", "message too large or etcd overloaded"
    ),
    grpc.StatusCode.FAILED_PRECONDITION: ErrorRule(
        "error", False, "failed_precondition", "etcd refused the request"
    ),
    grpc.StatusCode.INTERNAL: ErrorRule("error", False, "internal", "etcd internal error"),
    grpc.StatusCode.CANCELLED: ErrorRule("error", False, "cancelled", "the call was cancelled"),
    grpc.StatusCode.UNKNOWN: ErrorRule("error", False, "unknown", "etcd returned an error"),
}


def _grpc_cause(exc: BaseException) -> grpc.RpcError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, grpc.RpcError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _details(exc: BaseException) -> str:
    rpc = _grpc_cause(exc)
    if rpc is not None:
        code = getattr(rpc, "code", None)
        details = getattr(rpc, "details", None)
        try:
            code_name = code().name if callable(code) else "?"
            text = details() if callable(details) else ""
        except Exception:  # a bare RpcError without status: fall back to its type
            return type(rpc).__name__
        return f"{code_name}: {text}" if text else code_name
    return str(exc) or type(exc).__name__


# Conditions etcd reports under a code that is otherwise not retried, told apart by the
# details text:
# - a proposal the leader dropped while handing leadership over (UNKNOWN "raft proposal
#   dropped"; a rolling restart of the etcd StatefulSet causes it) and its request throttle
#   (RESOURCE_EXHAUSTED "too many requests"): neither was applied, so a retry is safe;
# - a member that shuts down resets its open HTTP/2 streams, which grpc reports as CANCELLED
#   ("Stream removed", RST_STREAM), the same code as a cancel by this process. Only the reset
#   is the member going away, as ambiguous as UNAVAILABLE and retried like it.
_BUSY = ErrorRule(
    "unavailable",
    True,
    "leader_busy",
    "etcd dropped the request while its leader was handing over or throttling",
)
_RESET = ErrorRule("unavailable", True, "stream_reset", "the member reset the call")
# etcd with authentication on answers a request that carries no credentials at all with
# INVALID_ARGUMENT "user name is empty": an auth refusal, whatever the code says.
_NO_CREDENTIALS = ErrorRule(
    "auth", False, "unauthenticated", "etcd requires credentials and none were given"
)
# A write refused because the backend reached its quota: the NOSPACE alarm is on until a person
# (or `kubectl defender defrag --disarm-nospace`) frees space and disarms it; no retry helps.
_NO_SPACE = ErrorRule(
    "nospace", False, "no_space", "etcd's database reached its quota (NOSPACE alarm)"
)
_BY_DETAILS: Final = (
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ("database space exceeded",), _NO_SPACE),
    (grpc.StatusCode.UNKNOWN, ("raft proposal dropped",), _BUSY),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ("etcdserver: too many requests",), _BUSY),
    (grpc.StatusCode.CANCELLED, ("RST_STREAM", "Stream removed"), _RESET),
    (grpc.StatusCode.INVALID_ARGUMENT, ("user name is empty",), _NO_CREDENTIALS),
)


def _by_details(exc: BaseException) -> ErrorRule | None:
    code = _grpc_code(exc)
    for known, texts, rule in _BY_DETAILS:
        if code == known:
            details = _details(exc)
            if any(t in details for t in texts):
                return rule
    return None


def classify_error(exc: BaseException) -> ErrorRule | None:
    """Look up how to handle `exc`; None means "not an etcd failure" (a bug: re-raise as is)."""
    rule = _by_details(exc)
    if rule is not None:
        return rule
    if isinstance(exc, grpc.RpcError):
        code = getattr(exc, "code", None)
        try:
            status = code() if callable(code) else None
        except Exception:
            status = None
        if status is None:
            return _UNAVAILABLE  # a stream that broke before any status arrived
        return _RULES.get(status, ErrorRule("error", False, "unknown", "etcd returned an error"))
    for cls in type(exc).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    return None


def _grpc_code(exc: BaseException) -> grpc.StatusCode | None:
    rpc = _grpc_cause(exc)
    code = getattr(rpc, "code", None)
    try:
        return code() if callable(code) else None
    except Exception:
        return None


def _is_compacted(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, etcd_exc.RevisionCompactedError) or (
        cause is not None and _grpc_code(cause) == grpc.StatusCode.OUT_OF_RANGE
    )
