"""The commands that talk to Kubernetes, given a kubeconfig they cannot use: a file that is not a
kubeconfig, or an API server that does not answer. One line naming the problem and exit 2, as
for any other mistake a person can fix; never the client's traceback, never the file's tokens."""

from __future__ import annotations

import argparse
import io
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from defender_cli import main

TOKEN = "sekrit-token-0123456789"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([*argv, "--no-color"], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def kubeconfig(server: str, *, ca_data: str | None = None, context: str = "x") -> str:
    ca = f", certificate-authority-data: {ca_data!r}" if ca_data else ""
    return (
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: c, cluster: {{server: {server!r}{ca}}}}}]\n"
        f"users: [{{name: u, user: {{token: {TOKEN}}}}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\n"
        f"current-context: {context}\n"
    )


MALFORMED = {
    "yaml cut short in a token": f"users:\n- name: u\n  user: {{token: '{TOKEN}\n",
    "binary": b"\xc9\x00\xff" * 100,
    "a list": "- a\n- b\n",
    "a scalar": "hello\n",
    "clusters not a list": "clusters: 5\ncontexts: 5\nusers: 5\ncurrent-context: x\n",
    "a context not a mapping": "clusters: [5]\ncontexts: [{name: x, context: 5}]\nusers: []\n"
    "current-context: x\n",
    "certificate data not base64": kubeconfig("https://127.0.0.1:1", ca_data="!!!notb64"),
}

COMMANDS = {
    "rotate-key": ["rotate-key"],
    "rollback": ["rollback", "sniffer"],
    "promote": ["promote", "sniffer"],
    "keyring export": ["keyring", "export", "-f", "{tmp}/export"],
}


def argv(command: str, tmp_path: Path, config: Path) -> list[str]:
    return [a.format(tmp=tmp_path) for a in COMMANDS[command]] + ["--kubeconfig", str(config)]


