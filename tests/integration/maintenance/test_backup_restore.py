"""`kubectl defender backup` and `restore` on a real 3-member etcd: configs, versions, history
and alerts written through the library come back after every member's data is destroyed."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from conftest import Result, run_cli
from defender_config import (
    ConfigStore,
    DefenderClient,
    EtcdSettings,
    Heartbeater,
    Keyring,
    LibrarySettings,
    Registry,
    SnapshotInvalidError,
    UnknownKeyError,
    take_backup,
)
from defender_devcluster import EtcdCluster, etcd_client_settings, wait_for

pytestmark = pytest.mark.etcd

PREFIX = "/ml-defender"
SNIFFER = {"interface": "eth0", "batch": 64}
DETECTOR = {"ddos": {"threshold": 0.8}, "interval": 5}
# Raft entries written before a client logs in, so that its token names an index a restored
# cluster reaches only long after the test (it writes a few dozen entries after the restore).
RAFT_ENTRIES_AHEAD = 400
# How long a client running through a restore may take to resume there: some seconds (a request
# timeout of 5 s, then a new login), far below the heartbeat threshold of the operator.
RESUME_SECONDS = 30.0


def client_for(
    cluster: EtcdCluster, keyring: Keyring, user: tuple[str, str] | None = None
) -> DefenderClient:
    login = {"user": user[0], "password": user[1]} if user else {}
    settings = LibrarySettings(
        etcd=EtcdSettings.model_validate({**etcd_client_settings(cluster.endpoints), **login}),
        prefix=PREFIX,
        history_limit=5,
    )
    return DefenderClient(settings, keyring, instance="restore-test")


def flags(cluster: EtcdCluster) -> list[str]:
    return ["--etcd-endpoints", ",".join(cluster.endpoints), "--prefix", PREFIX]


def write_deployment(client: DefenderClient) -> None:
    """Two components with MASTER, three ACTIVE versions and a rollback, and an alert."""
    configs = ConfigStore(client)
    schema = {"type": "object"}
    configs.seed("sniffer", SNIFFER, "custom", by="test", json_schema=schema)
    configs.seed("ml-detector", DETECTOR, "custom", by="test", json_schema=schema)
    configs.commit("sniffer", {**SNIFFER, "batch": 128}, by="test")
    configs.commit("sniffer", {**SNIFFER, "batch": 256}, by="test")
    configs.rollback("sniffer", 2, by="test")
    configs.commit("ml-detector", {**DETECTOR, "interval": 10}, by="test")
    client.report(UnknownKeyError("k-gone", ["k-other"]), component="ml-detector")


def state_of(client: DefenderClient) -> dict[str, Any]:
    configs = ConfigStore(client)
    out: dict[str, Any] = {}
    for name in ("sniffer", "ml-detector"):
        active = configs.get_active(name)
        meta = configs.get_metadata(name)
        assert meta is not None
        out[name] = {
            "master": configs.get_master(name),
            "active": active.config,
            "version": active.version,
            "modified_by": meta.modified_by,
            "history": [(h.version, h.config) for h in configs.history(name)],
        }
    return out


def backup(cluster: EtcdCluster, directory: Path, etcdutl: str, keep: int = 3) -> Result:
    return run_cli(
        "backup", "--dir", str(directory), "--keep", str(keep), "--etcdutl", etcdutl,
        "-o", "json", *flags(cluster),
    )  # fmt: skip


def destroy_and_restore(
    cluster: EtcdCluster, snapshot: str, etcdutl: str, token: str | None = "restored-in-test"
) -> Result:
    """`token` None: the plugin's default (one of its own per restore)."""
    cluster.stop()
    cluster.wipe_member_data()
    members = [f"--member={cluster.member_name(i)}={cluster.peer_url(i)}" for i in range(3)]
    result = run_cli(
        "restore", "--snapshot", snapshot, *members,
        "--data-dir", str(cluster.dir / "{name}.data"),
        *(["--token", token] if token else []),
        "--etcdutl", etcdutl, "--run", "-o", "json",
    )  # fmt: skip
    assert result.code == 0, result.err
    # Every member at once: one alone has no quorum.
    cluster.restart_members([0, 1, 2])
    return result


