"""Reaching the chart's etcd from outside the cluster, as docs/operations.md ("Reaching etcd")
and NOTES.txt show it: one port-forward per member (defrag refuses fewer endpoints than
members), https to 127.0.0.1 (which the members' certificates name), the CA and an etcd user
from the Secrets the chart really creates. The plugin's help is checked in
tests/unit/cli/test_cli_help_text.py."""

from __future__ import annotations

import base64
import ipaddress
import re
from pathlib import Path
from typing import Any

from cryptography import x509
from packaging_chart import REPO, Render, find, render_notes

from defender_config import EtcdSettings

OPERATIONS = REPO / "docs" / "operations.md"
RELEASE = "ml-defender"


def _recipe() -> str:
    """The shell blocks of the section, joined (line continuations undone)."""
    section = OPERATIONS.read_text().split("\n## Reaching etcd\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```sh\n(.*?)```", section, flags=re.S)).replace("\\\n", " ")


def _exported(text: str, name: str) -> list[str]:
    return re.findall(rf"export {name}=(\S+)", text)


def _member_facts(objects: list[dict[str, Any]]) -> tuple[str, int, int]:
    sts = find(objects, "StatefulSet")
    etcd = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "etcd")
    port = next(p["containerPort"] for p in etcd["ports"] if p["name"] == "client")
    return sts["metadata"]["name"], int(sts["spec"]["replicas"]), int(port)


def _forwards(text: str) -> tuple[list[int], list[tuple[str, str, str]]]:
    """The loop's member numbers and its port-forwards (pod prefix, local prefix, remote)."""
    loop = re.search(r"for i in ([\d ]+); do", text)
    assert loop, text
    forwards = re.findall(r"port-forward pod/(\S+)-\$i (\d+)\$i:(\d+)", text)
    return [int(i) for i in loop.group(1).split()], forwards


def _check_reaches_every_member(text: str, objects: list[dict[str, Any]]) -> None:
    name, replicas, port = _member_facts(objects)
    members, forwards = _forwards(text)
    assert members == list(range(replicas))
    assert len(forwards) == 1 and forwards[0][0] == name and forwards[0][2] == str(port)
    local = forwards[0][1]
    (endpoints,) = _exported(text, "DEFENDER_ETCD__ENDPOINTS")
    assert endpoints.split(",") == [f"https://127.0.0.1:{local}{i}" for i in members]


def _check_credentials(text: str, objects: list[dict[str, Any]]) -> None:
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    ca = re.findall(r"get secret (\S+) -o jsonpath='\{\.data\.ca\\\.crt\}'", text)
    assert ca and all("ca.crt" in secrets[s]["data"] for s in ca), ca
    # The certificate the members serve names 127.0.0.1: TLS verifies through a port-forward.
    served = x509.load_pem_x509_certificate(base64.b64decode(secrets[ca[0]]["data"]["tls.crt"]))
    san = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    passwords = re.findall(r"get secret (\S+)\s+-o jsonpath='\{\.data\.(\w+)\}'", text)
    assert passwords and all(key in secrets[s]["data"] for s, key in passwords), passwords
    operator = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    user = next(e["value"] for e in operator["env"] if e["name"] == "DEFENDER_ETCD__USER")
    assert user in _exported(text, "DEFENDER_ETCD__USER")


def test_the_documented_recipe_reaches_every_member_of_the_default_install(
    render: Render,
) -> None:
    text = _recipe()
    objects = render(release=RELEASE)
    _check_reaches_every_member(text, objects)
    _check_credentials(text, objects)
    # Root too: etcd allows defrag, snapshots and alarm changes to root only.
    assert _exported(text, "DEFENDER_ETCD__USER") == ["ml-defender-operator", "root"]
    # Every variable is a field of the library's settings, which the plugin reads.
    for var in re.findall(r"DEFENDER_ETCD__(\w+)", OPERATIONS.read_text()):
        assert var.lower() in EtcdSettings.model_fields, var


def test_notes_show_the_same_recipe_for_the_members_there_are(
    render: Render, helm_bin: Path, tmp_path: Path
) -> None:
    for replicas in (3, 5):
        args = ("--set", f"etcd.replicaCount={replicas}")
        notes = render_notes(helm_bin, tmp_path / str(replicas), *args, release=RELEASE)
        objects = render(*args, release=RELEASE)
        _check_reaches_every_member(notes, objects)
        _check_credentials(notes, objects)
        assert "port-forward svc/" not in notes, "one endpoint: defrag and status need them all"


def test_no_page_reaches_the_chart_etcd_another_way() -> None:
    # One Service port-forward is one endpoint (defrag refuses it, status sees one member), and
    # plain http:// fails against the default TLS: every page points at the recipe instead.
    for page in [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]:
        text = page.read_text()
        assert not re.search(r"port-forward svc/\S*etcd", text), page.name
        assert not re.search(r"kubectl defender .*http://127\.0\.0\.1", text), page.name


def test_notes_with_an_external_etcd_name_no_chart_etcd(helm_bin: Path, tmp_path: Path) -> None:
    external = ["https://etcd-a.infra:2379", "https://etcd-b.infra:2379"]
    notes = render_notes(
        helm_bin,
        tmp_path,
        "--set",
        f"etcd.enabled=false,externalEtcd.endpoints={{{','.join(external)}}},"
        "externalEtcd.tls.secretName=ext-etcd,"
        # Ignored without the chart's etcd: no warning about them either.
        "etcd.persistence.enabled=false,etcd.allowUnsafeReplicaCount=true",
    )
    # Nothing of the StatefulSet, its Service, pods or Secrets the release does not have.
    assert "statefulset" not in notes and "port-forward" not in notes, notes
    assert "rel-ml-defender-etcd" not in notes and "WARNING" not in notes, notes
    assert f"export DEFENDER_ETCD__ENDPOINTS={','.join(external)}" in notes
    assert "get secret ext-etcd" in notes and "DEFENDER_ETCD__KEY_FILE" in notes
    assert "rollout status deployment/rel-ml-defender-operator" in notes
