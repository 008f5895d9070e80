"""Data nested thousands of levels deep, wherever the plugin decodes someone else's data: one
line and exit 2 (or the command's success when it never needed that data), never a
RecursionError traceback.

The API server accepts objects nested some 10,000 levels deep (a custom resource's
preserved fields, a Secret's managedFields); the Kubernetes client decodes its answers with
`json.loads`, and a kubeconfig is read by a YAML loader that recurses once per level. etcd
values are bounded by the library (`parse_json`); the files the plugin reads itself too."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from defender_cli import main
from defender_config import Keyring

DEEP = 5000  # far past Python's recursion limit
TOO_DEEP = "nested too deeply to decode (past Python's recursion limit)"

Serve = Callable[[type[BaseHTTPRequestHandler]], str]


@pytest.fixture(autouse=True)
def _no_caller_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("DEFENDER_") or name == "KUBECONFIG":
            monkeypatch.delenv(name)
    yield


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([*argv, "--no-color"], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def one_line(err: str, command: str) -> None:
    assert err.count("\n") == 1 and err.startswith(f"kubectl defender {command}: "), err
    assert "Traceback" not in err and "RecursionError" not in err


def kubeconfig(server: str) -> str:
    return (
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: c, cluster: {{server: {server!r}}}}}]\n"
        "users: [{name: u, user: {token: t0k3n}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\n"
        "current-context: x\n"
    )


def deep_secret() -> bytes:
    """A Secret holding a keyring, whose managedFields someone nested DEEP levels deep."""
    data = Keyring.generate().to_secret_data()
    fields = '{"f:a": ' * DEEP + "{}" + "}" * DEEP
    return (
        '{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ml-defender-keyring",'
        ' "namespace": "ml-defender", "managedFields": [{"manager": "x", "operation": "Update",'
        f' "fieldsType": "FieldsV1", "fieldsV1": {fields}}}]}}, "data": {json.dumps(data)}}}'
    ).encode()


def answering(body: bytes, seen: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            seen.append(f"{self.command} {self.path}")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PATCH = do_PUT = do_POST = _answer

        def log_message(self, *_: object) -> None:
            pass

    return Handler


# --- a kubeconfig nested too deep -------------------------------------------------------------

KUBE_COMMANDS = {
    "rotate-key": ["rotate-key"],
    "rollback": ["rollback", "sniffer"],
    "promote": ["promote", "sniffer"],
    "abort": ["abort", "sniffer"],
    "keyring": ["keyring", "export", "-f", "{tmp}/export"],
    "diff": ["diff", "sniffer", "--keyring-secret", "ns/keys"],
}


@pytest.mark.parametrize("command", sorted(KUBE_COMMANDS))
def test_a_kubeconfig_nested_too_deep_is_one_line(tmp_path: Path, command: str) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: x\ncontexts: "
        + "[" * DEEP
        + "]" * DEEP
        + "\n"
    )
    args = [a.format(tmp=tmp_path) for a in KUBE_COMMANDS[command]]
    code, out, err = run(*args, "--kubeconfig", str(config))
    assert (code, out) == (2, "")
    one_line(err, command)
    assert f"kubeconfig {config} is {TOO_DEEP}" in err
    assert not (tmp_path / "export").exists()


# --- an answer of the API server nested too deep ----------------------------------------------


def test_keyring_export_of_a_secret_nested_too_deep_is_one_line(
    tmp_path: Path, serve_http: Serve
) -> None:
    seen: list[str] = []
    config = tmp_path / "kubeconfig"
    config.write_text(kubeconfig(serve_http(answering(deep_secret(), seen))))
    export = tmp_path / "export"
    code, out, err = run("keyring", "export", "-f", str(export), "--kubeconfig", str(config))
    assert (code, out) == (2, "")
    one_line(err, "keyring")
    assert (
        f"the API server's answer for Secret ml-defender/ml-defender-keyring is {TOO_DEEP}" in err
    )
    assert not export.exists()
    assert [s.split(" ")[0] for s in seen] == ["GET"]  # nothing written


def test_a_keyring_secret_nested_too_deep_is_one_line(tmp_path: Path, serve_http: Serve) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(kubeconfig(serve_http(answering(deep_secret(), []))))
    code, out, err = run(
        "diff", "sniffer", "--keyring-secret", "ns/keys", "--kubeconfig", str(config),
        "--etcd-endpoints", "http://127.0.0.1:1",
    )  # fmt: skip
    assert (code, out) == (2, "")
    one_line(err, "diff")
    assert f"the API server's answer for Secret ns/keys is {TOO_DEEP}" in err


def test_rotate_key_on_a_secret_nested_too_deep_is_requested_all_the_same(
    tmp_path: Path, serve_http: Serve
) -> None:
    """The server answers the patch with the whole Secret, which the plugin does not need: the
    annotation is set, and decoding that answer made the success a RecursionError."""
    seen: list[str] = []
    config = tmp_path / "kubeconfig"
    config.write_text(kubeconfig(serve_http(answering(deep_secret(), seen))))
    code, out, err = run("rotate-key", "--kubeconfig", str(config))
    assert (code, err) == (0, "")
    assert "Rotation requested" in out
    assert [s.split(" ")[0] for s in seen] == ["PATCH"]


def test_an_export_is_recorded_on_a_secret_nested_too_deep_to_read_back(
    tmp_path: Path, serve_http: Serve
) -> None:
    """The export's stamp: a patch whose answer (the whole Secret) is not needed either. The
    Secret is read first, so it must decode: here only the patch's answer is deep."""
    plain = Keyring.generate().to_secret_data()
    readable = json.dumps(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "k"}, "data": plain}
    ).encode()
    deep = deep_secret()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, body: bytes) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer(readable)

        def do_PATCH(self) -> None:
            self._answer(deep)

        def log_message(self, *_: object) -> None:
            pass

    config = tmp_path / "kubeconfig"
    config.write_text(kubeconfig(serve_http(Handler)))
    export = tmp_path / "export"
    code, out, err = run("keyring", "export", "-f", str(export), "--kubeconfig", str(config))
    assert (code, err) == (0, "")
    assert export.exists() and str(export) in out


# --- the net under every other decoder --------------------------------------------------------


def test_any_other_recursion_error_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from defender_cli import _app

    def deep_somewhere(*_: Any) -> Any:
        raise RecursionError("maximum recursion depth exceeded while decoding a JSON object")

    monkeypatch.setattr(_app, "run", deep_somewhere)
    code, out, err = run("status", "--etcd-endpoints", "http://127.0.0.1:1")
    assert (code, out) == (2, "")
    one_line(err, "status")
    assert TOO_DEEP in err


# --- files the plugin reads itself (bounded by the library: kept so) --------------------------


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_settings_file_nested_too_deep_is_one_line(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"settings{suffix}"
    path.write_text('{"prefix": ' + "[" * DEEP + "]" * DEEP + "}")
    code, out, err = run("status", "--settings", str(path))
    assert (code, out) == (2, "")
    one_line(err, "status")
    assert "nested too deeply" in err


@pytest.mark.parametrize("raw", [True, False])
def test_a_keyring_file_nested_too_deep_is_one_line(tmp_path: Path, raw: bool) -> None:
    path = tmp_path / "keyring.json"
    path.write_text('{"keys": ' + "[" * DEEP + "]" * DEEP + "}")
    if raw:
        code, out, err = run("diff", "sniffer", "--keyring", str(path))
        command = "diff"
    else:
        code, out, err = run("keyring", "import", "-f", str(path))
        command = "keyring"
    assert (code, out) == (2, "")
    one_line(err, command)
    assert "nested too deeply" in err
