"""Member replacement on real local etcd processes (issue 12 point 5): a member of a 3-member
cluster dies and comes back with an empty data directory (its volume lost). The same module
the chart's etcd pods run (`python -m defender_config.etcd_member prepare|promote`) removes the
old member, adds it back as a learner, starts it with `--config-file`, and promotes it once it
has caught up; writes go on throughout and none acknowledged is lost."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from defender_config import EtcdSettings
from defender_config.etcd_member import EtcdMembers
from defender_config.store import EtcdStore
from defender_devcluster import EtcdCluster, tool, wait_for

pytestmark = pytest.mark.etcd


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    c = EtcdCluster(tmp_path / "run", members=3, name="rejoin").start()
    try:
        yield c
    finally:
        c.stop()


def member_env(c: EtcdCluster, i: int) -> dict[str, str]:
    """The ETCD_* variables the chart gives member i (as EtcdCluster starts it with flags)."""
    peers = ",".join(
        f"{c.member_name(j)}=http://127.0.0.1:{c.advertised_peer_ports[j]}"
        for j in range(c.members)
    )
    client = c.endpoints[i]
    return {
        "ETCD_NAME": c.member_name(i),
        "ETCD_DATA_DIR": str(c.data_dir(i)),
        "ETCD_LISTEN_CLIENT_URLS": client,
        "ETCD_ADVERTISE_CLIENT_URLS": client,
        "ETCD_LISTEN_PEER_URLS": f"http://127.0.0.1:{c.peer_ports[i]}",
        "ETCD_INITIAL_ADVERTISE_PEER_URLS": f"http://127.0.0.1:{c.advertised_peer_ports[i]}",
        "ETCD_INITIAL_CLUSTER": peers,
        "ETCD_INITIAL_CLUSTER_TOKEN": f"defender-devcluster-{c.name}",
        "ETCD_INITIAL_CLUSTER_STATE": "new",
        "ETCD_HEARTBEAT_INTERVAL": "200",
        "ETCD_ELECTION_TIMEOUT": "2000",
        "ETCD_LOG_LEVEL": "warn",
    }


def clean_env(**extra: str) -> dict[str, str]:
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ETCD_", "ETCDCTL_", "DEFENDER_")) and k != "KUBECONFIG"
    }
    return {**keep, **extra}


def member_tool(command: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "defender_config.etcd_member", command, *args]
    return subprocess.run(argv, env=clean_env(**env), capture_output=True, text=True, timeout=120)


class Writer(threading.Thread):
    """Puts keys one after the other until stopped; remembers every acknowledged one."""

    def __init__(self, endpoints: list[str], prefix: str) -> None:
        super().__init__(daemon=True)
        self.store = EtcdStore(EtcdSettings(endpoints=endpoints), registry=CollectorRegistry())
        self.prefix = prefix
        self.acked: list[str] = []
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stopping.is_set():
            key = f"{self.prefix}{n:06d}"
            try:
                self.store.put(key, b"v")
                self.acked.append(key)
            except Exception as exc:
                self.errors.append(exc)
            n += 1
            self.stopping.wait(0.02)

    def stop(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.join(timeout=30)
        self.store.close()


def test_member_with_lost_data_rejoins_as_learner_and_is_promoted(
    cluster: EtcdCluster, tmp_path: Path
) -> None:
    victim = 2
    survivors = [ep for i, ep in enumerate(cluster.endpoints) if i != victim]
    old_id = cluster.member_ids[victim]
    writer = Writer(survivors, "/rejoin/k")
    writer.start()
    proc: subprocess.Popen[bytes] | None = None
    try:
        wait_for("writes before the loss", lambda: len(writer.acked) >= 20, timeout=30)
        cluster.kill_member(victim)
        shutil.rmtree(cluster.data_dir(victim))  # the volume is gone
        env = member_env(cluster, victim)
        config = tmp_path / "etcd.yaml"
        endpoints = ",".join(cluster.endpoints)

        prepared = member_tool(
            "prepare", env, "--endpoints", endpoints, "--config-out", str(config)
        )
        assert prepared.returncode == 0, prepared.stderr
        assert f"removed member {old_id}" in prepared.stderr
        written = json.loads(config.read_text())
        assert written["initial-cluster-state"] == "existing"
        assert written["heartbeat-interval"] == 200  # typed for etcd's config file
        members = EtcdMembers(survivors).members()
        assert len(members) == 3
        learner = next(m for m in members if m.learner)
        assert format(learner.id, "x") != old_id and learner.name == ""

        with (tmp_path / "rejoined.log").open("wb") as log:
            proc = subprocess.Popen(
                [str(tool("etcd")), f"--config-file={config}"],
                env=clean_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        promoted = member_tool("promote", env, "--endpoints", endpoints, "--timeout", "60")
        assert promoted.returncode == 0, promoted.stderr + (tmp_path / "rejoined.log").read_text()
        wait_for("more writes after the rejoin", lambda: len(writer.acked) >= 200, timeout=60)
        writer.stop()

        members = EtcdMembers(cluster.endpoints).members()
        assert len(members) == 3 and not any(m.learner for m in members)
        rejoined = next(m for m in members if m.name == cluster.member_name(victim))
        assert format(rejoined.id, "x") != old_id
        # Quorum throughout: no write failed (the store retries across members, within its
        # budget), and every acknowledged write is on the rejoined member's own disk.
        assert writer.errors == []
        wait_for(
            "every acknowledged write on the rejoined member",
            lambda: local_keys(cluster.endpoints[victim]) == set(writer.acked),
            timeout=60,
        )
        # It answers linearizable reads as itself: a voting member of the cluster.
        assert EtcdMembers([cluster.endpoints[victim]]).healthy() == frozenset({rejoined.id})
    finally:
        writer.stop()
        if proc is not None:
            proc.kill()
            proc.wait(timeout=30)


def local_keys(endpoint: str) -> set[str]:
    """Keys under /rejoin/ as the member at `endpoint` holds them (a serializable read, served
    from its own data)."""
    argv = [str(tool("etcdctl")), f"--endpoints={endpoint}", "get", "/rejoin/", "--prefix"]
    argv += ["--keys-only", "--consistency=s", "-w", "json"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=clean_env())
    if out.returncode != 0:
        return set()
    kvs = json.loads(out.stdout).get("kvs", [])
    return {base64.b64decode(kv["key"]).decode() for kv in kvs}


def test_prepare_keeps_a_member_with_data_and_bootstraps_alone(tmp_path: Path) -> None:
    """A member whose data is there starts as configured, and so does the first member of a
    new cluster nobody else answers for: no member change at all."""
    data = tmp_path / "data"
    (data / "member" / "wal").mkdir(parents=True)
    env = {
        "ETCD_NAME": "m0",
        "ETCD_DATA_DIR": str(data),
        "ETCD_INITIAL_ADVERTISE_PEER_URLS": "http://127.0.0.1:1",
        "ETCD_INITIAL_CLUSTER_STATE": "new",
        "ETCD_QUOTA_BACKEND_BYTES": "2147483648",
        "ETCD_CLIENT_CERT_AUTH": "true",
        "ETCD_CERT_FILE": "/tls/tls.crt",
    }
    out = tmp_path / "keep.yaml"
    ran = member_tool("prepare", env, "--endpoints", "http://127.0.0.1:9", "--config-out", str(out))
    assert ran.returncode == 0, ran.stderr
    assert "keep" in ran.stderr
    cfg = json.loads(out.read_text())
    assert cfg["initial-cluster-state"] == "new" and cfg["quota-backend-bytes"] == 2147483648
    assert cfg["client-transport-security"] == {
        "cert-file": "/tls/tls.crt",
        "client-cert-auth": True,
    }
    shutil.rmtree(data / "member")
    ran = member_tool("prepare", env, "--endpoints", "http://127.0.0.1:9", "--config-out", str(out))
    assert ran.returncode == 0 and "bootstrap" in ran.stderr, ran.stderr
    bad = member_tool("prepare", {}, "--endpoints", "http://127.0.0.1:9", "--config-out", str(out))
    assert bad.returncode == 2 and "ETCD_NAME is not set" in bad.stderr
