"""A tenant with edit rights in one namespace only (a Role on DefenderComponents, Pods, Secrets,
ConfigMaps and Events there, nothing cluster-wide) against the components of another
namespace served by the same operator (docs/security.md, "Kubernetes edit on
DefenderComponents"). Real API server with RBAC, the tenant impersonated by kubectl."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from operator_e2e_support import OperatorRun, custom_component, extra_namespace, kubectl, wait_for

from defender_config import contract

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]

TENANT = "mallory"
AS_TENANT = ("--as", TENANT)


@pytest.fixture
def tenant_namespace(operator_run: OperatorRun) -> Iterator[str]:
    """A namespace the operator also watches (start it with ``-n`` of it), where `mallory`
    may edit DefenderComponents, Pods, Secrets, ConfigMaps and Events, and nothing else."""
    run = operator_run
    with extra_namespace(run, "t-tenant") as name:
        rbac = k8s.RbacAuthorizationV1Api(run.api)
        rbac.create_namespaced_role(
            name,
            k8s.V1Role(
                metadata=k8s.V1ObjectMeta(name="tenant-edit"),
                rules=[
                    k8s.V1PolicyRule(
                        api_groups=[contract.API_GROUP],
                        resources=[contract.PLURAL],
                        verbs=["get", "list", "watch", "create", "update", "patch", "delete"],
                    ),
                    k8s.V1PolicyRule(
                        api_groups=[""],
                        resources=["pods", "secrets", "configmaps", "events"],
                        verbs=["get", "list", "watch", "create", "update", "patch", "delete"],
                    ),
                ],
            ),
        )
        rbac.create_namespaced_role_binding(
            name,
            k8s.V1RoleBinding(
                metadata=k8s.V1ObjectMeta(name="tenant-edit"),
                role_ref=k8s.V1RoleRef(
                    api_group="rbac.authorization.k8s.io", kind="Role", name="tenant-edit"
                ),
                subjects=[
                    k8s.RbacV1Subject(
                        api_group="rbac.authorization.k8s.io", kind="User", name=TENANT
                    )
                ],
            ),
        )
        yield name


def _as_tenant(*args: str, check: bool = True) -> str:
    return kubectl(*AS_TENANT, *args, check=check).stdout.strip()


def _tenant_component(name: str, value: int) -> dict[str, Any]:
    return custom_component(name, {"value": value}, retention="Purge")


def _active_version(run: OperatorRun, namespace: str, name: str) -> int | None:
    obj: Any = run.custom.get_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, namespace, contract.PLURAL, name
    )
    version = (obj.get("status") or {}).get("activeVersion")
    return int(version) if version is not None else None


def _wait_version(run: OperatorRun, namespace: str, name: str, version: int) -> None:
    wait_for(
        f"{namespace}/{name} status.activeVersion {version}",
        lambda: _active_version(run, namespace, name) == version or None,
    )


def test_a_progress_annotation_kopf_cannot_read_leaves_no_resource_unhandled(
    operator_run: OperatorRun, tenant_namespace: str, tmp_path: Path
) -> None:
    """kopf keeps each handler's progress as JSON in an annotation of the object, which the
    tenant may write. With kopf's own storage, a value kopf could not decode, sent with a spec
    change, made kopf throttle the object and never run its handlers again: the change was never
    committed (the other namespace kept being served: kopf throttles per object). Now such a
    record is ignored (the handler runs afresh): the tenant's change is committed, the other
    namespace's components keep committing, and so after a restart with the annotation in place."""
    run = operator_run
    ns = tenant_namespace
    run.start("-n", ns)
    run.apply_sample("firewall")
    run.wait_active_version("firewall", 1)
    # The tenant's rights are what the docstring says: its namespace, not the operator's.
    assert _as_tenant("auth", "can-i", "patch", contract.PLURAL, "-n", ns) == "yes"
    assert (
        _as_tenant("auth", "can-i", "patch", contract.PLURAL, "-n", run.namespace, check=False)
        == "no"
    )
    path = tmp_path / "tenant.json"
    path.write_text(json.dumps(_tenant_component("tenant", 1)))
    _as_tenant("create", "-n", ns, "-f", str(path))
    _wait_version(run, ns, "tenant", 1)

    hostile = {
        "kopf.zalando.org/reconcile_component": "[" * 3000,
        "kopf.zalando.org/apply_retention": "{not json",
    }
    patch = {"metadata": {"annotations": hostile}, "spec": {"config": {"value": 2}}}
    _as_tenant(
        "patch", contract.PLURAL, "tenant", "-n", ns, "--type=merge", "-p", json.dumps(patch)
    )
    _wait_version(run, ns, "tenant", 2)
    run.patch("firewall", {"spec": {"config": {"block_ttl_seconds": 601}}})
    run.wait_active_version("firewall", 2)
    assert all(p.poll() is None for p in run.procs), run.log_tail(200)

    # A restart reads the annotations of every object (resume) before serving anyone.
    _as_tenant(
        "annotate", contract.PLURAL, "tenant", "-n", ns, "--overwrite",
        *(f"{k}={v}" for k, v in hostile.items()),
    )  # fmt: skip
    run.stop()
    run.start("-n", ns)
    run.patch("firewall", {"spec": {"config": {"block_ttl_seconds": 602}}})
    run.wait_active_version("firewall", 3)
    assert all(p.poll() is None for p in run.procs), run.log_tail(200)
    log = run.log_tail(3000)
    assert "Throttling for" not in log, log  # kopf giving up on an object for a while
    assert "cannot be used" in log and "progress record of handler" in log, log
    assert "[[[[" not in log and "not json" not in log, "the annotation's value was logged"


