"""Reliability suites: chaos on the real 3-member etcd, key rotation under load, bad input, and
secrets hygiene. Long variants are `@pytest.mark.slow` (`make test-reliability` runs them all;
`make test` runs the rest).

Every log record of the session is kept in the hygiene ledger (reliability_support.HYGIENE) so
test_zz_secrets_hygiene.py can search it for key material.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s
from reliability_support import HYGIENE, restore_members

from defender_config import Alert, Keyring, contract
from defender_devcluster import EtcdCluster, LocalCluster
from defender_devcluster._system import apply_crds

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "e2e" / "operator"))
from operator_e2e_support import SECRET, OperatorRun, new_operator_run  # noqa: E402

GROUP, VERSION, PLURAL = contract.API_GROUP, contract.API_VERSION, contract.PLURAL


@pytest.fixture(scope="module", autouse=True)
def _hygiene_ledger() -> Iterator[None]:
    # Per module, not per session: the root logger goes to DEBUG only while this folder's
    # tests run, so suites collected later see the logging setup they expect.
    HYGIENE.install()
    try:
        yield
    finally:
        HYGIENE.uninstall()


@pytest.fixture
def healthy_etcd(defender_etcd: EtcdCluster) -> Iterator[EtcdCluster]:
    """The harness etcd with three running members before and after the test (members the
    test killed or stopped are restarted), and its logs noted for the hygiene check."""
    restore_members(defender_etcd)
    for i in range(defender_etcd.members):
        HYGIENE.log_files.add(defender_etcd.log_path(i))
    yield defender_etcd
    restore_members(defender_etcd)


@pytest.fixture
def alerts() -> list[Alert]:
    return []


@pytest.fixture
def operator(
    local_cluster: LocalCluster,
    k8s_api: k8s.ApiClient,
    namespace: str,
    healthy_etcd: EtcdCluster,
    tmp_path: Path,
) -> Iterator[OperatorRun]:
    """A (not yet started) operator subprocess on the harness cluster, its log, prefix, status,
    Events and keyring registered with the hygiene ledger."""
    apply_crds(local_cluster.kubeconfig, REPO / "crds")
    run = new_operator_run(
        k8s_api, healthy_etcd, namespace, tmp_path / "operator.log", "reliability-op"
    )
    HYGIENE.log_files.add(run.log_path)
    HYGIENE.prefixes.add(run.prefix + "/")
    try:
        yield run
    finally:
        run.close()
        for item in run.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)[
            "items"
        ]:
            # Status and Events are searched for key material by the hygiene suite.
            HYGIENE.add_text(f"status {item['metadata']['name']}", json.dumps(item))
            run.patch(item["metadata"]["name"], {"metadata": {"finalizers": None}})
        for ns in (namespace, run.operator_namespace):
            # Events on components and on the keyring Secret (NoKeyringExport) alike.
            events = run.core.list_namespaced_event(ns)
            HYGIENE.add_text(f"events {ns}", str([e.to_dict() for e in events.items]))
        # The operator's own key is what its logs, Events, status and etcd values must not hold.
        with contextlib.suppress(k8s.ApiException):
            secret = run.core.read_namespaced_secret(SECRET, run.operator_namespace)
            HYGIENE.register(Keyring.from_secret_data(dict(secret.data)))
        run.core.delete_namespace(run.operator_namespace)
