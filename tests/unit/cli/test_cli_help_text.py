"""What `kubectl defender --help` tells a person: connection examples that work against the
chart's defaults (docs/operations.md, "Reaching etcd")."""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Iterator

import pytest

from defender_cli._app import build_parser


def _help(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return out.getvalue()


@pytest.mark.parametrize("argv", [(), ("status",), ("defrag",)])
def test_connection_examples_use_https_and_every_member(argv: tuple[str, ...]) -> None:
    # argparse wraps long words anywhere: compare without whitespace.
    text = "".join(_help(*argv).split())
    # TLS is on by default, and defrag refuses fewer endpoints than members.
    assert "https://127.0.0.1:23790" in text
    assert "http://127.0.0.1" not in text
    assert "port-forwardsvc/" not in text
    assert "docs/operations.md#reaching-etcd" in text


def _parsers(
    parser: argparse.ArgumentParser, path: str = "kubectl defender"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_flag_and_argument_says_what_it_does() -> None:
    # `--help` is the plugin's reference: a flag listed without a word is a guess for the user.
    silent = []
    seen = 0
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            seen += 1
            if not action.help or action.help == argparse.SUPPRESS:
                silent.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert seen > 50, "the walk found the commands"
    assert not silent, "\n".join(sorted(set(silent)))
