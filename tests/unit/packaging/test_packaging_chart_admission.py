"""The chart's admission webhooks as rendered: where the API server sends requests, with which
failure policy, and where the certificate comes from."""

from __future__ import annotations

import json
from typing import Any

import pytest
from packaging_chart import HelmFailed, Render, find

NAME = "rel-ml-defender-operator-admission"


def hooks(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        find(objects, "ValidatingWebhookConfiguration", NAME)["webhooks"][0],
        find(objects, "MutatingWebhookConfiguration", NAME)["webhooks"][0],
    ]


def env_of(objects: list[dict[str, Any]]) -> dict[str, str]:
    container = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container["env"]}


def test_webhooks_reach_the_operator_service_and_ignore_an_operator_that_is_down(
    render: Render,
) -> None:
    objects = render()
    validate, stamp = hooks(objects)
    assert validate["clientConfig"]["service"] == {
        "name": "rel-ml-defender-operator",
        "namespace": "ml-defender",
        "path": "/validate",
        "port": 443,
    }
    assert stamp["clientConfig"]["service"]["path"] == "/stamp"
    for hook in (validate, stamp):
        assert hook["failurePolicy"] == "Ignore" and hook["timeoutSeconds"] == 5
        assert hook["rules"][0]["resources"] == ["defendercomponents"]
        assert "namespaceSelector" not in hook  # all namespaces, like the operator
    ports = {
        p["name"]: p for p in find(objects, "Service", "rel-ml-defender-operator")["spec"]["ports"]
    }
    assert ports["webhook"] == {"name": "webhook", "port": 443, "targetPort": "webhook"}
    env = env_of(objects)
    assert env["DEFENDER_OPERATOR_ADMISSION_ENABLED"] == "true"
    assert "DEFENDER_OPERATOR_ADMISSION_CERT_DIR" not in env  # self-signed by the operator
    assert "rel-ml-defender-operator.ml-defender.svc" in json.loads(
        env["DEFENDER_OPERATOR_ADMISSION_CERT_HOSTS"]
    )


def test_watched_namespaces_and_the_chosen_policy_reach_both_webhooks(render: Render) -> None:
    objects = render(
        "--set",
        "operator.watchNamespaces={edge}",
        "--set",
        "operator.admission.failurePolicy=Fail",
        "--set",
        "operator.admission.timeoutSeconds=10",
    )
    for hook in hooks(objects):
        assert hook["failurePolicy"] == "Fail" and hook["timeoutSeconds"] == 10
        assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["edge"]


def test_cert_manager_issues_the_certificate_and_injects_the_ca(render: Render) -> None:
    objects = render("--set", "operator.admission.certManager.enabled=true")
    cert = find(objects, "Certificate", NAME)
    assert cert["spec"]["secretName"] == f"{NAME}-tls"
    assert cert["spec"]["issuerRef"]["name"] == NAME
    assert find(objects, "Issuer", NAME)["spec"] == {"selfSigned": {}}
    annotations = find(objects, "ValidatingWebhookConfiguration", NAME)["metadata"]["annotations"]
    assert annotations["cert-manager.io/inject-ca-from"] == f"ml-defender/{NAME}"
    assert env_of(objects)["DEFENDER_OPERATOR_ADMISSION_CERT_DIR"] == "/etc/ml-defender/webhook-tls"


def test_admission_off_renders_no_webhook(render: Render) -> None:
    objects = render("--set", "operator.admission.enabled=false")
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"}
    assert not [n for n in env_of(objects) if n.startswith("DEFENDER_OPERATOR_ADMISSION_")]


def test_a_failure_policy_other_than_ignore_or_fail_is_refused(render: Render) -> None:
    with pytest.raises(HelmFailed, match="failurePolicy"):
        render("--set", "operator.admission.failurePolicy=Maybe")
