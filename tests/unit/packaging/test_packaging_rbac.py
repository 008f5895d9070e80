"""The operator's RBAC grants exactly what it uses, namespaced where it can be."""

from __future__ import annotations

from typing import Any

from packaging_chart import Render, find

from defender_config import contract

Rule = tuple[str, str, str | None, frozenset[str]]


def _rules(obj: dict[str, Any]) -> set[Rule]:
    out: set[Rule] = set()
    for rule in obj["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for name in rule.get("resourceNames") or [None]:
                    out.add((group, resource, name, frozenset(rule["verbs"])))
    return out


def test_cluster_role_for_components_is_exactly_what_the_operator_does(render: Render) -> None:
    role = find(render(), "ClusterRole", "rel-ml-defender-operator-components")
    assert _rules(role) == {
        (contract.API_GROUP, contract.PLURAL, None, frozenset({"get", "list", "watch", "patch"})),
        (contract.API_GROUP, f"{contract.PLURAL}/status", None, frozenset({"get", "patch"})),
        (contract.API_GROUP, f"{contract.PLURAL}/finalizers", None, frozenset({"update"})),
        ("", "events", None, frozenset({"create", "patch"})),
        ("", "pods", None, frozenset({"list", "watch", "delete"})),
        ("", "secrets", None, frozenset({"create"})),
        ("", "secrets", "ml-defender-keyring", frozenset({"get", "update"})),
    }


def test_no_wildcards_and_no_cluster_wide_secret_reads(render: Render) -> None:
    for obj in render("--set", "operator.replicaCount=2"):
        if obj["kind"] not in ("ClusterRole", "Role"):
            continue
        for group, resource, name, verbs in _rules(obj):
            assert "*" not in verbs and resource != "*" and group != "*", obj["metadata"]["name"]
            if resource == "secrets" and name is None:
                assert verbs == {"create"}, f"{obj['metadata']['name']} may read any Secret"


def test_own_namespace_role_covers_only_the_keyring_admission_secret_and_events(
    render: Render,
) -> None:
    role = find(render("--set", "operator.keyring.secretName=my-keys"), "Role")
    assert _rules(role) == {
        ("", "secrets", None, frozenset({"create"})),
        ("", "secrets", "my-keys", frozenset({"get", "update"})),
        ("", "secrets", "rel-ml-defender-operator-admission", frozenset({"get", "update"})),
        ("", "events", None, frozenset({"create", "patch"})),
    }
    off = find(render("--set", "operator.admission.enabled=false"), "Role")
    assert all(name != "rel-ml-defender-operator-admission" for _, _, name, _ in _rules(off))


def test_webhook_configurations_are_read_and_patched_only_where_the_operator_fills_the_ca(
    render: Render,
) -> None:
    # fill_ca_bundle reads both configurations and patches their caBundle; it never replaces
    # them. With cert-manager (its CA injector fills caBundle) the operator touches neither.
    def rules(*args: str) -> set[Rule]:
        role = find(render(*args), "ClusterRole", "rel-ml-defender-operator-cluster")
        return {r for r in _rules(role) if r[0] == "admissionregistration.k8s.io"}

    name = "rel-ml-defender-operator-admission"
    assert rules() == {
        ("admissionregistration.k8s.io", resource, name, frozenset({"get", "patch"}))
        for resource in ("validatingwebhookconfigurations", "mutatingwebhookconfigurations")
    }
    assert rules("--set", "operator.admission.certManager.enabled=true") == set()
    assert rules("--set", "operator.admission.enabled=false") == set()


def test_peering_rights_only_with_several_replicas(render: Render) -> None:
    def groups(*args: str) -> set[str]:
        role = find(render(*args), "ClusterRole", "rel-ml-defender-operator-cluster")
        return {g for g, *_ in _rules(role)}

    assert "kopf.dev" not in groups()
    assert "kopf.dev" in groups("--set", "operator.replicaCount=2")
    # Peering per watched namespace: the right goes with the per-namespace binding instead.
    objects = render("--set", "operator.replicaCount=2,operator.watchNamespaces={edge}")
    components = find(objects, "ClusterRole", "rel-ml-defender-operator-components")
    assert (
        "kopf.dev",
        "kopfpeerings",
        None,
        frozenset({"list", "watch", "patch", "get"}),
    ) in _rules(components)


def test_watch_namespaces_bind_per_namespace(render: Render) -> None:
    objects = render("--set", "operator.watchNamespaces={edge,core}")
    bindings = [
        o for o in objects if o["kind"] == "RoleBinding" and o["roleRef"]["kind"] == "ClusterRole"
    ]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["core", "edge"]
    assert not [
        o
        for o in objects
        if o["kind"] == "ClusterRoleBinding"
        and o["roleRef"]["name"] == "rel-ml-defender-operator-components"
    ]
    # Finding the namespaces that need a keyring copy lists components cluster-wide.
    cluster = find(objects, "ClusterRole", "rel-ml-defender-operator-cluster")
    assert (contract.API_GROUP, contract.PLURAL, None, frozenset({"list"})) in _rules(cluster)


def test_bindings_point_at_the_operator_service_account(render: Render) -> None:
    objects = render()
    sa = find(objects, "ServiceAccount")["metadata"]["name"]
    dep = find(objects, "Deployment")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == sa
    for obj in objects:
        if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            assert obj["subjects"] == [
                {"kind": "ServiceAccount", "name": sa, "namespace": "ml-defender"}
            ]
