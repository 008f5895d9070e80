"""The chart's etcd lock-down as rendered (no cluster): generated TLS, etcd users and their
Secrets, the NetworkPolicy, and the values that keep an old plain install as it ran."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import ipaddress
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from packaging_chart import (
    CHART,
    KEEP_PLAIN_VALUES,
    PLAIN_CHART_COMMIT,
    HelmFailed,
    Render,
    chart_at,
    find,
    render_with_live,
)

AGENTS = "agent.components[0].name=firewall,agent.components[0].namespace=edge," + (
    "agent.components[1].name=sniffer,agent.components[1].namespace=core"
)
KEEP_PLAIN = KEEP_PLAIN_VALUES
EXAMPLE = CHART / "examples" / "agent-sidecar"


def _b64(secret: dict[str, Any], key: str) -> bytes:
    return base64.b64decode(secret["data"][key])


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    key = ca.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            assert cert.signature_hash_algorithm is not None
            key.verify(
                cert.signature,
                cert.tbs_certificate_bytes,
                padding.PKCS1v15(),
                cert.signature_hash_algorithm,
            )
        elif isinstance(key, ec.EllipticCurvePublicKey):
            assert cert.signature_hash_algorithm is not None
            key.verify(
                cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
            )
        else:
            return False
    except Exception:
        return False
    return cert.issuer == ca.subject


# ------------------------------------------------------------------------------------ TLS


def test_defaults_serve_clients_and_peers_over_tls_with_generated_certificates(
    render: Render,
) -> None:
    objects = render()
    env = find(objects, "ConfigMap", "rel-ml-defender-etcd-env")["data"]
    assert env["ETCD_LISTEN_CLIENT_URLS"].startswith("https://")
    assert env["ETCD_LISTEN_PEER_URLS"].startswith("https://")
    assert all(
        m.split("=", 1)[1].startswith("https://") for m in env["ETCD_INITIAL_CLUSTER"].split(",")
    )
    assert env["ETCD_PEER_CLIENT_CERT_AUTH"] == "true"
    assert env["ETCD_LISTEN_METRICS_URLS"].startswith("http://"), "probes stay plain HTTP"
    client = find(objects, "Secret", "rel-ml-defender-etcd-client-tls")
    peer = find(objects, "Secret", "rel-ml-defender-etcd-peer-tls")
    assert client["type"] == peer["type"] == "kubernetes.io/tls"
    pod = find(objects, "StatefulSet")["spec"]["template"]["spec"]
    mounted = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    # The auth Secret for the member tool's root login (member changes need root), its `root`
    # key alone, and only in the member containers, never in etcd's.
    assert mounted == {
        "rel-ml-defender-etcd-client-tls",
        "rel-ml-defender-etcd-peer-tls",
        "rel-ml-defender-etcd-auth",
    }
    auth = next(v for v in pod["volumes"] if v.get("name") == "member-auth")
    assert auth["secret"]["items"] == [{"key": "root", "path": "root"}]
    etcd = next(c for c in pod["containers"] if c["name"] == "etcd")
    assert "member-auth" not in {m["name"] for m in etcd["volumeMounts"]}


def test_one_generated_ca_signs_both_listeners_for_every_member_name(render: Render) -> None:
    objects = render()
    client = find(objects, "Secret", "rel-ml-defender-etcd-client-tls")
    peer = find(objects, "Secret", "rel-ml-defender-etcd-peer-tls")
    assert _b64(client, "ca.crt") == _b64(peer, "ca.crt")
    ca = _cert(_b64(client, "ca.crt"))
    members = find(objects, "ConfigMap", "rel-ml-defender-etcd-env")["data"]["ETCD_INITIAL_CLUSTER"]
    hosts = [m.split("://", 1)[1].rsplit(":", 1)[0] for m in members.split(",")]
    for secret in (client, peer):
        cert = _cert(_b64(secret, "tls.crt"))
        assert _signed_by(cert, ca)
        assert cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=3000)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
        for host in hosts:
            # A wildcard covers one label: the member's pod name.
            assert f"*.{host.split('.', 1)[1]}" in names, host
        assert "rel-ml-defender-etcd.ml-defender.svc" in names
        assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        # Peers are servers and clients of each other.
        assert {u.dotted_string for u in usages} >= {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}


def test_helm_template_without_a_cluster_mints_new_material_each_time(render: Render) -> None:
    # No lookup without a cluster: proof that nothing is a fixed, published secret.
    # (The e2e chart test proves `helm upgrade` keeps them.)
    first = find(render(), "Secret", "rel-ml-defender-etcd-auth")["data"]
    second = find(render(), "Secret", "rel-ml-defender-etcd-auth")["data"]
    assert first.keys() == second.keys() == {"root", "operator", "health"}
    assert all(first[k] != second[k] for k in first)
    assert all(len(base64.b64decode(v)) == 32 for v in first.values())


def _secrets(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (o["metadata"]["namespace"], o["metadata"]["name"]): o
        for o in objects
        if o["kind"] == "Secret"
    }


def test_uninstall_keeps_every_generated_secret(render: Render) -> None:
    # The etcd PVCs outlive `helm uninstall`, with auth on and users checked against the root
    # password; agents elsewhere keep their password and CA. Losing any of these Secrets locks a
    # reinstall out (docs/install.md#uninstalling).
    secrets = _secrets(render("--set", AGENTS))
    assert set(secrets) == {
        ("ml-defender", "rel-ml-defender-etcd-client-tls"),
        ("ml-defender", "rel-ml-defender-etcd-peer-tls"),
        ("ml-defender", "rel-ml-defender-etcd-auth"),
        ("edge", "rel-ml-defender-etcd-agent-firewall"),
        ("core", "rel-ml-defender-etcd-agent-sniffer"),
        ("edge", "rel-ml-defender-etcd-ca"),
        ("core", "rel-ml-defender-etcd-ca"),
    }
    for ref, secret in secrets.items():
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep", ref


def test_a_reinstall_reuses_the_kept_secrets(render: Render, tmp_path: Path) -> None:
    # What `helm install` after `helm uninstall` renders: lookup finds the kept Secrets (the
    # same code path as `helm upgrade`), so the kept etcd still takes the root password.
    first = _secrets(render("--set", AGENTS))
    again = _secrets(render_with_live(render, list(first.values()), tmp_path, "--set", AGENTS))
    assert again.keys() == first.keys()
    for ref, secret in first.items():
        assert again[ref]["data"] == secret["data"], ref


def _ca_checksums(objects: list[dict[str, Any]]) -> tuple[str | None, str | None]:
    sts = find(objects, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]
    dep = find(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    return sts.get("checksum/etcd-ca"), dep.get("checksum/etcd-ca")


def test_reissued_certificates_roll_the_members_and_the_operator(
    render: Render, tmp_path: Path
) -> None:
    # etcd and the library load the trusted CA only at start: pods must restart when the chart
    # re-issues (docs/install.md, "Renewing the generated certificates"), and only then.
    first = render()
    ca = _b64(find(first, "Secret", "rel-ml-defender-etcd-client-tls"), "ca.crt")
    digest = hashlib.sha256(ca).hexdigest()
    assert _ca_checksums(first) == (digest, digest)
    live = list(_secrets(first).values())
    kept = render_with_live(render, live, tmp_path / "kept")
    assert _ca_checksums(kept) == (digest, digest), "an upgrade that keeps them rolls nothing"
    without_tls = [s for s in live if not s["metadata"]["name"].endswith("-tls")]
    reissued = render_with_live(render, without_tls, tmp_path / "reissued")
    new_ca = _b64(find(reissued, "Secret", "rel-ml-defender-etcd-client-tls"), "ca.crt")
    assert new_ca != ca
    new = hashlib.sha256(new_ca).hexdigest()
    assert _ca_checksums(reissued) == (new, new)


@pytest.mark.parametrize(
    "values",
    [
        "etcd.tls.client.secretName=mine-client,etcd.tls.peer.secretName=mine-peer",
        "etcd.tls.certManager.enabled=true,etcd.tls.certManager.issuerRef.name=ca",
        "etcd.tls.client.enabled=false,etcd.tls.peer.enabled=false",
    ],
)
def test_no_ca_checksum_where_the_chart_makes_no_ca(render: Render, values: str) -> None:
    assert _ca_checksums(render("--set", values)) == (None, None)


def test_clients_get_the_ca_and_never_a_member_key(render: Render) -> None:
    objects = render()
    settings = json.loads(
        find(objects, "ConfigMap", "rel-ml-defender-config")["data"]["defender.json"]
    )
    assert all(e.startswith("https://") for e in settings["etcd"]["endpoints"])
    assert settings["etcd"]["ca_file"] == "/etc/ml-defender/etcd-tls/ca.crt"
    assert "cert_file" not in settings["etcd"] and "key_file" not in settings["etcd"]
    dep = find(objects, "Deployment")["spec"]["template"]["spec"]
    tls = next(v for v in dep["volumes"] if v["name"] == "etcd-tls")["secret"]
    assert tls["secretName"] == "rel-ml-defender-etcd-client-tls"
    assert tls["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    test_pod = find(objects, "Pod", "rel-ml-defender-test-etcd")
    volume = test_pod["spec"]["volumes"][0]["secret"]
    assert volume["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    args = test_pod["spec"]["containers"][0]["args"]
    assert "--cacert=/etc/etcd/tls/client/ca.crt" in args
    assert not [a for a in args if a.startswith(("--cert=", "--key="))]


def test_your_own_secrets_replace_the_generated_ones(render: Render) -> None:
    objects = render(
        "--set",
        "etcd.tls.client.secretName=mine-client,etcd.tls.peer.secretName=mine-peer",
    )
    assert not [
        o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"].endswith("-tls")
    ]
    pod = find(objects, "StatefulSet")["spec"]["template"]["spec"]
    assert {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v} == {
        "mine-client",
        "mine-peer",
        "rel-ml-defender-etcd-auth",  # the member tool's root login
    }
    settings = json.loads(
        find(objects, "ConfigMap", "rel-ml-defender-config")["data"]["defender.json"]
    )
    # Your Secret is a client certificate too (the old contract): the clients present it.
    assert settings["etcd"]["cert_file"].endswith("tls.crt")


def test_cert_manager_issues_both_listeners(render: Render) -> None:
    objects = render(
        "--set",
        "etcd.tls.certManager.enabled=true,etcd.tls.certManager.issuerRef.name=etcd-ca,"
        "etcd.tls.certManager.issuerRef.kind=ClusterIssuer",
    )
    certs = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Certificate"}
    assert set(certs) == {"rel-ml-defender-etcd-client-tls", "rel-ml-defender-etcd-peer-tls"}
    for name, cert in certs.items():
        assert cert["apiVersion"] == "cert-manager.io/v1"
        assert cert["spec"]["secretName"] == name
        assert cert["spec"]["issuerRef"] == {
            "name": "etcd-ca",
            "kind": "ClusterIssuer",
            "group": "cert-manager.io",
        }
        assert {"server auth", "client auth"} <= set(cert["spec"]["usages"])
        assert "127.0.0.1" in cert["spec"]["ipAddresses"]
    assert not [
        o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"].endswith("-tls")
    ]


def test_cert_manager_needs_an_issuer(render: Render) -> None:
    with pytest.raises(HelmFailed, match=r"needs etcd\.tls\.certManager\.issuerRef\.name"):
        render("--set", "etcd.tls.certManager.enabled=true")


def test_client_cert_auth_needs_a_client_certificate(render: Render) -> None:
    with pytest.raises(HelmFailed, match=r"needs etcd\.tls\.client\.clientSecretName"):
        render("--set", "etcd.tls.client.clientCertAuth=true")


# ------------------------------------------------------------------------------------ auth


def test_operator_gets_its_own_etcd_user_and_nothing_else(
    render: Render, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from defender_config import load_settings

    objects = render()
    dep = find(objects, "Deployment")["spec"]["template"]["spec"]
    [operator] = dep["containers"]
    env = {e["name"]: e for e in operator["env"]}
    assert env["DEFENDER_ETCD__USER"]["value"] == "ml-defender-operator"
    ref = env["DEFENDER_ETCD__PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "rel-ml-defender-etcd-auth", "key": "operator"}
    assert "etcd-auth" not in {m["name"] for m in operator["volumeMounts"]}
    # The environment and the rendered settings file together are valid library settings.
    data = find(objects, "ConfigMap", "rel-ml-defender-config")["data"]
    (tmp_path / "defender.json").write_text(data["defender.json"])
    for name in list(__import__("os").environ):
        if name.startswith("DEFENDER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DEFENDER_ETCD__USER", env["DEFENDER_ETCD__USER"]["value"])
    monkeypatch.setenv("DEFENDER_ETCD__PASSWORD", "x" * 32)
    settings = load_settings(tmp_path / "defender.json")
    assert settings.etcd.user == "ml-defender-operator"
    assert settings.etcd.password is not None
    assert len(settings.etcd.endpoints) == 3 and settings.etcd.ca_file is not None


def test_init_container_applies_the_plan_with_every_password(render: Render) -> None:
    from defender_operator.etcd_access import AccessPlan

    objects = render("--set", AGENTS)
    dep = find(objects, "Deployment")["spec"]["template"]["spec"]
    [init] = dep["initContainers"]
    assert init["command"] == ["python", "-m", "defender_operator.etcd_access"]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    plan_arg = next(a for a in init["args"] if a.startswith("--plan="))
    assert plan_arg.removeprefix("--plan=").startswith(mounts["config"] + "/")
    data = find(objects, "ConfigMap", "rel-ml-defender-config")["data"]
    plan = AccessPlan.model_validate_json(data["etcd-access.json"])
    assert plan.prefix == "/ml-defender"
    assert [(a.component, a.user) for a in plan.agents] == [
        ("firewall", "ml-defender-agent-firewall"),
        ("sniffer", "ml-defender-agent-sniffer"),
    ]
    auth = find(objects, "Secret", "rel-ml-defender-etcd-auth")
    volume = next(v for v in dep["volumes"] if v["name"] == "etcd-auth")
    assert volume["secret"]["secretName"] == "rel-ml-defender-etcd-auth"
    files = [plan.root_password_file, plan.operator_password_file] + [
        a.password_file for a in plan.agents
    ]
    for path in files:
        directory, key = path.rsplit("/", 1)
        assert directory == mounts["etcd-auth"] and key in auth["data"], path
    assert init["securityContext"]["readOnlyRootFilesystem"] is True


def test_each_agent_namespace_gets_its_credentials_and_the_ca_only(render: Render) -> None:
    objects = render("--set", AGENTS)
    auth = find(objects, "Secret", "rel-ml-defender-etcd-auth")
    ca = _b64(find(objects, "Secret", "rel-ml-defender-etcd-client-tls"), "ca.crt")
    for component, namespace in (("firewall", "edge"), ("sniffer", "core")):
        creds = find(objects, "Secret", f"rel-ml-defender-etcd-agent-{component}")
        assert creds["metadata"]["namespace"] == namespace
        assert creds["type"] == "kubernetes.io/basic-auth"
        assert _b64(creds, "username").decode() == f"ml-defender-agent-{component}"
        assert creds["data"]["password"] == auth["data"][f"agent-{component}"]
    cas = [
        o
        for o in objects
        if o["kind"] == "Secret" and o["metadata"]["name"] == "rel-ml-defender-etcd-ca"
    ]
    assert sorted(c["metadata"]["namespace"] for c in cas) == ["core", "edge"]
    for secret in cas:
        assert secret["data"].keys() == {"ca.crt"} and _b64(secret, "ca.crt") == ca


def test_a_component_listed_twice_is_refused(render: Render) -> None:
    with pytest.raises(HelmFailed, match='lists "firewall" twice'):
        render(
            "--set",
            "agent.components[0].name=firewall,agent.components[0].namespace=a,"
            "agent.components[1].name=firewall,agent.components[1].namespace=b",
        )


def test_a_component_entry_needs_a_namespace(render: Render) -> None:
    with pytest.raises(HelmFailed, match="missing property 'namespace'"):
        render("--set", "agent.components[0].name=firewall")


def test_agent_helper_wires_the_credentials_the_chart_creates(
    render: Render, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from defender_agent._settings import library_settings, load_agent_settings

    chart = tmp_path / "ml-defender"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-agent-pod.yaml").write_text(
        """apiVersion: v1
