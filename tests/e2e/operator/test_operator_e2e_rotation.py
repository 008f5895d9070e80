"""Staged key rotation while instances read and write: no decode failure at any point."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_e2e_support import (
    SAMPLES,
    SECRET,
    OperatorRun,
    key_forms,
    key_material_shown,
    kubectl,
    wait_for,
)

from defender_config import (
    ConfigStore,
    ConflictError,
    DefenderConfigError,
    EnvelopeError,
    Keyring,
    KeyringSource,
    KeyState,
    StoreUnavailableError,
    contract,
)

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]

LABELS = {"app.kubernetes.io/name": "sniffer"}


class FakeKubelet(threading.Thread):
    """Copies the namespace's keyring Secret into a file the way kubelet updates a mounted
    Secret: a whole new file swapped in atomically."""

    def __init__(self, run: OperatorRun, directory: Path) -> None:
        super().__init__(daemon=True)
        self.run_ = run
        self.file = directory / "keyring.json"
        self.stop_event = threading.Event()
        self.sync()

    def sync(self) -> None:
        keyring = self.run_.keyring_copy()
        tmp = self.file.with_suffix(".tmp")
        tmp.write_bytes(keyring.to_json())
        os.replace(tmp, self.file)

    def run(self) -> None:
        while not self.stop_event.wait(0.3):
            try:
                self.sync()
            except Exception:  # the API server may be briefly busy; next round syncs
                continue


class Load(threading.Thread):
    """A component instance at work: commits to firewall (as rag may) and reads everything."""

    def __init__(self, configs: ConfigStore, base: dict[str, Any], write: bool) -> None:
        super().__init__(daemon=True)
        self.configs = configs
        self.base = base
        self.write = write
        self.stop_event = threading.Event()
        self.ops = 0
        self.decode_failures: list[str] = []

    def run(self) -> None:
        i = 0
        while not self.stop_event.is_set():
            i += 1
            try:
                if self.write:
                    cfg = dict(self.base, block_ttl_seconds=1000 + i % 50)
                    self.configs.commit("firewall", cfg, "rag/e2e")
                self.configs.get_active("firewall")
                self.configs.get_master("sniffer")
                self.ops += 1
            except ConflictError:
                continue
            except EnvelopeError as exc:
                self.decode_failures.append(f"{exc.reason}: {exc}")
            except StoreUnavailableError:
                continue
            except DefenderConfigError as exc:
                self.decode_failures.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.05)


def test_rotation_under_load_has_no_decode_failures(
    operator_run: OperatorRun, tmp_path: Path
) -> None:
    run = operator_run
    run.start(
        DEFENDER_OPERATOR_ROTATION_DISTRIBUTE_TIMEOUT_SECONDS="120",
        DEFENDER_OPERATOR_ROTATION_GRACE_SECONDS="3",
    )
    run.apply_sample("sniffer")
    run.apply_sample("firewall")
    for name in ("sniffer", "firewall"):
        wait_for(f"{name} seeded", lambda n=name: run.get(n).get("status", {}).get("activeVersion"))  # type: ignore[misc]
    run.deployment("sniffer", LABELS, replicas=2)
    pods = wait_for("2 pods", lambda: len(p := run.pods(LABELS)) == 2 and p)

    kubelet = FakeKubelet(run, tmp_path)
    kubelet.start()
    source = KeyringSource(kubelet.file, poll_seconds=0.2)
    old = source.current()
    firewall = yaml.safe_load((SAMPLES / "firewall.yaml").read_text())["spec"]["config"]
    heartbeaters = []
    loads = []
    for i, pod in enumerate(pods):
        client = run.client(source)
        heartbeaters.append(run.heartbeat("sniffer", pod.metadata.name, client=client))
        loads.append(Load(ConfigStore(client), firewall, write=i == 0))
    for load in loads:
        load.start()
    stop_refresh = threading.Event()

    def refresh() -> None:
        # What the agent does when its keyring file changes: report the new fingerprints.
        while not stop_refresh.wait(0.3):
            for hb in heartbeaters:
                hb.refresh_key_fields()

    refresher = threading.Thread(target=refresh, daemon=True)
    refresher.start()
    try:
        _request_rotation(run)
        wait_for(
            "rotation started",
            lambda: _stage(run) != "Idle" or _rotated(run, old),
            timeout=30,
        )
        wait_for("rotation finished", lambda: _rotated(run, old), timeout=120)
    finally:
        stop_refresh.set()
        for load in loads:
            load.stop_event.set()
        for load in loads:
            load.join(timeout=30)
        kubelet.stop_event.set()

    new = Keyring.from_secret_data(
        dict(run.core.read_namespaced_secret(SECRET, run.operator_namespace).data)
    )
    assert new.primary.key_id != old.primary.key_id
    assert new.get(old.primary.key_id).state is KeyState.RETIRED  # type: ignore[union-attr]
    failures = [f for load in loads for f in load.decode_failures]
    assert failures == [], failures
    assert all(load.ops > 0 for load in loads)
    # Every sealed value is now under the new key; the old one opens nothing any more.
    checker = run.client(new)
    sealed = [e for e in checker.dump() if e.sealed]
    assert sealed and {e.header["key_id"] for e in sealed if e.header} == {new.primary.key_id}
    assert ConfigStore(checker).get_master("sniffer")["interface"] == "eth0"
    _assert_no_key_material(run, [old, new])
    _assert_no_key_in_etcd_or_a_snapshot(run, [old, new], tmp_path)
    wait_for(
        "KeyCurrent on the new key",
        lambda: (
            (c := run.condition("sniffer", "KeyCurrent"))
            and c["status"] == "True"
            and new.primary_fingerprint in c["message"]
        ),
        timeout=30,
    )


def _request_rotation(run: OperatorRun) -> None:
    """What a person does: annotate the source keyring Secret."""
    kubectl(
        "annotate",
        "secret",
        SECRET,
        "-n",
        run.operator_namespace,
        f"{contract.ROTATE_ANNOTATION}=now",
    )


def _stage(run: OperatorRun) -> str:
    secret = run.core.read_namespaced_secret(SECRET, run.operator_namespace)
    return str((secret.metadata.annotations or {}).get(contract.ROTATION_STAGE_ANNOTATION, "Idle"))


def _rotated(run: OperatorRun, old: Keyring) -> bool:
    secret = run.core.read_namespaced_secret(SECRET, run.operator_namespace)
    annotations = secret.metadata.annotations or {}
    keyring = Keyring.from_secret_data(dict(secret.data))
    return (
        annotations.get(contract.ROTATION_STAGE_ANNOTATION) == "Idle"
        and keyring.primary.key_id != old.primary.key_id
    )


def test_instance_that_never_loads_the_key_times_out_and_is_reported(
    operator_run: OperatorRun,
) -> None:
    run = operator_run
    run.start(
        DEFENDER_OPERATOR_ROTATION_DISTRIBUTE_TIMEOUT_SECONDS="3",
        DEFENDER_OPERATOR_ROTATION_GRACE_SECONDS="1",
    )
    run.apply_sample("sniffer")
    run.wait_active_version("sniffer", 1)
    run.deployment("sniffer", LABELS, replicas=1)
    pod = wait_for("a pod", lambda: run.pods(LABELS))[0]
    # This instance keeps its old keyring and never refreshes its fingerprints.
    old = run.keyring_copy()
    run.heartbeat("sniffer", pod.metadata.name, client=run.client(old))
    _request_rotation(run)
    wait_for("rotation finished anyway", lambda: _rotated(run, old), timeout=90)
    kinds = {
        json.loads(v.value)["kind"]
        for v in run.client(old).store.list_prefix(f"{run.prefix}/alerts/sniffer/")
    }
    assert {"DistributionTimedOut", "PromotionTimedOut"} <= kinds
    # The laggard is visible on the component too: its records are signed with the retired
    # key, which nothing rewrites for it (the rewrap leaves heartbeat records to their
    # heartbeaters), so they no longer verify and are reported as such, naming the pod.
    run.wait_event("sniffer", "UnverifiedInstances")
    messages = [e.message for e in run.events("sniffer") if e.reason == "UnverifiedInstances"]
    assert any(pod.metadata.name in m and "retired" in m for m in messages), messages
    # The timeouts, alerts and Events of a rotation that went on without an instance name
    # keys by id and fingerprint only.
    assert key_material_shown(run, [old, run.keyring_copy()]) == []


def _assert_no_key_material(run: OperatorRun, keyrings: list[Keyring]) -> None:
    """Neither the operator's log, nor Events, nor any DefenderComponent, nor etcd holds a key;
    fingerprints are what is shown instead."""
    assert key_material_shown(run, keyrings) == []
    shown = run.log_path.read_text(errors="replace")
    shown += json.dumps(
        run.custom.list_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, run.namespace, contract.PLURAL
        )
    )
    assert keyrings[-1].primary_fingerprint in shown


def _assert_no_key_in_etcd_or_a_snapshot(
    run: OperatorRun, keyrings: list[Keyring], tmp_path: Path
) -> None:
    """docs/security.md, "Snapshots": the keyring is never in etcd, the key record holds key
    ids and fingerprints only. After a whole rotation (new key, promotion, re-seal of every
    value, retirement) the current values are searched by `key_material_shown`; here a snapshot
    of the member, which also holds what was overwritten but not yet compacted."""
    keys = [k for keyring in keyrings for k in keyring.keys]
    final = keyrings[-1]
    client = run.client(final)
    record = wait_for(
        "the key record naming the new primary",
        lambda: (
            (got := client.store.get(client.layout.keyring_record))
            and json.loads(got.value).get("primary") == final.primary.key_id
            and json.loads(got.value)
        ),
        timeout=30,
    )
    assert set(record) <= {"version", "keys", "primary", "updated"}, record
    assert record["keys"] == final.fingerprints()
    assert final.primary.key_id in record["keys"]
    assert all(len(fp) == 16 and int(fp, 16) >= 0 for fp in record["keys"].values())
    snap = client.store.snapshot(run.etcd.endpoints[0], str(tmp_path / "etcd.snapshot"))
    assert snap.hash_ok
    data = Path(snap.path).read_bytes()
    # The search is live: the snapshot holds this run's sealed values and plaintext records.
    assert client.layout.keyring_record.encode() in data
    found = [
        f"snapshot: key {k.key_id} as {form}"
        for k in keys
        for form, needle in key_forms(k.material).items()
        if needle in data
    ]
    assert found == [], found


def test_a_value_sealed_with_the_old_key_during_the_grace_period_is_rewrapped_before_retiring(
    operator_run: OperatorRun,
) -> None:
    """An instance whose keyring copy kubelet has not yet updated since the new key arrived
    (old key primary, new key decrypt-only) commits during the grace period, after the
    rewrap: retiring the old key then would leave that value unreadable for good."""
    run = operator_run
    run.start(
        DEFENDER_OPERATOR_ROTATION_DISTRIBUTE_TIMEOUT_SECONDS="3",
        DEFENDER_OPERATOR_ROTATION_GRACE_SECONDS="5",
        DEFENDER_OPERATOR_ROTATION_INTERVAL_SECONDS="1",
    )
    run.apply_sample("firewall")
    run.wait_active_version("firewall", 1)
    old = run.keyring_copy()
    _request_rotation(run)
    wait_for("the grace period", lambda: _stage(run) == "Grace", timeout=60, every=0.05)
    lagging = run.keyring_copy().promote(old.primary.key_id)
    writer = run.client(lagging)
    firewall = yaml.safe_load((SAMPLES / "firewall.yaml").read_text())["spec"]["config"]
    committed = dict(firewall, block_ttl_seconds=4321)
    ConfigStore(writer).commit("firewall", committed, "rag/e2e")
    assert _stage(run) == "Grace", "the commit came too late to test the grace period"
    active = writer.layout.active_config("firewall")
    sealed_with = {e.key: e.header["key_id"] for e in writer.dump() if e.sealed and e.header}
    assert sealed_with[active] == old.primary.key_id  # what the laggard wrote

    wait_for("rotation finished", lambda: _rotated(run, old), timeout=60)
    new = Keyring.from_secret_data(
        dict(run.core.read_namespaced_secret(SECRET, run.operator_namespace).data)
    )
    assert new.get(old.primary.key_id).state is KeyState.RETIRED  # type: ignore[union-attr]
    reader = run.client(new)
    assert ConfigStore(reader).get_active("firewall").config["block_ttl_seconds"] == 4321
    sealed = [e for e in reader.dump() if e.sealed and e.header]
    assert {e.header["key_id"] for e in sealed} == {new.primary.key_id}
