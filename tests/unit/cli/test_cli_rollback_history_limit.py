"""`kubectl defender rollback --direct` keeps the history the component asks for: the choice of
the limit (--history-limit, else the DefenderComponent's spec.rollout.historyLimit, else the
store's default with a warning), the flag's argument errors, and reading the resource through
an API server stood in for by a local HTTP server. Against the real kube-apiserver and etcd:
tests/e2e/cli/test_cli_e2e_rollback_history_limit.py."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from defender_cli._app import HISTORY_LIMIT_MAX, build_parser, main
from defender_cli._commands import (
    HistoryLimitChoice,
    Unreadable,
    choose_history_limit,
    read_component,
)
from defender_cli._connect import Connection
from defender_config.contract import DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT

WHERE = "defendercomponent prod/firewall"
TOKEN = "sekrit-token-0123456789"


def spec_limit(value: Any) -> dict[str, Any]:
    return {"metadata": {"name": "firewall"}, "spec": {"rollout": {"historyLimit": value}}}


def choose(flag: int | None, found: Any, store_default: int = 10) -> HistoryLimitChoice:
    return choose_history_limit(flag, found, store_default, where=WHERE)


# ------------------------------------------------------------------------------------ the choice


@pytest.mark.parametrize("limit", [1, 3, 30, MAX_HISTORY_LIMIT])
def test_the_spec_limit_is_kept_below_and_above_the_default(limit: int) -> None:
    assert choose(None, spec_limit(limit)) == HistoryLimitChoice(limit, "spec")


@pytest.mark.parametrize(
    "found",
    [spec_limit(30), Unreadable("404 Not Found"), {"spec": "not a mapping"}, spec_limit(0)],
    ids=["spec", "unreadable", "malformed", "invalid"],
)
def test_the_flag_wins_over_whatever_the_resource_says(found: Any) -> None:
    assert choose(5, found) == HistoryLimitChoice(5, "flag")


def test_with_the_flag_the_resource_need_not_be_read() -> None:
    assert choose(7, None) == HistoryLimitChoice(7, "flag")


def test_without_the_flag_a_resource_not_read_is_a_bug() -> None:
    with pytest.raises(ValueError, match="must have been read"):
        choose(None, None)


@pytest.mark.parametrize(
    "found",
    [{}, {"spec": {}}, {"spec": {"rollout": {}}}, spec_limit(None)],
    ids=["no spec", "no rollout", "no historyLimit", "null"],
)
def test_an_unset_limit_is_the_crds_default_not_the_stores(found: dict[str, Any]) -> None:
    # A store configured to keep 25 by default: the resource's own (defaulted) limit still wins.
    assert choose(None, found, store_default=25) == HistoryLimitChoice(
        DEFAULT_HISTORY_LIMIT, "crd-default"
    )


def warned(choice: HistoryLimitChoice) -> str:
    assert choice.warning is not None
    assert "\n" not in choice.warning
    return choice.warning


def test_an_unreadable_resource_keeps_the_stores_default_and_says_so() -> None:
    choice = choose(None, Unreadable("403 Forbidden"), store_default=12)
    assert (choice.limit, choice.source) == (12, "store-default")
    text = warned(choice)
    assert text.startswith(f"cannot read {WHERE} (403 Forbidden);")
    assert "the store's default history limit, 12 versions" in text
    assert "--history-limit N" in text


@pytest.mark.parametrize(
    ("found", "shown"),
    [
        (spec_limit(0), "spec.rollout.historyLimit 0,"),
        (spec_limit(MAX_HISTORY_LIMIT + 1), f"spec.rollout.historyLimit {MAX_HISTORY_LIMIT + 1},"),
        (spec_limit(-3), "spec.rollout.historyLimit -3,"),
        (spec_limit(True), "spec.rollout.historyLimit True,"),
        (spec_limit("30"), "spec.rollout.historyLimit '30',"),
        (spec_limit(2.5), "spec.rollout.historyLimit 2.5,"),
        (spec_limit("x" * 500), "spec.rollout.historyLimit 'xxxxx"),
        ({"spec": {"rollout": [1]}}, "has no spec.rollout mapping"),
        ({"spec": ["rollout"]}, "has no spec.rollout mapping"),
    ],
    ids=["0", "above max", "negative", "bool", "string", "float", "long", "list", "spec list"],
)
def test_a_limit_the_crd_would_not_allow_keeps_the_stores_default_and_says_so(
    found: dict[str, Any], shown: str
) -> None:
    choice = choose(None, found, store_default=10)
    assert (choice.limit, choice.source) == (10, "store-default")
    text = warned(choice)
    assert text.startswith(f"{WHERE} ")
    assert shown in text and "--history-limit N" in text
    assert len(text) < 300, "a hostile value is quoted only in part"


def test_the_bounds_are_the_crds() -> None:
    """The flag's maximum is a literal (the parser loads no library): the contract's value."""
    assert HISTORY_LIMIT_MAX == MAX_HISTORY_LIMIT


# ------------------------------------------------------------------------------ argument errors


def argument_error(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main(list(argv), out=io.StringIO(), err=io.StringIO())
    assert exited.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("0", "'0' is out of range: keep 1 to 1000 versions"),
        ("-1", "'-1' is out of range: keep 1 to 1000 versions"),
        ("1001", "'1001' is out of range"),
        ("ten", "'ten' is not a whole number"),
        ("2.5", "'2.5' is not a whole number"),
        ("", "'' is not a whole number"),
    ],
)
def test_a_history_limit_that_is_not_one_to_a_thousand_is_an_argument_error(
    value: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = argument_error(
        "rollback", "firewall", "--direct", f"--history-limit={value}", capsys=capsys
    )
    assert f"argument --history-limit: {why}" in err


def test_a_history_limit_without_direct_is_an_argument_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = argument_error("rollback", "firewall", "--history-limit", "5", capsys=capsys)
    assert "rollback --history-limit needs --direct" in err


def test_the_flag_parses() -> None:
    parse = build_parser().parse_args
    assert parse(["rollback", "fw", "--direct", "--history-limit", "30"]).history_limit == 30
    assert parse(["rollback", "fw", "--direct"]).history_limit is None


# ------------------------------------------------------------------------- reading the resource


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: c, cluster: {{server: {server!r}}}}}]\n"
        f"users: [{{name: u, user: {{token: {TOKEN}}}}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\n"
        "current-context: x\n"
    )
    return path


def connection(config: Path, *extra: str) -> Connection:
    args = build_parser().parse_args(
        ["rollback", "firewall", "--direct", "--kubeconfig", str(config), *extra]
    )
    return Connection(args)


def read(config: Path, *extra: str) -> dict[str, Any] | Unreadable:
    conn = connection(config, *extra)
    try:
        return read_component(
            conn.kube, "prod", "firewall", request_timeout=conn.args.request_timeout
        )
    finally:
        conn.close()


def answering(status: int, body: bytes, seen: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    return Handler


def test_the_resource_is_read_as_served(
    tmp_path: Path, serve_http: Callable[[type[BaseHTTPRequestHandler]], str]
) -> None:
    seen: list[str] = []
    url = serve_http(answering(200, json.dumps(spec_limit(30)).encode(), seen))
    assert read(kubeconfig(tmp_path / "kc", url)) == spec_limit(30)
    assert seen == ["/apis/mldefender.io/v1alpha1/namespaces/prod/defendercomponents/firewall"]


@pytest.mark.parametrize(
    ("status", "body", "why"),
    [
        (404, b'{"kind": "Status", "code": 404}', "404 Not Found"),
        (403, b'{"kind": "Status", "code": 403}', "403 Forbidden"),
        (401, b'{"kind": "Status", "code": 401}', "401 Unauthorized"),
        (200, b"<html>a proxy's page</html>", "the API server's answer is not JSON"),
        (200, b"\xff\xfe\x00", "the API server's answer is not JSON"),
        (200, b"[1, 2]", "the API server's answer is not an object"),
        (
            200,
            b'{"spec": {"config": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}}",
            "the API server's answer is nested too deeply to decode",
        ),
    ],
    ids=["not found", "forbidden", "unauthorized", "html", "not utf-8", "a list", "too deep"],
)
def test_a_resource_that_cannot_be_read_says_why(
    tmp_path: Path,
    serve_http: Callable[[type[BaseHTTPRequestHandler]], str],
    status: int,
    body: bytes,
    why: str,
) -> None:
    url = serve_http(answering(status, body, []))
    found = read(kubeconfig(tmp_path / "kc", url))
    assert isinstance(found, Unreadable)
    assert found.why.startswith(why), found.why


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port on 127.0.0.1 bound and not listening: every connection is refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_an_api_server_that_does_not_answer_is_a_reason_not_an_error(
    tmp_path: Path, refusing_port: int
) -> None:
    found = read(kubeconfig(tmp_path / "kc", f"https://127.0.0.1:{refusing_port}"))
    assert isinstance(found, Unreadable)
    assert found.why.startswith("the Kubernetes API server does not answer:")
    assert "Connection refused" in found.why and TOKEN not in found.why


def test_a_kubeconfig_that_does_not_load_is_a_reason_without_its_content(tmp_path: Path) -> None:
    config = tmp_path / "kc"
    config.write_text(f"users:\n- name: u\n  user: {{token: '{TOKEN}\n")
    found = read(config)
    assert isinstance(found, Unreadable)
    assert f"kubeconfig {config} is not a valid kubeconfig" in found.why
    assert TOKEN not in found.why


def test_no_kubeconfig_at_all_is_a_reason(tmp_path: Path) -> None:
    found = read(tmp_path / "missing")
    assert isinstance(found, Unreadable) and found.why.startswith("kubeconfig:"), found


def test_an_unexpected_error_is_a_bug_not_a_reason() -> None:
    """Only reading's own failures fall back to the default: anything else keeps its
    traceback (and the rollback is not written)."""

    def broken() -> Any:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        read_component(broken, "prod", "firewall")


def test_a_warning_goes_to_stderr_with_control_characters_escaped() -> None:
    from defender_cli._output import Printer

    out, err = io.StringIO(), io.StringIO()
    Printer.for_stream(out, False, err=err).warn("cannot read x (403 \x1b[2JForbidden)")
    assert out.getvalue() == ""
    assert err.getvalue() == "cannot read x (403 \\x1b[2JForbidden)\n"


@pytest.mark.parametrize(
    ("source", "said"),
    [
        ("flag", "(--history-limit)"),
        ("spec", "(spec.rollout.historyLimit)"),
        ("crd-default", "(spec.rollout.historyLimit unset: the CRD's default)"),
        ("store-default", "(the store's default)"),
    ],
)
def test_the_table_says_what_the_history_keeps_and_why(source: str, said: str) -> None:
    from defender_cli._app import _show_done
    from defender_cli._output import Printer

    out = io.StringIO()
    data = {
        "component": "firewall",
        "rolledBackTo": "3",
        "activeVersion": 16,
        "historyLimit": 7,
        "historyLimitFrom": source,
        "via": "etcd",
    }
    _show_done(Printer(out, False), data)
    assert out.getvalue() == (
        f"firewall: ACTIVE is now version 16 (a copy of 3); the history keeps 7 versions {said}.\n"
    )
