from __future__ import annotations

import contextlib
import http.server
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from defender_agent import (
    HttpReloader,
    HttpReloadError,
    ProcessNotFoundError,
    SignalDeliveryError,
    SignalReloader,
)
from defender_agent._reload import (
    NoReload,
    find_processes,
    parse_signal,
    pidfile_pid_problem,
    read_pidfile,
)
from defender_devcluster import wait_for

Spawn = Callable[[str], tuple[subprocess.Popen[bytes], Path]]


def test_parse_signal_forms() -> None:
    assert parse_signal("SIGHUP") is signal.SIGHUP
    assert parse_signal("hup") is signal.SIGHUP
    assert parse_signal("usr1") is signal.SIGUSR1
    assert parse_signal(str(int(signal.SIGTERM))) is signal.SIGTERM


@pytest.mark.parametrize("bad", ["SIGNOPE", "", "999"])
def test_parse_signal_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="unknown signal"):
        parse_signal(bad)


def test_find_by_argv0_name(spawn_named: Spawn, unique_name: str) -> None:
    child, _ = spawn_named(unique_name)
    found = find_processes(unique_name)
    assert [p.pid for p in found] == [child.pid]


def test_find_by_comm(tmp_path: Path) -> None:
    # `sleep` is found through /proc/<pid>/comm and argv[0]; several may run, ours is among them.
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in [p.pid for p in find_processes("sleep")]
    finally:
        child.kill()
        child.wait()


def test_find_returns_only_topmost_of_a_tree(tmp_path: Path, unique_name: str) -> None:
    # A parent with the name starts a child with the same name: only the parent is a target,
    # like an nginx master and its workers.
    code = (
        "import subprocess, sys, time\n"
        f"c = subprocess.Popen([{unique_name!r}, '-c', 'import time; time.sleep(30)'],"
        f" executable={sys.executable!r})\n"
        f"open({str(tmp_path / 'child')!r}, 'w').write(str(c.pid))\n"
        "time.sleep(30)\n"
    )
    parent = subprocess.Popen([unique_name, "-c", code], executable=sys.executable)
    try:
        wait_for(
            "the parent to write its child's pid",
            lambda: (tmp_path / "child").exists() and (tmp_path / "child").read_text() != "",
            timeout=10,
        )
        child_pid = int((tmp_path / "child").read_text())
        wait_for(
            "the child to run under the same name",
            lambda: (
                Path(f"/proc/{child_pid}/cmdline").read_bytes().startswith(unique_name.encode())
            ),
            timeout=10,
        )
        assert [p.pid for p in find_processes(unique_name)] == [parent.pid]
    finally:
        parent.kill()
        parent.wait()
        child_pid_text = (tmp_path / "child").read_text() if (tmp_path / "child").exists() else ""
        if child_pid_text:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child_pid_text), signal.SIGKILL)


def test_find_never_returns_self() -> None:
    own = Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert os.getpid() not in [p.pid for p in find_processes(own)]


def test_signal_reloader_by_name_delivers(spawn_named: Spawn, unique_name: str) -> None:
    child, marker = spawn_named(unique_name)
    reloader = SignalReloader(signal.SIGHUP, process_name=unique_name)
    assert str(child.pid) in reloader.reload()
    wait_for("the first SIGHUP", lambda: marker.read_text() == "1", timeout=10)
    reloader.reload()
    wait_for("the second SIGHUP", lambda: marker.read_text() == "2", timeout=10)


def test_signal_reloader_by_pidfile(spawn_named: Spawn, unique_name: str, tmp_path: Path) -> None:
    child, marker = spawn_named(unique_name)
    pidfile = tmp_path / "target.pid"
    pidfile.write_text(f"{child.pid}\n")
    SignalReloader(signal.SIGHUP, pidfile=pidfile).reload()
    wait_for("the first SIGHUP", lambda: marker.read_text() == "1", timeout=10)


def test_signal_reloader_unknown_name(unique_name: str) -> None:
    with pytest.raises(ProcessNotFoundError, match="shareProcessNamespace") as info:
        SignalReloader(signal.SIGHUP, process_name=unique_name).reload()
    assert info.value.reason == "ProcessNotFound"


