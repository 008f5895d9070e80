"""The chart against the real local API server: dry-run, install, guards, plain manifests."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from packaging_chart import (
    CHART,
    KEEP_PLAIN_VALUES,
    PLAIN_CHART_COMMIT,
    REPO,
    HelmFailed,
    chart_at,
    kube_version,
)

from defender_config import contract
from defender_devcluster import wait_for

CRD_RESOURCE = f"{contract.PLURAL}.{contract.API_GROUP}"

pytestmark = pytest.mark.cluster

Kubectl = Callable[..., subprocess.CompletedProcess[str]]
Helm = Callable[..., str]

LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)


def _objects(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _dump(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects)


def _establish_crds(kubectl: Kubectl, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Apply the CRDs for real (custom objects cannot be dry-run before their type exists) and
    return the other objects."""
    crds = [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    if crds:
        kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=_dump(crds))
        for crd in crds:
            kubectl(
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                f"crd/{crd['metadata']['name']}",
            )
    return [o for o in objects if o["kind"] != "CustomResourceDefinition"]


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["--set", "operator.replicaCount=2", "--set", "operator.watchNamespaces={edge,core}"],
        [
            "--set",
            "etcd.tls.client.enabled=true,etcd.tls.client.secretName=etcd-client,"
            "etcd.tls.client.clientCertAuth=true,etcd.tls.peer.enabled=true,"
            "etcd.tls.peer.secretName=etcd-peer,etcd.persistence.enabled=false",
        ],
        [
            "--set",
            "agent.components[0].name=firewall,agent.components[0].namespace=edge,"
            "agent.components[1].name=sniffer,agent.components[1].namespace=core",
        ],
        ["--values", str(KEEP_PLAIN_VALUES)],
    ],
    ids=[
        "defaults",
        "peering-and-watched-namespaces",
        "own-tls-no-persistence",
        "agents-in-two-namespaces",
        "keep-plain",
    ],
)
def test_every_rendered_object_passes_a_server_side_dry_run(
    helm: Helm, kubectl: Kubectl, namespace: str, values: list[str]
) -> None:
    rendered = _objects(
        helm(
            "template",
            "dry",
            str(CHART),
            "--namespace",
            namespace,
            "--kube-version",
            kube_version(),
            "--include-crds",
            *values,
        )
    )
    rest = _establish_crds(kubectl, rendered)
    for extra in ("edge", "core"):
        # RoleBindings in watched namespaces need those namespaces to exist.
        if any(o["metadata"].get("namespace") == extra for o in rest):
            kubectl("create", "namespace", extra, check=False)
    proc = kubectl("apply", "--dry-run=server", "-o", "json", "-f", "-", input=_dump(rest))
    accepted = json.loads(proc.stdout)
    items = accepted["items"] if accepted.get("kind") == "List" else [accepted]
    assert sorted((i["kind"], i["metadata"]["name"]) for i in items) == sorted(
        (o["kind"], o["metadata"]["name"]) for o in rest
    )


def test_server_rejects_what_the_dry_run_should_catch(kubectl: Kubectl, namespace: str) -> None:
    # The dry-run above is only worth something if the server really validates: a StatefulSet
    # whose selector does not match its pods must be refused.
    bad = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "bad", "namespace": namespace},
        "spec": {
            "serviceName": "x",
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "c"}},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            },
        },
    }
    proc = kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(bad), check=False)
    assert proc.returncode != 0 and "selector" in proc.stderr


def test_helm_install_creates_the_whole_release(
    helm: Helm, kubectl: Kubectl, namespace: str, release: str, k8s_api: Any
) -> None:
    from kubernetes import client

    out = helm("install", release, str(CHART), "--namespace", namespace, "--take-ownership")
    assert f"helm test {release} -n {namespace}" in out.split("NOTES:", 1)[1]
    full = f"{release}-ml-defender"
    core = client.CoreV1Api(k8s_api)
    apps = client.AppsV1Api(k8s_api)
    sts = apps.read_namespaced_stateful_set(f"{full}-etcd", namespace)
    assert sts.spec.replicas == 3 and sts.spec.pod_management_policy == "Parallel"

    def etcd_pods() -> list[str]:
        pods = core.list_namespaced_pod(
            namespace,
            label_selector=f"app.kubernetes.io/instance={release},app.kubernetes.io/component=etcd",
        ).items
        names = sorted(p.metadata.name for p in pods)
        return names if len(names) == 3 else []

    # All three at once (Parallel); Pending, since this cluster has no kubelet.
    assert wait_for("3 etcd pods", etcd_pods, timeout=60, every=0.5) == [
        f"{full}-etcd-{i}" for i in range(3)
    ]
    claims = wait_for(
        "3 etcd PVCs",
        lambda: [c for c in core.list_namespaced_persistent_volume_claim(namespace).items] or None,
        timeout=60,
        every=0.5,
    )
    assert sorted(c.metadata.name for c in claims) == [f"data-{full}-etcd-{i}" for i in range(3)]
    headless = core.read_namespaced_service(f"{full}-etcd-headless", namespace)
    assert headless.spec.cluster_ip == "None" and headless.spec.publish_not_ready_addresses
    core.read_namespaced_service(f"{full}-etcd", namespace)
    pdb = client.PolicyV1Api(k8s_api).read_namespaced_pod_disruption_budget(
        f"{full}-etcd", namespace
    )
    assert pdb.spec.min_available == 2
    dep = apps.read_namespaced_deployment(f"{full}-operator", namespace)
    assert dep.spec.template.spec.service_account_name == f"{full}-operator"
    core.read_namespaced_service_account(f"{full}-operator", namespace)
    rbac = client.RbacAuthorizationV1Api(k8s_api)
    rbac.read_namespaced_role(f"{full}-operator", namespace)
    rbac.read_namespaced_role_binding(f"{full}-operator", namespace)
    for suffix in ("cluster", "components"):
        rbac.read_cluster_role(f"{full}-operator-{suffix}")
        rbac.read_cluster_role_binding(f"{full}-operator-{suffix}")

    def operator_pod() -> list[Any]:
        return core.list_namespaced_pod(
            namespace,
            label_selector=f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator",
        ).items

    assert len(wait_for("the operator pod", operator_pod, timeout=60, every=0.5)) == 1
    # helm test pods are hooks: not created by install.
    assert not [p for p in core.list_namespaced_pod(namespace).items if "-test-" in p.metadata.name]


