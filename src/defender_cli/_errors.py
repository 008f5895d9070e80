"""Errors the plugin reports to a person. Anything else is a bug and shows a traceback, except
a RecursionError: data nested past Python's recursion limit, in an answer of the API server or a
file, is the data's fault, and `main` words it as one line (`TOO_DEEP`), exit 2.

CliError                 exit 2; the message says what is wrong and what to check
├── NeedsKeyringError    a command must decrypt and no keyring was given
├── ExportNotStampedError exit 3; `keyring export` wrote a complete file but could not stamp
│                        the Secret's last-export-time (RBAC, or the Secret was deleted)
└── SkippedError         exit 3; maintenance skipped on purpose (etcd unhealthy): retry later
"""

from __future__ import annotations

import sys


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""

    exit_code = 2


class NeedsKeyringError(CliError):
    """The command opens sealed values and was given no keyring."""

    def __init__(self, command: str) -> None:
        super().__init__(
            f"{command} decrypts configs: pass --keyring PATH (a mounted keyring Secret or"
            " keyring.json) or --keyring-secret [NAMESPACE/]NAME to read it from Kubernetes"
        )


class ExportNotStampedError(CliError):
    """`keyring export` wrote the file, complete and correct (the keyring the Secret held when
    it was read), but could not record the export on the Secret. Its own exit code, so a backup
    script can tell "kept, not recorded" (3) from "nothing written" (2)."""

    exit_code = 3


class SkippedError(CliError):
    """A maintenance step refused to run because etcd is not healthy enough; a CronJob sees
    exit 3 and retries at its next schedule."""

    exit_code = 3


#: What a RecursionError means here: someone else's data, nested thousands of levels deep (the
#: API server accepts some 10,000 levels in a custom resource, or in a Secret's managedFields).
TOO_DEEP = (
    "nested too deeply to decode (past Python's recursion limit): something wrote data nested"
    " thousands of levels deep into it"
)


def too_deep(what: str) -> CliError:
    """`what` (the API server's answer for an object, a file) could not be decoded: too deep."""
    return CliError(f"{what} is {TOO_DEEP}")


def api_server_unreachable(exc: Exception, timeout: float | None) -> str | None:
    """Why the Kubernetes client could not talk to the API server (refused, TLS, reset, no answer
    within --request-timeout), or None for any other exception. urllib3 is the client's
    transport; it is loaded only once a command has used Kubernetes, and only then can its error
    arrive here, so it is not imported for this."""
    transport = sys.modules.get("urllib3.exceptions")
    if transport is None or not isinstance(exc, transport.HTTPError):
        return None
    reason = getattr(exc, "reason", None) or exc
    # urllib3 makes a refused connection (NewConnectionError) a kind of connect timeout.
    timed_out = isinstance(reason, transport.TimeoutError) and not isinstance(
        reason, transport.NewConnectionError
    )
    if timed_out and timeout is not None:
        return f"no answer within {timeout:g}s, see --request-timeout"
    return f"{type(reason).__name__}: {reason}"
