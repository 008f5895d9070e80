"""Key rotation under load: reader, writer and committer threads of several "components" (each
its own DefenderClient and KeyringSource on one mounted keyring file) while the keyring goes
through add decrypt-only → promote → rewrap_all → retire. Zero decode failures, zero wrong
plaintexts, zero alerts.

Each stage is rolled out as the operator does it: the file is replaced, then the next stage
waits until every component's source has loaded it and every write that started before has
finished (the operator learns both from heartbeats' key fingerprints and its grace window).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from reliability_support import make_client, new_keyring, write_keyring_file

from defender_config import (
    Alert,
    ConfigStore,
    ConflictError,
    DefenderClient,
    DefenderConfigError,
    EnvelopeError,
    Keyring,
    KeyringSource,
    StaticKeyringSource,
    UnknownKeyError,
    inspect,
    is_envelope,
)
from defender_devcluster import EtcdCluster, wait_for

pytestmark = pytest.mark.etcd

# How long the load runs on each stage (at least).
STAGE_SECONDS = 1.0

FIREWALL = {"node_id": "fw-01", "version": "1.0.0", "default_policy": "deny", "rules": []}


@dataclass
class Load:
    """The threads and what they saw, counted per rotation stage."""

    clients: list[DefenderClient]
    keys: list[str]
    stage: str = "initial"
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    reads: Counter[str] = field(default_factory=Counter)
    writes: Counter[str] = field(default_factory=Counter)
    commits: Counter[str] = field(default_factory=Counter)
    decode_failures: list[str] = field(default_factory=list)
    wrong_plaintexts: list[str] = field(default_factory=list)
    other_errors: list[str] = field(default_factory=list)
    # Per writing thread: the start time of its latest finished write.
    last_write_started: dict[str, float] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)

    def count(self, counter: Counter[str]) -> None:
        with self.lock:
            counter[self.stage] += 1

    def fail(self, sink: list[str], text: str) -> None:
        with self.lock:
            sink.append(f"[{self.stage}] {text}")

    # --- threads ---------------------------------------------------------------------------

    def writer(self, n: int, keys: list[str]) -> None:
        client = self.clients[n % len(self.clients)]
        rng = random.Random(n)
        seq = 0
        name = f"writer-{n}"
        while not self.stop.is_set():
            key = rng.choice(keys)
            seq += 1
            started = time.monotonic()
            body = f"{key}|{name}|{seq}|".encode() + b"rule " * rng.randrange(1, 400)
            try:
                client.put_sealed(key, body)
            except DefenderConfigError as exc:
                self.fail(self.other_errors, f"{name} {key}: {exc!r}")
                continue
            self.count(self.writes)
            self.last_write_started[name] = started

    def reader(self, n: int) -> None:
        client = self.clients[n % len(self.clients)]
        rng = random.Random(1000 + n)
        while not self.stop.is_set():
            key = rng.choice(self.keys)
            try:
                got = client.get_sealed(key)
            except EnvelopeError as exc:
                self.fail(self.decode_failures, f"{key}: {exc.reason}: {exc}")
                continue
            except DefenderConfigError as exc:
                self.fail(self.other_errors, f"reader {key}: {exc!r}")
                continue
            if got is None or not got.data.startswith(f"{key}|".encode()):
                self.fail(
                    self.wrong_plaintexts, f"{key}: {None if got is None else got.data[:40]!r}"
                )
                continue
            self.count(self.reads)

    def committer(self, n: int) -> None:
        configs = ConfigStore(self.clients[n % len(self.clients)])
        name = f"committer-{n}"
        seq = 0
        while not self.stop.is_set():
            seq += 1
            started = time.monotonic()
            rules = [{"id": f"r{seq}", "action": "allow", "proto": "tcp", "ports": [1 + seq]}]
            try:
                configs.commit("firewall", {**FIREWALL, "rules": rules}, by=name)
                active = configs.get_active("firewall")
            except ConflictError:
                continue  # another committer's version landed first: expected, not a failure
            except EnvelopeError as exc:
                self.fail(self.decode_failures, f"{name}: {exc.reason}: {exc}")
                continue
            except DefenderConfigError as exc:
                self.fail(self.other_errors, f"{name}: {exc!r}")
                continue
            if active.config["node_id"] != "fw-01":
                self.fail(self.wrong_plaintexts, f"{name}: ACTIVE decoded to another config")
            self.count(self.commits)
            self.last_write_started[name] = started

    def start(self, writers: int, readers: int, committers: int) -> None:
        per = max(1, len(self.keys) // writers)
        for n in range(writers):
            own = self.keys[n * per : (n + 1) * per] or self.keys
            self.threads.append(threading.Thread(target=self.writer, args=(n, own), daemon=True))
        for n in range(readers):
            self.threads.append(threading.Thread(target=self.reader, args=(n,), daemon=True))
        for n in range(committers):
            self.threads.append(threading.Thread(target=self.committer, args=(n,), daemon=True))
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)
            assert not t.is_alive(), f"{t.name} hung"


def roll_out(
    load: Load, file: Path, sources: list[KeyringSource], target: Keyring, stage: str
) -> None:
    """Write the stage, wait until every component runs with it and every write begun before
    has finished, then let the load run on it for a moment."""
    write_keyring_file(file, target)
    wait_for(f"{stage} everywhere", lambda: all(s.current() == target for s in sources), timeout=60)
    switched = time.monotonic()
    wait_for(
        f"writes begun before {stage} to finish",
        lambda: all(t > switched for t in load.last_write_started.values()),
        timeout=60,
    )
    load.stage = stage
    until = time.monotonic() + STAGE_SECONDS
    wait_for(
        f"reads and writes during {stage}",
        lambda: time.monotonic() > until and load.reads[stage] >= 50 and load.writes[stage] >= 10,
        timeout=60,
    )


def rotate_under_load(
    cluster: EtcdCluster,
    prefix: str,
    tmp_path: Path,
    alerts: list[Alert],
    *,
    components: int,
    writers: int,
    readers: int,
    committers: int,
    n_keys: int,
    rotations: int,
) -> Load:
    file = tmp_path / "keyring.json"
    keyring = new_keyring()
    write_keyring_file(file, keyring)
    sources = [KeyringSource(file, poll_seconds=0.05) for _ in range(components)]
    clients = [
        make_client(cluster, prefix, s, alerts, instance=f"c{i}") for i, s in enumerate(sources)
    ]
    keys = [f"{prefix}data/{i:04d}" for i in range(n_keys)]
    for key in keys:
        clients[0].put_sealed(key, f"{key}|seed|0|".encode())
    ConfigStore(clients[0]).seed("firewall", FIREWALL, "firewall", by="test")
    load = Load(clients, keys)
    load.start(writers, readers, committers)
    try:
        wait_for("the load to start", lambda: load.reads["initial"] >= 20, timeout=60)
        for r in range(rotations):
            old_id = keyring.primary.key_id
            staged = keyring.with_new_decrypt_only()
            new_id = staged.keys[-1].key_id
            roll_out(load, file, sources, staged, f"{r}:decrypt-only")
            promoted = staged.promote(new_id)
            roll_out(load, file, sources, promoted, f"{r}:promoted")
            report = ConfigStore(clients[0]).rewrap_all()
            assert report.failed == 0 and report.errors == [], report
            assert report.rewrapped > 0, "nothing was sealed with the old key: rotation untested"
            load.stage = f"{r}:rewrapped"
            keyring = promoted.retire(old_id)
            roll_out(load, file, sources, keyring, f"{r}:retired")
            # Whatever is stored now must be sealed with the new key: the old one is retired.
            for sv in clients[0].store.list_prefix(prefix):
                if is_envelope(sv.value):
                    assert inspect(sv.value).key_id == new_id, f"{sv.key} still on {old_id}"
            keyring = keyring.remove(old_id)
            roll_out(load, file, sources, keyring, f"{r}:removed")
    finally:
        load.join()

    # The check is live: a component that missed the rotation cannot read, and says why.
    laggard_alerts: list[Alert] = []
    laggard = make_client(
        cluster, prefix, StaticKeyringSource(new_keyring()), laggard_alerts, instance="laggard"
    )
    try:
        with pytest.raises(UnknownKeyError):
            laggard.get_sealed(keys[0])
        assert [a.kind for a in laggard_alerts] == ["UnknownKey"]
    finally:
        laggard.close()
        for c in clients:
            c.close()
    return load


def assert_clean(load: Load, alerts: list[Alert], stages: int) -> None:
    assert load.decode_failures == [], load.decode_failures[:5]
    assert load.wrong_plaintexts == [], load.wrong_plaintexts[:5]
    assert load.other_errors == [], load.other_errors[:5]
    assert [a.kind for a in alerts] == []
    # Every stage really ran under load.
    assert len([s for s in load.reads if load.reads[s] > 0]) >= stages, load.reads
    assert sum(load.writes.values()) > 0 and sum(load.commits.values()) > 0


def test_one_rotation_under_load_has_no_decode_failures(
    healthy_etcd: EtcdCluster, etcd_prefix: str, tmp_path: Path, alerts: list[Alert]
) -> None:
    load = rotate_under_load(
        healthy_etcd,
        etcd_prefix,
        tmp_path,
        alerts,
        components=2,
        writers=2,
        readers=3,
        committers=1,
        n_keys=40,
        rotations=1,
    )
    assert_clean(load, alerts, stages=5)


@pytest.mark.slow
def test_three_rotations_with_more_components_have_no_decode_failures(
    healthy_etcd: EtcdCluster, etcd_prefix: str, tmp_path: Path, alerts: list[Alert]
) -> None:
    load = rotate_under_load(
        healthy_etcd,
        etcd_prefix,
        tmp_path,
        alerts,
        components=4,
        writers=4,
        readers=8,
        committers=2,
        n_keys=200,
        rotations=3,
    )
    assert_clean(load, alerts, stages=13)