def test_every_installed_object_carries_the_labels(
    helm: Helm, kubectl: Kubectl, namespace: str, release: str
) -> None:
    helm("install", release, str(CHART), "--namespace", namespace, "--take-ownership")
    manifest = _objects(helm("get", "manifest", release, "--namespace", namespace))
    assert len(manifest) > 15
    for obj in manifest:
        ref = f"{obj['kind']}/{obj['metadata']['name']}"
        args = ["get", ref, "-o", "json"]
        if obj["metadata"].get("namespace"):
            args += ["--namespace", obj["metadata"]["namespace"]]
        live = json.loads(kubectl(*args).stdout)
        missing = [k for k in LABELS if k not in live["metadata"].get("labels", {})]
        assert not missing, f"{ref} on the server lacks {missing}"


def test_operator_service_account_has_exactly_the_rights_it_needs(
    helm: Helm, kubectl: Kubectl, namespace: str, release: str
) -> None:
    helm("install", release, str(CHART), "--namespace", namespace, "--take-ownership")
    sa = f"system:serviceaccount:{namespace}:{release}-ml-defender-operator"

    def can(*args: str) -> bool:
        proc = kubectl("auth", "can-i", *args, "--as", sa, check=False)
        return proc.stdout.strip() == "yes"

    assert can("watch", CRD_RESOURCE, "--all-namespaces")
    assert can("patch", CRD_RESOURCE, "--subresource=status", "-n", "any")
    assert can("delete", "pods", "-n", "component-ns")
    assert can("create", "events", "-n", "component-ns")
    assert can("create", "secrets", "-n", "component-ns")
    assert can("update", "secrets/ml-defender-keyring", "-n", "component-ns")
    assert can("get", "secrets/ml-defender-keyring", "-n", namespace)
    assert can("list", "namespaces")
    # Least privilege: no reading other Secrets, no touching workloads, nothing cluster-admin.
    assert not can("get", "secrets/some-other-secret", "-n", "component-ns")
    assert not can("list", "secrets", "-n", "component-ns")
    assert not can("delete", "deployments", "-n", "component-ns")
    assert not can("create", "pods", "-n", "component-ns")
    assert not can("delete", CRD_RESOURCE, "-n", "any")
    assert not can("delete", "secrets/ml-defender-keyring", "-n", "component-ns")
    assert not can("*", "*")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "etcd.replicas=3"], "additional properties 'replicas' not allowed"),
        (["--set", "etcd.podAntiAffinityPreset=maybe"], "value must be one of"),
        (["--set", "etcd.replicaCount=2"], "etcd needs an odd number of members"),
        (["--set", "etcd.tls.certManager.enabled=true"], "needs etcd.tls.certManager.issuerRef"),
    ],
    ids=["schema-typo", "schema-enum", "fail-even-members", "fail-cert-manager-without-issuer"],
)
def test_install_refuses_bad_values_and_creates_nothing(
    helm: Helm, namespace: str, release: str, values: list[str], message: str
) -> None:
    with pytest.raises(HelmFailed, match=message):
        helm("install", release, str(CHART), "--namespace", namespace, *values)
    assert release not in helm("list", "--namespace", namespace, "--all", "-q").split()


