"""Errors the plugin reports to a person. Anything else is a bug and shows a traceback.

CliError                 exit 2; the message says what is wrong and what to check
├── NeedsKeyringError    a command must decrypt and no keyring was given
└── SkippedError         exit 3; maintenance skipped on purpose (etcd unhealthy): retry later
"""

from __future__ import annotations


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


class SkippedError(CliError):
    """A maintenance step refused to run because etcd is not healthy enough; a CronJob sees
    exit 3 and retries at its next schedule."""

    exit_code = 3
