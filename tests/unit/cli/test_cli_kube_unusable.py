"""The commands that talk to Kubernetes, given a kubeconfig they cannot use: a file that is not a
kubeconfig, or an API server that does not answer. One line naming the problem and exit 2, as
for any other mistake a person can fix; never the client's traceback, never the file's tokens."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
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
