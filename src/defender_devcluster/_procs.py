"""Child processes started by the harness: pid files, log files, stop by PID, stale cleanup.

Every process gets ``<name>.pid`` (JSON) next to ``<name>.log``. The pid file records a marker
(a path inside the run dir that appears on the command line), so a later run only ever kills a
PID whose command line still carries that marker: a recycled PID belonging to someone else is
left alone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import StaleProcessError
from ._wait import poll

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the kernel says are free right now.

    All sockets stay open until every port is picked, so the same port is never returned twice.
    Another process can still grab one before our child binds it; callers retry on that.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def read_cmdline(pid: int) -> list[str] | None:
    """argv of a live, non-zombie process, or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            # The state letter follows the parenthesised command name, which may contain spaces.
            state = f.read().rpartition(")")[2].split()[0]
        if state in ("Z", "X"):
            return None
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return None
    if not raw:
        return None
    return [part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")]


def pid_matches(pid: int, marker: str) -> bool:
    """True when ``pid`` is alive and its command line or environment contains ``marker``.

    The environment counts because some commands (``python -m defender_operator``) carry no
    run-dir path in argv; the harness then sets ``DEFENDER_DEVCLUSTER_RUN_DIR`` for them.
    """
    argv = read_cmdline(pid)
    if argv is None:
        return False
    if any(marker in arg for arg in argv):
        return True
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return marker.encode() in environ.split(b"\0")


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the forked child
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. A child
# started from a short-lived thread (tests restart members in parallel) would be killed as soon
# as that thread ends, so every such child is forked from this one thread that lives as long as
# the interpreter.
_spawner = concurrent.futures.ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="devcluster-spawn"
)


def _spawn_dying_with_parent(
    argv: list[str],
    spawn: Callable[[list[str], Callable[[], None] | None], subprocess.Popen[bytes]],
) -> subprocess.Popen[bytes]:
    def fork() -> subprocess.Popen[bytes]:
        # Python code between fork and exec (preexec_fn) can crash the child when the parent
        # runs gRPC threads (seen: a restarted etcd member dying with SIGSEGV). util-linux's
        # setpriv sets the same parent-death signal and then execs, so no Python runs there.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            return spawn(argv, _set_pdeathsig)
        child = spawn([setpriv, "--pdeathsig", "KILL", "--", *argv], None)
        _await_exec_past(child)
        return child

    return _spawner.submit(fork).result()


