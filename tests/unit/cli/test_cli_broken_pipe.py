"""`kubectl defender status | head`: the reader goes away mid-output. The plugin stops quietly
(exit 141, as a writer SIGPIPE ended) instead of a BrokenPipeError traceback."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import sys
from defender_cli import _app

def many_lines(args, printer):
    for i in range(200_000):
        printer.line(f"line {i}")
    return 0

_app.run = many_lines
sys.exit(_app.main(["alerts"]))
"""


def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DEFENDER_", "ETCDCTL_")) and k != "KUBECONFIG"
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"line 0\n"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert err == ""
