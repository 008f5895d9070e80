"""`kubectl delete crd` while the operator runs (docs/operator.md, "Retention on delete").

kopf serves no resource whose CRD is terminating, so before the operator finalized such
resources itself a Purge resource held the CRD's deletion for good, unexplained."""

from __future__ import annotations

import contextlib

from kubernetes import client as k8s
from operator_e2e_support import CRD, OperatorRun, kubectl, wait_for

from defender_config import contract

CRD_NAME = f"{contract.PLURAL}.{contract.API_GROUP}"


def _crd_gone(api: k8s.ApiextensionsV1Api) -> bool:
    try:
        api.read_custom_resource_definition(CRD_NAME)
    except k8s.ApiException as exc:
        return exc.status == 404
    return False


def _put_the_crd_back(run: OperatorRun, api: k8s.ApiextensionsV1Api) -> None:
    """The session's other tests need the CRD: whatever this test left, it goes back."""
    if not _crd_gone(api):
        with contextlib.suppress(k8s.ApiException):
            for item in run.custom.list_cluster_custom_object(
                contract.API_GROUP, contract.API_VERSION, contract.PLURAL
            )["items"]:
                meta = item["metadata"]
                run.custom.patch_namespaced_custom_object(
                    contract.API_GROUP,
                    contract.API_VERSION,
                    meta["namespace"],
                    contract.PLURAL,
                    meta["name"],
                    {"metadata": {"finalizers": None}},
                )
        wait_for("the CRD deleted", lambda: _crd_gone(api) or None, timeout=60)
    kubectl("apply", "-f", str(CRD))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{CRD_NAME}")


def test_deleting_the_crd_applies_each_retention_and_is_not_held_for_good(
    operator_run: OperatorRun,
) -> None:
    run = operator_run
    crds = k8s.ApiextensionsV1Api(run.api)
    run.start()
    run.apply_sample("firewall")
    run.apply_sample("sniffer", retention="Purge")
    run.wait_active_version("firewall", 1)
    run.wait_active_version("sniffer", 1)
    operator = run.procs[0]
    store = run.client(run.operator_keyring()).store
    try:
        kubectl("delete", "crd", CRD_NAME, "--wait=false")
        # The Purge resource's finalizer is removed by the operator, so the CRD goes.
        wait_for("the CRD deleted", lambda: _crd_gone(crds) or None, timeout=45)
        # Each retention was applied: Purge removed the sniffer's keys, Keep left the
        # firewall's data readable.
        assert store.list_prefix(f"{run.prefix}/components/sniffer/") == []
        assert run.configs().get_active("firewall").version == 1
        assert operator.poll() is None
        # The resource is gone; its Event says what became of its data.
        wait_for(
            "the RetentionAppliedOnCrdDeletion event",
            lambda: (
                any(
                    e.reason == "RetentionAppliedOnCrdDeletion" and "Purge" in (e.message or "")
                    for e in run.core.list_namespaced_event(
                        run.namespace, field_selector="involvedObject.name=sniffer"
                    ).items
                )
                or None
            ),
        )
    finally:
        _put_the_crd_back(run, crds)


def test_a_crd_deleted_while_no_operator_ran_goes_once_one_starts(
    operator_run: OperatorRun,
) -> None:
    run = operator_run
    crds = k8s.ApiextensionsV1Api(run.api)
    run.start()
    run.apply_sample("sniffer", retention="Purge")
    run.wait_active_version("sniffer", 1)
    run.stop()
    store = run.client(run.operator_keyring()).store
    try:
        kubectl("delete", "crd", CRD_NAME, "--wait=false")
        # Nobody removes the finalizer: the data stays and the CRD waits.
        assert not _crd_gone(crds)
        run.start()
        wait_for("the CRD deleted", lambda: _crd_gone(crds) or None, timeout=45)
        assert store.list_prefix(f"{run.prefix}/components/sniffer/") == []
        assert run.procs[0].poll() is None
    finally:
        _put_the_crd_back(run, crds)
