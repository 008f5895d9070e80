"""The plugin's commands that ask the operator for something, against the local kube-apiserver:
they set the operator's command annotations and nothing else."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from defender_cli import main
from defender_config import contract

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[3]


def run(kubeconfig: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([*args, "--kubeconfig", str(kubeconfig), "--no-color"], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_rotate_key_annotates_the_keyring_secret(
    kubeconfig_path: Path, k8s_api: Any, namespace: str
) -> None:
    from kubernetes import client

    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="ml-defender-keyring"),
            string_data={"keyring.json": "{}"},
        ),
    )
    code, out, err = run(kubeconfig_path, "rotate-key", "--operator-namespace", namespace)
    assert code == 0, err
    assert "Rotation requested" in out
    secret = core.read_namespaced_secret("ml-defender-keyring", namespace)
    assert contract.ROTATE_ANNOTATION in secret.metadata.annotations
    # The data is the operator's business: untouched.
    assert secret.data["keyring.json"] == "e30="


def test_rotate_key_on_a_missing_secret_says_what_to_check(
    kubeconfig_path: Path, namespace: str
) -> None:
    code, _, err = run(kubeconfig_path, "rotate-key", "--operator-namespace", namespace)
    assert code == 2
    assert f"Secret {namespace}/ml-defender-keyring: 404" in err and "--operator-namespace" in err


def test_keyring_from_a_secret_that_is_not_a_keyring(
    kubeconfig_path: Path, k8s_api: Any, namespace: str
) -> None:
    from kubernetes import client

    client.CoreV1Api(k8s_api).create_namespaced_secret(
        namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="other"), string_data={"x": "y"}),
    )
    code, _, err = run(
        kubeconfig_path,
        "diff",
        "sniffer",
        "--keyring-secret",
        f"{namespace}/other",
        "--etcd-endpoints",
        "http://127.0.0.1:1",
    )
    assert code == 2
    assert "has no keyring.json entry (found: x)" in err


def test_rollback_asks_the_operator_through_an_annotation(
    kubeconfig_path: Path, k8s_api: Any, namespace: str
) -> None:
    from kubernetes import client

    crd = yaml.safe_load((REPO / "crds" / "defendercomponents.yaml").read_text())
    ext = client.ApiextensionsV1Api(k8s_api)
    try:
        ext.create_custom_resource_definition(crd)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    samples = sorted((REPO / "manifests" / "samples").glob("*.yaml"))
    assert samples, "manifests/samples/ holds one DefenderComponent per component type"
    sample = yaml.safe_load(samples[0].read_text())
    name = sample["metadata"]["name"]
    custom = client.CustomObjectsApi(k8s_api)
    for _ in range(50):
        try:
            custom.create_namespaced_custom_object(
                contract.API_GROUP, contract.API_VERSION, namespace, contract.PLURAL, sample
            )
            break
        except client.ApiException as exc:
            # The new CRD takes a moment to be served.
            if exc.status != 404:
                raise
            time.sleep(0.2)
    code, out, err = run(kubeconfig_path, "rollback", name, "-n", namespace, "--to", "master")
    assert code == 0, err
    assert "Asked the operator" in out
    obj = custom.get_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, namespace, contract.PLURAL, name
    )
    assert obj["metadata"]["annotations"][contract.ROLLBACK_ANNOTATION] == "master"


def test_rollback_of_a_missing_component(kubeconfig_path: Path, namespace: str) -> None:
    code, _, err = run(kubeconfig_path, "rollback", "ghost", "-n", namespace)
    assert code == 2
    assert f"defendercomponent {namespace}/ghost: 404" in err
