"""Component health checks on real processes, sockets, files and commands; the gate's grace and
transitions; the settings that choose a check; the status endpoint."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from defender_agent import AgentSettingsError, load_agent_settings
from defender_agent._agent import build_health_check
from defender_agent._health import (
    UNHEALTHY,
    ExecCheck,
    FileCheck,
    HealthGate,
    HttpCheck,
    ProcessCheck,
    TcpCheck,
    process_state,
)
from defender_agent._http import http_request
from defender_agent._status import CONNECTIONS_PER_SOURCE, CONNECTIONS_TOTAL, StatusServer
from defender_devcluster import wait_for

BASE = ["--component", "sniffer", "--output-path", "/shared/sniffer.json"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("DEFENDER_AGENT_") or key in ("POD_NAME", "NODE_NAME"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("POD_NAME", "sniffer-0")


# --- process -----------------------------------------------------------------------------------


def test_process_check_sees_a_stopped_process_and_its_return(
    spawn_named: Callable[[str], tuple[subprocess.Popen[bytes], Path]], unique_name: str
) -> None:
    child, _ = spawn_named(unique_name)
    check = ProcessCheck(process_name=unique_name)
    assert check.check() is None
    os.kill(child.pid, signal.SIGSTOP)
    try:
        wait_for("state T", lambda: process_state(child.pid) == "T", timeout=10)
        problem = check.check()
        assert problem is not None
        assert f"pid {child.pid}" in problem and "stopped (state T)" in problem
    finally:
        os.kill(child.pid, signal.SIGCONT)
    wait_for("running again", lambda: check.check() is None, timeout=10)


def test_process_check_sees_an_exited_process(
    spawn_named: Callable[[str], tuple[subprocess.Popen[bytes], Path]], unique_name: str
) -> None:
    child, _ = spawn_named(unique_name)
    child.kill()
    child.wait(timeout=10)
    problem = ProcessCheck(process_name=unique_name).check()
    assert problem == f"process name {unique_name!r}: no process with that name under /proc"


def test_process_check_by_pidfile(
    spawn_named: Callable[[str], tuple[subprocess.Popen[bytes], Path]],
    unique_name: str,
    tmp_path: Path,
) -> None:
    child, _ = spawn_named(unique_name)
    pidfile = tmp_path / "component.pid"
    pidfile.write_text(f"{child.pid}\n")
    check = ProcessCheck(pidfile=pidfile)
    assert check.check() is None
    pidfile.write_text("not a pid")
    assert "does not hold a pid" in (check.check() or "")
    with pytest.raises(ValueError, match="exactly one"):
        ProcessCheck()


def test_process_check_with_the_agents_own_pid_is_not_well(tmp_path: Path) -> None:
    # A pidfile holding the agent's pid would make the check report the agent as the
    # component: the heartbeat would mean "the sidecar is up" again.
    pidfile = tmp_path / "component.pid"
    pidfile.write_text(str(os.getpid()))
    assert "agent's own pid" in (ProcessCheck(pidfile=pidfile).check() or "")


def test_zombie_is_not_alive(tmp_path: Path) -> None:
    # A fake /proc: the state letter is all the check reads.
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "stat").write_text("4242 (we (ird) name) Z 1 4242 4242 0 -1")
    assert process_state(4242, proc) == "Z"
    assert process_state(4243, proc) is None


# --- http / tcp / exec / file ------------------------------------------------------------------


@pytest.fixture
def http_server(serve_http: Callable[[type[Any]], str]) -> tuple[str, dict[str, int]]:
    answer = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(answer["code"])
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return serve_http(Handler) + "/health", answer


def test_http_check(http_server: tuple[str, dict[str, int]]) -> None:
    url, answer = http_server
    check = HttpCheck(url, timeout_seconds=2)
    assert check.check() is None
    answer["code"] = 503
    assert check.check() == f"GET {url} answered HTTP 503"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_http_check_connection_refused() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/health"
    assert (HttpCheck(url, 1).check() or "").startswith(f"GET {url} failed:")


def test_tcp_check() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = int(listener.getsockname()[1])
        assert TcpCheck("127.0.0.1", port, 1).check() is None
    assert "refused or timed out" in (TcpCheck("127.0.0.1", port, 1).check() or "")


def test_exec_check(tmp_path: Path) -> None:
    assert ExecCheck(["true"]).check() is None
    failing = ExecCheck(["sh", "-c", "echo 'queue stuck' >&2; exit 3"])
    assert failing.check() == "exec sh (+2 arguments) exited 3: queue stuck"
    assert "did not finish within 0.2s" in (ExecCheck(["sleep", "5"], 0.2).check() or "")
    assert "could not run" in (ExecCheck([str(tmp_path / "missing")]).check() or "")


def test_exec_check_text_names_the_program_not_its_arguments() -> None:
    # Arguments may carry a token; the text reaches etcd (the heartbeat) and /status.
    token = "Bearer s3cr3t-t0ken"
    check = ExecCheck(["sh", "-c", f"echo nope >&2; exit 1 # {token}"])
    assert check.describe() == "exec sh (+2 arguments)"
    assert check.check() == "exec sh (+2 arguments) exited 1: nope"
    assert ExecCheck(["true"]).describe() == "exec true"
    assert ExecCheck(["pgrep", "x"]).describe() == "exec pgrep (+1 argument)"
    assert token not in (ExecCheck(["sleep", "5", token], 0.1).check() or "")


def test_file_check(tmp_path: Path) -> None:
    path = tmp_path / "alive"
    check = FileCheck(path, max_age_seconds=5)
    assert "cannot be read" in (check.check() or "")
    path.touch()
    assert check.check() is None
    old = time.time() - 6
    os.utime(path, (old, old))
    assert "last touched 6." in (check.check() or "")


# --- the gate ----------------------------------------------------------------------------------


class Flaky:
    def __init__(self) -> None:
        self.problem: str | None = None
        self.raises = False

    def describe(self) -> str:
        return "flaky"

    def check(self) -> str | None:
        if self.raises:
            raise RuntimeError("boom")
        return self.problem


def test_gate_reports_once_holds_after_grace_and_recovers() -> None:
    now = [0.0]
    fails: list[str] = []
    recovers: list[str] = []
    check = Flaky()
    gate = HealthGate(
        check,
        start_grace_seconds=10,
        on_fail=fails.append,
        on_recover=recovers.append,
        clock=lambda: now[0],
    )
    assert gate() is None
    check.problem = "stuck"
    # Within the start grace: reported, not held.
    assert gate() is None
    assert fails == ["stuck"] and not gate.holding
    now[0] = 11
    held = gate()
    assert held is not None and (held.reason, held.detail) == (UNHEALTHY, "stuck")
    assert gate.holding
    assert gate() is not None
    assert fails == ["stuck"], "one report per episode"
    check.problem = None
    assert gate() is None
    assert recovers == ["stuck"] and gate.problem is None


def test_a_crashing_check_counts_as_a_failure() -> None:
    check = Flaky()
    check.raises = True
    fails: list[str] = []
    gate = HealthGate(check, start_grace_seconds=0, on_fail=fails.append, on_recover=print)
    held = gate()
    assert held is not None and "flaky crashed: RuntimeError: boom" in held.detail
    assert fails and "boom" in fails[0]


# --- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kind"),
    [
        (["--health-check", "process", "--health-process", "sniffer"], ProcessCheck),
        (["--health-check", "http", "--health-url", "http://127.0.0.1:8080/ok"], HttpCheck),
        (["--health-check", "tcp", "--health-tcp", "127.0.0.1:9000"], TcpCheck),
        (["--health-check", "exec", "--health-exec", "pgrep -x sniffer"], ExecCheck),
        (
            [
                "--health-check",
                "file",
                "--health-file",
                "/shared/alive",
                "--health-file-max-age-seconds",
                "10",
            ],
            FileCheck,
        ),
    ],
)
def test_settings_build_each_check(args: list[str], kind: type) -> None:
    settings = load_agent_settings([*BASE, "--reload-method", "none", *args])
    assert isinstance(build_health_check(settings), kind)


def test_process_check_defaults_to_the_reload_target() -> None:
    settings = load_agent_settings(
        [*BASE, "--reload-process", "sniffer", "--health-check", "process"]
    )
    check = build_health_check(settings)
    assert isinstance(check, ProcessCheck) and check.process_name == "sniffer"
    none = load_agent_settings([*BASE, "--reload-process", "sniffer"])
    assert build_health_check(none) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--health-check", "process"], "health_check=process needs"),
        (["--health-check", "http"], "health_check=http needs"),
        (["--health-check", "http", "--health-url", "ftp://x"], "health_url: .*http://"),
        (["--health-check", "tcp", "--health-tcp", "nohost"], "health_check=tcp needs"),
        (["--health-check", "tcp", "--health-tcp", "[::1]:99999"], "health_check=tcp needs"),
        (["--health-check", "exec", "--health-exec", "  "], "health_check=exec needs"),
        (["--health-check", "file", "--health-file", "/x"], "health_check=file needs"),
        (["--health-check", "bogus"], "health_check"),
        (
            ["--health-process", "a", "--health-pidfile", "/p", "--health-check", "process"],
            "at most one",
        ),
        (["--health-check", "process", "--health-process", "/usr/bin/x"], "a process name"),
    ],
)
def test_bad_health_settings_name_the_problem(args: list[str], message: str) -> None:
    with pytest.raises(AgentSettingsError, match=message):
        load_agent_settings([*BASE, "--reload-method", "none", *args])


# --- status endpoint ---------------------------------------------------------------------------


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_status_endpoint_answers_by_health() -> None:
    state: dict[str, Any] = {"healthy": True, "problem": None}
    server = StatusServer("127.0.0.1", 0, lambda: dict(state)).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert _get(f"{base}/status") == (200, state)
        state.update(healthy=False, problem="stopped")
        code, body = _get(f"{base}/status")
        assert (code, body["problem"]) == (503, "stopped")
        assert _get(f"{base}/healthz") == (200, {"ok": True})
        assert _get(f"{base}/other")[0] == 404
    finally:
        server.stop()


def test_status_endpoints_ignore_a_query_string() -> None:
    # A probe that adds a query (a cache buster, a token its tool always sends) still works.
    server = StatusServer("127.0.0.1", 0, lambda: {"healthy": True}).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert _get(f"{base}/status?x") == (200, {"healthy": True})
        assert _get(f"{base}/status?probe=1&t=2") == (200, {"healthy": True})
        assert _get(f"{base}/healthz?x=1") == (200, {"ok": True})
        assert _get(f"{base}/other?x")[0] == 404
    finally:
        server.stop()


def test_status_endpoint_hangs_up_on_a_client_that_sends_nothing() -> None:
    # The endpoint may listen on every address: each idle or half-sent request held a handler
    # thread for ever, so enough of them exhausted the agent. They are cut after a few seconds.
    server = StatusServer("127.0.0.1", 0, lambda: {"healthy": True}).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as idle:
            idle.sendall(b"GET /sta")
            idle.settimeout(15)
            started = time.monotonic()
            assert idle.recv(1024) == b""  # the server closed the connection
            assert time.monotonic() - started < 10
        assert _get(f"http://127.0.0.1:{server.port}/healthz") == (200, {"ok": True})
    finally:
        server.stop()


def test_status_endpoint_hangs_up_on_a_client_that_dribbles_its_request() -> None:
    # One byte every 0.2 s never lets a 1 s read time out; the request as a whole must.
    server = StatusServer(
        "127.0.0.1", 0, lambda: {"healthy": True}, request_timeout_seconds=1.0
    ).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as slow:
            slow.sendall(b"GET /status HTTP/1.1\r\n")
            started = time.monotonic()
            hung_up = False
            while not hung_up and time.monotonic() - started < 8:
                try:
                    slow.sendall(b"X")
                    readable, _, _ = select.select([slow], [], [], 0.2)
                    hung_up = bool(readable) and slow.recv(1024) == b""
                except OSError:  # a reset: the server closed it
                    hung_up = True
            assert hung_up, "the dribbling client still held its handler thread"
            assert time.monotonic() - started < 4
        assert _get(f"http://127.0.0.1:{server.port}/healthz") == (200, {"ok": True})
    finally:
        server.stop()


def _answered(port: int, source: str = "127.0.0.1") -> bool:
    """Whether a GET /healthz from `source` gets an answer (False: closed unanswered)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as c:
        c.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        try:
            return c.recv(1024).startswith(b"HTTP/1.0 200")
        except ConnectionResetError:
            return False


