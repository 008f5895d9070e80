"""The local control plane is a real Kubernetes API: schemas enforced, controllers running."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from defender_devcluster import LocalCluster, tool, wait_for

GROUP = "harness.defender.test"


def test_readyz_through_kubectl_and_kubeconfig_env(
    kubeconfig_path: Path, local_cluster: LocalCluster
) -> None:
    # No --kubeconfig: the fixture exported KUBECONFIG, which is what kubectl/helm/kopf rely on.
    assert os.environ["KUBECONFIG"] == str(kubeconfig_path)
    out = subprocess.run(
        [str(tool("kubectl")), "get", "--raw", "/readyz"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert local_cluster.api_url.startswith("https://127.0.0.1:")


@pytest.fixture
def widget_crd(k8s_api: client.ApiClient) -> Iterator[str]:
    """A namespaced CRD with a strict schema; yields its plural."""
    plural = f"widgets{uuid.uuid4().hex[:6]}"
    ext = client.ApiextensionsV1Api(k8s_api)
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "required": ["size"],
                "properties": {
                    "size": {"type": "string", "enum": ["small", "large"]},
                    "replicas": {"type": "integer", "minimum": 1, "maximum": 5},
                },
            }
        },
    }
    body = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": plural[:-1], "kind": f"W{plural[1:-1]}"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }
    ext.create_custom_resource_definition(body)

    def established() -> bool:
        crd = ext.read_custom_resource_definition(f"{plural}.{GROUP}")
        conds = crd.status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conds)

    wait_for("the CRD to be Established", established, timeout=60, every=0.25)
    try:
        yield plural
    finally:
        ext.delete_custom_resource_definition(f"{plural}.{GROUP}")


def test_crd_schema_is_enforced_by_the_api_server(
    k8s_api: client.ApiClient, namespace: str, widget_crd: str
) -> None:
    api = client.CustomObjectsApi(k8s_api)
    crd = api.list_namespaced_custom_object(GROUP, "v1", namespace, widget_crd)
    kind = crd["kind"].removesuffix("List")

    def obj(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/v1",
            "kind": kind,
            "metadata": {"name": name},
            "spec": spec,
        }

    created = api.create_namespaced_custom_object(
        GROUP, "v1", namespace, widget_crd, obj("good", {"size": "small", "replicas": 3})
    )
    assert created["spec"] == {"size": "small", "replicas": 3}

    with pytest.raises(client.ApiException) as err:
        api.create_namespaced_custom_object(
            GROUP, "v1", namespace, widget_crd, obj("bad", {"size": "huge", "replicas": 9})
        )
    assert err.value.status == 422
    message = json.loads(err.value.body)["message"]
    # The server's own validation messages, one per violated rule.
    assert "spec.size" in message and 'Unsupported value: "huge"' in message
    assert "spec.replicas" in message and "less than or equal to 5" in message

    with pytest.raises(client.ApiException) as err:
        api.create_namespaced_custom_object(
            GROUP, "v1", namespace, widget_crd, obj("missing", {"replicas": 2})
        )
    assert err.value.status == 422
    message = json.loads(err.value.body)["message"]
    assert "spec.size" in message and "Required value" in message


def test_statefulset_pods_are_created_by_the_controller_manager(
    k8s_api: client.ApiClient, namespace: str
) -> None:
    apps = client.AppsV1Api(k8s_api)
    core = client.CoreV1Api(k8s_api)
    labels = {"app": "web"}
    sts = client.V1StatefulSet(
        metadata=client.V1ObjectMeta(name="web"),
        spec=client.V1StatefulSetSpec(
            replicas=3,
            service_name="web",
            # No kubelet: pods never become Ready, so OrderedReady would stop at web-0.
            pod_management_policy="Parallel",
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    containers=[client.V1Container(name="web", image="registry.invalid/web:1")]
                ),
            ),
        ),
    )
    created = apps.create_namespaced_stateful_set(namespace, sts)

    def pod_names() -> list[str]:
        pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
        names = sorted(p.metadata.name for p in pods)
        return names if len(names) == 3 else []

    assert wait_for("3 StatefulSet pods", pod_names, timeout=60, every=0.25) == [
        "web-0",
        "web-1",
        "web-2",
    ]
    for pod in core.list_namespaced_pod(namespace, label_selector="app=web").items:
        (owner,) = pod.metadata.owner_references
        assert (owner.kind, owner.uid) == ("StatefulSet", created.metadata.uid)


def test_deleting_an_owner_garbage_collects_its_dependents(
    k8s_api: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    ref = client.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
    )
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="dependent", owner_references=[ref])),
    )
    # Control: an unrelated object must survive, so "gone" below means GC, not a wiped namespace.
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="bystander"))
    )
    core.delete_namespaced_config_map("owner", namespace)

    def dependent_gone() -> bool:
        names = {cm.metadata.name for cm in core.list_namespaced_config_map(namespace).items}
        return "dependent" not in names

    wait_for(
        "the garbage collector to delete the dependent ConfigMap",
        dependent_gone,
        timeout=60,
        every=0.25,
    )
    names = {cm.metadata.name for cm in core.list_namespaced_config_map(namespace).items}
    assert "bystander" in names


def test_deployment_replicaset_pods_chain_and_cascading_delete(
    k8s_api: client.ApiClient, namespace: str
) -> None:
    apps = client.AppsV1Api(k8s_api)
    core = client.CoreV1Api(k8s_api)
    labels = {"app": "api"}
    dep = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="api"),
        spec=client.V1DeploymentSpec(
            replicas=2,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    containers=[client.V1Container(name="api", image="registry.invalid/api:1")]
                ),
            ),
        ),
    )
    apps.create_namespaced_deployment(namespace, dep)
    wait_for(
        "the ReplicaSet and its 2 pods",
        lambda: (
            len(apps.list_namespaced_replica_set(namespace).items) == 1
            and len(core.list_namespaced_pod(namespace, label_selector="app=api").items) == 2
        ),
        timeout=60,
        every=0.25,
    )
    apps.delete_namespaced_deployment(
        "api", namespace, body=client.V1DeleteOptions(propagation_policy="Background")
    )
    wait_for(
        "the ReplicaSet and pods to be garbage-collected",
        lambda: (
            not apps.list_namespaced_replica_set(namespace).items
            and not core.list_namespaced_pod(namespace, label_selector="app=api").items
        ),
        timeout=60,
        every=0.25,
    )