def test_restore_brings_back_configs_versions_history_and_alerts(
    fresh_etcd: EtcdCluster, tmp_path: Path, etcdutl: str
) -> None:
    keyring = Keyring.generate()
    with client_for(fresh_etcd, keyring) as client:
        write_deployment(client)
        before = state_of(client)
        keys_before = client.store.count_prefix(PREFIX + "/")
        taken = backup(fresh_etcd, tmp_path / "backups", etcdutl)
        assert taken.code == 0, taken.err
        # Written after the snapshot: a restore must not have it.
        ConfigStore(client).commit("sniffer", {**SNIFFER, "batch": 999}, by="later")

    snap = taken.json()
    assert snap["verified"] == ["sha256", "etcdutl"]
    assert snap["keys"] == keys_before
    assert snap["etcdutl_status"]["revision"] == snap["revision"]
    manifest = json.loads(Path(snap["path"]).with_suffix(".json").read_text())
    assert manifest["revision"] == snap["revision"]

    restored = destroy_and_restore(fresh_etcd, snap["path"], etcdutl)
    assert [s["member"] for s in restored.json()["steps"]] == [
        fresh_etcd.member_name(i) for i in range(3)
    ]
    assert restored.json()["revision"] == snap["revision"]

    with client_for(fresh_etcd, keyring) as client:
        assert state_of(client) == before
        assert client.store.count_prefix(PREFIX + "/") == keys_before
        # Every sealed value opens and every record verifies: no decode error anywhere.
        dump = client.dump(PREFIX + "/", decrypt=True)
        assert dump and [e.key for e in dump if e.error] == []
    alerts = run_cli("alerts", "-o", "json", *flags(fresh_etcd))
    assert alerts.code == 0, alerts.err
    assert sorted((a["component"], a["kind"]) for a in alerts.json()) == [
        ("ml-detector", "UnknownKey"),
        ("sniffer", "ConfigRolledBack"),
    ]
    status = run_cli("status", "-o", "json", *flags(fresh_etcd)).json()
    assert status["etcd"]["healthyMembers"] == 3
    assert status["etcd"]["revision"] >= snap["revision"]


def test_restore_after_a_key_rotation_needs_the_old_key_in_the_keyring(
    fresh_etcd: EtcdCluster, tmp_path: Path, etcdutl: str
) -> None:
    old = Keyring.generate()
    with client_for(fresh_etcd, old) as client:
        write_deployment(client)
        before = state_of(client)
        taken = backup(fresh_etcd, tmp_path / "backups", etcdutl)
        assert taken.code == 0, taken.err
    # The Secret rotates after the snapshot: a new primary, the old key decrypt-only.
    staged = old.with_new_decrypt_only()
    new_id = staged.keys[-1].key_id
    rotated = staged.promote(new_id)
    old_id = old.primary.key_id
    # ... and, later, the old key retired and removed for good.
    rotated_out = rotated.retire(old_id).remove(old_id)

    destroy_and_restore(fresh_etcd, taken.json()["path"], etcdutl)

    with client_for(fresh_etcd, rotated) as client:
        assert state_of(client) == before, "old values open while the old key is in the keyring"
        assert [e.key for e in client.dump(PREFIX + "/", decrypt=True) if e.error] == []
    with client_for(fresh_etcd, rotated_out) as client:
        with pytest.raises(UnknownKeyError) as refused:
            ConfigStore(client).get_active("sniffer")
        assert old_id in str(refused.value)
    # The restore itself changed nothing: with the old key back, everything opens again.
    with client_for(fresh_etcd, rotated) as client:
        assert state_of(client) == before


def test_backup_keeps_only_the_newest_snapshots(
    fresh_etcd: EtcdCluster, tmp_path: Path, etcdutl: str
) -> None:
    directory = tmp_path / "backups"
    directory.mkdir()
    (directory / "notes.txt").write_text("not a snapshot: never pruned")
    taken = []
    with client_for(fresh_etcd, Keyring.generate()) as client:
        for i in range(4):
            client.store.put(f"{PREFIX}/test/{i}", b"x")
            result = backup(fresh_etcd, directory, etcdutl, keep=2)
            assert result.code == 0, result.err
            taken.append(result.json())
    kept = sorted(p.name for p in directory.glob("*.db"))
    assert kept == sorted(Path(t["path"]).name for t in taken[-2:])
    assert sorted(p.name for p in directory.glob("*.json")) == sorted(
        Path(t["path"]).with_suffix(".json").name for t in taken[-2:]
    )
    assert (directory / "notes.txt").exists()
    assert taken[-1]["revision"] > taken[0]["revision"]


