"""What `kubectl defender --help` tells a person: connection examples that work against the
chart's defaults (docs/operations.md, "Reaching etcd")."""

from __future__ import annotations

import contextlib
import io

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
