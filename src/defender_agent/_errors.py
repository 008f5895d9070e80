"""Errors raised by the sidecar agent.

The tree (one root, so a caller can catch everything the agent raises on purpose)::

    AgentError
    ├── AgentSettingsError        bad flags / environment at start-up
    ├── OutputDirError            at start: the output path leads out of its volume through a link
    ├── WriteError                the decoded config could not be written to the shared volume
    ├── FileDriftedError          the file no longer held the delivered config; it was put back
    ├── ConfigTooLargeError       the config's file would be over the library's cap on a value,
    │                             or the config is more than the agent's memory can parse
    └── ReloadError               the target process could not be told to reload
        ├── ProcessNotFoundError  no process (or no live pid in the pidfile) to signal
        ├── SignalDeliveryError   the kernel refused the signal
        └── HttpReloadError       the reload URL failed after every retry

Errors from the shared library (``defender_config.DefenderConfigError`` and its tree) are not
wrapped: the agent reports their ``.reason`` as they are. ``ConfigTooLargeError`` is also a
``DefenderConfigError``: the agent raises it from inside the library's read of ACTIVE
(``ConfigStore.before_parse``), and the library's watch hands only its own errors to the agent.
"""

from __future__ import annotations

from typing import ClassVar

from defender_config import DefenderConfigError

__all__ = [
    "AgentError",
    "AgentSettingsError",
    "ConfigTooLargeError",
    "FileDriftedError",
    "HttpReloadError",
    "OutputDirError",
    "ProcessNotFoundError",
    "ReloadError",
    "SignalDeliveryError",
    "WriteError",
]


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""

    reason: ClassVar[str] = "AgentError"


class AgentSettingsError(AgentError):
    """Flags or environment variables are missing, malformed or contradict each other."""

    reason = "AgentSettings"


class OutputDirError(AgentError):
    """At start: a directory of the output path is a symbolic link in a mounted volume (which
    another container of the pod may have written), or the path holds too many links. The agent
    does not start: followed, the link could take the config out of its volume, to another one
    or anywhere the agent may write."""

    reason = "OutputDirRefused"

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(
            f"refusing the output directory {path}: {detail}; give --output-path as the real "
            "path in the shared volume, with no link below the volume's mount point"
        )


class WriteError(AgentError):
    """Writing the config file failed; the previous file is left in place."""

    reason = "WriteFailed"

    def __init__(self, path: str, detail: str, *, hint: str | None = None) -> None:
        self.path = path
        self.detail = detail
        hint = hint or "check that the shared volume is mounted, writable by the agent and not full"
        super().__init__(f"could not write {path}: {detail}; {hint}")


class FileDriftedError(AgentError):
    """The written file no longer held the config the agent delivered (edited by hand or by the
    component's container, replaced or removed): the agent put it back and told the component
    to reload. Reported until a check finds the file intact once no drift was put back for a
    whole drift window (``_core.drift_quiet``)."""

    reason = "FileDrifted"

    def __init__(self, path: str, version: int | None, digest: str) -> None:
        self.path = path
        super().__init__(
            f"{path} no longer held config version {version} (digest {digest[:16]}): it was "
            "edited or replaced in the pod; the agent put it back and told the component to "
            "reload"
        )


class ConfigTooLargeError(AgentError, DefenderConfigError):
    """The config is over ``max_bytes``; the previous file is left in place. Not retried.

    Two caps: the config's file is at most the library's cap on a decoded value (the shared
    volume holds two files of that size: the file and the temporary file that replaces it),
    and the decoded config is at most what the agent's memory can parse, validate and render
    (``message`` then says so: :mod:`defender_agent._memory`)."""

    reason = "ConfigTooLarge"

    def __init__(self, size: int, max_bytes: int, message: str | None = None) -> None:
        self.size = size
        self.max_bytes = max_bytes
        super().__init__(
            message
            or f"the config's file would be {size} bytes, over the cap of {max_bytes} bytes "
            "(envelope.max_decompressed_bytes); the last good file is kept"
        )


class ReloadError(AgentError):
    """The target process could not be told to reload."""

    reason = "ReloadFailed"


class ProcessNotFoundError(ReloadError):
    """No process matches the configured name or pidfile."""

    reason = "ProcessNotFound"

    def __init__(self, what: str, detail: str) -> None:
        self.what = what
        self.detail = detail
        super().__init__(
            f"no process to reload for {what}: {detail}; check that the pod sets "
            "shareProcessNamespace: true and that the process name or pidfile is right"
        )


class SignalDeliveryError(ReloadError):
    """The kernel refused to deliver the signal (usually a permission problem)."""

    reason = "SignalFailed"

    def __init__(self, pid: int, signal_name: str, detail: str) -> None:
        self.pid = pid
        self.signal_name = signal_name
        self.detail = detail
        super().__init__(
            f"could not send {signal_name} to pid {pid}: {detail}; check that the agent runs "
            "as the same user as the target or has CAP_KILL"
        )


class HttpReloadError(ReloadError):
    """The reload URL did not answer with a 2xx status after every retry."""

    reason = "HttpReloadFailed"

    def __init__(self, url: str, attempts: int, detail: str) -> None:
        self.url = url
        self.attempts = attempts
        self.detail = detail
        super().__init__(
            f"reload call {url} failed after {attempts} attempt(s): {detail}; check that the "
            "component listens on that address and accepts the method"
        )