@pytest.mark.parametrize("content", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("command", ["rotate-key", "keyring export"])
def test_a_malformed_kubeconfig_is_one_line_without_its_content(
    tmp_path: Path, command: str, content: str | bytes
) -> None:
    config = tmp_path / "kubeconfig"
    if isinstance(content, bytes):
        config.write_bytes(content)
    else:
        config.write_text(content)
    code, out, err = run(*argv(command, tmp_path, config))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert f"kubeconfig {config}" in err and "not a valid kubeconfig" in err
    assert TOKEN not in err
    assert not (tmp_path / "export").exists()


def test_a_yaml_error_says_where(tmp_path: Path) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text("clusters: [\n")
    code, _, err = run("rotate-key", "--kubeconfig", str(config))
    assert code == 2
    assert "not valid YAML at line 2, column 1" in err


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port on 127.0.0.1 bound and not listening: every connection is refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.mark.parametrize("command", COMMANDS)
def test_an_api_server_that_does_not_answer_is_one_line(
    tmp_path: Path, refusing_port: int, command: str
) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(kubeconfig(f"https://127.0.0.1:{refusing_port}"))
    code, out, err = run(*argv(command, tmp_path, config))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert "the Kubernetes API server does not answer" in err
    assert "Connection refused" in err and "--kubeconfig / --context" in err
    assert TOKEN not in err
    assert not (tmp_path / "export").exists()


def test_other_errors_still_show_as_bugs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only the transport's errors are worded: anything else is a bug and keeps its traceback."""
    import defender_cli._app as app

    def broken(*_: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(app, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run("rotate-key", "--kubeconfig", str(tmp_path / "none"))


@pytest.mark.parametrize("current", ["[x]", f"{{a: {TOKEN}}}"], ids=["a list", "a mapping"])
def test_a_current_context_that_is_no_string_says_so(tmp_path: Path, current: str) -> None:
    """The loader's own message showed `<…ConfigNode object at 0x…>`: which field is wrong and
    what it must be, and none of the file's text."""
    config = tmp_path / "kubeconfig"
    config.write_text(kubeconfig("https://127.0.0.1:1", context=current))
    code, out, err = run("rotate-key", "--kubeconfig", str(config))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert (
        f"kubeconfig {config} is not a valid kubeconfig (current-context is a list or mapping;"
        " it must be a string, the name of an entry of contexts)" in err
    )
    assert "ConfigNode" not in err and " at 0x" not in err
    assert TOKEN not in err


@pytest.fixture
def silent_port() -> Iterator[tuple[int, list[socket.socket]]]:
    """A port on 127.0.0.1 that accepts connections and never answers on them, and the
    connections it accepted."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


@pytest.mark.parametrize("command", COMMANDS)
def test_an_api_server_that_never_answers_ends_within_the_request_timeout(
    tmp_path: Path, silent_port: tuple[int, list[socket.socket]], command: str
) -> None:
    """Without a timeout the client waited forever on a server that took the connection and
    never answered: the command runs in a thread so that a hang fails the test, not the run."""
    config = tmp_path / "kubeconfig"
    port, accepted = silent_port
    config.write_text(kubeconfig(f"http://127.0.0.1:{port}"))
    result: list[tuple[int, str, str]] = []
    args = [*argv(command, tmp_path, config), "--request-timeout", "1s"]
    thread = threading.Thread(target=lambda: result.append(run(*args)), daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert result, "the command still waits after 20 s with --request-timeout 1s"
    code, out, err = result[0]
    # One attempt, one connection: urllib3's default retries sent a read (keyring export's
    # GET) four times, each on a new connection, and waited out the timeout each time.
    assert len(accepted) == 1, f"{len(accepted)} connections for one request"
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert "the Kubernetes API server does not answer (no answer within 1s, see" in err
    assert TOKEN not in err
    assert not (tmp_path / "export").exists()


def test_the_request_timeout_flag() -> None:
    from defender_cli._app import build_parser
    from defender_cli._flags import DEFAULT_REQUEST_TIMEOUT, request_timeout

    assert DEFAULT_REQUEST_TIMEOUT == 30
    assert build_parser().parse_args(["rotate-key"]).request_timeout == 30
    assert [request_timeout(t) for t in ("45", "45s", "2m", "0.5", "1h")] == [
        45,
        45,
        120,
        0.5,
        3600,
    ]
    for never in ("0", "0s", "2h", "-1", "soon", "1d"):
        with pytest.raises(argparse.ArgumentTypeError):
            request_timeout(never)


DEEP = 5000  # far past Python's recursion limit: json.loads ends in RecursionError


def _patch_answering(status: int, body: bytes, seen: list[bytes]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:
            seen.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    return Handler


@pytest.mark.parametrize("command", ["rollback", "promote"])
def test_a_component_nested_too_deep_to_decode_is_annotated_all_the_same(
    tmp_path: Path, serve_http: Callable[[type[BaseHTTPRequestHandler]], str], command: str
) -> None:
    """The API server answers a patch with the whole object; a spec.config nested thousands of
    levels deep made the client's decoding a RecursionError traceback after the annotation was
    set. The plugin does not need that object and does not read it."""
    deep = b'{"spec": {"config": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}}"
    seen: list[bytes] = []
    url = serve_http(_patch_answering(200, deep, seen))
    config = tmp_path / "kubeconfig"
    config.write_text(kubeconfig(url))
    code, out, err = run(*argv(command, tmp_path, config))
    assert (code, err) == (0, "")
    assert "Asked the operator to" in out and "sniffer" in out
    assert len(seen) == 1 and b"mldefender.io/" in seen[0]


def test_a_refused_patch_is_still_an_error_without_reading_the_answer(
    tmp_path: Path, serve_http: Callable[[type[BaseHTTPRequestHandler]], str]
) -> None:
    url = serve_http(_patch_answering(404, b'{"kind": "Status"}', []))
    config = tmp_path / "kubeconfig"
    config.write_text(kubeconfig(url))
    code, out, err = run("promote", "sniffer", "--kubeconfig", str(config))
    assert (code, out) == (2, "")
    assert err.startswith(
        "kubectl defender promote: cannot annotate defendercomponent default/sniffer: 404"
    )
