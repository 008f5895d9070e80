"""The plugin's pure parts: durations, ages, tables, colour decisions, flag errors."""

from __future__ import annotations

import argparse
import io
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from defender_cli._app import build_parser, count, duration, kube_name, main, rollback_target
from defender_cli._flags import secret_ref
from defender_cli._output import Printer, age, shorten, use_colour


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30s", timedelta(seconds=30)), ("15m", timedelta(minutes=15)), ("7d", timedelta(days=7))],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert duration(text) == expected


@pytest.mark.parametrize("text", ["", "5", "1w", "-3m", "m"])
def test_bad_durations_say_what_is_expected(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="30s, 15m, 2h or 7d"):
        duration(text)


def test_rollback_targets_follow_the_contract_grammar() -> None:
    assert rollback_target("master") == "master"
    assert rollback_target("MASTER") == "master"
    assert rollback_target("12") == 12
    for bad in ("0", "-1", "latest", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="master` or a version"):
            rollback_target(bad)


def test_ages_read_like_kubectl() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert age(None) == "-"
    assert age(now - timedelta(seconds=5), now) == "5s"
    assert age(now - timedelta(minutes=5), now) == "5m"
    assert age(now - timedelta(hours=5), now) == "5h"
    assert age(now - timedelta(days=5), now) == "5d"
    assert age(now + timedelta(seconds=5), now) == "0s", "clock skew never shows negative"


def test_table_aligns_columns_ignoring_colour_codes() -> None:
    out = _Tty()
    printer = Printer(out, colour=True)
    printer.table(["A", "STATUS", "C"], [["x", printer.status("RUNNING"), "1"], ["long", "-", "2"]])
    lines = out.getvalue().splitlines()
    assert "\x1b[32mRUNNING\x1b[0m" in lines[1]
    plain = [re.sub(r"\x1b\[[0-9;]*m", "", ln) for ln in lines]
    assert plain[0].index("C") == plain[1].index("1") == plain[2].index("2")
    assert plain[0].index("STATUS") == plain[1].index("RUNNING") == plain[2].index("-")


def test_colour_only_on_a_terminal_and_never_with_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_colour(_Tty()) is True
    assert use_colour(io.StringIO()) is False
    assert use_colour(io.StringIO(), forced=True) is True
    monkeypatch.setenv("NO_COLOR", "1")
    assert use_colour(_Tty()) is False
    assert Printer(io.StringIO(), colour=False).paint("x", "red") == "x"


def test_shorten_keeps_one_line() -> None:
    assert shorten("a\n  b", 10) == "a b"
    assert shorten("x" * 20, 10) == "x" * 9 + "…"


def test_every_command_has_help_and_json_output() -> None:
    parser = build_parser()
    for command in ("status", "diff", "history", "rollback", "rotate-key", "alerts", "dump"):
        args = parser.parse_args(
            [command, *(["c"] if command in ("diff", "history", "rollback") else [])]
        )
        assert args.output == "table"


def test_bad_settings_file_is_one_readable_line(tmp_path: Path) -> None:
    bad = tmp_path / "settings.json"
    bad.write_text("{not json")
    err = io.StringIO()
    code = main(["status", "--settings", str(bad)], out=io.StringIO(), err=err)
    assert code == 2
    assert err.getvalue().startswith("kubectl defender status: settings:")
    assert "not valid JSON" in err.getvalue()


NOT_UTF8 = b"\xffcorrect horse\n"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["status", "--etcd-endpoints", "notanendpoint"],
            "status: --etcd-endpoints 'notanendpoint': endpoint 'notanendpoint' must look like"
            " [scheme://]host:port",
        ),
        (["status", "--etcd-endpoints", " , "], "status: --etcd-endpoints ' , ': at least one"),
        (
            ["dump", "--etcd-endpoints", "http://127.0.0.1:1,ftp://b:2"],
            "dump: --etcd-endpoints 'http://127.0.0.1:1,ftp://b:2': endpoint 'ftp://b:2' must use"
            " http:// or https://",
        ),
        (
            ["alerts", "--etcd-endpoints", "http://127.0.0.1:1", "--prefix", "ml-defender/"],
            "alerts: --prefix 'ml-defender/': String should match pattern",
        ),
        (["status", "--settings", "{not_utf8}"], "status: settings: settings file {not_utf8}: not"),
        (
            ["keyring", "export", "-f", "x", "--passphrase-file", "{not_utf8}"],
            "keyring: the passphrase file {not_utf8} is not UTF-8 text",
        ),
    ],
)
def test_a_bad_flag_value_is_one_line_naming_the_flag(
    argv: list[str], says: str, tmp_path: Path
) -> None:
    not_utf8 = tmp_path / "not-utf8"
    not_utf8.write_bytes(NOT_UTF8)
    argv = [a.format(not_utf8=not_utf8) for a in argv]
    err = io.StringIO()
    assert main(argv, out=io.StringIO(), err=err) == 2
    message = err.getvalue()
    assert message.startswith("kubectl defender " + says.format(not_utf8=not_utf8)), message
    assert len(message.splitlines()) == 1 and "pydantic" not in message
    assert "horse" not in message and "xff" not in message