def _await_exec_past(child: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Return once setpriv has exec'd the target (it sets the death signal just before).

    Popen returns when setpriv itself is exec'd; a parent dying in the moment before setpriv's
    prctl leaves a child the kernel never kills (seen in CI: an orphan holding a test's pipe).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        argv = read_cmdline(child.pid)
        if argv is None or "--pdeathsig" not in argv:
            return
        time.sleep(0.001)


def popen_dying_with_parent(argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """`subprocess.Popen(argv, **kwargs)` for a child the kernel kills (SIGKILL) when this
    process dies, so an interrupted test or benchmark leaves no operator or agent running."""

    def spawn(args: list[str], preexec: Callable[[], None] | None) -> subprocess.Popen[Any]:
        return subprocess.Popen(args, preexec_fn=preexec, **kwargs)

    return _spawn_dying_with_parent(argv, spawn)


def _wait_gone(
    pid: int, marker: str, timeout: float, popen: subprocess.Popen[bytes] | None
) -> bool:
    def gone() -> bool:
        if popen is not None:
            return popen.poll() is not None
        return not pid_matches(pid, marker)

    done, _ = poll(gone, timeout, 0.05)
    return done is not None


def stop_pid(
    pid: int,
    marker: str,
    name: str,
    *,
    timeout: float = 10.0,
    popen: subprocess.Popen[bytes] | None = None,
) -> bool:
    """SIGTERM, then SIGKILL after ``timeout``. Returns False when nothing matching was running.

    The marker check guards against killing an unrelated process that reused the PID.
    """
    if popen is None and not pid_matches(pid, marker):
        return False
    if popen is not None and popen.poll() is not None:
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        if _wait_gone(pid, marker, wait, popen):
            return True
        log.warning("%s (pid %s) ignored %s", name, pid, sig.name)
    raise StaleProcessError(pid, name)


@dataclass
class PidFile:
    """What a pid file records: enough to find and verify the process from another Python."""

    name: str
    pid: int
    marker: str
    argv: list[str] = field(default_factory=list)

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".pid.tmp")
        tmp.write_text(json.dumps(self.__dict__), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> PidFile | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                name=str(data["name"]),
                pid=int(data["pid"]),
                marker=str(data["marker"]),
                argv=[str(a) for a in data.get("argv", [])],
            )
        except (OSError, ValueError, KeyError, TypeError):
            # A torn or foreign file is not proof of a running process: ignore it.
            return None


def _stop_order(path: Path) -> tuple[int, str]:
    # Clients before servers: the operator, then Kubernetes, then etcd. kube-apiserver waits
    # for etcd while shutting down, so stopping etcd first would make it hang until SIGKILL.
    parent = path.parent.name
    rank = 0 if parent == "operator" else 1 if parent == "kube" else 2
    return rank, str(path)


def reap_stale(directory: Path) -> list[PidFile]:
    """Stop every process recorded by a ``*.pid`` file under ``directory`` that still matches.

    Returns the records whose process was found running and stopped. Pid files are removed.
    """
    stopped: list[PidFile] = []
    if not directory.is_dir():
        return stopped
    for path in sorted(directory.rglob("*.pid"), key=_stop_order):
        rec = PidFile.read(path)
        if rec is not None and pid_matches(rec.pid, rec.marker):
            log.warning("stopping %s (pid %s) left over from an earlier run", rec.name, rec.pid)
            stop_pid(rec.pid, rec.marker, rec.name, timeout=5.0)
            stopped.append(rec)
        path.unlink(missing_ok=True)
    return stopped


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """One child process with a log file and a pid file in ``directory``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        directory: Path,
        *,
        marker: str,
        env: dict[str, str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.directory = directory
        self.marker = marker
        self.env = env
        self.die_with_parent = die_with_parent
        self.log_path = directory / f"{name}.log"
        self.pid_path = directory / f"{name}.pid"
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def exit_code(self) -> int | None:
        return self._popen.poll() if self._popen is not None else None

    def start(self) -> int:
        if self.running():
            raise RuntimeError(f"{self.name} is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n=== start {time.strftime('%Y-%m-%dT%H:%M:%S')} ===\n".encode())
            logf.flush()

            def spawn(
                argv: list[str], preexec: Callable[[], None] | None
            ) -> subprocess.Popen[bytes]:
                return subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    # Own session: a Ctrl-C aimed at pytest or make does not hit the cluster.
                    start_new_session=True,
                    preexec_fn=preexec,
                )

            if self.die_with_parent:
                self._popen = _spawn_dying_with_parent(self.argv, spawn)
            else:
                self._popen = spawn(self.argv, None)
        PidFile(self.name, self._popen.pid, self.marker, self.argv).write(self.pid_path)
        log.debug("started %s pid=%s", self.name, self._popen.pid)
        return self._popen.pid

    def stop(self, timeout: float = 10.0) -> None:
        if self._popen is not None:
            stop_pid(self._popen.pid, self.marker, self.name, timeout=timeout, popen=self._popen)
        self.pid_path.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL by PID, as a crash would; reaps the child so no zombie is left."""
        if self._popen is None or self._popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._popen.pid, signal.SIGKILL)
        self._popen.wait(timeout=10)
        self.pid_path.unlink(missing_ok=True)

    def tail(self, lines: int = 20) -> str:
        return log_tail(self.log_path, lines)
