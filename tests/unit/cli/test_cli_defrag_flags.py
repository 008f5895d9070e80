"""`kubectl defender defrag --settle-timeout`: parsed as a duration of at least a second and
handed to the defrag procedure, whose waits it bounds (tested in
tests/unit/library/test_maintenance_defrag_procedure.py and on real clusters in
tests/integration/maintenance)."""

from __future__ import annotations

import io
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from defender_cli import _connect, _etcd_commands
from defender_cli._app import build_parser, run
from defender_cli._output import Printer
from defender_config import DefragResult


def test_the_default_wait_is_a_minute() -> None:
    args = build_parser().parse_args(["defrag"])
    assert args.settle_timeout == timedelta(seconds=60)


@pytest.mark.parametrize("text", ["0s", "soon", "-5s", "1.5m"])
def test_a_wait_shorter_than_a_second_or_not_a_duration_is_an_argument_error(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["defrag", "--settle-timeout", text])
    assert exited.value.code == 2
    assert "--settle-timeout" in capsys.readouterr().err


def test_the_wait_reaches_the_defrag_procedure(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    store = object()

    def fake_defragment(given: Any, **kwargs: Any) -> DefragResult:
        seen.update(kwargs, store=given)
        return DefragResult()

    class Client:
        def __init__(self) -> None:
            self.store = store
            self.envelope = SimpleNamespace(options=SimpleNamespace(request_limit_bytes=1234))

    monkeypatch.setattr(_etcd_commands, "defragment_cluster", fake_defragment)
    monkeypatch.setattr(_connect.Connection, "client", lambda self, **_: Client())
    monkeypatch.setattr(_connect.Connection, "close", lambda self: None)
    args = build_parser().parse_args(["defrag", "--compact", "--settle-timeout", "5m"])
    out = io.StringIO()
    assert run(args, Printer.for_stream(out, colour=False)) == 0
    assert seen["settle_timeout"] == 300.0 and seen["compact"] is True
    assert seen["disarm_nospace"] is False and seen["store"] is store
    # The room a member needs is the largest write this client's library sends.
    assert seen["room_bytes"] == 1234
    assert "No alarm left." in out.getvalue()


def test_a_member_left_with_less_room_than_the_largest_write_is_shown() -> None:
    data = {
        **DefragResult(short_of_room=("m1:2379", "m2:2379")).as_dict(),
        "room_bytes": 1_572_864,
    }
    out = io.StringIO()
    _etcd_commands.show_defrag(Printer.for_stream(out, colour=False), data)
    text = out.getvalue()
    assert "1.5MiB or less (the largest write) left under the quota: m1:2379, m2:2379." in text
    assert "raises NOSPACE again" in text and "No alarm left." in text


def test_nothing_is_said_of_room_when_every_member_has_enough() -> None:
    data = {**DefragResult().as_dict(), "room_bytes": 1_572_864}
    out = io.StringIO()
    _etcd_commands.show_defrag(Printer.for_stream(out, colour=False), data)
    assert "left under the quota" not in out.getvalue()
