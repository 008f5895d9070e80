"""What `helm template` renders with default and edited values (no cluster)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging_chart import CHART, REPO, HelmFailed, Render, find, kube_version, run_helm

REQUIRED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)
# Selectors are immutable: only labels that never change between releases may appear in them.
# `component` tells the operator's pods from the etcd pods of the same release.
SELECTOR_LABELS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
}


def _selectors(obj: dict[str, Any]) -> list[dict[str, str]]:
    spec = obj.get("spec", {})
    found = []
    if obj["kind"] in ("Deployment", "StatefulSet", "PodDisruptionBudget"):
        found.append(spec["selector"]["matchLabels"])
    if obj["kind"] == "Service":
        found.append(spec["selector"])
    return found


def test_lint_is_clean(helm_bin: Any) -> None:
    out = run_helm(helm_bin, "lint", str(CHART), "--strict", "--kube-version", kube_version())
    assert "0 chart(s) failed" in out
    # --strict turns warnings into failures; INFO lines (e.g. a missing icon) are checked here.
    assert "[INFO]" not in out and "[WARNING]" not in out, out


def test_every_object_has_the_standard_labels(render: Render) -> None:
    objects = render("--set", "operator.replicaCount=3")
    assert len(objects) > 15
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        missing = [k for k in REQUIRED_LABELS if k not in labels]
        assert not missing, f"{obj['kind']}/{obj['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == "rel"


def test_pod_templates_carry_the_labels_too(render: Render) -> None:
    for obj in render():
        if obj["kind"] in ("Deployment", "StatefulSet"):
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert all(k in labels for k in REQUIRED_LABELS), obj["metadata"]["name"]


def test_selectors_use_only_stable_labels_and_match_their_pods(render: Render) -> None:
    objects = render()
    pods = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    for obj in objects:
        for selector in _selectors(obj):
            assert set(selector) <= SELECTOR_LABELS, (obj["kind"], selector)
            matched = [
                p["metadata"]["name"]
                for p in pods
                if selector.items() <= p["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert len(matched) == 1, f"{obj['kind']}/{obj['metadata']['name']} selects {matched}"


def test_common_labels_reach_every_object_but_no_selector(render: Render) -> None:
    objects = render("--set", "commonLabels.team=secops")
    for obj in objects:
        assert obj["metadata"]["labels"]["team"] == "secops"
        for selector in _selectors(obj):
            assert "team" not in selector


def test_namespaced_objects_name_the_release_namespace(render: Render) -> None:
    cluster_scoped = {
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
    }
    for obj in render(namespace="defender-system"):
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in obj["metadata"]
        else:
            assert obj["metadata"]["namespace"] == "defender-system", obj["kind"]


# ------------------------------------------------------------------------------------ etcd


def test_etcd_statefulset_shape(render: Render) -> None:
    objects = render()
    sts = find(objects, "StatefulSet")
    spec = sts["spec"]
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel"
    headless = find(objects, "Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    client = find(objects, "Service", "rel-ml-defender-etcd")
    assert client["spec"].get("clusterIP") != "None"
    assert "publishNotReadyAddresses" not in client["spec"]
    claim = spec["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    container = spec["template"]["spec"]["containers"][0]
    assert container["image"] == "gcr.io/etcd-development/etcd:v3.6.16"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "metrics"
    assert container["resources"]["requests"]
    assert spec["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_initial_cluster_names_every_member_by_its_stable_dns_name(render: Render) -> None:
    objects = render("--set", "etcd.replicaCount=5", "--set", "etcd.pdb.minAvailable=3")
    env = find(objects, "ConfigMap", "rel-ml-defender-etcd-env")["data"]
    members = dict(m.split("=", 1) for m in env["ETCD_INITIAL_CLUSTER"].split(","))
    sts = find(objects, "StatefulSet")
    service = sts["spec"]["serviceName"]
    expected = {
        f"rel-ml-defender-etcd-{i}": (
            f"https://rel-ml-defender-etcd-{i}.{service}.ml-defender.svc.cluster.local:2380"
        )
        for i in range(5)
    }
    assert members == expected
    # Each member advertises the same URL the others expect, built from its pod name.
    # The member init container reads them and writes etcd's config file from them.
    member = next(
        c for c in sts["spec"]["template"]["spec"]["initContainers"] if c["name"] == "member"
    )
    container_env = {e["name"]: e for e in member["env"]}
    assert container_env["ETCD_NAME"]["value"] == "$(POD_NAME)"
    assert container_env["ETCD_INITIAL_ADVERTISE_PEER_URLS"]["value"] == (
        f"https://$(POD_NAME).{service}.ml-defender.svc.cluster.local:2380"
    )
    # $(POD_NAME) only expands when POD_NAME is defined before it.
    names = list(container_env)
    assert names.index("POD_NAME") < names.index("ETCD_NAME")


def test_clients_get_every_member_endpoint(render: Render) -> None:
    objects = render()
    data = find(objects, "ConfigMap", "rel-ml-defender-config")["data"]
    settings = yaml.safe_load(data["defender.json"])
    assert len(settings["etcd"]["endpoints"]) == 3
    assert all(e.endswith(":2379") for e in settings["etcd"]["endpoints"])
    assert data["etcd-endpoints"] == ",".join(settings["etcd"]["endpoints"])


def test_shared_settings_are_valid_library_settings(render: Render) -> None:
    from defender_config._settings import LibrarySettings

    data = find(render(), "ConfigMap", "rel-ml-defender-config")["data"]
    LibrarySettings(**yaml.safe_load(data["defender.json"]))


def test_pdb_keeps_quorum(render: Render) -> None:
    objects = render()
    pdb = find(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2
    sts = find(objects, "StatefulSet")
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]


def test_anti_affinity_soft_by_default_hard_or_none_on_request(render: Render) -> None:
    def affinity(*args: str) -> dict[str, Any]:
        return find(render(*args), "StatefulSet")["spec"]["template"]["spec"].get("affinity", {})

    soft = affinity()["podAntiAffinity"]
    assert "preferredDuringSchedulingIgnoredDuringExecution" in soft
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in soft
    hard = affinity("--set", "etcd.podAntiAffinityPreset=hard")["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in hard
    assert affinity("--set", "etcd.podAntiAffinityPreset=none") == {}


def test_config_change_rolls_the_members_and_operator(render: Render) -> None:
    def checksums(*args: str) -> tuple[str, str]:
        objects = render(*args)
        sts = find(objects, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]
        dep = find(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        return sts["checksum/config"], dep["checksum/config"]

    base = checksums()
    assert checksums() == base
    etcd_changed = checksums("--set", "etcd.autoCompactionRetention=2h")
    assert etcd_changed[0] != base[0] and etcd_changed[1] == base[1]
    lib_changed = checksums("--set", "config.etcd.retries=7")
    assert lib_changed[1] != base[1] and lib_changed[0] == base[0]


def test_tls_mounts_secrets_and_switches_schemes(render: Render) -> None:
    objects = render(
        "--set",
        "etcd.tls.client.enabled=true,etcd.tls.client.secretName=etcd-client,"
        "etcd.tls.client.clientCertAuth=true,etcd.tls.peer.enabled=true,"
        "etcd.tls.peer.secretName=etcd-peer",
    )
    env = find(objects, "ConfigMap", "rel-ml-defender-etcd-env")["data"]
    assert env["ETCD_LISTEN_CLIENT_URLS"].startswith("https://")
    assert env["ETCD_CLIENT_CERT_AUTH"] == "true"
    assert "https://" in env["ETCD_INITIAL_CLUSTER"]
    assert env["ETCD_LISTEN_METRICS_URLS"].startswith("http://"), "probes stay plain HTTP"
    pod = find(objects, "StatefulSet")["spec"]["template"]["spec"]
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"etcd-client", "etcd-peer", "rel-ml-defender-etcd-auth"}
    settings = yaml.safe_load(
        find(objects, "ConfigMap", "rel-ml-defender-config")["data"]["defender.json"]
    )
    assert all(e.startswith("https://") for e in settings["etcd"]["endpoints"])
    assert settings["etcd"]["ca_file"].endswith("ca.crt")
    operator = find(objects, "Deployment")["spec"]["template"]["spec"]
    assert any(v.get("secret", {}).get("secretName") == "etcd-client" for v in operator["volumes"])


def test_persistence_off_uses_empty_dir(render: Render) -> None:
    sts = find(render("--set", "etcd.persistence.enabled=false"), "StatefulSet")
    assert "volumeClaimTemplates" not in sts["spec"]
    volumes = sts["spec"]["template"]["spec"]["volumes"]
    assert [v for v in volumes if v["name"] == "data"] == [{"name": "data", "emptyDir": {}}]


def test_external_etcd_renders_no_statefulset(render: Render) -> None:
    objects = render(
        "--set", "etcd.enabled=false", "--set", "externalEtcd.endpoints={https://etcd.example:2379}"
    )
    assert not [o for o in objects if o["kind"] in ("StatefulSet", "PodDisruptionBudget")]
    settings = yaml.safe_load(
        find(objects, "ConfigMap", "rel-ml-defender-config")["data"]["defender.json"]
    )
    assert settings["etcd"]["endpoints"] == ["https://etcd.example:2379"]


# ------------------------------------------------------------------------------------ operator


def test_operator_single_replica_runs_standalone(render: Render) -> None:
    objects = render()
    dep = find(objects, "Deployment")
    assert dep["spec"]["replicas"] == 1
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(a.startswith("--peering") for a in args)
    assert not [o for o in objects if o["kind"] in ("ClusterKopfPeering", "KopfPeering")]


def test_operator_replicas_use_peering(render: Render) -> None:
    objects = render("--set", "operator.replicaCount=2", "--include-crds")
    dep = find(objects, "Deployment")
    assert dep["spec"]["replicas"] == 2
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--peering=ml-defender" in args
    peering = find(objects, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "ml-defender"
    crds = {o["metadata"]["name"] for o in objects if o["kind"] == "CustomResourceDefinition"}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= crds


def test_operator_replicas_watching_namespaces_peer_in_each(render: Render) -> None:
    objects = render("--set", "operator.replicaCount=2,operator.watchNamespaces={edge,core}")
    peerings = [o for o in objects if o["kind"] == "KopfPeering"]
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["core", "edge"]
    assert not [o for o in objects if o["kind"] == "ClusterKopfPeering"]


def test_operator_accepts_the_chart_arguments(render: Render) -> None:
    # The real entry point parses the flags first; an invalid setting then stops it with exit
    # code 2 and its own message, which proves the flags were accepted (argparse would say
    # "unrecognized arguments" instead).
    for values in ([], ["--set", "operator.replicaCount=2"]):
        container = find(render(*values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["defender-operator"]
        proc = subprocess.run(
            [sys.executable, "-m", "defender_operator", *container["args"]],
            env={**os.environ, "DEFENDER_OPERATOR_LOG_LEVEL": "LOUD"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert "unrecognized arguments" not in proc.stderr
        assert "DEFENDER_OPERATOR_LOG_LEVEL" in proc.stderr


def test_operator_env_is_what_the_operator_reads(
    render: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    # OperatorSettings ignores unknown DEFENDER_OPERATOR_* names, so a typo in the chart would
    # silently fall back to a default: every name must be a field, and the values must validate.
    from defender_operator._settings import OperatorSettings

    objects = render(
        "--set",
        "operator.watchNamespaces={edge,core}",
        "--set",
        "operator.rotation.everySeconds=86400",
    )
    container = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    prefix = "DEFENDER_OPERATOR_"
    env = {e["name"]: e for e in container["env"] if e["name"].startswith(prefix)}
    fields = {name.upper() for name in OperatorSettings.model_fields}
    assert {name.removeprefix(prefix) for name in env} <= fields
    for name, var in env.items():
        monkeypatch.setenv(name, var.get("value", "ml-defender"))
    settings = OperatorSettings()
    assert settings.watch_namespaces == ["edge", "core"]
    assert settings.rotation_every_seconds == 86400
    assert settings.keyring_secret == "ml-defender-keyring"
    config_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert str(settings.library_settings_file).startswith(config_mount["mountPath"] + "/")


def test_operator_pod_is_locked_down(render: Render) -> None:
    pod = find(render(), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = pod["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]


# ------------------------------------------------------------------------------------ CRD


def test_crd_template_is_the_generated_crd_plus_labels(render: Render) -> None:
    source = yaml.safe_load((REPO / "crds" / "defendercomponents.yaml").read_text())
    rendered = find(render(), "CustomResourceDefinition")
    assert rendered["spec"] == source["spec"]
    assert rendered["metadata"]["name"] == source["metadata"]["name"]
    assert rendered["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert source["metadata"].get("labels", {}).items() <= rendered["metadata"]["labels"].items()


def test_crd_can_be_left_out_or_not_kept(render: Render) -> None:
    assert not [
        o for o in render("--set", "crds.enabled=false") if o["kind"] == "CustomResourceDefinition"
    ]
    crd = find(render("--set", "crds.keep=false"), "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in crd["metadata"].get("annotations", {})


def test_chart_copy_of_the_crd_is_current() -> None:
    for source in sorted((REPO / "crds").glob("*.yaml")):
        folder = "crds" if source.name.startswith("kopf-") else "files/crds"
        copy = CHART / folder / source.name
        assert copy.exists(), f"{copy} missing: run `make manifests`"
        assert copy.read_bytes() == source.read_bytes(), f"{copy} is stale: run `make manifests`"


# ------------------------------------------------------------------------------------ tests


def test_helm_test_pods_check_operator_and_etcd(render: Render) -> None:
    pods = [o for o in render() if o["kind"] == "Pod"]
    assert {p["metadata"]["annotations"]["helm.sh/hook"] for p in pods} == {"test"}
    by_name = {p["metadata"]["name"]: p for p in pods}
    etcd = by_name["rel-ml-defender-test-etcd"]["spec"]["containers"][0]
    assert etcd["command"] == ["/usr/local/bin/etcdctl"]
    assert etcd["args"][-2:] == ["endpoint", "health"]
    assert etcd["args"][0].count("://") == 3
    operator = by_name["rel-ml-defender-test-operator"]["spec"]["containers"][0]
    assert operator["command"][-1].endswith(":8080/healthz")
    assert not [o for o in render("--set", "tests.enabled=false") if o["kind"] == "Pod"]


def test_peering_crds_are_the_repository_files(render: Render) -> None:
    text = (REPO / "crds" / "kopf-peering.yaml").read_text()
    source = {d["metadata"]["name"]: d for d in yaml.safe_load_all(text) if d}
    # In the chart's crds/ folder: Helm installs them before the KopfPeering objects.
    assert not [
        o
        for o in render("--set", "operator.replicaCount=2")
        if o["kind"] == "CustomResourceDefinition" and o["spec"]["group"] == "kopf.dev"
    ]
    objects = render("--set", "operator.replicaCount=2", "--include-crds")
    rendered = {
        o["metadata"]["name"]: o
        for o in objects
        if o["kind"] == "CustomResourceDefinition" and o["spec"]["group"] == "kopf.dev"
    }
    assert set(rendered) == set(source) == {"kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}
    for name, crd in rendered.items():
        assert crd["spec"] == source[name]["spec"]


def test_a_chart_without_its_crd_copy_says_how_to_fix_it(render: Render, tmp_path: Path) -> None:
    chart = tmp_path / "ml-defender"
    shutil.copytree(CHART, chart)
    (chart / "files" / "crds" / "defendercomponents.yaml").unlink()
    with pytest.raises(HelmFailed, match="run `make manifests`"):
        render(chart=chart)


def test_members_start_through_the_member_tool(render: Render) -> None:
    """Member replacement (docs/operations.md): the `member` init container
    decides how etcd starts and writes its config file; etcd reads only that file; a sidecar
    promotes a replacement learner. Both reach every member over TLS as root (member changes
    need it)."""
    objects = render()
    pod = find(objects, "StatefulSet")["spec"]["template"]["spec"]
    member = next(c for c in pod["initContainers"] if c["name"] == "member")
    assert member["command"] == ["python", "-m", "defender_config.etcd_member", "prepare"]
    endpoints = next(a for a in member["args"] if a.startswith("--endpoints="))
    assert len(endpoints.split("=", 1)[1].split(",")) == 3
    assert all(e.startswith("https://") for e in endpoints.split("=", 1)[1].split(","))
    for arg in (
        "--config-out=/etc/etcd/run/etcd.yaml",
        "--ca-file=/etc/etcd/tls/client/ca.crt",
        "--user=root",
        "--password-file=/etc/etcd/auth/root",
    ):
        assert arg in member["args"]
    etcd = next(c for c in pod["containers"] if c["name"] == "etcd")
    assert etcd["command"] == ["/usr/local/bin/etcd", "--config-file=/etc/etcd/run/etcd.yaml"]
    assert "env" not in etcd and "envFrom" not in etcd
    promote = next(c for c in pod["containers"] if c["name"] == "member-promote")
    assert promote["command"][-2:] == ["promote", "--forever"]
    assert promote["args"] == member["args"]
    # Without TLS or auth, no certificate and no password arguments.
    plain = find(
        render(
            "--set",
            "etcd.tls.client.enabled=false,etcd.tls.peer.enabled=false,etcd.auth.enabled=false",
        ),
        "StatefulSet",
    )["spec"]["template"]["spec"]
    args = next(c for c in plain["initContainers"] if c["name"] == "member")["args"]
    assert not [a for a in args if a.startswith(("--ca-file", "--user", "--password-file"))]


# Every workload the chart can render, with the optional ones switched on.
ALL_WORKLOADS = (
    "--set",
    "etcd.backup.enabled=true,etcd.defrag.enabled=true,tests.enabled=true,"
    "operator.replicaCount=2,operator.admission.enabled=true",
)


def _containers(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(kind/name/container, container) of every container of every pod the objects make."""
    out = []
    for obj in objects:
        spec = {
            "Pod": lambda o: o["spec"],
            "Deployment": lambda o: o["spec"]["template"]["spec"],
            "StatefulSet": lambda o: o["spec"]["template"]["spec"],
            "DaemonSet": lambda o: o["spec"]["template"]["spec"],
            "Job": lambda o: o["spec"]["template"]["spec"],
            "CronJob": lambda o: o["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        }.get(obj["kind"], lambda o: None)(obj)
        if spec is None:
            continue
        for container in spec.get("initContainers", []) + spec["containers"]:
            out.append((f"{obj['kind']}/{obj['metadata']['name']}/{container['name']}", container))
    return out


def test_every_container_has_requests_and_a_memory_limit(render: Render) -> None:
    # Without requests the scheduler packs blind; without a memory limit one leaking container
    # takes its node's memory (no CPU limit: throttling only slows it down, by design).
    containers = _containers(render(*ALL_WORKLOADS))
    names = {where.rsplit("/", 1)[1] for where, _ in containers}
    assert {"member", "member-promote", "backup", "defrag", "etcdctl", "healthz"} <= names
    for where, container in containers:
        resources = container.get("resources", {})
        assert {"cpu", "memory"} <= resources.get("requests", {}).keys(), where
        assert "memory" in resources.get("limits", {}), where


@pytest.mark.parametrize(
    ("value", "container"),
    [
        ("etcd.memberResources", "member"),
        ("etcd.memberResources", "member-promote"),
        ("etcd.backup.resources", "backup"),
        ("etcd.defrag.resources", "defrag"),
        ("tests.resources", "etcdctl"),
        ("tests.resources", "healthz"),
    ],
)
def test_each_containers_resources_come_from_its_value(
    render: Render, value: str, container: str
) -> None:
    objects = render(*ALL_WORKLOADS, "--set", f"{value}.limits.memory=777Mi")
    [limits] = [c["resources"]["limits"] for w, c in _containers(objects) if w.endswith(container)]
    assert limits["memory"] == "777Mi"
