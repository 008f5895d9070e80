"""`python -m defender_devcluster` drives the cluster across processes through state.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from defender_devcluster import ClusterState
from defender_devcluster._procs import pid_matches


def devcluster(run_dir: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "defender_devcluster", command, "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=400,
    )


def test_up_status_crash_recovery_and_down(tmp_path: Path) -> None:
    run = tmp_path / "run"
    try:
        up = devcluster(run, "up")
        assert up.returncode == 0, up.stderr
        # The exports go to a file to source, not into the caller's shell profile.
        env_file = run / "env.sh"
        assert f"source {env_file}" in up.stdout
        assert f"export KUBECONFIG={run / 'kubeconfig'}" in env_file.read_text()
        assert "export DEFENDER_ETCD__ENDPOINTS=" in env_file.read_text()
        sourced = subprocess.run(
            ["bash", "-c", f'source "{env_file}" && echo "$DEFENDER_ETCD__ENDPOINTS"'],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        first = ClusterState.read(run)
        assert len(first.etcd_endpoints) == 3
        assert json.loads(sourced.stdout) == list(first.etcd_endpoints)
        names = {p.name for p in first.processes}
        assert {"kube-apiserver", "kube-controller-manager", "kube-scheduler"} <= names

        status = devcluster(run, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "readyz: ok" in status.stdout

        # A second `up` on a healthy cluster keeps it.
        again = devcluster(run, "up")
        assert again.returncode == 0 and "already up" in again.stdout
        assert ClusterState.read(run).api_url == first.api_url

        # Crash: the state file is lost but every process still runs. `up` must stop them by
        # PID and start a working cluster in the same run dir.
        (run / "state.json").unlink()
        up2 = devcluster(run, "up")
        assert up2.returncode == 0, up2.stderr
        assert "left over from an earlier run" in up2.stderr
        assert not any(pid_matches(p.pid, p.marker) for p in first.processes)
        second = ClusterState.read(run)
        assert all(pid_matches(p.pid, p.marker) for p in second.processes)

        down = devcluster(run, "down")
        assert down.returncode == 0, down.stderr
        assert "kube-apiserver" in down.stdout
        assert not any(pid_matches(p.pid, p.marker) for p in second.processes)
        gone = devcluster(run, "status")
        assert gone.returncode == 1 and "no state file" in gone.stderr
    finally:
        devcluster(run, "down")