kind: Pod
metadata:
  name: firewall-0
  namespace: edge
  labels:
    {{- include "ml-defender.agent.podLabels" (dict "ctx" $) | nindent 4 }}
spec:
  containers:
    {{- include "ml-defender.agent.sidecar" (dict "ctx" $ "component" "firewall"
        "componentType" "firewall" "process" "firewall") | nindent 4 }}
  volumes:
    {{- include "ml-defender.agent.sidecarVolumes" (dict "ctx" $) | nindent 4 }}
"""
    )
    objects = render("--set", AGENTS, chart=chart)
    pod = find(objects, "Pod", "firewall-0")
    [agent] = pod["spec"]["containers"]
    env = {e["name"]: e for e in agent["env"]}
    creds = find(objects, "Secret", "rel-ml-defender-etcd-agent-firewall")
    for name, key in (
        ("DEFENDER_AGENT_ETCD_USER", "username"),
        ("DEFENDER_AGENT_ETCD_PASSWORD", "password"),
    ):
        assert env[name]["valueFrom"]["secretKeyRef"] == {
            "name": creds["metadata"]["name"],
            "key": key,
        }
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    assert volumes["defender-shared-etcd-ca"]["secret"]["secretName"] == "rel-ml-defender-etcd-ca"
    assert (
        env["DEFENDER_AGENT_ETCD_CA_FILE"]["value"] == mounts["defender-shared-etcd-ca"] + "/ca.crt"
    )
    assert "DEFENDER_AGENT_ETCD_CERT_FILE" not in env
    assert all(
        e.startswith("https://") for e in env["DEFENDER_AGENT_ETCD_ENDPOINTS"]["value"].split(",")
    )
    # The NetworkPolicy admits exactly what the helper labels the pod with.
    policy = find(objects, "NetworkPolicy")
    admitted = policy["spec"]["ingress"][0]["from"][1]["podSelector"]["matchLabels"]
    assert admitted.items() <= pod["metadata"]["labels"].items()
    # What the kubelet would fill in is accepted by the agent's own settings.
    for name in list(__import__("os").environ):
        if name.startswith(("DEFENDER_", "POD_NAME", "NODE_NAME")):
            monkeypatch.delenv(name)
    for name, var in env.items():
        monkeypatch.setenv(name, var.get("value", "agent-user" if "USER" in name else "x" * 32))
    settings = load_agent_settings([])
    assert library_settings(settings).etcd.user == "agent-user"


def test_example_component_chart_carries_the_label_and_the_credentials(helm_bin: Path) -> None:
    proc = subprocess.run(
        [str(helm_bin), "template", "demo", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    [dep] = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]
    assert pod["metadata"]["labels"]["mldefender.io/etcd-client"] == "true"
    agent = next(c for c in pod["spec"]["containers"] if c["name"] == "defender-agent")
    env = {e["name"]: e for e in agent["env"]}
    # The names the ml-defender release (named ml-defender) creates in the component namespace.
    assert env["DEFENDER_AGENT_ETCD_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == (
        "ml-defender-etcd-agent-sniffer"
    )
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["defender-shared-etcd-ca"]["secret"]["secretName"] == "ml-defender-etcd-ca"


# ------------------------------------------------------------------------------------ network


def test_network_policy_admits_only_operator_agents_maintenance_and_members(
    render: Render,
) -> None:
    objects = render()
    policy = find(objects, "NetworkPolicy")
    sts = find(objects, "StatefulSet")
    etcd_labels = sts["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["podSelector"]["matchLabels"] == etcd_labels
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = {r["ports"][0]["port"]: r for r in policy["spec"]["ingress"]}
    assert set(rules) == {"client", "peer", "metrics"}
    operator = find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    client_from = rules["client"]["from"]
    assert len(client_from) == 4
    assert client_from[0]["podSelector"]["matchLabels"].items() <= operator.items()
    assert "namespaceSelector" not in client_from[0], "operator pods: the release namespace"
    assert client_from[1] == {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {"mldefender.io/etcd-client": "true"}},
    }
    maintenance = find(objects, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]
    assert client_from[2]["podSelector"]["matchLabels"].items() <= (
        maintenance["metadata"]["labels"].items()
    )
    assert "namespaceSelector" not in client_from[2], "maintenance pods: the release namespace"
    # The members' own member tool (replacing a lost member) calls the others' client port.
    assert client_from[3] == {"podSelector": {"matchLabels": etcd_labels}}
    assert "namespaceSelector" not in client_from[3], "members: the release namespace"
    assert etcd_labels.items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    member_tool = [
        c["name"]
        for c in (
            sts["spec"]["template"]["spec"]["initContainers"]
            + sts["spec"]["template"]["spec"]["containers"]
        )
        if "defender_config.etcd_member" in c.get("command", [])
    ]
    assert member_tool == ["member", "member-promote"]
    # Nothing broader: every source is a pod selector with labels, none an IP block, and only
    # the agents' label reaches beyond the release namespace.
    for source in client_from:
        assert source.keys() <= {"podSelector", "namespaceSelector"}, source
        assert source["podSelector"]["matchLabels"], source
    assert [s for s in client_from if "namespaceSelector" in s] == [client_from[1]]
    assert rules["peer"]["from"] == [{"podSelector": {"matchLabels": etcd_labels}}]
    # The member ports the policy names exist on the pods.
    ports = {p["name"] for p in sts["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert set(rules) <= ports
    assert "from" not in rules["metrics"]
    assert not [
        o for o in render("--set", "networkPolicy.enabled=false") if o["kind"] == "NetworkPolicy"
    ]


def test_network_policy_extra_peers_and_metrics_sources(render: Render) -> None:
    policy = find(
        render(
            "--set-json",
            'networkPolicy.extraClientPeers=[{"namespaceSelector":{"matchLabels":{"team":"backup"}}}]',
            "--set-json",
            'networkPolicy.metricsFrom=[{"namespaceSelector":{"matchLabels":{"name":"monitoring"}}}]',
        ),
        "NetworkPolicy",
    )
    rules = {r["ports"][0]["port"]: r for r in policy["spec"]["ingress"]}
    assert rules["client"]["from"][-1] == {"namespaceSelector": {"matchLabels": {"team": "backup"}}}
    assert rules["metrics"]["from"] == [
        {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}
    ]


# ------------------------------------------------------------------------------------ upgrade


@pytest.fixture(scope="module")
def plain_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart as it was before the lock-down defaults, from the repository's history."""
    return chart_at(PLAIN_CHART_COMMIT, tmp_path_factory.mktemp("plain-chart"))


