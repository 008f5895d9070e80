"""The files `make up` leaves to `source`: env.sh, and with a node etcd.sh, which takes the plugin
to the chart's etcd (the harness's own three members serve nothing of the system then)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from defender_devcluster import ClusterState
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


FAKE_KUBECTL = """#!/bin/bash
echo "$*" >> "$KUBECTL_LOG"
case "$*" in
  *port-forward*)
    port="${@: -1}"
    exec "$PYTHON" -c 'import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1].split(":")[0])))
s.listen()
time.sleep(60)' "$port" ;;
  *etcd-client-tls*) printf 'CA PEM' | base64 ;;
  *etcd-auth*) printf 's3cret' | base64 ;;
  *) exit 1 ;;
esac
"""


def test_etcd_sh_forwards_every_member_and_sets_the_plugin_up(tmp_path: Path) -> None:
    state = _state(tmp_path, "10.253.1.2")
    write_env_file(state)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "kubectl"
    fake.write_text(FAKE_KUBECTL)
    fake.chmod(0o755)
    log = tmp_path / "kubectl.log"
    script = (
        f'source "{tmp_path / ETCD_ENV_FILE}"; '
        'echo "$DEFENDER_ETCD__ENDPOINTS|$DEFENDER_ETCD__CA_FILE|$DEFENDER_ETCD__USER|'
        '$DEFENDER_ETCD__PASSWORD|$DEFENDER_PORT_FORWARDS"; '
        "kill $DEFENDER_PORT_FORWARDS"
    )
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "KUBECTL_LOG": str(log),
        "PYTHON": sys.executable,
        "HOME": str(tmp_path),
    }
    out = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    endpoints, ca_file, user, password, forwards = out.stdout.strip().split("|")
    assert endpoints == ",".join(f"https://127.0.0.1:{p}" for p in (23790, 23791, 23792))
    assert Path(ca_file).read_text() == "CA PEM"
    assert (user, password) == ("ml-defender-operator", "s3cret")
    assert len(forwards.split()) == 3
    calls = log.read_text().splitlines()
    for i in range(3):
        assert f"-n ml-defender port-forward pod/ml-defender-etcd-{i} 2379{i}:2379" in calls
