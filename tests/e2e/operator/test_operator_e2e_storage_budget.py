"""The per-namespace storage budget against a real API server and etcd: a namespace with a small
budget has a commit refused (ConfigSynced, a Warning Event, ACTIVE unchanged in etcd), while a
namespace under the default budget commits a config of the same size; a restarted operator
still counts what a resource deleted with retention Keep left; an edit of spec.customSchema is
judged too, and so is a re-sign of the metadata record that would record a larger one
(docs/operator.md, "Storage budget per namespace")."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest
from operator_e2e_support import (
    OperatorRun,
    custom_component,
    extra_namespace,
    free_port,
    metric,
    wait_for,
)

from defender_config import contract

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]

SMALL_BUDGET = 200_000
# ~120 KB of random data: incompressible enough that two copies (ACTIVE and its history entry)
# exceed the small budget wherever it is counted.
BLOB_BYTES = 90_000


def _blob(size: int = BLOB_BYTES) -> str:
    return base64.b64encode(os.urandom(size)).decode()


def _create(
    run: OperatorRun, namespace: str, name: str, config: dict[str, Any], retention: str = "Purge"
) -> None:
    run.custom.create_namespaced_custom_object(
        contract.API_GROUP,
        contract.API_VERSION,
        namespace,
        contract.PLURAL,
        custom_component(name, config, retention=retention),
    )


def _patch_config(run: OperatorRun, namespace: str, name: str, config: dict[str, Any]) -> None:
    run.custom.patch_namespaced_custom_object(
        contract.API_GROUP,
        contract.API_VERSION,
        namespace,
        contract.PLURAL,
        name,
        {"spec": {"config": config}},
    )


def _status(run: OperatorRun, namespace: str, name: str) -> dict[str, Any]:
    obj: Any = run.custom.get_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, namespace, contract.PLURAL, name
    )
    return dict(obj.get("status") or {})


def _wait_version(run: OperatorRun, namespace: str, name: str, version: int) -> None:
    wait_for(
        f"{namespace}/{name} status.activeVersion {version}",
        lambda: _status(run, namespace, name).get("activeVersion") == version or None,
    )


def test_a_namespace_over_its_budget_is_refused_a_commit_another_namespace_makes(
    operator_run: OperatorRun,
) -> None:
    run = operator_run
    with extra_namespace(run, "t-budget") as other:
        # Set here, whatever the caller's environment says: the operator's namespace A gets a
        # small budget of its own, namespace B the default.
        metrics_port = free_port()
        run.start(
            "-n",
            other,
            DEFENDER_OPERATOR_METRICS_PORT=str(metrics_port),
            DEFENDER_OPERATOR_NAMESPACE_STORAGE_BUDGET_BYTES=str(256 * 1024 * 1024),
            DEFENDER_OPERATOR_NAMESPACE_STORAGE_BUDGETS=json.dumps({run.namespace: SMALL_BUDGET}),
        )
        _create(run, run.namespace, "budget-a", {"value": 1})
        _create(run, other, "budget-b", {"value": 1})
        _wait_version(run, run.namespace, "budget-a", 1)
        _wait_version(run, other, "budget-b", 1)
        configs = run.configs()
        before = configs.get_metadata("budget-a")
        assert before is not None and before.version == 1

        large = {"value": 2, "blob": _blob()}
        _patch_config(run, run.namespace, "budget-a", large)
        synced = run.wait_condition(
            "budget-a", "ConfigSynced", status="False", reason="StorageBudgetExceeded"
        )
        assert f"namespace {run.namespace!r}" in synced["message"]
        assert f"{SMALL_BUDGET} bytes" in synced["message"]
        run.wait_event("budget-a", "StorageBudgetExceeded")
        # Nothing was written: ACTIVE in etcd is the version it was.
        after = configs.get_metadata("budget-a")
        assert after is not None
        assert (after.version, after.digest) == (1, before.digest)
        assert configs.get_active("budget-a").config == {"value": 1}
        assert _status(run, run.namespace, "budget-a").get("activeVersion") == 1

        # Namespace B, under the default budget, commits a config of the same size.
        _patch_config(run, other, "budget-b", {"value": 2, "blob": _blob()})
        _wait_version(run, other, "budget-b", 2)
        meta_b = configs.get_metadata("budget-b")
        assert meta_b is not None and meta_b.version == 2

        # Each namespace's usage beside its budget, for an alert before a refusal.
        def gauge(name: str, namespace: str) -> float:
            return metric(metrics_port, f'defender_operator_{name}{{namespace="{namespace}"}}')

        assert gauge("storage_budget_bytes", run.namespace) == SMALL_BUDGET
        assert gauge("storage_budget_bytes", other) == 256 * 1024 * 1024
        assert 0 < gauge("storage_used_bytes", run.namespace) <= SMALL_BUDGET
        assert gauge("storage_used_bytes", other) > len(_blob())


def test_a_restarted_operator_still_counts_what_a_keep_deletion_left(
    operator_run: OperatorRun,
) -> None:
    run = operator_run
    budgets = {
        "DEFENDER_OPERATOR_NAMESPACE_STORAGE_BUDGETS": json.dumps({run.namespace: SMALL_BUDGET})
    }
    # ~60 KB of base64: a seed (three copies, counted uncompressed) fits the small budget alone,
    # not beside what another such component keeps (~45 KB a copy, as stored).
    seeded_alone = 45_000
    first = run.start(**budgets)
    _create(run, run.namespace, "budget-kept", {"blob": _blob(seeded_alone)}, retention="Keep")
    _wait_version(run, run.namespace, "budget-kept", 1)
    run.custom.delete_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, run.namespace, contract.PLURAL, "budget-kept"
    )
    wait_for("budget-kept deleted", lambda: _gone(run, "budget-kept") or None)
    configs = run.configs()
    assert configs.get_active("budget-kept").version == 1  # Keep: its data stays in etcd
    run.stop(first)

    # A new operator remembers nothing of it: it measures the namespace before its first seed.
    metrics_port = free_port()
    run.start(DEFENDER_OPERATOR_METRICS_PORT=str(metrics_port), **budgets)
    _create(run, run.namespace, "budget-new", {"blob": _blob(seeded_alone)})
    synced = run.wait_condition(
        "budget-new", "ConfigSynced", status="False", reason="StorageBudgetExceeded"
    )
    assert f"namespace {run.namespace!r}" in synced["message"]
    assert configs.get_metadata("budget-new") is None  # nothing written
    used = metric(
        metrics_port, f'defender_operator_storage_used_bytes{{namespace="{run.namespace}"}}'
    )
    assert used > seeded_alone


def test_a_seed_into_a_name_whose_data_was_deleted_is_judged_by_the_budget(
    operator_run: OperatorRun,
) -> None:
    # A resource seeded once (its status shows an activeVersion) whose data was then deleted in
    # etcd: its next reconcile seeds it again through the seed step, not the create's
    # transaction, and that seed is judged as every other.
    run = operator_run
    run.start(DEFENDER_OPERATOR_NAMESPACE_STORAGE_BUDGETS=json.dumps({run.namespace: SMALL_BUDGET}))
    _create(run, run.namespace, "budget-lost", {"value": 1})
    _wait_version(run, run.namespace, "budget-lost", 1)
    client = run.client()
    client.store.delete_prefix(client.layout.component_dir("budget-lost"))
    # Three copies of ~67 KB of base64 (counted uncompressed): over the small budget.
    _patch_config(run, run.namespace, "budget-lost", {"value": 2, "blob": _blob(50_000)})
    synced = run.wait_condition(
        "budget-lost", "ConfigSynced", status="False", reason="StorageBudgetExceeded"
    )
    assert synced["message"].startswith("seed of 'budget-lost' refused")
    run.wait_event("budget-lost", "StorageBudgetExceeded")
    assert run.configs().get_metadata("budget-lost") is None  # nothing written


def test_a_custom_schema_edit_over_the_budget_is_refused_and_not_recorded(
    operator_run: OperatorRun,
) -> None:
    # Only spec.customSchema changes (no commit is due): the metadata record that keeps it
    # would grow past the small budget, so nothing of it is written.
    run = operator_run
    run.start(DEFENDER_OPERATOR_NAMESPACE_STORAGE_BUDGETS=json.dumps({run.namespace: SMALL_BUDGET}))
    _create(run, run.namespace, "budget-schema", {"value": 1})
    _wait_version(run, run.namespace, "budget-schema", 1)
    large = {"type": "object", "description": _blob(SMALL_BUDGET)}  # ~270 KB of base64
    run.custom.patch_namespaced_custom_object(
        contract.API_GROUP,
        contract.API_VERSION,
        run.namespace,
        contract.PLURAL,
        "budget-schema",
        {"spec": {"customSchema": large}},
    )
    synced = run.wait_condition(
        "budget-schema", "ConfigSynced", status="False", reason="StorageBudgetExceeded"
    )
    assert synced["message"].startswith("spec.customSchema change of 'budget-schema' refused")
    assert f"{SMALL_BUDGET} bytes" in synced["message"]
    run.wait_event("budget-schema", "StorageBudgetExceeded")
    meta = run.configs().get_metadata("budget-schema")
    assert meta is not None and meta.json_schema == {"type": "object"}  # as it was


def test_a_resign_that_would_record_a_larger_schema_is_judged_and_nothing_re_signed(
    operator_run: OperatorRun,
) -> None:
    # While the operator was down, the metadata record lost its signature (as one written
    # before records were signed) and spec.customSchema grew: the declare that re-signs the
    # record rebuilds it with the spec's schema, so that schema is judged first.
    run = operator_run
    budgets = {
        "DEFENDER_OPERATOR_NAMESPACE_STORAGE_BUDGETS": json.dumps({run.namespace: SMALL_BUDGET})
    }
    first = run.start(**budgets)
    _create(run, run.namespace, "budget-resign", {"value": 1})
    _wait_version(run, run.namespace, "budget-resign", 1)
    run.stop(first)
    client = run.client()
    meta_key = client.layout.metadata("budget-resign")
    signed = client.store.get(meta_key)
    assert signed is not None
    record = json.loads(signed.value)
    del record["auth"]
    unsigned = json.dumps(record).encode()
    client.store.put(meta_key, unsigned)

    def schema(value: dict[str, Any]) -> None:
        run.custom.patch_namespaced_custom_object(
            contract.API_GROUP,
            contract.API_VERSION,
            run.namespace,
            contract.PLURAL,
            "budget-resign",
            {"spec": {"customSchema": value}},  # a merge patch: None removes a key
        )

    schema({"type": "object", "description": _blob(SMALL_BUDGET)})  # ~270 KB of base64
    run.start(**budgets)
    synced = run.wait_condition(
        "budget-resign", "ConfigSynced", status="False", reason="StorageBudgetExceeded"
    )
    assert synced["message"].startswith("spec.customSchema change of 'budget-resign' refused")
    run.wait_event("budget-resign", "StorageBudgetExceeded")
    # Nothing re-signed: the record in etcd is the one left unsigned, byte for byte.
    left = client.store.get(meta_key)
    assert left is not None and left.value == unsigned
    # The schema the record held again: the same content signed again, never judged.
    schema({"description": None})
    run.wait_event("budget-resign", "MetadataResigned")
    meta = run.configs().get_metadata("budget-resign")
    assert meta is not None and meta.json_schema == {"type": "object"} and meta.version == 1


def _gone(run: OperatorRun, name: str) -> bool:
    from kubernetes.client import ApiException

    try:
        run.custom.get_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, run.namespace, contract.PLURAL, name
        )
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False