DEFRAG = ("CronJob", "rel-ml-defender-etcd-defrag")


def _by_ref(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def _without_member_tool(spec: dict[str, Any]) -> dict[str, Any]:
    """A StatefulSet spec as it was before the member tool (issue 12 point 5): etcd's ETCD_*
    variables back on its container, no `member` init container, promote sidecar or `run`
    volume, etcd started without `--config-file`. The member tool changes how a member starts,
    not what it runs with: an upgrade rolls the members once, each on its own data."""
    out = copy.deepcopy(spec)
    pod = out.get("template", {}).get("spec", {})
    inits = pod.pop("initContainers", [])
    member = next((c for c in inits if c["name"] == "member"), None)
    pod["containers"] = [c for c in pod.get("containers", []) if c["name"] != "member-promote"]
    pod["volumes"] = [v for v in pod.get("volumes", []) if v["name"] not in ("run", "member-auth")]
    if not pod["volumes"]:
        pod.pop("volumes")
    for c in pod["containers"]:
        if c["name"] == "etcd":
            c["command"] = ["/usr/local/bin/etcd"]
            c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "run"]
            if member is not None:
                c["envFrom"], c["env"] = member["envFrom"], member["env"]
    return out


def test_upgrade_with_keep_plain_values_changes_nothing_on_the_wire(
    render: Render, plain_chart: Path
) -> None:
    old = _by_ref(render(chart=plain_chart))
    new = _by_ref(render("--values", str(KEEP_PLAIN)))
    # Nothing added that a plain install would feel, nothing taken away. The defrag CronJob is
    # new in every install (docs/operations.md) and changes nothing that already runs.
    assert set(old) == set(new) - {DEFRAG}, set(old) ^ set(new)
    for ref in (("ConfigMap", "rel-ml-defender-etcd-env"), ("ConfigMap", "rel-ml-defender-config")):
        assert new[ref]["data"] == old[ref]["data"], ref
    for kind in ("StatefulSet", "Service", "PodDisruptionBudget"):
        for ref in [r for r in old if r[0] == kind]:
            assert _without_member_tool(new[ref]["spec"]) == _without_member_tool(
                old[ref]["spec"]
            ), ref
    old_dep = old[("Deployment", "rel-ml-defender-operator")]["spec"]["template"]["spec"]
    new_dep = new[("Deployment", "rel-ml-defender-operator")]["spec"]["template"]["spec"]
    assert "initContainers" not in new_dep
    assert new_dep["containers"][0]["env"] == old_dep["containers"][0]["env"]
    assert new_dep["volumes"] == old_dep["volumes"]


