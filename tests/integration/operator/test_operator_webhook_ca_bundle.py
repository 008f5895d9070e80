"""`fill_ca_bundle` against the real kube-apiserver: the JSON patch it sends sets each webhook's
caBundle and leaves every other field as the API server has it, and the resourceVersion it
carries makes the API server refuse it (409 Conflict) once the configuration changed since the
read. The unit tests (test_operator_webhook_setup_answers.py) cover fields the API server does
not know; a real one prunes those on create, so here the fields kept are ones the operator
does not use (matchConditions, labels, a second webhook, a service clientConfig)."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as k8s

from defender_operator._errors import AdmissionSetupError
from defender_operator._webhook_setup import (
    STAMP_ID,
    VALIDATE_ID,
    _ca_bundle_patch,
    _Configs,
    fill_ca_bundle,
    webhook_configurations,
)

CA = b"-----BEGIN CERTIFICATE-----\nnot checked here\n-----END CERTIFICATE-----\n"
BUNDLE = base64.b64encode(CA).decode()
KINDS = ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration")


def _service(path: str) -> dict[str, Any]:
    return {"service": {"namespace": "nowhere", "name": "nothing", "path": path, "port": 443}}


@pytest.fixture
def chart_rendered(k8s_api: k8s.ApiClient) -> Iterator[str]:
    """Both configurations as a chart renders them (no caBundle), with fields the operator
    does not use; deleted afterwards (they are cluster-scoped). Failure policy Ignore and
    rules for DefenderComponents only: nothing else in the cluster goes through them."""
    name = f"defender-ca-{uuid.uuid4().hex[:8]}"
    validating, mutating = webhook_configurations(
        name,
        {VALIDATE_ID: _service("/validate"), STAMP_ID: _service("/stamp")},
        watched=[],
        failure_policy="Ignore",
        timeout_seconds=5,
    )
    validating["metadata"]["labels"]["team"] = "a"
    second = json.loads(json.dumps(validating["webhooks"][0]))
    second["name"] = "second." + second["name"]
    second["clientConfig"]["caBundle"] = base64.b64encode(b"an old CA").decode()
    second["matchConditions"] = [{"name": "not-system", "expression": "true"}]
    validating["webhooks"].append(second)
    reg = k8s.AdmissionregistrationV1Api(k8s_api)
    reg.create_validating_webhook_configuration(validating)
    try:
        reg.create_mutating_webhook_configuration(mutating)
        yield name
    finally:
        for delete in (
            reg.delete_validating_webhook_configuration,
            reg.delete_mutating_webhook_configuration,
        ):
            try:
                delete(name)
            except k8s.ApiException as exc:
                if exc.status != 404:
                    raise


def _without_ca_bundles(body: dict[str, Any]) -> dict[str, Any]:
    """`body` but for what a write changes anyway (resourceVersion, generation, managedFields)
    and the caBundles."""
    copy = json.loads(json.dumps(body))
    for field in ("resourceVersion", "generation", "managedFields"):
        copy["metadata"].pop(field, None)
    for hook in copy["webhooks"]:
        hook["clientConfig"].pop("caBundle", None)
    return copy


def test_the_ca_bundle_is_filled_in_and_everything_else_left_as_it_was(
    k8s_api: k8s.ApiClient, chart_rendered: str
) -> None:
    configs = _Configs(k8s.AdmissionregistrationV1Api(k8s_api))
    before = {kind: configs.read(kind, chart_rendered) for kind in KINDS}
    fill_ca_bundle(k8s_api, chart_rendered, CA)
    for kind in KINDS:
        was, now = before[kind], configs.read(kind, chart_rendered)
        assert was is not None and now is not None
        assert [h["clientConfig"]["caBundle"] for h in now["webhooks"]] == [BUNDLE] * len(
            was["webhooks"]
        )
        assert _without_ca_bundles(now) == _without_ca_bundles(was)
    assert len(before[KINDS[0]]["webhooks"]) == 2
    # Filled in: a second start-up writes nothing.
    again = {kind: configs.read(kind, chart_rendered) for kind in KINDS}
    fill_ca_bundle(k8s_api, chart_rendered, CA)
    for kind in KINDS:
        now = configs.read(kind, chart_rendered)
        assert now is not None and again[kind] is not None
        assert now["metadata"]["resourceVersion"] == again[kind]["metadata"]["resourceVersion"]


def test_a_configuration_changed_since_the_read_is_not_patched(
    k8s_api: k8s.ApiClient, chart_rendered: str
) -> None:
    kind = KINDS[0]
    reg = k8s.AdmissionregistrationV1Api(k8s_api)
    configs = _Configs(reg)
    read = configs.read(kind, chart_rendered)
    assert read is not None
    # Someone else reorders the webhooks after the read: the indexes in the patch now point
    # at other webhooks.
    reg.patch_validating_webhook_configuration(
        chart_rendered,
        [
            {"op": "move", "from": "/webhooks/1", "path": "/webhooks/0"},
        ],
        _content_type="application/json-patch+json",
    )
    stale = _ca_bundle_patch(read["metadata"]["resourceVersion"], read["webhooks"], BUNDLE)
    assert stale is not None
    with pytest.raises(
        AdmissionSetupError, match=f"cannot write {kind} {chart_rendered}: HTTP 409"
    ):
        configs.patch(kind, chart_rendered, stale)
    now = configs.read(kind, chart_rendered)
    assert now is not None
    assert [h["clientConfig"].get("caBundle") for h in now["webhooks"]] == [
        read["webhooks"][1]["clientConfig"]["caBundle"],
        None,
    ]
