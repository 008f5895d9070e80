"""A component argument that is no etcd component name (`a/b`, `../x`) is an argument error:
before, it reached the library's key layout and ended in a ValueError traceback."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from defender_cli import main
from defender_config._layout import check_name

BAD = ["a/b", "a/../b", "../x", "x-", "a b", "x\n", "ü", "x" * 254]
# Refused by argparse before any type: an option, or an empty positional.
NOT_ARGUMENTS = ["-x", ""]
GOOD = ["sniffer", "ml-detector", "a.b-c.d9", "Fw_2", "x" * 253, "0"]

COMMANDS = [
    ["status"],
    ["diff"],
    ["history"],
    ["alerts"],
    ["rollback", "--direct"],
]


@pytest.mark.parametrize("name", BAD)
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_a_bad_component_name_is_an_argument_error(command: list[str], name: str) -> None:
    err = io.StringIO()
    argv = [command[0], name, *command[1:], "--etcd-endpoints", "http://127.0.0.1:1"]
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exited:
        main(argv, out=io.StringIO(), err=err)
    assert exited.value.code == 2
    assert "is not a component name" in err.getvalue()
    assert "Traceback" not in err.getvalue()


@pytest.mark.parametrize("name", BAD + NOT_ARGUMENTS + GOOD)
def test_the_plugin_and_the_library_agree_on_component_names(name: str) -> None:
    from defender_cli._flags import component_name

    try:
        check_name(name)
        library = True
    except ValueError:
        library = False
    try:
        component_name(name)
        plugin = True
    except argparse.ArgumentTypeError:
        plugin = False
    assert plugin == library
