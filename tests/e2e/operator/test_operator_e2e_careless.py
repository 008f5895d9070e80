"""What a careless user (or one with `create` on DefenderComponents) does to the operator:
odd names, odd configs, a namespace deleted under a component. Each must end in the documented
state for that component alone: the operator keeps running and the other components keep
committing (docs/operator.md, docs/security.md)."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from operator_e2e_support import OperatorRun, custom_component, kubectl, wait_for

from defender_config import contract

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]


def _custom(name: str, config: Any, **spec: Any) -> dict[str, Any]:
    return custom_component(name, config, app="careless", **spec)


def _create(run: OperatorRun, doc: dict[str, Any], namespace: str | None = None) -> None:
    run.custom.create_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, namespace or run.namespace, contract.PLURAL, doc
    )


def _nested(depth: int) -> dict[str, Any]:
    config: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        config = {"n": config}
    return config


def _others_still_commit(run: OperatorRun) -> None:
    run.patch("firewall", {"spec": {"config": {"block_ttl_seconds": 601}}})
    run.wait_active_version("firewall", 2)
    assert all(p.poll() is None for p in run.procs)


ODD_CONFIGS: dict[str, Any] = {
    "empty": {},
    "nul-and-surrogates": {"s": "a\u0000b\ufffd\U0001f600", "\u0000k": ["\u2028"]},
}


def test_odd_names_and_configs_are_components_like_any_other(operator_run: OperatorRun) -> None:
    """Names with dots and at the 253-character limit, an empty config, NUL and non-BMP
    characters: each is committed as given and read back equal, and deleted with Purge leaves
    nothing. A config nested deeper than the library stores (which the API server takes) is
    refused as ConfigInvalid naming its component. The sample beside them keeps committing."""
    run = operator_run
    run.start()
    run.apply_sample("firewall")
    longest = ".".join(["x" * 63, "y" * 63, "z" * 63, "w" * 61])
    assert len(longest) == 253
    components = {"a.b-c.d9": {"a": 1}, longest: {"a": 1}, **ODD_CONFIGS}
    for name, config in components.items():
        _create(run, _custom(name, config, retention="Purge"))
    _create(run, _custom("deep", _nested(120), retention="Purge"))
    # A schema one level too deep for the metadata record that holds it.
    deep_schema: dict[str, Any] = {"type": "object", "properties": {}}
    for _ in range(49):
        deep_schema = {"type": "object", "properties": {"a": deep_schema}}
    _create(run, _custom("deep-schema", {}, retention="Purge", customSchema=deep_schema))
    for name, config in components.items():
        run.wait_active_version(name, 1)
        assert run.configs().get_active(name).config == config
    refused = run.wait_condition("deep", "ConfigSynced", status="False", reason="ConfigInvalid")
    assert "config for 'deep' rejected" in refused["message"], refused
    refused = run.wait_condition(
        "deep-schema", "ConfigSynced", status="False", reason="ConfigInvalid"
    )
    assert "metadata record" in refused["message"], refused
    run.wait_active_version("firewall", 1)
    _others_still_commit(run)
    store = run.client(run.operator_keyring()).store
    for name in [*components, "deep", "deep-schema"]:
        run.custom.delete_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, run.namespace, contract.PLURAL, name
        )
    wait_for(
        "every one purged",
        lambda: (
            all(
                not store.list_prefix(f"{run.prefix}/components/{n}/")
                for n in [*components, "deep", "deep-schema"]
            )
            or None
        ),
    )
    assert "failed permanently" not in run.log_tail(3000)


def test_deleting_a_component_namespace_purges_and_spares_the_others(
    operator_run: OperatorRun,
) -> None:
    run = operator_run
    doomed = f"doomed-{uuid.uuid4().hex[:8]}"
    run.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=doomed)))
    run.start("-n", doomed)
    run.apply_sample("firewall")
    _create(run, _custom("gone", {"a": 1}, retention="Purge"), doomed)
    _create(run, _custom("kept", {"a": 1}), doomed)
    run.wait_active_version("firewall", 1)
    store = run.client(run.operator_keyring()).store

    def active(ns: str, name: str) -> bool:
        obj: Any = run.custom.get_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, ns, contract.PLURAL, name
        )
        return bool(obj.get("status", {}).get("activeVersion") == 1)

    wait_for(
        "gone and kept active", lambda: (active(doomed, "gone") and active(doomed, "kept")) or None
    )
    run.core.delete_namespace(doomed)

    def namespace_gone() -> bool:
        try:
            run.core.read_namespace(doomed)
        except k8s.ApiException as exc:
            return exc.status == 404
        return False

    wait_for("the namespace deleted", lambda: namespace_gone() or None, timeout=90)
    assert store.list_prefix(f"{run.prefix}/components/gone/") == []
    assert run.configs().get_active("kept").version == 1
    _others_still_commit(run)
    time.sleep(5)
    log = run.log_tail(3000)
    assert "Traceback" not in log, log


def _nested_text(name: str, depth: int) -> str:
    """A component whose config nests `depth` levels, as JSON text: the python client (and
    json.dumps) cannot send it, kubectl can, and the API server takes ~10,000 levels."""
    doc = json.dumps(_custom(name, {"PLACEHOLDER": 1}, retention="Purge"))
    return doc.replace('{"PLACEHOLDER": 1}', '{"n":' * depth + '{"leaf":1}' + "}" * depth)


def _kubectl_conditions(run: OperatorRun, name: str) -> list[dict[str, Any]]:
    # kubectl, not the python client: the test's own client cannot decode these objects.
    out = kubectl(
        "get", contract.PLURAL, name, "-n", run.namespace, "-o", "jsonpath={.status.conditions}"
    ).stdout
    return list(json.loads(out)) if out.strip() else []


def _wait_config_invalid(run: OperatorRun, name: str, timeout: float = 60.0) -> dict[str, Any]:
    def refused() -> dict[str, Any] | None:
        for c in _kubectl_conditions(run, name):
            if c["type"] == "ConfigSynced" and c["reason"] == "ConfigInvalid":
                return c
        return None

    return wait_for(f"{name} ConfigInvalid", refused, timeout)


@contextlib.contextmanager
def _deleted_by_kubectl(run: OperatorRun, names: list[str]) -> Iterator[None]:
    # The harness's cleanup lists components with the python client: they must be gone first.
    try:
        yield
    finally:
        for name in names:
            kubectl(
                "delete", contract.PLURAL, name, "-n", run.namespace, "--wait=false", check=False
            )
            kubectl(
                "patch", contract.PLURAL, name, "-n", run.namespace, "--type=merge",
                "-p", '{"metadata":{"finalizers":null}}', check=False,
            )  # fmt: skip


def test_a_config_nested_thousands_deep_is_refused_and_the_operator_carries_on(
    operator_run: OperatorRun, tmp_path: Path
) -> None:
    """Configs nested 700 and 3,000 deep (kopf's deep copies fail past ~500, Python's JSON
    decoder past ~990: the operator used to stop serving every component, and fail to start
    again while the object existed). The operator decodes them cut at 128 levels: each is
    refused as ConfigInvalid naming the depth limit, with its Event; the sample beside them
    keeps committing, and an operator restarted with them present starts and serves."""
    run = operator_run
    run.start()
    run.apply_sample("firewall")
    run.wait_active_version("firewall", 1)
    deep = {"deep-700": 700, "deep-3000": 3000}
    with _deleted_by_kubectl(run, list(deep)):
        for name, depth in deep.items():
            path = tmp_path / f"{name}.json"
            path.write_text(_nested_text(name, depth))
            kubectl("create", "-n", run.namespace, "-f", str(path))
        for name in deep:
            refused = _wait_config_invalid(run, name)
            assert refused["status"] == "False", refused
            assert "nested too deeply (over 100 levels)" in refused["message"], refused
            run.wait_event(name, "ConfigInvalid")
        _others_still_commit(run)
        run.stop()
        run.start()
        run.patch("firewall", {"spec": {"config": {"block_ttl_seconds": 602}}})
        run.wait_active_version("firewall", 3)
        for name in deep:
            assert _wait_config_invalid(run, name)["status"] == "False"
        log = run.log_tail(3000)
        assert "RecursionError" not in log, log
        assert "Traceback" not in log, log


def test_kopfs_progress_annotations_written_by_hand_leave_the_operator_serving(
    operator_run: OperatorRun,
) -> None:
    """kopf reads each handler's progress from an annotation of the object
    (`kopf.zalando.org/<handler>`) at every change, and whoever may patch a component writes
    its annotations. One nested 5,000 deep, one not JSON, one with a time without a zone: each
    raised in the object's kopf worker, which stopped the operator for every namespace (and
    again at each start). Each is read as no record now: the change is committed, the sample
    beside it keeps committing, and an operator restarted with them present serves."""
    run = operator_run
    run.start()
    run.apply_sample("firewall")
    _create(run, _custom("odd-progress", {"a": 1}, retention="Purge"))
    run.wait_active_version("firewall", 1)
    run.wait_active_version("odd-progress", 1)
    progress = {
        "kopf.zalando.org/reconcile_component": '{"n":' * 5000 + "1" + "}" * 5000,
        "kopf.zalando.org/apply_retention": "not json",
    }
    run.patch(
        "odd-progress",
        {"metadata": {"annotations": progress}, "spec": {"config": {"a": 2}}},
    )
    run.wait_active_version("odd-progress", 2)
    _others_still_commit(run)
    # Present at the next start (kopf removed both once it handled the change: one planted again).
    zoneless = '{"started": "2026-12-06T03:00:00", "delayed": "2026-12-06T03:00:00"}'
    run.patch(
        "odd-progress",
        {"metadata": {"annotations": {"kopf.zalando.org/reconcile_component": zoneless}}},
    )
    run.stop()
    run.start()
    run.patch("odd-progress", {"spec": {"config": {"a": 3}}})
    run.wait_active_version("odd-progress", 3)
    run.patch("firewall", {"spec": {"config": {"block_ttl_seconds": 602}}})
    run.wait_active_version("firewall", 3)
    assert all(p.poll() is None for p in run.procs)
    log = run.log_tail(3000)
    assert "cannot be used (not JSON)" in log, log
    assert "cannot be used (started has no time zone)" in log, log
    for crash in ("RecursionError", "Traceback", "unrecoverable error"):
        assert crash not in log, log
