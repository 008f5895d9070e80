"""Is the component well? The agent renews its instance's lease only while the answer is yes.

The sidecar's own heartbeat says nothing about the component beside it: a C++ process that hung,
was stopped or crash-loops leaves a healthy agent. Each check here looks at the component
itself and returns None when it is well, or one line saying what is wrong.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from defender_config import ErrorInfo

from ._errors import ProcessNotFoundError
from ._http import http_request, loopback_peer_problem, shown_url
from ._reload import target_pids

__all__ = [
    "UNHEALTHY",
    "ExecCheck",
    "FileCheck",
    "HealthCheck",
    "HealthGate",
    "HttpCheck",
    "ProcessCheck",
    "TcpCheck",
    "process_state",
]

# The last_error reason and alert kind while the component fails its check.
UNHEALTHY = "ComponentUnhealthy"

# /proc/<pid>/stat states of a process that does no work: stopped (SIGSTOP, or a tracer),
# zombie (exited, not reaped), dead.
_NOT_WORKING = {
    "T": "stopped",
    "t": "stopped by a tracer",
    "Z": "a zombie (it exited)",
    "X": "dead",
}


class HealthCheck(Protocol):
    def check(self) -> str | None:
        """None when the component is well, else what is wrong (one line)."""
        ...

    def describe(self) -> str:
        """What is checked, for logs and the status endpoint."""
        ...


def process_state(pid: int, proc_root: Path = Path("/proc")) -> str | None:
    """The state letter of `pid` from /proc/<pid>/stat (R, S, D, T, Z...), None if it is gone."""
    try:
        stat = (proc_root / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The name field is in parentheses and may itself hold spaces or ')'.
    after = stat[stat.rfind(")") + 2 :].split()
    return after[0] if after else None


@dataclass
class ProcessCheck:
    """The named process (or the pid in a pidfile) exists and is not stopped, a zombie or dead.
    Needs `shareProcessNamespace: true` on the pod."""

    process_name: str | None = None
    pidfile: Path | None = None
    proc_root: Path = field(default=Path("/proc"))

    def __post_init__(self) -> None:
        if (self.process_name is None) == (self.pidfile is None):
            raise ValueError("give exactly one of process_name or pidfile")

    def describe(self) -> str:
        if self.pidfile is not None:
            return f"process in pidfile {self.pidfile}"
        return f"process {self.process_name!r}"

    def check(self) -> str | None:
        try:
            pids = target_pids(self.process_name, self.pidfile, self.proc_root)
        except ProcessNotFoundError as exc:
            return f"{exc.what}: {exc.detail}"
        for pid in pids:
            state = process_state(pid, self.proc_root)
            if state is None:
                return f"{self.describe()} (pid {pid}) exited"
            if state in _NOT_WORKING:
                return f"{self.describe()} (pid {pid}) is {_NOT_WORKING[state]} (state {state})"
        return None


@dataclass
class HttpCheck:
    """A GET answered with 2xx or 3xx within the timeout: the component's own answer (no proxy,
    no redirect followed, one deadline for the whole exchange; see `_http`)."""

    url: str = field(repr=False)  # may hold a token: shown through shown_url only
    timeout_seconds: float = 2.0

    def describe(self) -> str:
        return f"GET {shown_url(self.url)}"

    def check(self) -> str | None:
        try:
            code = http_request(self.url, "GET", self.timeout_seconds).status
        except (OSError, ValueError) as exc:
            return f"{self.describe()} failed: {exc}"
        if code >= 400:
            return f"{self.describe()} answered HTTP {code}"
        return None


@dataclass
class TcpCheck:
    """A TCP connection to host:port is accepted within the timeout."""

    host: str
    port: int
    timeout_seconds: float = 2.0

    def describe(self) -> str:
        return f"TCP {self.host}:{self.port}"

    def check(self) -> str | None:
        try:
            with socket.create_connection(
                (self.host, self.port), timeout=self.timeout_seconds
            ) as sock:
                return loopback_peer_problem(sock, self.host)
        except OSError as exc:
            return f"TCP {self.host}:{self.port} refused or timed out: {exc.strerror or exc}"


@dataclass
class ExecCheck:
    """A command (run by the agent, in its own container) exits 0 within the timeout."""

    command: list[str]
    timeout_seconds: float = 2.0

    def describe(self) -> str:
        # The program only: its arguments may carry a token (`curl -H "Authorization: ..."`),
        # and this text reaches the heartbeat record in etcd, /status and the agent's log.
        program, args = self.command[0], len(self.command) - 1
        more = f" (+{args} argument{'s' if args != 1 else ''})" if args else ""
        return f"exec {shlex.quote(program)}{more}"

    def check(self) -> str | None:
        try:
            # stdout is not wanted, and neither is more of stderr than its last line: a check
            # such as `nft list ruleset` can print megabytes each interval, and whatever is
            # captured stays in the agent's memory (a pod limit kills the agent instead).
            # Its own process group: what it starts (a shell's `curl`, a wrapper's children)
            # is ended with it, rather than left running, one more each interval, holding
            # stderr open.
            proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            return f"{self.describe()} could not run: {exc.strerror or exc}"
        assert proc.stderr is not None
        tail = _Tail(proc.stderr)
        try:
            code = proc.wait(timeout=self.timeout_seconds)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            return f"{self.describe()} did not finish within {self.timeout_seconds:g}s"
        finally:
            # The check is over: nothing it started may outlive it. The leader is reaped, but
            # the kernel gives its id to no new process while a member of its group lives; with
            # none left the signal finds nobody (reuse needs every other pid taken first).
            _kill_group(proc.pid)
            # A child that escaped the group may hold stderr open: do not wait for it long.
            tail.join(1.0)
        if code != 0:
            last = tail.text().strip().splitlines()[-1:]
            said = f": {last[0][:200]}" if last else ""
            return f"{self.describe()} exited {code}{said}"
        return None


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class _Tail:
    """Reads a stream to its end in a thread, keeping only its last `limit` bytes."""

    def __init__(self, stream: IO[bytes], limit: int = 4096) -> None:
        self._stream = stream
        self._limit = limit
        self._kept = b""
        self._thread = threading.Thread(target=self._read, name="defender-exec-stderr", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with self._stream:
            while chunk := os.read(self._stream.fileno(), 65536):
                self._kept = (self._kept + chunk)[-self._limit :]

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def text(self) -> str:
        return self._kept.decode(errors="replace")


@dataclass
class FileCheck:
    """A file the component touches while it works is younger than `max_age_seconds`: the
    simplest contract for a C++ main loop (touch it once per loop). Set the age to at least two
    touch periods so one late touch is not a failure."""

    path: Path
    max_age_seconds: float

    def describe(self) -> str:
        return f"heartbeat file {self.path} (younger than {self.max_age_seconds:g}s)"

    def check(self) -> str | None:
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError as exc:
            return f"heartbeat file {self.path} cannot be read: {exc.strerror or exc}"
        age = time.time() - mtime
        if age > self.max_age_seconds:
            return (
                f"heartbeat file {self.path} was last touched {age:.1f}s ago"
                f" (more than {self.max_age_seconds:g}s)"
            )
        return None


class HealthGate:
    """Asked by the heartbeater before each renewal: runs the check, says when it starts and
    stops failing (once per episode, through `on_fail` / `on_recover`), and answers with the
    reason to hold renewals, or None.

    During `start_grace_seconds` after the agent started a failure is reported but renewals go
    on: the component container may still be starting."""

    def __init__(
        self,
        check: HealthCheck,
        *,
        start_grace_seconds: float,
        on_fail: Callable[[str], None],
        on_recover: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.check = check
        self.problem: str | None = None
        self.checked_at: float | None = None
        self._grace_until = clock() + start_grace_seconds
        self._on_fail = on_fail
        self._on_recover = on_recover
        self._clock = clock

    @property
    def holding(self) -> bool:
        return self.problem is not None and self._clock() >= self._grace_until

    def __call__(self) -> ErrorInfo | None:
        try:
            problem = self.check.check()
        except Exception as exc:  # a check that crashes says nothing good about the component
            problem = f"{self.check.describe()} crashed: {type(exc).__name__}: {exc}"
        self.checked_at = time.time()
        was, self.problem = self.problem, problem
        if problem is None:
            if was is not None:
                self._on_recover(was)
            return None
        if was is None:
            self._on_fail(problem)
        if self._clock() < self._grace_until:
            return None
        return ErrorInfo(reason=UNHEALTHY, detail=problem[:2000])
