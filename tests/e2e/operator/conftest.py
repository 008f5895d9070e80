"""Fixtures of the operator end-to-end tests; helpers live in operator_e2e_support."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s
from operator_e2e_support import CRD, OperatorRun, free_port, kubectl, wait_for

from defender_devcluster import EtcdCluster
from defender_operator import _api


@pytest.fixture(scope="session")
def crd_installed(kubeconfig_path: Path) -> None:
    kubectl("apply", "-f", str(CRD))
    kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", f"crd/{_api.PLURAL}.{_api.GROUP}"
    )


def _namespace(core: k8s.CoreV1Api, name: str) -> None:
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    wait_for(
        f"serviceaccount default in {name}",
        lambda: core.read_namespaced_service_account("default", name),
        timeout=60,
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
    core = k8s.CoreV1Api(k8s_api)
    op_ns = f"op-{uuid.uuid4().hex[:8]}"
    _namespace(core, op_ns)
    run = OperatorRun(
        namespace=namespace,
        operator_namespace=op_ns,
        prefix=f"/e2e-{uuid.uuid4().hex[:8]}",
        etcd=defender_etcd,
        api=k8s_api,
        log_path=tmp_path / "operator.log",
        liveness_port=free_port(),
    )
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
                _api.GROUP, _api.VERSION, namespace, _api.PLURAL
            )["items"]:
                run.patch(item["metadata"]["name"], {"metadata": {"finalizers": None}})
        except k8s.ApiException:
            pass
        core.delete_namespace(op_ns)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)