def test_a_tampered_snapshot_is_refused_by_restore(
    fresh_etcd: EtcdCluster, tmp_path: Path, etcdutl: str
) -> None:
    taken = backup(fresh_etcd, tmp_path / "backups", etcdutl)
    assert taken.code == 0, taken.err
    path = Path(taken.json()["path"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    target = tmp_path / "restore-{name}"
    result = run_cli(
        "restore", "--snapshot", str(path), "--member", "a=http://127.0.0.1:1",
        "--data-dir", str(target), "--etcdutl", etcdutl, "--run",
    )  # fmt: skip
    assert result.code == 2
    assert "SnapshotInvalid" in result.err or "SHA-256" in result.err
    assert not (tmp_path / "restore-a").exists()


def test_restore_refuses_to_overwrite_a_member_data_directory(
    fresh_etcd: EtcdCluster, tmp_path: Path, etcdutl: str
) -> None:
    taken = backup(fresh_etcd, tmp_path / "backups", etcdutl)
    occupied = tmp_path / "member-a"
    occupied.mkdir()
    (occupied / "keep-me").write_text("data")
    result = run_cli(
        "restore", "--snapshot", taken.json()["path"], "--member", "a=http://127.0.0.1:1",
        "--data-dir", str(tmp_path / "member-{name}"), "--etcdutl", etcdutl, "--run",
    )  # fmt: skip
    assert result.code == 2
    assert "refusing to overwrite" in result.err
    assert (occupied / "keep-me").read_text() == "data"


def test_restore_without_run_prints_one_etcdutl_step_per_member(
    fresh_etcd: EtcdCluster, tmp_path: Path, etcdutl: str
) -> None:
    taken = backup(fresh_etcd, tmp_path / "backups", etcdutl)
    result = run_cli(
        "restore", "--snapshot", taken.json()["path"],
        "--member", "etcd-0=http://e0:2380", "--member", "etcd-1=http://e1:2380",
        "--member", "etcd-2=http://e2:2380", "--data-dir", "/var/lib/etcd/{name}",
        "--etcdutl", etcdutl,
    )  # fmt: skip
    assert result.code == 0, result.err
    lines = [line for line in result.out.splitlines() if not line.startswith("#")]
    assert len(lines) == 3
    assert all("--initial-cluster=etcd-0=http://e0:2380,etcd-1=" in line for line in lines)
    assert "--data-dir=/var/lib/etcd/etcd-2" in lines[2]


def test_take_backup_deletes_a_snapshot_that_fails_its_check(
    fresh_etcd: EtcdCluster, tmp_path: Path
) -> None:
    # An "etcdutl" that counts fewer keys than are stored: the snapshot must not stay behind.
    fake = tmp_path / "etcdutl"
    fake.write_text('#!/bin/sh\necho \'{"hash": 1, "revision": 999999, "totalKey": 0}\'\n')
    fake.chmod(0o755)
    with client_for(fresh_etcd, Keyring.generate()) as client:
        client.store.put(f"{PREFIX}/test/a", b"x")
        with pytest.raises(SnapshotInvalidError, match="fewer than the 1 stored"):
            take_backup(
                client.store, tmp_path / "b", keep=1, prefix=PREFIX + "/", etcdutl=str(fake)
            )
    assert list((tmp_path / "b").iterdir()) == []


def test_a_snapshot_is_owner_only_even_over_a_world_readable_file(
    fresh_etcd: EtcdCluster, tmp_path: Path
) -> None:
    """It holds every stored record: the plaintext ones (metadata, heartbeats, alerts) too."""
    import stat

    (tmp_path / "backups").mkdir()
    dest = tmp_path / "backups" / "etcd.db"
    dest.write_bytes(b"an older, world-readable snapshot")
    dest.chmod(0o644)
    with client_for(fresh_etcd, Keyring.generate()) as client:
        client.store.put(f"{PREFIX}/test/x", b"x")
        taken = client.store.snapshot(fresh_etcd.endpoints[0], str(dest))
    assert taken.hash_ok and taken.size_bytes == dest.stat().st_size
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert [p.name for p in dest.parent.iterdir()] == ["etcd.db"]  # no temporary file left


@contextmanager
def running_agent(client: DefenderClient) -> Iterator[tuple[ConfigStore, list[tuple[int, Any]]]]:
    """What an agent of the sniffer runs on `client`: a watch of ACTIVE, recording (version,
    config) of every delivery, and a heartbeat of instance s-0."""
    seen: list[tuple[int, Any]] = []
    configs = ConfigStore(client)
    watch = configs.watch_active("sniffer", lambda a: seen.append((a.version, a.config)))
    hb = Heartbeater(client, "sniffer", "s-0", interval_seconds=0.5, allowed_misses=4)
    hb.start()
    try:
        yield configs, seen
    finally:
        hb.stop()
        watch.cancel()


def beating(client: DefenderClient, component: str, instance: str) -> bool:
    """The instance's record is there and its lease alive."""
    found = [h for h in Registry(client).list_instances(component) if h.instance == instance]
    return bool(found) and client.store.lease_ttl(found[0].lease_id) > 0


def test_clients_running_through_a_restore_resume_on_the_restored_cluster(
    fresh_etcd: EtcdCluster, tmp_path: Path, etcdutl: str
) -> None:
    # An agent does not restart when etcd is restored under it: its config watch must deliver
    # the next commit and its heartbeat must be back on the restored cluster, although that
    # cluster starts from the snapshot: its versions are older than those the client accepted
    # and, restored a second time, its revisions older than those the client saw.
    keyring = Keyring.generate()
    with client_for(fresh_etcd, keyring) as agent:
        write_deployment(agent)
        taken = backup(fresh_etcd, tmp_path / "backups", etcdutl)
        assert taken.code == 0, taken.err
        with running_agent(agent) as (configs, configs_seen):
            # Written after the snapshot, so the client has seen revisions the restore loses.
            for batch in range(300, 310):
                configs.commit("sniffer", {**SNIFFER, "batch": batch}, by="later")
            wait_for("the ten commits delivered", lambda: len(configs_seen) >= 11, 10)
            # The second restore, of the same snapshot with the plugin's default token, comes
            # back below the revisions the first restored cluster handed out since.
            for batch, token in ((4242, "restored-in-test"), (4343, None)):
                destroy_and_restore(fresh_etcd, taken.json()["path"], etcdutl, token)
                with client_for(fresh_etcd, keyring) as operator:
                    config = {**SNIFFER, "batch": batch}
                    for extra in range(20):  # revisions for the next restore to fall below
                        ConfigStore(operator).commit("sniffer", {**config, "x": extra}, by="op")
                    committed = ConfigStore(operator).commit("sniffer", config, by="op")
                    wait_for(
                        f"version {committed} delivered after the restore",
                        lambda: (committed, config) in configs_seen,  # noqa: B023
                    )
                    wait_for(
                        "the heartbeat back on the restored cluster",
                        partial(beating, operator, "sniffer", "s-0"),
                    )


def test_clients_logged_in_to_etcd_resume_after_a_restore(
    fresh_etcd: EtcdCluster, tmp_path: Path, etcdutl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The chart's etcd has authentication on, with simple tokens. A simple token names the raft
    # index it was issued at, and a member checking one first waits until its own log reaches
    # that index. A restored cluster starts a new log far below the old one's: every call with
    # a token of the old cluster waited out its deadline instead of being refused, so an agent's
    # watches and keep-alives timed out for minutes (until the new log caught up) and the
    # operator restarted its pod. The client must log in again and resume within seconds.
    ep = fresh_etcd.endpoints[0]
    etcdctl = str(Path(etcdutl).with_name("etcdctl"))
    subprocess.run(
        [etcdctl, f"--endpoints={ep}", "user", "add", "root:rootpw", "--interactive=false"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [etcdctl, f"--endpoints={ep}", "auth", "enable"], check=True, capture_output=True
    )
    keyring = Keyring.generate()
    with client_for(fresh_etcd, keyring, user=("root", "rootpw")) as writer:
        write_deployment(writer)
        # Raft entries the restored cluster's log will not have for a long while: the agent's
        # token, issued after them, names an index the restored members only reach much later.
        for i in range(RAFT_ENTRIES_AHEAD):
            writer.store.put(f"{PREFIX}/padding/{i}", b"x")
    with client_for(fresh_etcd, keyring, user=("root", "rootpw")) as agent:
        with monkeypatch.context() as env:  # the plugin's login (snapshots are root's)
            env.setenv("DEFENDER_ETCD__USER", "root")
            env.setenv("DEFENDER_ETCD__PASSWORD", "rootpw")
            taken = backup(fresh_etcd, tmp_path / "backups", etcdutl)
        assert taken.code == 0, taken.err
        with running_agent(agent) as (configs, configs_seen):
            configs.commit("sniffer", {**SNIFFER, "batch": 300}, by="later")
            wait_for(
                "the commit delivered",
                lambda: any(c == {**SNIFFER, "batch": 300} for _, c in configs_seen),
            )
            destroy_and_restore(fresh_etcd, taken.json()["path"], etcdutl)
            with client_for(fresh_etcd, keyring, user=("root", "rootpw")) as operator:
                committed = ConfigStore(operator).commit(
                    "sniffer", {**SNIFFER, "batch": 4242}, by="after-restore"
                )
                wait_for(
                    f"version {committed} delivered after the restore",
                    lambda: (committed, {**SNIFFER, "batch": 4242}) in configs_seen,
                    timeout=RESUME_SECONDS,
                )
                wait_for(
                    "the heartbeat back on the restored cluster",
                    partial(beating, operator, "sniffer", "s-0"),
                    RESUME_SECONDS,
                )
                # Still far below the agent's old token: it resumed by logging in again, not
                # because the restored log caught up.
                raft_index = operator.store.health().members[0].raft_index
                assert raft_index is not None and raft_index < RAFT_ENTRIES_AHEAD
