"""The harness's own failure modes: missing binaries, crashing processes, stale run dirs."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from defender_devcluster import (
    ClusterState,
    ControlPlane,
    DevClusterError,
    EtcdCluster,
    LocalCluster,
    PortInUseError,
    ProcessStartError,
    StateError,
    ToolNotFoundError,
    stop_run_dir,
    tool,
    tools_bin,
)
from defender_devcluster.__main__ import main
from defender_devcluster._procs import PidFile, pid_matches


def fake_binary(directory: Path, name: str, script: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(script))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_missing_tools_dir_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEFENDER_TOOLS_BIN", str(tmp_path / "nope"))
    with pytest.raises(ToolNotFoundError) as err:
        tools_bin()
    assert str(tmp_path / "nope") in str(err.value)
    assert "make tools" in str(err.value) and "DEFENDER_TOOLS_BIN" in str(err.value)


def test_missing_etcd_binary_names_it_and_make_tools(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEFENDER_TOOLS_BIN", str(tmp_path))
    with pytest.raises(ToolNotFoundError) as err:
        EtcdCluster(tmp_path / "run", members=1).start()
    assert err.value.binary == "etcd"
    assert f"etcd not found in {tmp_path}" in str(err.value)
    assert "make tools" in str(err.value)


def test_missing_kube_binary_fails_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "etcd").symlink_to(tool("etcd"))
    monkeypatch.setenv("DEFENDER_TOOLS_BIN", str(bindir))
    run = tmp_path / "run"
    with pytest.raises(ToolNotFoundError) as err:
        ControlPlane(run).start()
    assert err.value.binary == "kube-apiserver"
    assert not list(run.rglob("*.pid")), "no process may be started when a binary is missing"


def test_crashing_member_reports_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    fake_binary(bindir, "etcd", 'echo "fatal: cannot open data dir (simulated)"; exit 3\n')
    monkeypatch.setenv("DEFENDER_TOOLS_BIN", str(bindir))
    with pytest.raises(ProcessStartError) as err:
        EtcdCluster(tmp_path / "run", members=1, start_timeout=20).start()
    assert not isinstance(err.value, PortInUseError)
    assert "exited with code 3" in str(err.value)
    assert "cannot open data dir (simulated)" in err.value.log_tail


def test_port_race_is_retried_then_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "bin"
    calls = tmp_path / "calls"
    fake_binary(
        bindir,
        "etcd",
        f"""\
        echo run >> {calls}
        echo "listen tcp 127.0.0.1:1: bind: address already in use"
        exit 1
        """,
    )
    monkeypatch.setenv("DEFENDER_TOOLS_BIN", str(bindir))
    with pytest.raises(PortInUseError):
        EtcdCluster(tmp_path / "run", members=1, start_timeout=20).start()
    # Three attempts, each with freshly chosen ports.
    assert calls.read_text().splitlines() == ["run", "run", "run"]


def test_crashed_run_in_same_dir_is_cleaned_up(tmp_path: Path) -> None:
    crashed = EtcdCluster(tmp_path, members=1, name="crash").start()
    (old_pid,) = crashed.member_pids
    assert old_pid is not None
    # No stop(): as if the test process had died. The next run must cope.
    fresh = EtcdCluster(tmp_path, members=1, name="crash")
    try:
        fresh.start()
        assert not pid_matches(old_pid, str(fresh.data_dir(0)))
        (new_pid,) = fresh.member_pids
        assert new_pid is not None and new_pid != old_pid
        assert fresh.wait_for_leader(timeout=10) == fresh.endpoints[0]
    finally:
        fresh.stop()
        crashed.stop()  # reaps the killed child; nothing else left to stop


def test_stale_pid_file_of_an_unrelated_process_is_left_alone(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path, members=1, name="reuse")
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        cluster.dir.mkdir(parents=True)
        # The PID was "recycled": the pid file names a process that is not our etcd.
        PidFile("reuse-0", bystander.pid, str(cluster.data_dir(0))).write(
            cluster.dir / "reuse-0.pid"
        )
        (cluster.dir / "garbage.pid").write_text("{not json")
        cluster.start()
        assert bystander.poll() is None, "an unrelated process was killed"
        assert not (cluster.dir / "garbage.pid").exists()
    finally:
        cluster.stop()
        bystander.kill()
        bystander.wait()


def test_status_without_a_cluster_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--run-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no state file" in err and "make cluster-up" in err


@pytest.mark.parametrize(("ci", "expected"), [("true", "1 error"), ("", "1 skipped")])
def test_plugin_fails_under_ci_and_skips_otherwise(tmp_path: Path, ci: str, expected: str) -> None:
    (tmp_path / "test_inner.py").write_text("def test_needs_etcd(defender_etcd):\n    pass\n")
    env = {**os.environ, "DEFENDER_TOOLS_BIN": str(tmp_path), "CI": ci}
    argv = [sys.executable, "-m", "pytest", "-p", "defender_devcluster.pytest_plugin", "-q"]
    argv += ["-rs", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "test_inner.py"]
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert expected in out.stdout, out.stdout
    assert "etcd not found" in out.stdout and "make tools" in out.stdout
    if ci:
        assert out.returncode != 0
        assert "CI=true and a required binary is missing" in out.stdout
    else:
        assert out.returncode == 0


def test_processes_die_with_a_crashed_parent(tmp_path: Path) -> None:
    # The fixtures start members with die_with_parent=True: a pytest killed mid-run leaves no etcd.
    script = textwrap.dedent(
        f"""\
        import os, sys
        from pathlib import Path
        from defender_devcluster import EtcdCluster
        c = EtcdCluster(Path({str(tmp_path)!r}), members=1, name="orphan", die_with_parent=True)
        c.start()
        print(c.member_pids[0], flush=True)
        os._exit(9)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 9, out.stderr
    pid = int(out.stdout.strip())
    marker = str(tmp_path / "etcd-orphan" / "orphan-0.data")
    deadline = time.monotonic() + 10
    while pid_matches(pid, marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_matches(pid, marker), f"etcd pid {pid} outlived its parent"


def test_popen_dying_with_parent_leaves_no_orphan(tmp_path: Path) -> None:
    # Tests and benchmarks start operators and agents this way: an interrupted run leaves none.
    marker = f"orphan-{uuid.uuid4().hex[:8]}"
    script = textwrap.dedent(
        f"""\
        import os, sys
        from defender_devcluster import popen_dying_with_parent
        child = popen_dying_with_parent(
            [sys.executable, "-c", "import time; time.sleep(300)", {marker!r}]
        )
        print(child.pid, flush=True)
        os._exit(9)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 9, out.stderr
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 10
    while pid_matches(pid, marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_matches(pid, marker), f"pid {pid} outlived its parent"


def test_popen_dying_with_parent_covers_a_parent_dying_before_the_death_signal_is_set(
    tmp_path: Path,
) -> None:
    # CI once hung on the test above: the parent exited between setpriv's exec and its prctl, so
    # the kernel never killed the child. A slow setpriv widens that window to half a second.
    real = shutil.which("setpriv")
    assert real is not None
    fake_dir = tmp_path / "bin"
    fake_dir.mkdir()
    fake = fake_dir / "setpriv"
    fake.write_text(f'#!/bin/sh\nsleep 0.5\nexec {real} "$@"\n')
    fake.chmod(0o755)
    marker = f"orphan-{uuid.uuid4().hex[:8]}"
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(
        f"""\
        import os, subprocess, sys
        from pathlib import Path
        from defender_devcluster import popen_dying_with_parent
        child = popen_dying_with_parent(
            [sys.executable, "-c", "import time; time.sleep(300)", {marker!r}],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        Path({str(pid_file)!r}).write_text(str(child.pid))
        os._exit(9)
        """
    )
    env = {**os.environ, "PATH": f"{fake_dir}:{os.environ.get('PATH', '')}"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 9, out.stderr
    pid = int(pid_file.read_text())
    try:
        deadline = time.monotonic() + 10
        while pid_matches(pid, marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_matches(pid, marker), f"pid {pid} outlived its parent"
    finally:
        if pid_matches(pid, marker):
            os.kill(pid, signal.SIGKILL)


def test_local_cluster_refuses_an_etcd_inside_its_run_dir(tmp_path: Path) -> None:
    inside = EtcdCluster(tmp_path / "etcd-defender-parent", members=1)
    with pytest.raises(ValueError, match="outside"):
        LocalCluster(tmp_path, etcd=inside)


def test_control_plane_failure_stops_what_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "etcd").symlink_to(tool("etcd"))
    fake_binary(bindir, "kube-apiserver", 'echo "E0000 bad flag (simulated)"; exit 1\n')
    for name in ("kube-controller-manager", "kube-scheduler"):
        fake_binary(bindir, name, "exit 1\n")
    monkeypatch.setenv("DEFENDER_TOOLS_BIN", str(bindir))
    plane = ControlPlane(tmp_path / "run", start_timeout=60)
    with pytest.raises(ProcessStartError) as err:
        plane.start()
    assert err.value.name == "kube-apiserver"
    assert "bad flag (simulated)" in err.value.log_tail
    # The Kubernetes etcd it had started is gone again, and so are the pid files.
    assert plane.etcd.member_pids == [None]
    assert not list((tmp_path / "run").rglob("*.pid"))


def test_corrupt_state_file_is_a_state_error_and_down_still_sweeps(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"api_url": 12')
    with pytest.raises(StateError, match="unreadable state file"):
        ClusterState.read(tmp_path)
    crashed = EtcdCluster(tmp_path, members=1, name="left").start()
    (pid,) = crashed.member_pids
    assert pid is not None
    try:
        assert stop_run_dir(tmp_path) == ["left-0"]
        assert not pid_matches(pid, str(crashed.data_dir(0)))
        assert not (tmp_path / "state.json").exists()
    finally:
        crashed.stop()


def test_freezing_a_member_that_is_not_running_is_a_harness_error(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path / "run", members=1)  # never started: no member runs
    cluster.client_ports = [23790]
    assert cluster.member_at("127.0.0.1:23790") == 0
    assert cluster.member_at("http://127.0.0.1:23790") == 0
    with pytest.raises(ValueError):
        cluster.member_at("127.0.0.1:1")
    with pytest.raises(DevClusterError, match="member 0 is not running"), cluster.frozen(0):
        pass