def test_plain_manifests_pass_a_server_side_dry_run(kubectl: Kubectl) -> None:
    # The kubectl path users take: kubectl apply -f crds/ -f manifests/
    objects = _objects((REPO / "manifests" / "install.yaml").read_text())
    assert objects[0]["kind"] == "Namespace"
    created = kubectl("create", "-f", "-", input=_dump(objects[:1]), check=False).returncode == 0
    try:
        _establish_crds(kubectl, _objects((REPO / "crds" / "defendercomponents.yaml").read_text()))
        rest = _establish_crds(kubectl, objects[1:])
        kubectl("apply", "--dry-run=server", "-f", "-", input=_dump(rest))
        kubectl("apply", "--dry-run=server", "-f", str(REPO / "manifests" / "install.yaml"))
    finally:
        if created:
            kubectl("delete", "namespace", objects[0]["metadata"]["name"], "--wait=false")


def test_samples_are_accepted_by_the_installed_crd(kubectl: Kubectl, namespace: str) -> None:
    samples = sorted((REPO / "manifests" / "samples").glob("*.yaml"))
    if not samples:
        pytest.fail(
            "manifests/samples/ is empty: the operator writes one sample per component type"
        )
    _establish_crds(kubectl, _objects((REPO / "crds" / "defendercomponents.yaml").read_text()))
    for sample in samples:
        kubectl("apply", "--dry-run=server", "--namespace", namespace, "-f", str(sample))


# ------------------------------------------------------------------------------------ lock-down

KEEP_PLAIN = KEEP_PLAIN_VALUES


@pytest.fixture(scope="module")
def plain_chart(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return chart_at(PLAIN_CHART_COMMIT, tmp_path_factory.mktemp("plain-chart"))


def _secret_data(kubectl: Kubectl, namespace: str, name: str) -> dict[str, str]:
    return dict(
        json.loads(kubectl("get", "secret", name, "-n", namespace, "-o", "json").stdout)["data"]
    )


def test_upgrade_keeps_the_generated_certificates_and_passwords(
    helm: Helm, kubectl: Kubectl, namespace: str, release: str
) -> None:
    full = f"{release}-ml-defender"
    one = f"agent.components[0].name=firewall,agent.components[0].namespace={namespace}"
    helm("install", release, str(CHART), "--namespace", namespace, "--take-ownership", "--set", one)
    names = (f"{full}-etcd-client-tls", f"{full}-etcd-peer-tls", f"{full}-etcd-auth")
    before = {n: _secret_data(kubectl, namespace, n) for n in names}
    agent = _secret_data(kubectl, namespace, f"{full}-etcd-agent-firewall")
    two = one + f",agent.components[1].name=sniffer,agent.components[1].namespace={namespace}"
    helm("upgrade", release, str(CHART), "--namespace", namespace, "--set", two)
    after = {n: _secret_data(kubectl, namespace, n) for n in names}
    assert after[names[0]] == before[names[0]] and after[names[1]] == before[names[1]]
    # Existing passwords kept, the new component's added.
    assert {k: v for k, v in after[names[2]].items() if k in before[names[2]]} == before[names[2]]
    assert set(after[names[2]]) - set(before[names[2]]) == {"agent-sniffer"}
    assert _secret_data(kubectl, namespace, f"{full}-etcd-agent-firewall") == agent
    assert (
        _secret_data(kubectl, namespace, f"{full}-etcd-ca")["ca.crt"] == before[names[0]]["ca.crt"]
    )


def test_upgrade_from_a_plain_install_first_keeps_it_then_locks_it_down(
    helm: Helm, kubectl: Kubectl, namespace: str, release: str, plain_chart: Any
) -> None:
    full = f"{release}-ml-defender"
    helm("install", release, str(plain_chart), "--namespace", namespace, "--take-ownership")

    def etcd_env() -> dict[str, str]:
        cm = kubectl("get", "configmap", f"{full}-etcd-env", "-n", namespace, "-o", "json")
        return dict(json.loads(cm.stdout)["data"])

    plain = etcd_env()
    assert plain["ETCD_LISTEN_CLIENT_URLS"].startswith("http://")
    # --reuse-values would take the old chart's defaults, which lack the new settings: the
    # docs say to use --reset-then-reuse-values; this is what happens otherwise.
    with pytest.raises(HelmFailed, match="nil pointer"):
        helm(
            "upgrade", release, str(CHART), "--namespace", namespace,
            "--reuse-values", "--values", str(KEEP_PLAIN),
        )  # fmt: skip
    # Step 1 of docs/install.md: the new chart with the old behaviour.
    helm(
        "upgrade", release, str(CHART), "--namespace", namespace,
        "--reset-then-reuse-values", "--values", str(KEEP_PLAIN),
    )  # fmt: skip
    assert etcd_env() == plain
    kinds = {o["kind"] for o in _objects(helm("get", "manifest", release, "-n", namespace))}
    assert "NetworkPolicy" not in kinds and "Secret" not in kinds
    # And all the way to the new defaults: the API server accepts every change (no immutable
    # field of the StatefulSet or Deployment is touched).
    helm("upgrade", release, str(CHART), "--namespace", namespace, "--reset-values")
    locked = etcd_env()
    assert locked["ETCD_LISTEN_CLIENT_URLS"].startswith("https://")
    kinds = {o["kind"] for o in _objects(helm("get", "manifest", release, "-n", namespace))}
    assert {"NetworkPolicy", "Secret"} <= kinds