def test_status_endpoint_bounds_the_connections_one_source_holds() -> None:
    # Idle connections from one address (a flood) take their share of handler threads; the next
    # is closed unanswered, while another address (the kubelet's probes) still gets in.
    server = StatusServer("127.0.0.1", 0, lambda: {"healthy": True}).start()
    idle: list[socket.socket] = []
    try:
        for _ in range(CONNECTIONS_PER_SOURCE):
            idle.append(socket.create_connection(("127.0.0.1", server.port)))
        assert not _answered(server.port)
        assert server.refused == 1
        assert _answered(server.port, source="127.0.0.2")
        # A share given back is free again.
        idle.pop().close()
        wait_for("a freed share answered", lambda: _answered(server.port), timeout=5, every=0.1)
    finally:
        for conn in idle:
            conn.close()
        server.stop()


def test_status_endpoint_bounds_the_connections_all_sources_hold() -> None:
    server = StatusServer("127.0.0.1", 0, lambda: {"healthy": True}).start()
    idle: list[socket.socket] = []
    sources = [f"127.0.1.{i}" for i in range(1, CONNECTIONS_TOTAL // CONNECTIONS_PER_SOURCE + 1)]
    try:
        for source in sources:
            for _ in range(CONNECTIONS_PER_SOURCE):
                idle.append(
                    socket.create_connection(("127.0.0.1", server.port), source_address=(source, 0))
                )
        assert not _answered(server.port, source="127.0.2.1")  # a source that holds none
        assert server.refused == 1
    finally:
        for conn in idle:
            conn.close()
        server.stop()


def test_status_port_in_use_is_a_settings_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = int(taken.getsockname()[1])
        with pytest.raises(AgentSettingsError, match="cannot serve the status endpoint"):
            StatusServer("127.0.0.1", port, dict)
    # Never started: stopping does not wait for a loop that never ran.
    StatusServer("127.0.0.1", 0, dict).stop()


# --- the agent's wiring ------------------------------------------------------------------------


def _agent(tmp_path: Path, *args: str) -> Any:
    from defender_agent._agent import Agent
    from defender_config import EnvelopeOptions, LibrarySettings

    settings = load_agent_settings(
        ["--component", "sniffer", "--output-path", str(tmp_path / "s.json"), *args]
    )
    return Agent(settings, LibrarySettings(envelope=EnvelopeOptions(encrypt=False)))


def test_an_alert_that_cannot_be_stored_does_not_stop_the_check(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from types import SimpleNamespace

    agent = _agent(
        tmp_path, "--reload-method", "none", "--health-check", "exec", "--health-exec", "false"
    )

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("etcd gone")

    agent.client = SimpleNamespace(alerter=SimpleNamespace(event=refuse))
    assert agent.health is not None
    held = agent.health()  # within the start grace: reported, not held
    assert held is None and agent.health.problem == "exec false exited 1"
    assert "could not record the ComponentUnhealthy alert" in caplog.text
    assert "fails its health check" in caplog.text


def test_status_before_registration(tmp_path: Path) -> None:
    agent = _agent(tmp_path, "--reload-method", "none")
    snap = agent.status_snapshot()
    assert snap["healthy"] is False and snap["renewing"] is False
    assert snap["cadence"] is None and snap["health_check"] == "none"
    assert snap["beats"] == 0 and snap["overwritten"] == 0


class _Proxy(http.server.BaseHTTPRequestHandler):
    """Stands for a cluster-wide HTTP proxy: answers 200 to anything it is asked to fetch."""

    asked: list[str] = []

    def do_GET(self) -> None:
        type(self).asked.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize("variable", ["http_proxy", "HTTP_PROXY"])
def test_http_check_asks_the_component_not_a_proxy_from_the_environment(
    serve_http: Callable[[type[Any]], str],
    http_server: tuple[str, dict[str, int]],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    # A proxy set for the whole cluster must not answer for the component: the proxy's
    # "localhost" is not the pod's.
    url, answer = http_server
    answer["code"] = 503
    proxy = type("P", (_Proxy,), {"asked": []})
    monkeypatch.setenv(variable, serve_http(proxy))
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert HttpCheck(url, 2).check() == f"GET {url} answered HTTP 503"
    assert proxy.asked == []


def test_http_check_does_not_follow_a_redirect(serve_http: Callable[[type[Any]], str]) -> None:
    # A 3xx is the component's answer (well, as documented); the agent calls no other address.
    elsewhere = type("P", (_Proxy,), {"asked": []})
    target = serve_http(elsewhere) + "/elsewhere"

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    assert HttpCheck(serve_http(Redirect) + "/health", 2).check() is None
    assert elsewhere.asked == []


def test_http_check_that_answers_byte_by_byte_is_cut_at_the_timeout(
    serve_http: Callable[[type[Any]], str],
) -> None:
    # Each read gets a byte before the socket timeout; only a deadline for the whole exchange
    # stops an endpoint that dribbles its headers (it would hold the heartbeat thread).
    class Dribble(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with contextlib.suppress(OSError):  # the agent hangs up at its deadline
                self.wfile.write(b"HTTP/1.0 200 OK\r\n")
                for _ in range(40):
                    self.wfile.write(b"X-Slow: 1\r\n")
                    self.wfile.flush()
                    time.sleep(0.2)
                self.wfile.write(b"\r\n")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    url = serve_http(Dribble) + "/health"
    started = time.monotonic()
    problem = HttpCheck(url, timeout_seconds=1).check()
    took = time.monotonic() - started
    assert problem is not None and "timed out" in problem
    assert took < 4, f"the check took {took:.1f}s with a 1s timeout"


_LOUD = """
import os
for _ in range(300):
    os.write(1, b"x" * (1 << 20))
    os.write(2, b"y" * (1 << 19))
os.write(2, b"\\nlast words\\n")
raise SystemExit(4)
"""

_MEASURE = """
import resource, sys
from defender_agent._health import ExecCheck
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
problem = ExecCheck([sys.executable, sys.argv[1]], 60).check()
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(grown // 1024, problem.rsplit(" exited ", 1)[1])
"""


def test_exec_check_does_not_keep_what_the_command_prints(tmp_path: Path) -> None:
    # A check like `nft list ruleset` may print megabytes each interval: none of it may pile
    # up in the agent (its pod memory limit would kill it). Measured in a child process so the
    # high-water mark is this check's alone.
    loud = tmp_path / "loud.py"
    loud.write_text(_LOUD)
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(loud)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    grown_mib, said = done.stdout.split(maxsplit=1)
    assert said.strip() == "4: last words"
    assert int(grown_mib) < 64, f"the agent grew by {grown_mib} MiB for 450 MiB of output"


def test_a_token_in_the_health_url_is_never_shown() -> None:
    # describe() feeds the status endpoint, the problem line feeds logs and the alert.
    check = HttpCheck(f"http://agent:pw-s3cret@127.0.0.1:{_closed_port()}/health?token=tok-s3cret")
    shown = [check.describe(), check.check() or "", repr(check)]
    assert not [text for text in shown if "s3cret" in text]
    assert check.describe().endswith("/health?...")


# --- localhost that is not loopback ------------------------------------------------------------


@pytest.fixture
def localhost_elsewhere(monkeypatch: pytest.MonkeyPatch) -> tuple[str, socket.socket]:
    """``localhost`` leading to a listener outside loopback, as after a container of the pod
    rewrote the pod's /etc/hosts. Whether this host has a non-loopback address to listen on
    depends on its network, so the listener is on loopback and the agent's connections see
    their peer as 192.0.2.7 (TEST-NET-1): the address check itself is the real one
    (`loopback_peer_problem`, also tested on its own below), and so are the lookup, the
    connection and what is sent on it."""
    from defender_agent import _health, _http

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = int(listener.getsockname()[1])
    real_check = _http.loopback_peer_problem

    class Elsewhere:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def getpeername(self) -> tuple[str, int]:
            return "192.0.2.7", int(self.sock.getpeername()[1])

    def seen_elsewhere(sock: socket.socket, host: str) -> str | None:
        return real_check(Elsewhere(sock), host)  # type: ignore[arg-type]

    monkeypatch.setattr(_http, "loopback_peer_problem", seen_elsewhere)
    monkeypatch.setattr(_health, "loopback_peer_problem", seen_elsewhere)
    return f"localhost:{port}", listener


def test_an_http_check_whose_localhost_is_elsewhere_fails_without_a_request(
    localhost_elsewhere: tuple[str, socket.socket],
) -> None:
    target, listener = localhost_elsewhere
    with listener:
        problem = HttpCheck(f"http://{target}/health", 2).check() or ""
        assert "not a loopback address" in problem
        accepted, _ = listener.accept()
        with accepted:
            accepted.settimeout(1)
            assert accepted.recv(100) == b""  # closed before a byte of the request was sent


def test_a_tcp_check_whose_localhost_is_elsewhere_fails(
    localhost_elsewhere: tuple[str, socket.socket],
) -> None:
    target, listener = localhost_elsewhere
    host, _, port = target.partition(":")
    with listener:
        assert "not a loopback address" in (TcpCheck(host, int(port), 2).check() or "")


def test_http_requests_go_to_loopback_over_plain_http_only() -> None:
    for url in ("https://127.0.0.1:1/x", "http://10.0.0.7/x", "http://127.1/x"):
        with pytest.raises(ValueError, match="must"):
            http_request(url, "GET", 1)


@pytest.mark.parametrize(
    ("peer", "ok"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("192.0.2.7", False),
        ("::ffff:192.0.2.7", False),
        ("fd00::2", False),
    ],
)
def test_the_address_a_connection_reached_is_checked(peer: str, ok: bool) -> None:
    from defender_agent._http import loopback_peer_problem

    class Connected:
        def getpeername(self) -> tuple[str, int]:
            return peer, 8080

    problem = loopback_peer_problem(Connected(), "localhost")  # type: ignore[arg-type]
    assert (problem is None) is ok


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (a killed orphan waits for its reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


@pytest.mark.parametrize("ends", ["times out", "exits"])
def test_an_exec_check_leaves_no_process_behind(tmp_path: Path, ends: str) -> None:
    # The check runs every heartbeat interval. A command that starts a child of its own (a
    # shell running `curl`, a wrapper script) and hangs, or leaves it running, must not leave
    # one more process each interval, nor hold the check for as long as the child keeps its
    # stderr open.
    left = tmp_path / "left.pid"
    tail = "wait" if ends == "times out" else "exit 0"
    check = ExecCheck(["sh", "-c", f"sleep 60 & echo $! > {left}; {tail}"], 1.0)
    started = time.monotonic()
    problem = check.check()
    took = time.monotonic() - started
    pid = int(left.read_text())
    try:
        if ends == "times out":
            assert "did not finish within 1s" in (problem or "")
        else:
            assert problem is None
        wait_for("the command's child to be gone", lambda: not _running(pid), timeout=5)
        assert took < 1.9, f"the check took {took:.1f}s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