def test_limit_is_a_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert (count("0"), count("7")) == (0, 7)
    for bad, why in (("-3", "is negative"), ("x", "not a whole number")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            count(bad)
    with pytest.raises(SystemExit) as exited:
        main(["alerts", "--limit", "-3"])
    assert exited.value.code == 2
    assert "argument --limit: '-3' is negative" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["rollback", "sniffer", "-n", ""],
        ["promote", "sniffer", "-n", "Not_A_Name"],
        ["rotate-key", "--operator-namespace", ""],
        ["rotate-key", "--secret", ""],
        ["keyring", "export", "-f", "x", "--secret", "a/b"],
        ["keyring", "import", "-f", "x", "--operator-namespace=-bad-"],
        ["status", "--keyring-secret", "ml-defender/"],
        ["status", "--keyring-secret", "/ml-defender-keyring"],
        ["diff", "sniffer", "--keyring-secret", "Bad_NS/ml-defender-keyring"],
    ],
    ids=[
        "empty namespace",
        "bad namespace",
        "empty operator ns",
        "empty secret",
        "slash",
        "dash",
        "keyring secret without name",
        "keyring secret with empty namespace",
        "keyring secret in a bad namespace",
    ],
)
def test_a_kubernetes_name_flag_refuses_what_kubernetes_would(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty name would make the client list (every namespace's Secrets) instead of get."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "is not a Kubernetes name" in capsys.readouterr().err


def test_a_keyring_secret_is_namespace_and_name() -> None:
    assert secret_ref("ml-defender-keyring") == ("ml-defender", "ml-defender-keyring")
    assert secret_ref("ops/keys") == ("ops", "keys")
    for bad in ("", "ops/", "/keys", "a/b/c", "Ops/keys", "ops/Keys"):
        with pytest.raises(argparse.ArgumentTypeError, match="use \\[NAMESPACE/\\]NAME"):
            secret_ref(bad)


def test_kubernetes_names_pass_as_they_are() -> None:
    for name in ("default", "ml-defender", "ml-defender-keyring", "a", "a.b-1", "x" * 253):
        assert kube_name(name) == name
    for bad in ("", "A", "a_b", "-a", "a-", "a/b", ".a", "x" * 254, "ns\n", "ns\r"):
        with pytest.raises(argparse.ArgumentTypeError):
            kube_name(bad)


def test_a_refused_settings_field_that_is_no_flag_is_named_as_a_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from defender_cli._connect import _refused
    from defender_config import LibrarySettings, SettingsError, override_settings

    for name in list(os.environ):
        if name.startswith("DEFENDER_"):
            monkeypatch.delenv(name)
    flags = {"etcd.endpoints": ("--etcd-endpoints", "http://a:1")}
    for fields, says in (
        (
            {"timeout_seconds": 0, "retries": -1},
            "settings: etcd.timeout_seconds: Input should be greater than 0"
            "; settings: etcd.retries: Input should be greater than or equal to 0",
        ),
        ({"user": "u"}, "settings: etcd: user and password must be set together (etcd auth)"),
        (
            {"endpoints": ["ftp://b:2"]},
            "--etcd-endpoints 'http://a:1': endpoint 'ftp://b:2' must use http:// or https://",
        ),
    ):
        with pytest.raises(SettingsError) as caught:
            override_settings(LibrarySettings(), etcd=fields)
        assert str(_refused(caught.value.problems, flags)) == says
