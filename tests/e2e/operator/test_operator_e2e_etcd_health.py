"""The operator shows the defender etcd's own health on the components: EtcdHealthy, degraded
while a member is down, NOSPACE as a condition, an Event and an alert, and recovery.

Runs on a 3-member etcd of its own with a 2 MiB backend quota, so NOSPACE is reachable."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s
from operator_e2e_support import OperatorRun, new_operator_run

from defender_cli import main as cli_main
from defender_config import Alert, EtcdSettings, StoreNoSpaceError, contract
from defender_config.store import EtcdStore
from defender_devcluster import EtcdCluster, etcd_client_settings
from defender_devcluster.pytest_plugin import private_etcd
from defender_operator import _api

QUOTA = 2 * 1024 * 1024
CHUNK = b"z" * (200 * 1024)


@pytest.fixture
def small_etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    yield from private_etcd(
        tmp_path / "etcd", "opnospace", extra_args=(f"--quota-backend-bytes={QUOTA}",)
    )


@pytest.fixture
def run(
    crd_installed: None,
    namespace: str,
    k8s_api: k8s.ApiClient,
    small_etcd: EtcdCluster,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[OperatorRun]:
    r = new_operator_run(k8s_api, small_etcd, namespace, tmp_path / "operator.log", "e2e-etcd")
    try:
        yield r
    finally:
        failed = getattr(request.node, "rep_call", None)
        r.close()
        if failed is not None and failed.failed:
            sys.stderr.write(f"\n--- operator log ({r.log_path}) ---\n{r.log_tail()}\n")
        for item in r.custom.list_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, namespace, _api.PLURAL
        )["items"]:
            r.patch(item["metadata"]["name"], {"metadata": {"finalizers": None}})
        r.core.delete_namespace(r.operator_namespace)


def test_etcd_health_degraded_and_nospace_reach_the_components(
    run: OperatorRun, small_etcd: EtcdCluster
) -> None:
    run.start()
    run.apply_sample("sniffer")
    # Generous: the shared machine is slow to start kopf under load.
    run.wait_active_version("sniffer", 1, timeout=240)
    healthy = run.wait_condition(
        "sniffer", "EtcdHealthy", status="True", reason="EtcdHealthy", timeout=120
    )
    assert "3/3 healthy" in healthy["message"]

    # A member down: quorum kept, the condition says how close the edge is.
    small_etcd.stop_member(2)
    try:
        degraded = run.wait_condition("sniffer", "EtcdHealthy", reason="EtcdDegraded", timeout=120)
        assert degraded["status"] == "False" and "2/3 healthy" in degraded["message"]
    finally:
        small_etcd.restart_member(2)
    run.wait_condition("sniffer", "EtcdHealthy", status="True", timeout=90)

    settings = EtcdSettings.model_validate(
        {**etcd_client_settings(small_etcd.endpoints), "retries": 1}
    )
    with EtcdStore(settings) as store:
        for _ in range(4 * QUOTA // len(CHUNK)):
            try:
                store.put(f"{run.prefix}-filler/big", CHUNK)
            except StoreNoSpaceError:
                break
        else:
            raise AssertionError("etcd never raised NOSPACE")

    nospace = run.wait_condition("sniffer", "EtcdHealthy", reason="EtcdNoSpace", timeout=120)
    assert "defrag --compact --disarm-nospace" in nospace["message"]
    run.wait_event("sniffer", "EtcdNoSpace", timeout=120)
    # Heartbeats cannot be written: the operator judges none (no restart for a full database).
    heartbeat = run.condition("sniffer", "Heartbeating")
    assert heartbeat is not None and heartbeat["reason"] in ("EtcdNoSpace", "NoPods")

    out, err = io.StringIO(), io.StringIO()
    endpoints = ",".join(small_etcd.endpoints)
    code = cli_main(
        ["defrag", "--compact", "--disarm-nospace", "--etcd-endpoints", endpoints, "--no-color"],
        out=out,
        err=err,
    )
    assert code == 0, err.getvalue()
    assert "No alarm left." in out.getvalue()

    run.wait_condition("sniffer", "EtcdHealthy", status="True", timeout=90)
    run.wait_event("sniffer", "EtcdSpaceRecovered", timeout=120)
    client = run.client()
    kinds = []
    for stored in client.store.list_prefix(client.layout.component_alerts_dir("sniffer")):
        kinds.append(Alert.model_validate(client.decode_json(stored.key, stored.value)).kind)
    # The alert raised while etcd refused writes could not be stored; the recovery one is.
    assert "EtcdSpaceRecovered" in kinds
