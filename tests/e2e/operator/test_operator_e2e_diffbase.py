"""kopf's diff base across operator versions, with the real kopf and API server: a status left
by an operator before the digest (the JSON in status.lastHandledConfiguration, or a value that
does not parse) is read at start-up, replaced by status.lastHandledDigest and removed, and a
spec edited while no operator ran is still reconciled."""

from __future__ import annotations

import json
from typing import Any

import kopf
import pytest
import yaml
from kubernetes import client as k8s
from operator_e2e_support import SAMPLES, OperatorRun, wait_for

from defender_config import contract
from defender_operator._diffbase import FIELD, LEGACY_FIELD, PublishedDiffBase

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]


def _set_status(run: OperatorRun, name: str, status: dict[str, Any]) -> None:
    run.custom.patch_namespaced_custom_object_status(
        contract.API_GROUP,
        contract.API_VERSION,
        run.namespace,
        contract.PLURAL,
        name,
        {"status": status},
    )


def _migrated(run: OperatorRun, name: str) -> bool:
    obj = run.get(name)
    status = obj.get("status") or {}
    expected = PublishedDiffBase().encoded(kopf.Body(obj))
    return status.get(FIELD) == expected and LEGACY_FIELD not in status


def test_an_earlier_operators_diff_base_is_read_then_replaced(operator_run: OperatorRun) -> None:
    run = operator_run
    run.start()
    run.apply_sample("sniffer")
    run.apply_sample("firewall")
    for name in ("sniffer", "firewall"):
        run.wait_active_version(name, 1)
        wait_for(f"{name}'s digest", lambda n=name: _migrated(run, n))  # type: ignore[misc]
    run.stop()

    # What an operator before the digest left: the essence's JSON (kopf's own encoding) and no
    # digest; for the firewall, a value that does not parse.
    sniffer = run.get("sniffer")
    essence = PublishedDiffBase().build(body=kopf.Body(sniffer))
    _set_status(
        run,
        "sniffer",
        {FIELD: None, LEGACY_FIELD: json.dumps(essence, separators=(",", ":"))},
    )
    _set_status(run, "firewall", {FIELD: None, LEGACY_FIELD: "{not json"})
    # And while no operator runs, someone edits the sniffer's config.
    config = dict(sniffer["spec"]["config"])
    config["snaplen"] = int(config.get("snaplen", 256)) + 1
    run.patch("sniffer", {"spec": {"config": config}})

    run.start()
    run.wait_active_version("sniffer", 2)
    for name in ("sniffer", "firewall"):
        wait_for(f"{name} migrated", lambda n=name: _migrated(run, n))  # type: ignore[misc]
    run.wait_active_version("firewall", 1)
    assert "JSONDecodeError" not in run.log_tail(400), run.log_tail()


def test_a_crd_without_the_digest_field_costs_a_reconcile_per_start_not_a_failure(
    operator_run: OperatorRun,
) -> None:
    # A CRD older than the operator (crds.enabled=false, crds/ not applied): the API server
    # prunes status.lastHandledDigest. The CRD is the cluster's: put back whatever happens.
    ext = k8s.ApiextensionsV1Api(operator_run.api)
    crd_name = f"{contract.PLURAL}.{contract.API_GROUP}"
    original = ext.read_custom_resource_definition(crd_name)
    path = "/spec/versions/0/schema/openAPIV3Schema/properties/status/properties/" + FIELD
    ext.patch_custom_resource_definition(crd_name, [{"op": "remove", "path": path}])
    try:
        run = operator_run
        _wait_pruned(run, True)
        run.start()
        run.apply_sample("sniffer")
        run.wait_active_version("sniffer", 1)
        run.wait_condition("sniffer", "ConfigSynced", status="True")
        assert FIELD not in run.get("sniffer")["status"]
        run.stop()
        run.start()
        wait_for(
            "a second reconcile, as created",
            lambda: run.log_tail(400).count("Creation is processed") >= 2,
        )
        run.wait_condition("sniffer", "ConfigSynced", status="True")
        assert run.get("sniffer")["status"]["activeVersion"] == 1
        assert "Traceback" not in run.log_tail(400), run.log_tail()
    finally:
        current = ext.read_custom_resource_definition(crd_name)
        original.metadata.resource_version = current.metadata.resource_version
        ext.replace_custom_resource_definition(crd_name, original)
        operator_run.stop()
        _wait_pruned(operator_run, False)  # the tests after this one see the field again


def _wait_pruned(run: OperatorRun, pruned: bool) -> None:
    """Until the API server serves the CRD with (or without) the field, as a status write of
    it shows: the schema change takes a moment. Probed on a resource of its own, while no
    operator runs."""
    doc = yaml.safe_load((SAMPLES / "firewall.yaml").read_text())
    doc["metadata"]["name"] = "probe"
    run.custom.create_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, run.namespace, contract.PLURAL, doc
    )

    def served() -> bool:
        _set_status(run, "probe", {FIELD: "sha256:probe"})
        return (FIELD not in (run.get("probe").get("status") or {})) is pruned

    try:
        wait_for(f"the CRD {'without' if pruned else 'with'} {FIELD}", served)
    finally:
        run.custom.delete_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, run.namespace, contract.PLURAL, "probe"
        )