def test_signal_reloader_needs_one_target(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        SignalReloader(signal.SIGHUP)
    with pytest.raises(ValueError, match="exactly one"):
        SignalReloader(signal.SIGHUP, process_name="x", pidfile=tmp_path / "p")


def test_pidfile_missing(tmp_path: Path) -> None:
    with pytest.raises(ProcessNotFoundError, match="cannot read"):
        read_pidfile(tmp_path / "absent.pid")


@pytest.mark.parametrize("content", ["", "abc", "-4", "0"])
def test_pidfile_garbage(tmp_path: Path, content: str) -> None:
    pidfile = tmp_path / "bad.pid"
    pidfile.write_text(content)
    with pytest.raises(ProcessNotFoundError, match="pid"):
        read_pidfile(pidfile)


def test_pidfile_stale(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile = tmp_path / "stale.pid"
    pidfile.write_text(str(dead.pid))
    with pytest.raises(ProcessNotFoundError, match="stale"):
        read_pidfile(pidfile)


def test_pidfile_with_the_agents_own_pid_is_refused(tmp_path: Path) -> None:
    # The component writes the pidfile. Its pid could be the agent's (a mistake, or on purpose):
    # the agent does not handle SIGHUP, so signalling itself would end it.
    received: list[int] = []
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: received.append(signum))
    try:
        pidfile = tmp_path / "component.pid"
        pidfile.write_text(f"{os.getpid()}\n")
        with pytest.raises(ProcessNotFoundError, match="agent's own pid"):
            SignalReloader(signal.SIGHUP, pidfile=pidfile).reload()
        time.sleep(0.1)
        assert received == []
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_pidfile_older_than_its_process_is_a_reused_pid(
    spawn_named: Spawn, unique_name: str, tmp_path: Path
) -> None:
    # A pidfile written an hour before the process with that pid started names another process
    # that got the pid later: it is not signalled.
    child, marker = spawn_named(unique_name)
    pidfile = tmp_path / "component.pid"
    pidfile.write_text(f"{child.pid}\n")
    hour_ago = time.time() - 3600
    os.utime(pidfile, (hour_ago, hour_ago))
    with pytest.raises(ProcessNotFoundError, match="pid reused"):
        SignalReloader(signal.SIGHUP, pidfile=pidfile).reload()
    time.sleep(0.2)
    assert marker.read_text() == "ready"  # no SIGHUP arrived


def test_pidfile_that_is_a_fifo_does_not_block(tmp_path: Path) -> None:
    pidfile = tmp_path / "component.pid"
    os.mkfifo(pidfile)
    done: list[str] = []

    def read() -> None:
        with contextlib.suppress(ProcessNotFoundError):
            read_pidfile(pidfile)
        done.append("returned")

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(10)
    assert done == ["returned"]
    with pytest.raises(ProcessNotFoundError, match="not a regular file"):
        read_pidfile(pidfile)


def test_pidfile_pid_problem_decisions() -> None:
    assert pidfile_pid_problem(42, own_pid=7, started_at=100.0, written_at=101.0) is None
    assert pidfile_pid_problem(42, own_pid=7, started_at=None, written_at=101.0) is None
    # /proc/stat's boot time is whole seconds: a start a little after the write is not reuse.
    assert pidfile_pid_problem(42, own_pid=7, started_at=102.5, written_at=101.0) is None
    reused = pidfile_pid_problem(42, own_pid=7, started_at=200.0, written_at=101.0)
    assert "reused" in (reused or "")
    assert "own pid" in (pidfile_pid_problem(7, own_pid=7, started_at=None, written_at=0.0) or "")
    assert "invalid" in (pidfile_pid_problem(0, own_pid=7, started_at=None, written_at=0.0) or "")


def test_signal_refused_by_kernel() -> None:
    # The kernel refuses a signal to another user's process (EPERM). As root we start the target
    # ourselves and drop to `nobody` in the signalling child; unprivileged, pid 1 is another
    # user's process. SIGWINCH, not SIGCONT: SIGCONT is allowed within one session whatever the
    # owner, and a CI sandbox may run us in pid 1's session.
    target = None
    if os.getuid() == 0:
        target = subprocess.Popen(["sleep", "60"], start_new_session=True)
        pid = target.pid
    else:
        pid = 1
    # As root the pidfile is written before the drop, readable by `nobody`: a root-owned
    # pidfile may name any process (a root component could signal it), so the kernel decides.
    # Unprivileged, our own pidfile naming pid 1 (root's) is refused before any signal unless
    # the process's uids are unknown: an empty /proc copy leaves the decision to the kernel.
    code = (
        "import os, signal, sys, tempfile\n"
        "from pathlib import Path\n"
        "from defender_agent import SignalReloader, SignalDeliveryError\n"
        "d = Path(tempfile.mkdtemp()); d.chmod(0o755)\n"
        "p = d / 'target.pid'; p.write_text(sys.argv[1]); p.chmod(0o644)\n"
        "proc = Path('/proc')\n"
        "if os.getuid() == 0:\n"
        "    os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "else:\n"
        "    proc = Path(tempfile.mkdtemp())\n"
        "try:\n"
        "    SignalReloader(signal.SIGWINCH, pidfile=p, proc_root=proc).reload()\n"
        "except SignalDeliveryError as e:\n"
        "    print(e.reason, e.pid); sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code, str(pid)], capture_output=True, text=True, timeout=30
        )
    finally:
        if target is not None:
            target.kill()
            target.wait()
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SignalFailed", str(pid)]
    assert issubclass(SignalDeliveryError, Exception)


class _Handler(http.server.BaseHTTPRequestHandler):
    # A scripted server: each request pops the next status from the class-level plan.
    plan: list[int | str] = []
    seen: list[str] = []

    def _answer(self) -> None:
        type(self).seen.append(self.command)
        step = type(self).plan.pop(0) if type(self).plan else 200
        if step == "sleep":
            time.sleep(1.0)
            step = 200
        self.send_response(int(step))
        if 300 <= int(step) < 400:
            self.send_header("Location", "/moved")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET = do_PUT = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("H", (_Handler,), {"plan": [], "seen": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/-/reload", handler
    httpd.shutdown()
    httpd.server_close()


def test_http_reload_ok(server: tuple[str, type[_Handler]]) -> None:
    url, handler = server
    assert "-> 200" in HttpReloader(url, method="PUT").reload()
    assert handler.seen == ["PUT"]


def test_http_reload_retries_5xx(server: tuple[str, type[_Handler]]) -> None:
    url, handler = server
    handler.plan = [503, 500, 204]
    assert "-> 204" in HttpReloader(url, retries=3, backoff_seconds=0.01).reload()
    assert len(handler.seen) == 3


def test_http_reload_gives_up(server: tuple[str, type[_Handler]]) -> None:
    url, handler = server
    handler.plan = [500, 500, 500]
    with pytest.raises(HttpReloadError, match="3 attempt") as info:
        HttpReloader(url, retries=3, backoff_seconds=0.01).reload()
    assert info.value.reason == "HttpReloadFailed"
    assert "HTTP 500" in info.value.detail


def test_http_reload_4xx_not_retried(server: tuple[str, type[_Handler]]) -> None:
    url, handler = server
    handler.plan = [404, 200]
    with pytest.raises(HttpReloadError, match="1 attempt"):
        HttpReloader(url, retries=3, backoff_seconds=0.01).reload()
    assert len(handler.seen) == 1


def test_http_reload_timeout(server: tuple[str, type[_Handler]]) -> None:
    url, handler = server
    handler.plan = ["sleep", "sleep"]
    with pytest.raises(HttpReloadError, match="2 attempt") as info:
        HttpReloader(url, retries=2, timeout_seconds=0.2, backoff_seconds=0.01).reload()
    assert "timed out" in info.value.detail.lower()


def test_http_reload_connection_refused() -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on this port now
    with pytest.raises(HttpReloadError, match="refused"):
        HttpReloader(f"http://127.0.0.1:{port}/", retries=2, backoff_seconds=0.01).reload()


def test_no_reload() -> None:
    assert NoReload().reload() == "no reload configured"


def test_http_reload_goes_to_the_component_not_to_a_proxy_from_the_environment(
    server: tuple[str, type[_Handler]],
    serve_http: Callable[[type[http.server.BaseHTTPRequestHandler]], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, handler = server
    proxy = type("H", (_Handler,), {"plan": [], "seen": []})
    monkeypatch.setenv("http_proxy", serve_http(proxy))
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    HttpReloader(url).reload()
    assert (handler.seen, proxy.seen) == (["POST"], [])


def test_http_reload_redirect_is_a_failure_not_followed(server: tuple[str, type[_Handler]]) -> None:
    url, handler = server
    # urllib followed a 302 to a POST with a GET to the new address; the component that
    # redirects did not reload.
    handler.plan = [302, 200]
    with pytest.raises(HttpReloadError, match="1 attempt") as info:
        HttpReloader(url, retries=3, backoff_seconds=0.01).reload()
    assert "HTTP 302" in info.value.detail
    assert "/moved (redirects are not followed)" in info.value.detail
    assert handler.seen == ["POST"]


def test_a_token_in_the_reload_url_is_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    # The failure goes to the log, the heartbeat's last_error and an alert (plaintext in etcd).
    url = f"http://agent:pw-s3cret@127.0.0.1:{_closed_port()}/-/reload?token=tok-s3cret"
    reloader = HttpReloader(url, retries=2, backoff_seconds=0.01)
    with caplog.at_level(logging.DEBUG), pytest.raises(HttpReloadError) as info:
        reloader.reload()
    shown = [str(info.value), info.value.url, caplog.text, repr(reloader)]
    assert not [text for text in shown if "s3cret" in text]
    assert "http://127.0.0.1:" in str(info.value) and "/-/reload?..." in str(info.value)


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _proc_claiming_uid(tmp_path: Path, pid: int, uid: int) -> Path:
    """A /proc copy where `pid` (its real stat, the real boot time) runs as `uid`: the pidfile's
    writer and the process then differ in uid whoever runs the test."""
    root = tmp_path / "proc"
    (root / str(pid)).mkdir(parents=True)
    (root / "stat").write_text(Path("/proc/stat").read_text())
    (root / str(pid) / "stat").write_text(Path(f"/proc/{pid}/stat").read_text())
    (root / str(pid) / "status").write_text(f"Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    return root


def test_a_pidfile_naming_a_process_of_another_user_is_refused(
    spawn_named: Spawn, unique_name: str, tmp_path: Path
) -> None:
    # The component writes the pidfile; an agent with CAP_KILL (signalAccess: capKill) can
    # signal any process of the pod. A non-root component must not make it signal a process
    # the component could not signal itself (another container's, e.g. a mesh proxy).
    child, marker = spawn_named(unique_name)
    pidfile = tmp_path / "component.pid"
    pidfile.write_text(f"{child.pid}\n")
    writer = os.lstat(pidfile).st_uid
    if writer == 0:  # a root-owned pidfile may name anything: make the writer a plain user
        os.chown(pidfile, 10001, 10001, follow_symlinks=False)
        writer = 10001
    other = _proc_claiming_uid(tmp_path, child.pid, writer + 1)
    with pytest.raises(ProcessNotFoundError, match=f"not as uid {writer}"):
        SignalReloader(signal.SIGHUP, pidfile=pidfile, proc_root=other).reload()
    time.sleep(0.2)
    assert marker.read_text() == "ready"  # no SIGHUP arrived
    same = _proc_claiming_uid(tmp_path / "same", child.pid, writer)
    SignalReloader(signal.SIGHUP, pidfile=pidfile, proc_root=same).reload()
    wait_for("the SIGHUP", lambda: marker.read_text() == "1", timeout=10)


def test_pidfile_owner_decisions() -> None:
    def problem(owner: int, uids: tuple[int, ...] | None) -> str | None:
        return pidfile_pid_problem(
            42,
            own_pid=7,
            started_at=None,
            written_at=0.0,
            pidfile_uid=owner,
            process_uids=uids,
        )

    assert problem(10001, (10001, 10001)) is None
    assert problem(10001, (0, 10001)) is None  # the saved uid: the kernel lets it signal
    assert problem(0, (1337, 1337)) is None  # root could signal it itself
    assert problem(10001, None) is None  # unknown (no /proc status): as the start time
    assert "uid 1337" in (problem(10001, (1337, 1337)) or "")


@pytest.mark.parametrize(
    ("location", "shown"),
    [
        # A trailing-slash redirect keeps the query (Go's ServeMux does): the agent's own token.
        ("/-/reload/?token=tok-s3cret", "/-/reload/?..."),
        ("http://agent:pw-s3cret@127.0.0.1:9/login?next=/-/reload", "http://127.0.0.1:9/login?..."),
    ],
)
def test_a_redirect_location_is_shown_without_its_query_or_credentials(
    location: str, shown: str
) -> None:
    # The error reaches the log, the heartbeat, the alert and GET /status, which show the
    # reload URL itself without its query and credentials: so must they the redirect target.
    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(301)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/-/reload?token=tok-s3cret"
        with pytest.raises(HttpReloadError) as info:
            HttpReloader(url, retries=1).reload()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert f"to {shown} (redirects are not followed)" in info.value.detail
    assert "s3cret" not in str(info.value)


def test_a_long_or_control_character_reason_phrase_is_cut_and_cleaned() -> None:
    # The component's reason phrase (up to 64 KiB on the status line) reaches the log, the
    # heartbeat, the alert and GET /status: one printable line of at most 200 characters.
    reason = "\x1b[2J\rforged\x07" + "A" * 60_000
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(f"HTTP/1.1 418 {reason}\r\nContent-Length: 0\r\n\r\n".encode())

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/-/reload"
        with pytest.raises(HttpReloadError) as info:
            HttpReloader(url, retries=1).reload()
    finally:
        thread.join(5)
        listener.close()
    detail = info.value.detail
    assert detail.startswith("HTTP 418 ?[2J?forged?AAA")
    assert detail.endswith("A...")
    assert len(detail) <= len("HTTP 418 ") + 200 + len("...")
    assert all(ch.isprintable() for ch in str(info.value))
