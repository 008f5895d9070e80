"""Fixtures of the operator end-to-end tests; helpers live in operator_e2e_support."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s
from operator_e2e_support import CRD, OperatorRun, close_operator_run, kubectl, new_operator_run

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
        close_operator_run(run, failed=failed is not None and failed.failed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)