def _annotations(run: OperatorRun, namespace: str, name: str) -> dict[str, str]:
    obj: Any = run.custom.get_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, namespace, contract.PLURAL, name
    )
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def test_a_progress_record_the_tenant_writes_does_not_skip_a_reconcile(
    operator_run: OperatorRun, tenant_namespace: str, tmp_path: Path
) -> None:
    """kopf's own storage believed a well-formed record: `{"success": true}` for the reconcile
    handler (planted alone, which kopf sees as no change) made kopf skip the next spec change and
    record it as handled; `delayed` to 2999 put it off for good. The operator honours only the
    records it sealed, so both changes are committed, and kopf's write removes the records."""
    run = operator_run
    ns = tenant_namespace
    run.start("-n", ns)
    path = tmp_path / "tenant.json"
    path.write_text(json.dumps(_tenant_component("tenant", 1)))
    _as_tenant("create", "-n", ns, "-f", str(path))
    _wait_version(run, ns, "tenant", 1)
    key = "kopf.zalando.org/reconcile_component"

    # With a record of the delete handler, which is not run on a live object.
    other = "kopf.zalando.org/apply_retention"
    _as_tenant(
        "annotate", contract.PLURAL, "tenant", "-n", ns, "--overwrite",
        f'{key}={{"success": true}}', f"{other}=[]",
    )  # fmt: skip
    _as_tenant(
        "patch", contract.PLURAL, "tenant", "-n", ns, "--type=merge",
        "-p", json.dumps({"spec": {"config": {"value": 2}}}),
    )  # fmt: skip
    _wait_version(run, ns, "tenant", 2)
    wait_for(
        "the planted records removed",
        lambda: not {key, other} & set(_annotations(run, ns, "tenant")) or None,
    )

    later = {
        "metadata": {"annotations": {key: '{"delayed": "2999-01-01T00:00:00+00:00"}'}},
        "spec": {"config": {"value": 3}},
    }
    _as_tenant(
        "patch", contract.PLURAL, "tenant", "-n", ns, "--type=merge", "-p", json.dumps(later)
    )
    _wait_version(run, ns, "tenant", 3)
    wait_for(f"{key} removed", lambda: key not in _annotations(run, ns, "tenant") or None)
    log = run.log_tail(3000)
    assert "not one this operator process wrote" in log, log
    assert "2999" not in log, "the annotation's value was logged"
