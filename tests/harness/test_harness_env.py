"""The suite ignores a developer's stale cluster exports (DEFENDER_*, KUBECONFIG, ETCDCTL_*).

Each check runs pytest in a subprocess whose environment holds exports of a cluster that is
gone (a dead etcd port, a kubeconfig that does not exist), as a shell still has them after
`source .devcluster/env.sh` and `make down`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from defender_devcluster import tools_bin
from defender_devcluster.pytest_plugin import caller_env_names

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json
import os
import subprocess
import sys

from defender_config import LibrarySettings

STALE = ("DEFENDER_ETCD__ENDPOINTS", "DEFENDER_PREFIX", "KUBECONFIG", "ETCDCTL_ENDPOINTS")


def test_the_test_process_and_its_children_see_no_stale_exports():
    assert not [name for name in STALE if name in os.environ]
    child = subprocess.run(
        [sys.executable, "-c", "import json, os; print(json.dumps(sorted(os.environ)))"],
        capture_output=True, text=True, check=True,
    )
    assert not set(STALE) & set(json.loads(child.stdout))


def test_library_settings_do_not_pick_up_the_dead_endpoint():
    assert "{dead}" not in str(LibrarySettings().etcd.endpoints)
"""


def _dead_port() -> int:
    # Bound and closed: nothing listens there.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stale_env(tmp_path: Path) -> dict[str, str]:
    port = _dead_port()
    return {
        **os.environ,
        "DEFENDER_ETCD__ENDPOINTS": f'["http://127.0.0.1:{port}"]',
        "DEFENDER_PREFIX": "/stale-prefix",
        "KUBECONFIG": str(tmp_path / "gone" / "kubeconfig"),
        "ETCDCTL_ENDPOINTS": f"http://127.0.0.1:{port}",
        # The binaries' location is not cluster state: it must survive.
        "DEFENDER_TOOLS_BIN": str(tools_bin()),
    }


def _pytest(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_only_cluster_exports_are_cleared() -> None:
    env = {
        "DEFENDER_ETCD__ENDPOINTS": "x",
        "DEFENDER_OPERATOR_NAMESPACE": "x",
        "ETCDCTL_API": "3",
        "KUBECONFIG": "x",
        "DEFENDER_TOOLS_BIN": "x",
        "DEFENDER_TOOLS_DIR": "x",
        "PATH": "x",
        "CI": "true",
    }
    assert caller_env_names(env) == [
        "DEFENDER_ETCD__ENDPOINTS",
        "DEFENDER_OPERATOR_NAMESPACE",
        "ETCDCTL_API",
        "KUBECONFIG",
    ]


def test_the_plugin_clears_stale_exports_for_tests_and_their_subprocesses(tmp_path: Path) -> None:
    env = _stale_env(tmp_path)
    port = env["ETCDCTL_ENDPOINTS"].rsplit(":", 1)[1]
    (tmp_path / "test_probe.py").write_text(PROBE.replace("{dead}", port))
    with_plugin = _pytest(["-p", "defender_devcluster.pytest_plugin"], tmp_path, env)
    assert with_plugin.returncode == 0, with_plugin.stdout + with_plugin.stderr
    assert "2 passed" in with_plugin.stdout
    # The probe can fail: without the plugin the stale exports reach it.
    without = _pytest([], tmp_path, env)
    assert without.returncode == 1, without.stdout + without.stderr
    assert "2 failed" in without.stdout


@pytest.mark.etcd
@pytest.mark.cluster
def test_library_integration_tests_pass_with_stale_exports(tmp_path: Path) -> None:
    """A real integration test (its own 3-member etcd) in a shell whose exports point at a
    cluster that is gone."""
    done = _pytest(
        [
            "tests/integration/library/test_store_etcd.py::test_put_get_list_delete",
            # KUBECONFIG: the session's own, exported by the plugin for kubectl.
            "tests/harness/test_harness_kube.py::test_readyz_through_kubectl_and_kubeconfig_env",
        ],
        REPO,
        _stale_env(tmp_path),
        timeout=500,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "passed" in done.stdout and "skipped" not in done.stdout
