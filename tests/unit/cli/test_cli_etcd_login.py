"""An etcd that needs a login and does not answer: the plugin says so once, on stderr, with what
to check. Run as a process, so stderr is what a person sees (a library warning included)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_an_etcd_login_that_gets_no_answer_is_one_error_line() -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DEFENDER_", "ETCDCTL_")) and k != "KUBECONFIG"
    }
    env.update(
        DEFENDER_ETCD__USER="root",
        DEFENDER_ETCD__PASSWORD="rootpw",
        DEFENDER_ETCD__RETRIES="1",
        DEFENDER_ETCD__BACKOFF_BASE_SECONDS="0.01",
    )
    done = subprocess.run(
        [sys.executable, "-m", "defender_cli", "status", "--etcd-endpoints", "http://127.0.0.1:1"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("kubectl defender status: etcd is unavailable (")
    assert "check --etcd-endpoints" in lines[0]
    assert "login deferred" not in done.stderr
