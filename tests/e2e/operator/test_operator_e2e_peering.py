"""Two operator replicas with kopf peering: one acts, the other takes over when it stops."""

from __future__ import annotations

import pytest
from operator_e2e_support import REPO, OperatorRun, kubectl, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]


def test_two_replicas_one_active_then_failover(operator_run: OperatorRun) -> None:
    run = operator_run
    kubectl("apply", "-f", str(REPO / "crds" / "kopf-peering.yaml"))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/kopfpeerings.kopf.dev")
    run.custom.create_namespaced_custom_object(
        "kopf.dev",
        "v1",
        run.namespace,
        "kopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "ml-defender"}},
    )
    first = run.start("--peering", "ml-defender", "--priority", "200", POD_NAME="op-a")
    run.start("--peering", "ml-defender", "--priority", "100", POD_NAME="op-b")
    wait_for("both replicas in the peering", lambda: len(_peers(run)) == 2)
    doc = run.apply_sample("firewall")
    run.wait_active_version("firewall", 1)
    configs = run.configs()
    meta = configs.get_metadata("firewall")
    assert meta is not None and meta.modified_by == "operator:op-a"
    # Both replicas share one keyring: the second adopted the first one's Secret.
    assert len(run.core.list_namespaced_secret(run.operator_namespace).items) >= 1

    run.stop(first)
    config = dict(doc["spec"]["config"], block_ttl_seconds=120)
    run.patch("firewall", {"spec": {"config": config}})
    wait_for("version 2 by the standby", lambda: configs.get_active("firewall").version == 2, 90)
    meta = configs.get_metadata("firewall")
    assert meta is not None and meta.modified_by == "operator:op-b"


def _peers(run: OperatorRun) -> dict[str, object]:
    obj = run.custom.get_namespaced_custom_object(
        "kopf.dev", "v1", run.namespace, "kopfpeerings", "ml-defender"
    )
    return dict(obj.get("status") or {})  # type: ignore[union-attr]
