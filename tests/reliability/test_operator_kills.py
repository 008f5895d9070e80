"""The operator SIGKILLed at random points while it reconciles a stream of config edits.

The operator runs as a subprocess against the local control plane and the defender etcd (the
operator end-to-end harness, tests/e2e/operator/operator_e2e_support.OperatorRun). Every edit
gives spec.config a value never used before; after random edits the operator is killed (at a
random delay, so often mid-reconcile) and started again. Every value the component keys had in
etcd's own MVCC history is read back afterwards. Then:

* MASTER was written once per component and never changed or deleted;
* ACTIVE versions only went up, by one, each with a config never committed before (no
  duplicated side effect: a reconcile repeated after a kill commits nothing new);
* every component converges on its last spec.config (ACTIVE, status digest, Ready condition
  aside: no pods run here).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from reliability_support import etcd_settings

from defender_config import config_digest, contract, validate_config
from defender_config.store import EtcdStore, StoredValue
from defender_devcluster import EtcdCluster, wait_for

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "e2e" / "operator"))
from operator_e2e_support import OperatorRun  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]

GROUP, VERSION, PLURAL = contract.API_GROUP, contract.API_VERSION, contract.PLURAL
BASE: dict[str, Any] = yaml.safe_load((REPO / "manifests/samples/firewall.yaml").read_text())


def component(name: str) -> dict[str, Any]:
    doc = json.loads(json.dumps(BASE))
    doc["metadata"] = {"name": name}
    doc["spec"]["selector"] = {"matchLabels": {"app": name}}
    return doc


def edited_config(n: int) -> dict[str, Any]:
    """A config that no other edit uses (block_ttl_seconds = n)."""
    config = json.loads(json.dumps(BASE["spec"]["config"]))
    config["block_ttl_seconds"] = 10_000 + n
    return config


def key_history(store: EtcdStore, key: str) -> list[StoredValue]:
    """Every value `key` ever had, oldest first, read back from etcd's MVCC history (each
    version's predecessor is the value at its mod_revision - 1). Complete because the
    harness etcd does not compact."""
    out: list[StoredValue] = []
    current = store.get(key)
    while current is not None:
        out.append(current)
        if current.mod_revision == current.create_revision:
            break
        current = store.get(key, revision=current.mod_revision - 1)
    return list(reversed(out))


def kill_and_restart(run: OperatorRun) -> None:
    (proc,) = run.procs
    proc.kill()  # SIGKILL: no cleanup, no finalizer handling, no status write
    proc.wait(timeout=30)
    run.procs.remove(proc)
    run.start()


def check_invariants(store: EtcdStore, prefix: str, names: list[str]) -> dict[str, int]:
    """Assert the invariants on etcd's recorded history; returns the final version per
    component."""
    finals: dict[str, int] = {}
    for name in names:
        base = f"{prefix}/components/{name}/"
        master = key_history(store, base + "master_config")
        assert len(master) == 1 and master[0].version == 1, (
            f"{name}: MASTER changed after creation ({len(master)} values)"
        )
        versions: list[int] = []
        digests: list[str] = []
        for sv in key_history(store, base + "metadata"):
            meta = json.loads(sv.value)
            if versions and meta["version"] == versions[-1]:
                # Same version re-written (a field besides the config): config unchanged.
                assert meta["digest"] == digests[-1], f"{name}: v{meta['version']} rewritten"
                continue
            versions.append(meta["version"])
            digests.append(meta["digest"])
        assert versions == list(range(1, len(versions) + 1)), f"{name}: versions {versions}"
        assert len(set(digests)) == len(digests), (
            f"{name}: a config was committed twice (duplicated side effect): {digests}"
        )
        finals[name] = versions[-1]
    return finals


def edits_with_kills(
    run: OperatorRun, cluster: EtcdCluster, components: int, edits: int, kill_chance: float
) -> tuple[int, int]:
    rng = random.Random(11)
    names = [f"fw-{i}" for i in range(components)]
    store = EtcdStore(etcd_settings(cluster), registry=CollectorRegistry())
    run.start()
    try:
        for name in names:
            run.custom.create_namespaced_custom_object(
                GROUP, VERSION, run.namespace, PLURAL, component(name)
            )
        for name in names:
            wait_for(
                f"{name} seeded",
                lambda n=name: run.get(n).get("status", {}).get("activeVersion") == 1,
                timeout=120,
            )
        last: dict[str, dict[str, Any]] = {n: BASE["spec"]["config"] for n in names}
        kills = 0
        for n in range(1, edits + 1):
            name = rng.choice(names)
            last[name] = edited_config(n)
            run.patch(name, {"spec": {"config": last[name]}})
            if rng.random() < kill_chance:
                time.sleep(rng.uniform(0.0, 1.5))  # anywhere in the reconcile that follows
                kill_and_restart(run)
                kills += 1
            else:
                time.sleep(rng.uniform(0.0, 0.2))
        expected = {n: config_digest(validate_config("firewall", c)) for n, c in last.items()}
        for name in names:
            wait_for(
                f"{name} to converge on its last spec.config",
                lambda n=name: run.get(n).get("status", {}).get("activeDigest") == expected[n],
                timeout=180,
            )
        configs = run.configs()
        for name in names:
            assert config_digest(configs.get_active(name).config) == expected[name]
            assert configs.get_master(name) == validate_config("firewall", BASE["spec"]["config"])
        finals = check_invariants(store, run.prefix, names)
        for name in names:
            # Status is written after etcd: give the operator time to publish the version.
            try:
                wait_for(
                    f"{name} status.activeVersion {finals[name]}",
                    lambda n=name: run.get(n)["status"]["activeVersion"] == finals[n],
                    timeout=30,
                )
            except AssertionError as exc:
                status = run.get(name)["status"]
                shown = {k: status.get(k) for k in ("activeVersion", "activeDigest")}
                raise AssertionError(
                    f"{exc}: status {shown}, etcd final version {finals[name]} with digest "
                    f"{expected[name]}; operator log:\n{run.log_tail(40)}"
                ) from None
        assert [p.poll() for p in run.procs] == [None], run.log_tail()
        return kills, sum(finals.values()) - len(names)
    finally:
        store.close()


def test_operator_killed_during_reconciles_keeps_master_and_versions(
    operator: OperatorRun, healthy_etcd: EtcdCluster
) -> None:
    kills, commits = edits_with_kills(
        operator, healthy_etcd, components=2, edits=20, kill_chance=0.15
    )
    assert kills >= 2 and commits >= 2, (kills, commits)


@pytest.mark.slow
def test_operator_killed_at_random_points_during_100_reconciles(
    operator: OperatorRun, healthy_etcd: EtcdCluster
) -> None:
    kills, commits = edits_with_kills(
        operator, healthy_etcd, components=5, edits=100, kill_chance=0.1
    )
    assert kills >= 5 and commits >= 20, (kills, commits)
