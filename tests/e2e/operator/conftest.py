"""Fixtures of the operator end-to-end tests; helpers live in operator_e2e_support."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s
from operator_e2e_support import CRD, OperatorRun, kubectl, new_operator_run

from defender_config import contract
from defender_devcluster import EtcdCluster


@pytest.fixture(scope="session")
def crd_installed(kubeconfig_path: Path) -> None:
    kubectl("apply", "-f", str(CRD))
    kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        f"crd/{contract.PLURAL}.{contract.API_GROUP}",
    )


@pytest.fixture
def operator_run(
    crd_installed: None,
    namespace: str,
    k8s_api: k8s.ApiClient,
    defender_etcd: EtcdCluster,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[OperatorRun]:
    """A (not yet started) operator for this test: own component namespace, own operator
    namespace, own etcd prefix. Call `.start()`; it is stopped and its log shown on failure."""
    run = new_operator_run(k8s_api, defender_etcd, namespace, tmp_path / "operator.log", "e2e")
    try:
        yield run
    finally:
        failed = getattr(request.node, "rep_call", None)
        run.close()
        if failed is not None and failed.failed:
            sys.stderr.write(f"\n--- operator log ({run.log_path}) ---\n{run.log_tail()}\n")
        # Remove finalizers first so the namespace can go even if the operator is gone.
        try:
            for item in run.custom.list_namespaced_custom_object(
                contract.API_GROUP, contract.API_VERSION, namespace, contract.PLURAL
            )["items"]:
                run.patch(item["metadata"]["name"], {"metadata": {"finalizers": None}})
        except k8s.ApiException:
            pass
        run.core.delete_namespace(run.operator_namespace)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)
