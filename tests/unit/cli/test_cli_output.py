"""The plugin's pure parts: durations, ages, tables, colour decisions, flag errors."""

from __future__ import annotations

import argparse
import io
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from defender_cli._app import build_parser, duration, main, rollback_target
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