def test_upgrade_to_the_new_defaults_changes_what_the_docs_say(
    render: Render, plain_chart: Path
) -> None:
    old = _by_ref(render(chart=plain_chart))
    new = _by_ref(render())
    added = {ref for ref in set(new) - set(old)}
    assert added == {
        ("Secret", "rel-ml-defender-etcd-client-tls"),
        ("Secret", "rel-ml-defender-etcd-peer-tls"),
        ("Secret", "rel-ml-defender-etcd-auth"),
        ("NetworkPolicy", "rel-ml-defender-etcd"),
        ("ValidatingWebhookConfiguration", "rel-ml-defender-operator-admission"),
        ("MutatingWebhookConfiguration", "rel-ml-defender-operator-admission"),
        DEFRAG,
    }
    assert set(old) <= set(new)
    # The immutable parts of the StatefulSet stay, so `helm upgrade` can patch it in place.
    old_sts = old[("StatefulSet", "rel-ml-defender-etcd")]["spec"]
    new_sts = new[("StatefulSet", "rel-ml-defender-etcd")]["spec"]
    for field in ("selector", "serviceName", "volumeClaimTemplates", "podManagementPolicy"):
        assert new_sts[field] == old_sts[field], field


def test_only_the_listeners_the_chart_certifies_get_generated_secrets(render: Render) -> None:
    def tls_secrets(*args: str) -> list[dict[str, Any]]:
        return [
            o
            for o in render("--set", AGENTS, *args)
            if o["kind"] == "Secret" and o["metadata"]["name"].endswith(("-tls", "-etcd-ca"))
        ]

    client_only = tls_secrets("--set", "etcd.tls.peer.enabled=false")
    assert {s["metadata"]["name"] for s in client_only} == {
        "rel-ml-defender-etcd-client-tls",
        "rel-ml-defender-etcd-ca",
    }
    # Your own client certificate with a generated peer one: the agents are not handed the
    # peer CA as if it were the client CA.
    own_client = tls_secrets("--set", "etcd.tls.client.secretName=mine")
    assert {s["metadata"]["name"] for s in own_client} == {"rel-ml-defender-etcd-peer-tls"}


