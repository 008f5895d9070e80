"""Telling the component to reload its config: a signal to a process in the pod, or an HTTP call.

With ``shareProcessNamespace: true`` every container of the pod sees the others' processes under
``/proc``, so the agent finds the component by name and signals it, the way ``nginx -s reload``
or ``kill -HUP`` would be used by hand.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from defender_config import read_regular_file

from ._errors import HttpReloadError, ProcessNotFoundError, SignalDeliveryError
from ._http import http_request, shown_url

__all__ = [
    "HttpReloader",
    "NoReload",
    "ProcessInfo",
    "Reloader",
    "SignalReloader",
    "find_processes",
    "parse_signal",
    "pidfile_pid_problem",
    "process_started_at",
    "process_uids",
    "read_pidfile",
    "target_pids",
]

log = logging.getLogger(__name__)

# The kernel keeps at most 15 characters of a process name in /proc/<pid>/comm.
_COMM_LEN = 15
# A pidfile holds one number; anything longer is not a pidfile (and is not read further).
_PIDFILE_MAX_BYTES = 64
# /proc/stat's boot time is whole seconds and the wall clock may be stepped: a process must
# start this much later than its pidfile was written before the pid is taken as reused.
_PID_REUSE_SLACK_SECONDS = 2.0


class Reloader(Protocol):
    """Something that makes the component pick up the file the agent just wrote."""

    def reload(self) -> str:
        """Trigger a reload; return a short description of what was done (for logs)."""
        ...


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    comm: str
    argv0: str


def parse_signal(name: str) -> signal.Signals:
    """Turn ``HUP``, ``SIGHUP`` or ``1`` into a signal; ``ValueError`` names the bad input."""
    text = name.strip().upper()
    if text.isdigit():
        try:
            return signal.Signals(int(text))
        except ValueError:
            raise ValueError(f"unknown signal number {name!r}") from None
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return signal.Signals[text]
    except KeyError:
        raise ValueError(f"unknown signal name {name!r} (use e.g. SIGHUP, SIGUSR1)") from None


def _read_process(proc: Path) -> ProcessInfo | None:
    try:
        pid = int(proc.name)
        comm = (proc / "comm").read_text().rstrip("\n")
        stat = (proc / "stat").read_text()
        cmdline = (proc / "cmdline").read_bytes()
    except (OSError, ValueError):
        # The process exited while we looked, or is not ours to read: skip it.
        return None
    # The comm field in stat is in parentheses and may itself contain spaces or ')'.
    after = stat[stat.rfind(")") + 2 :].split()
    try:
        ppid = int(after[1])
    except (IndexError, ValueError):
        return None
    argv0 = cmdline.split(b"\0", 1)[0].decode(errors="replace")
    return ProcessInfo(pid=pid, ppid=ppid, comm=comm, argv0=argv0)


def _matches(info: ProcessInfo, name: str) -> bool:
    if info.argv0 and os.path.basename(info.argv0) == name:
        return True
    return info.comm == name[:_COMM_LEN]


def find_processes(name: str, proc_root: Path = Path("/proc")) -> list[ProcessInfo]:
    """Processes whose name (``comm`` or the base name of ``argv[0]``) is ``name``.

    The agent itself is never returned. When a matching process has a matching parent (nginx
    master and workers, a forking server) only the topmost ones are returned: the parent is the
    one that handles reload signals.
    """
    own = os.getpid()
    found: dict[int, ProcessInfo] = {}
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        info = _read_process(entry)
        if info is None or info.pid == own or not _matches(info, name):
            continue
        found[info.pid] = info
    return sorted((p for p in found.values() if p.ppid not in found), key=lambda p: p.pid)


def pidfile_pid_problem(
    pid: int,
    *,
    own_pid: int,
    started_at: float | None,
    written_at: float,
    pidfile_uid: int | None = None,
    process_uids: tuple[int, ...] | None = None,
) -> str | None:
    """Why the ``pid`` read from a pidfile must not be signalled or judged, or None.

    The pidfile lives on the volume the component writes: a stale file, a pid the kernel has
    since given to another process, or the agent's own pid (a SIGHUP would end the agent; a
    health check would report the agent, not the component) must not be taken as the component.
    ``started_at`` is the process's start (wall clock, None if unknown) and ``written_at`` the
    pidfile's modification time: a process cannot write its pid before it exists.

    Nor may the pidfile name a process its writer could not signal itself: ``pidfile_uid`` owns
    the pidfile and ``process_uids`` are the process's real and saved uids (None if unknown).
    An agent with CAP_KILL (`signalAccess: capKill`) could otherwise be made to signal, for a
    non-root component, another container's process (a service mesh proxy) that the kernel
    would not let the component signal. A root-owned pidfile names any process: root could.
    """
    if pid <= 0:
        return f"it holds an invalid pid {pid}"
    if pid == own_pid:
        return f"it holds the agent's own pid {pid}, not the component's"
    if (
        pidfile_uid is not None
        and process_uids is not None
        and pidfile_uid != 0
        and pidfile_uid not in process_uids
    ):
        return (
            f"pid {pid} runs as uid {process_uids[0]}, not as uid {pidfile_uid} that owns the "
            "pidfile: its writer could not signal that process itself"
        )
    if started_at is not None and started_at > written_at + _PID_REUSE_SLACK_SECONDS:
        return (
            f"pid {pid} belongs to a process started {started_at - written_at:.0f}s after the "
            "pidfile was written (stale pidfile, pid reused)"
        )
    return None


def process_uids(pid: int, proc_root: Path = Path("/proc")) -> tuple[int, ...] | None:
    """The real and saved uid of ``pid`` (whom the kernel lets signal it), None if unknown."""
    try:
        status = (proc_root / str(pid) / "status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        real, _effective, saved = (int(field) for field in line.split()[1:4])
    except (OSError, ValueError, StopIteration):
        return None
    return (real, saved)


def process_started_at(pid: int, proc_root: Path = Path("/proc")) -> float | None:
    """When ``pid`` started (wall clock, about a second's precision), None if unknown."""
    try:
        stat = (proc_root / str(pid) / "stat").read_text()
        boot = next(
            float(line.split()[1])
            for line in (proc_root / "stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        # Field 22 (starttime, clock ticks after boot); the name in parentheses may hold spaces.
        ticks = int(stat[stat.rfind(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def read_pidfile(path: Path, proc_root: Path = Path("/proc")) -> int:
    """The pid written in ``path``; :class:`ProcessNotFoundError` if missing, bad or stale."""
    what = f"pidfile {path}"
    try:
        # Bounded and regular files only: the component may leave a FIFO or a device here.
        raw = read_regular_file(path, _PIDFILE_MAX_BYTES)
        written_at = os.stat(path).st_mtime
        # Who put the entry there: for a symbolic link its own owner, not its target's (a
        # link to a root-owned file holding a pid must not pass for a root-owned pidfile).
        owner = os.lstat(path).st_uid
    except OSError as exc:
        raise ProcessNotFoundError(what, f"cannot read it: {exc.strerror or exc}") from exc
    text = raw.decode(errors="replace").strip()
    try:
        pid = int(text.split()[0])
    except (IndexError, ValueError):
        raise ProcessNotFoundError(what, f"it does not hold a pid (found {text[:40]!r})") from None
    problem = pidfile_pid_problem(
        pid,
        own_pid=os.getpid(),
        started_at=process_started_at(pid, proc_root) if pid > 0 else None,
        written_at=written_at,
        pidfile_uid=owner,
        process_uids=process_uids(pid, proc_root) if pid > 0 else None,
    )
    if problem is not None:
        raise ProcessNotFoundError(what, problem)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise ProcessNotFoundError(what, f"pid {pid} is not running (stale pidfile)") from None
    except PermissionError:
        # The process exists; whether we may signal it is decided when we send the signal.
        pass
    return pid


def target_pids(process_name: str | None, pidfile: Path | None, proc_root: Path) -> list[int]:
    """The component's pid(s): from `pidfile`, else the topmost processes named `process_name`;
    :class:`ProcessNotFoundError` when there is none."""
    if pidfile is not None:
        return [read_pidfile(pidfile, proc_root)]
    assert process_name is not None
    found = find_processes(process_name, proc_root)
    if not found:
        raise ProcessNotFoundError(
            f"process name {process_name!r}", f"no process with that name under {proc_root}"
        )
    return [p.pid for p in found]


@dataclass
class SignalReloader:
    """Send ``sig`` to the process named ``process_name`` or to the pid in ``pidfile``."""

    sig: signal.Signals
    process_name: str | None = None
    pidfile: Path | None = None
    proc_root: Path = field(default=Path("/proc"))

    def __post_init__(self) -> None:
        if (self.process_name is None) == (self.pidfile is None):
            raise ValueError("give exactly one of process_name or pidfile")

    def targets(self) -> list[int]:
        return target_pids(self.process_name, self.pidfile, self.proc_root)

    def reload(self) -> str:
        pids = self.targets()
        for pid in pids:
            try:
                os.kill(pid, self.sig)
            except ProcessLookupError as exc:
                raise ProcessNotFoundError(f"pid {pid}", "it exited before the signal") from exc
            except OSError as exc:
                raise SignalDeliveryError(pid, self.sig.name, exc.strerror or str(exc)) from exc
        return f"sent {self.sig.name} to pid(s) {','.join(map(str, pids))}"


@dataclass
class HttpReloader:
    """Call ``url`` with ``method``; retry on connection errors, timeouts and 5xx answers.

    A 4xx answer is not retried: the component understood the call and refused it, asking again
    will not help. Neither is a 3xx: redirects are not followed (see `_http`), and the component
    that answers with one did not reload.
    """

    url: str = field(repr=False)  # may hold a token: shown through shown_url only
    method: str = "POST"
    timeout_seconds: float = 5.0
    retries: int = 3
    backoff_seconds: float = 0.2

    def reload(self) -> str:
        attempts = 0
        last = "no attempt made"
        shown = shown_url(self.url)
        for attempt in range(1, self.retries + 1):
            attempts = attempt
            try:
                answer = http_request(self.url, self.method, self.timeout_seconds)
            except ValueError as exc:  # the URL itself: asking again will not help
                last = str(exc)
                break
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if 200 <= answer.status < 300:
                    return f"{self.method} {shown} -> {answer.status}"
                # The component's own text (a reason phrase may be up to 64 KiB): one
                # printable line, never at length, in the log, heartbeat, alert and /status.
                last = f"HTTP {answer.status} {_shown_text(answer.reason)}"
                if answer.status < 500:
                    if answer.location is not None:
                        # Shown like the URL too: a trailing-slash redirect repeats its query,
                        # the token.
                        target = _shown_text(shown_url(answer.location))
                        last += f" to {target} (redirects are not followed)"
                    break
            log.warning(
                "reload call failed, attempt %d of %d: %s",
                attempt,
                self.retries,
                last,
                extra={"url": shown, "attempt": attempt},
            )
            if attempt < self.retries:
                time.sleep(self.backoff_seconds * (2 ** (attempt - 1)))
        raise HttpReloadError(shown, attempts, last)


#: The most of a component's own text (reason phrase, redirect target) an error quotes.
SHOWN_TEXT_CHARS = 200


def _shown_text(text: str) -> str:
    """``text`` without control characters (a log line or terminal they could forge or
    garble), at most SHOWN_TEXT_CHARS characters."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text)
    return clean if len(clean) <= SHOWN_TEXT_CHARS else clean[:SHOWN_TEXT_CHARS] + "..."


class NoReload:
    """For components that watch the file themselves (inotify): writing is enough."""

    def reload(self) -> str:
        return "no reload configured"
