"""The files `make up` leaves to `source`: env.sh, and with a node etcd.sh, which takes the plugin
to the chart's etcd (the harness's own three members serve nothing of the system then)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

from defender_devcluster import ClusterState, wait_for
from defender_devcluster.__main__ import ETCD_ENV_FILE, _try_lines, write_env_file

HARNESS_ETCD = ["http://127.0.0.1:40001", "http://127.0.0.1:40002", "http://127.0.0.1:40003"]


def _state(run_dir: Path, node_ip: str | None) -> ClusterState:
    return ClusterState(
        run_dir=str(run_dir),
        api_url="https://10.253.1.1:6443",
        kubeconfig=str(run_dir / "kubeconfig"),
        etcd_endpoints=HARNESS_ETCD,
        kube_etcd_endpoints=["http://127.0.0.1:40000"],
        processes=[],
        started_at=0.0,
        start_seconds=1.0,
        node_ip=node_ip,
    )


def test_without_a_node_the_plugin_is_pointed_at_the_harness_etcd(tmp_path: Path) -> None:
    write_env_file(_state(tmp_path, "10.253.1.2"))  # an earlier node run in the same run dir
    env = write_env_file(_state(tmp_path, None)).read_text()
    assert "export DEFENDER_ETCD__ENDPOINTS=" in env and HARNESS_ETCD[0] in env
    assert not (tmp_path / ETCD_ENV_FILE).exists()


def test_with_a_node_env_sh_names_no_etcd_and_points_at_etcd_sh(tmp_path: Path) -> None:
    # Before, env.sh exported the harness's members and `kubectl defender status` on a running
    # system said "No components registered".
    state = _state(tmp_path, "10.253.1.2")
    env = write_env_file(state).read_text()
    assert "DEFENDER_ETCD__ENDPOINTS" not in env and HARNESS_ETCD[0] not in env
    assert f"source {tmp_path / ETCD_ENV_FILE}" in env
    lines = _try_lines(state)
    sourced = [i for i, line in enumerate(lines) if line.startswith(f"source {tmp_path}/etcd.sh")]
    assert sourced and sourced[0] < lines.index("kubectl defender status")


# A port-forward listens on the local port asked for (`PORT:2379`; `:2379`: one the kernel
# hands out), says so as kubectl does and records it in $PORTS_LOG. The member named by
# $FAIL_MEMBER has no pod: kubectl's error, exit 1.
FAKE_KUBECTL = """#!/bin/bash
echo "$*" >> "$KUBECTL_LOG"
case "$*" in
  *port-forward*)
    if [ -n "$FAIL_MEMBER" ] && [[ "$*" == *"etcd-$FAIL_MEMBER "* ]]; then
      echo "error: pods \\"ml-defender-etcd-$FAIL_MEMBER\\" not found" >&2
      exit 1
    fi
    local_port="${@: -1}"
    exec "$PYTHON" -c 'import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1].split(":")[0] or 0)))
s.listen()
port = s.getsockname()[1]
with open(sys.argv[2], "a") as log:
    print(port, file=log)
print(f"Forwarding from 127.0.0.1:{port} -> 2379", flush=True)
time.sleep(60)' "$local_port" "$PORTS_LOG" ;;
  *etcd-client-tls*) printf 'CA PEM' | base64 ;;
  *etcd-auth*) printf 's3cret' | base64 ;;
  *) exit 1 ;;
esac
"""

PRINT = (
    'echo "$DEFENDER_ETCD__ENDPOINTS|$DEFENDER_ETCD__CA_FILE|$DEFENDER_ETCD__USER|'
    '$DEFENDER_ETCD__PASSWORD|$DEFENDER_PORT_FORWARDS"; '
)


def _source_etcd_sh(
    tmp_path: Path, then: str, fail_member: str = ""
) -> subprocess.CompletedProcess[str]:
    state = _state(tmp_path, "10.253.1.2")
    write_env_file(state)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "kubectl"
    fake.write_text(FAKE_KUBECTL)
    fake.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "KUBECTL_LOG": str(tmp_path / "kubectl.log"),
        "PORTS_LOG": str(tmp_path / "ports.log"),
        "FAIL_MEMBER": fail_member,
        "PYTHON": sys.executable,
        "HOME": str(tmp_path),
    }
    script = f'source "{tmp_path / ETCD_ENV_FILE}"; echo "sourced: $?"; {then}'
    return subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=True
    )


def _listening(ports: list[int]) -> bool:
    for port in ports:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return True
    return False


def test_etcd_sh_forwards_every_member_and_sets_the_plugin_up(tmp_path: Path) -> None:
    out = _source_etcd_sh(tmp_path, PRINT + "kill $DEFENDER_PORT_FORWARDS")
    assert out.stdout.splitlines()[0] == "sourced: 0"
    endpoints, ca_file, user, password, forwards = out.stdout.splitlines()[1].split("|")
    listened = [int(p) for p in (tmp_path / "ports.log").read_text().split()]
    assert endpoints == ",".join(f"https://127.0.0.1:{p}" for p in listened)
    assert len(set(listened)) == 3
    assert Path(ca_file).read_text() == "CA PEM"
    assert (user, password) == ("ml-defender-operator", "s3cret")
    assert len(forwards.split()) == 3
    calls = (tmp_path / "kubectl.log").read_text().splitlines()
    for i in range(3):
        forward = f"-n ml-defender port-forward --address 127.0.0.1 pod/ml-defender-etcd-{i} :2379"
        assert forward in calls


def test_etcd_sh_beside_another_clusters_forwards_reaches_its_own(tmp_path: Path) -> None:
    # Another cluster on the machine (another clone's `make up`) forwards 23790-23792, the
    # ports etcd.sh used to take: its forwards failed, its wait found the other cluster's
    # listening, and the plugin was pointed at the other cluster's etcd.
    taken = []
    try:
        for port in (23790, 23791, 23792):
            other = socket.socket()
            taken.append(other)
            with contextlib.suppress(OSError):  # EADDRINUSE: taken already, as wanted
                other.bind(("127.0.0.1", port))
                other.listen()
        out = _source_etcd_sh(tmp_path, PRINT + "kill $DEFENDER_PORT_FORWARDS")
    finally:
        for other in taken:
            other.close()
    endpoints = out.stdout.splitlines()[1].split("|")[0]
    ports = [int(url.rsplit(":", 1)[1]) for url in endpoints.split(",")]
    assert ports == [int(p) for p in (tmp_path / "ports.log").read_text().split()]
    assert not {23790, 23791, 23792} & set(ports)


def test_etcd_sh_names_the_member_it_cannot_forward_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    out = _source_etcd_sh(tmp_path, PRINT, fail_member="1")
    assert out.stdout.splitlines()[0] == "sourced: 1"
    assert out.stdout.splitlines()[1] == "||||", "nothing exported, no forward kept"
    assert (
        "etcd.sh: no port-forward to pod/ml-defender-etcd-1 in namespace ml-defender:"
        ' error: pods "ml-defender-etcd-1" not found'
    ) in out.stderr
    # Member 0's forward, started before, is stopped.
    started = [int(p) for p in (tmp_path / "ports.log").read_text().split()]
    assert len(started) == 1
    wait_for("member 0's forward to stop", lambda: not _listening(started), timeout=10)