# ------------------------------------------------------------------------------ every pod


# The renderings whose pods differ: the defaults, the maintenance CronJobs, admission with
# cert-manager, the plain install kept for an upgrade, more members, client certificates.
LOCKDOWN_RENDERINGS: list[tuple[str, ...]] = [
    (),
    ("--set", "etcd.backup.enabled=true", "--set", "etcd.defrag.enabled=true"),
    (
        "--set",
        "operator.admission.enabled=true",
        "--set",
        "operator.admission.certManager.enabled=true",
        "--set",
        "operator.admission.certManager.issuerRef.name=ca",
    ),
    ("-f", str(KEEP_PLAIN)),
    ("--set", "etcd.replicaCount=5", "--set", "etcd.pdb.minAvailable=3"),
    ("--set", f"{AGENTS}", "--set", "etcd.backup.enabled=true"),
]
# Who may hold etcd's root password (docs/security.md, "etcd itself"): the operator pod's
# init container, the maintenance CronJobs, the member tool beside etcd. Never etcd itself.
ROOT_HOLDERS = {"etcd-access", "backup", "defrag", "member", "member-promote"}


def _pod_templates(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    pods = []
    for obj in objects:
        spec = obj.get("spec", {})
        if obj["kind"] == "CronJob":
            pods.append((obj["metadata"]["name"], spec["jobTemplate"]["spec"]["template"]["spec"]))
        elif obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            pods.append((obj["metadata"]["name"], spec["template"]["spec"]))
        elif obj["kind"] == "Pod":
            pods.append((obj["metadata"]["name"], spec))
    return pods


def _reaches_root_password(container: dict[str, Any], pod: dict[str, Any], auth: str) -> bool:
    for env in container.get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef", {})
        if ref.get("name") == auth and ref.get("key") == "root":
            return True
    if any(e.get("secretRef", {}).get("name") == auth for e in container.get("envFrom", [])):
        return True
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})  # absent: a claim template (etcd's data)
        sources = [volume, *volume.get("projected", {}).get("sources", [])]
        for source in sources:
            secret = source.get("secret", {})
            name = secret.get("secretName", secret.get("name"))
            items = secret.get("items")
            if name == auth and (items is None or any(i["key"] == "root" for i in items)):
                return True
    return False


