"""What reaches a person's terminal when things go wrong around the command: a reader that goes
away mid-output (`kubectl defender status | head`: exit 141 as a writer SIGPIPE ended, no
BrokenPipeError traceback), gRPC's own logging, and the advice for an etcd that does not
verify."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from defender_cli import _app
from defender_config import StoreUnavailableError

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


def test_an_untrusted_member_certificate_points_at_the_ca_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without DEFENDER_ETCD__CA_FILE the chart's members do not verify; the advice named the
    # endpoints and the port-forward, which were fine.
    def unverified(_args: object, _printer: object) -> int:
        raise StoreUnavailableError(
            ["https://127.0.0.1:23790"],
            "no member answered (UNAVAILABLE: Tls handshake failed (TSI_PROTOCOL_FAILURE):"
            " SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate)",
        )

    monkeypatch.setattr(_app, "run", unverified)
    err = io.StringIO()
    assert _app.main(["status"], out=io.StringIO(), err=err) == 2
    assert "set DEFENDER_ETCD__CA_FILE to the etcd CA" in err.getvalue()
    assert "check --etcd-endpoints" not in err.getvalue()


GRPC_PROBE = """
import os, sys
from defender_cli import _app

def show(args, printer):
    printer.line(os.environ.get("GRPC_VERBOSITY", "unset"))
    return 0

_app.run = show
sys.exit(_app.main(["alerts"]))
"""


@pytest.mark.parametrize(("given", "seen"), [(None, "ERROR"), ("DEBUG", "DEBUG")])
def test_grpc_core_logs_only_errors_unless_the_caller_says_otherwise(
    given: str | None, seen: str
) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DEFENDER_", "ETCDCTL_", "GRPC_")) and k != "KUBECONFIG"
    }
    if given is not None:
        env["GRPC_VERBOSITY"] = given
    out = subprocess.run(
        [sys.executable, "-c", GRPC_PROBE], capture_output=True, text=True, env=env, timeout=60
    )
    assert (out.returncode, out.stdout.strip()) == (0, seen), out.stderr