@pytest.mark.parametrize("args", LOCKDOWN_RENDERINGS, ids=lambda a: " ".join(a) or "defaults")
def test_every_pod_the_chart_renders_is_locked_down_and_etcd_never_holds_root(
    render: Render, args: tuple[str, ...]
) -> None:
    """docs/security.md, "etcd itself": the etcd pods run as non-root with a read-only root
    filesystem, no capabilities, no service account token; so do the operator and the agent
    (UID 10001); the root password reaches the operator's `etcd-access` init container, the
    maintenance CronJobs and the member tool only. Checked on every pod of every rendering,
    init containers and sidecars included, so a container added later cannot slip out."""
    objects = render(*args)
    auth = "rel-ml-defender-etcd-auth"
    pods = _pod_templates(objects)
    assert {name for name, _ in pods} >= {"rel-ml-defender-operator", "rel-ml-defender-etcd"}
    for name, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name}/{container['name']}"
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc["capabilities"].get("add"), where
            assert sc.get("runAsNonRoot", True) is True and sc.get("runAsUser", 1) != 0, where
            assert not sc.get("privileged", False), where
            if _reaches_root_password(container, pod, auth):
                assert container["name"] in ROOT_HOLDERS, f"{where} holds etcd's root password"
        if name != "rel-ml-defender-operator":
            # Only the operator talks to the API server.
            assert pod["automountServiceAccountToken"] is False, name
    operator = dict(pods)["rel-ml-defender-operator"]
    assert operator["securityContext"]["runAsUser"] == 10001
    # The operator keeps the keyring in memory: all it may write is a Memory emptyDir.
    volumes = {v["name"]: v for v in operator["volumes"]}
    for container in operator.get("initContainers", []) + operator["containers"]:
        for mount in container.get("volumeMounts", []):
            if not mount.get("readOnly", False):
                assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory", mount
    etcd = dict(pods)["rel-ml-defender-etcd"]
    (etcd_container,) = [c for c in etcd["containers"] if c["name"] == "etcd"]
    assert not _reaches_root_password(etcd_container, etcd, auth)
