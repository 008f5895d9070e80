"""The real operator, started from the chart's own settings, signed in as the chart's
ServiceAccount: proves the RBAC is enough for what the operator does (and the chart's env, flags
and settings file are what it reads). Anything the operator needs and the chart does not grant
shows up as a 403 in its log or as work not done."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from chart_processes import (
    lock_down,
    operator_settings,
    secret_value,
    start_members,
    write_member_tls,
    write_operator_mounts,
)
from packaging_chart import CHART, KEEP_PLAIN_VALUES, REPO, find, kube_version

from defender_config import contract
from defender_devcluster import EtcdCluster, free_ports, popen_dying_with_parent, tool, wait_for

pytestmark = pytest.mark.cluster

T = TypeVar("T")
Helm = Callable[..., str]


def _wait(what: str, probe: Callable[[], T | None], timeout: float, log: Path) -> T:
    """The shared wait with the operator's log tail in the failure message."""
    try:
        # A probe against a starting process may fail any way: every error means "not yet".
        return wait_for(what, probe, timeout, every=0.5, ignore=(Exception,))
    except AssertionError as exc:
        raise AssertionError(f"{exc}; operator log:\n{log.read_text()[-3000:]}") from exc


def _service_account_kubeconfig(admin: Path, token: str, target: Path) -> Path:
    config = yaml.safe_load(admin.read_text())
    cluster = config["clusters"][0]["cluster"]
    target.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": cluster}],
                "users": [{"name": "operator", "user": {"token": token}}],
                "contexts": [
                    {"name": "operator", "context": {"cluster": "local", "user": "operator"}}
                ],
                "current-context": "operator",
            }
        )
    )
    return target


def _key_ids(core: Any, namespace: str) -> list[str]:
    from defender_config import Keyring

    data = core.read_namespaced_secret("ml-defender-keyring", namespace).data
    return sorted(Keyring.from_secret_data(data).key_ids)


def _delete_component(custom: Any, namespace: str, log: Path) -> None:
    from kubernetes import client

    found = custom.list_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, namespace, contract.PLURAL
    )["items"]
    for item in found:
        name = item["metadata"]["name"]
        custom.delete_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, namespace, contract.PLURAL, name
        )

        def gone(name: str = name) -> bool:
            try:
                custom.get_namespaced_custom_object(
                    contract.API_GROUP, contract.API_VERSION, namespace, contract.PLURAL, name
                )
            except client.ApiException as exc:
                return exc.status == 404
            return False

        _wait(f"DefenderComponent {namespace}/{name} to be deleted", gone, 60, log)


@pytest.fixture
def component_namespace(k8s_api: Any) -> Iterator[str]:
    from kubernetes import client

    name = f"t-components-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(k8s_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name)


@pytest.fixture
def exit_stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.mark.parametrize(
    ("replicas", "locked"),
    [(1, False), (2, False), (1, True)],
    ids=["standalone", "peering", "locked-down-etcd"],
)
def test_operator_runs_with_exactly_the_chart_rbac(
    replicas: int,
    locked: bool,
    exit_stack: contextlib.ExitStack,
    helm: Helm,
    namespace: str,
    component_namespace: str,
    release: str,
    k8s_api: Any,
    kubeconfig_path: Path,
    defender_etcd: EtcdCluster,
    etcd_prefix: str,
    tmp_path: Path,
) -> None:
    from kubernetes import client

    prefix = etcd_prefix.rstrip("/")
    # Either the harness's plain etcd with the values that keep a plain install, or (locked)
    # the chart's defaults: its own three members with TLS and etcd users, the operator signed
    # in as its etcd user.
    values = [] if locked else ["--values", str(KEEP_PLAIN_VALUES)]
    values += [
        "--set",
        f"operator.watchNamespaces={{{component_namespace}}}",
        "--set",
        f"config.prefix={prefix}",
        "--set",
        f"operator.replicaCount={replicas}",
    ]
    helm("install", release, str(CHART), "--namespace", namespace, "--take-ownership", *values)
    rendered = [
        d
        for d in yaml.safe_load_all(
            helm(
                "template",
                release,
                str(CHART),
                "--namespace",
                namespace,
                "--kube-version",
                kube_version(),
                *values,
            )
        )
        if d
    ]
    full = f"{release}-ml-defender"
    container = find(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    settings = json.loads(find(rendered, "ConfigMap", f"{full}-config")["data"]["defender.json"])

    # What the pod would get, mapped onto this machine: etcd members by their local URLs, the
    # ConfigMap as a file, the ServiceAccount's token as the only credential.
    if locked:
        root = tmp_path / "etcd"
        write_member_tls(rendered, root)
        write_operator_mounts(rendered, root)
        members = exit_stack.enter_context(
            start_members(tool("etcd"), rendered, root, free_ports(9))
        )
        lock_down(rendered, root, members)
        settings = operator_settings(rendered, root, members)
    else:
        settings["etcd"]["endpoints"] = defender_etcd.endpoints
    settings_file = tmp_path / "defender.json"
    settings_file.write_text(json.dumps(settings))
    core = client.CoreV1Api(k8s_api)
    token = core.create_namespaced_service_account_token(
        f"{full}-operator",
        namespace,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
        ),
    ).status.token
    sa_kubeconfig = _service_account_kubeconfig(kubeconfig_path, token, tmp_path / "kubeconfig")

    health_port, metrics_port, webhook_port = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFENDER_")}
    env["KUBECONFIG"] = str(sa_kubeconfig)
    for var in container["env"]:
        source = var.get("valueFrom")
        if source is None:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in source:
            env[var["name"]] = secret_value(rendered, source["secretKeyRef"])
        else:
            env[var["name"]] = {"metadata.namespace": namespace, "metadata.name": "operator-0"}[
                source["fieldRef"]["fieldPath"]
            ]
    assert ("DEFENDER_ETCD__USER" in env) is locked
    assert env["DEFENDER_OPERATOR_LIBRARY_SETTINGS_FILE"].startswith("/etc/ml-defender/config/")
    env["DEFENDER_OPERATOR_LIBRARY_SETTINGS_FILE"] = str(settings_file)
    env["DEFENDER_OPERATOR_METRICS_PORT"] = str(metrics_port)
    env["DEFENDER_OPERATOR_LOG_FORMAT"] = "text"
    # The chart's webhook server (defaults only; the keep-plain values leave it off), on a
    # port and address of this machine.
    admission_on = env.get("DEFENDER_OPERATOR_ADMISSION_ENABLED") == "true"
    assert admission_on is locked
    env["DEFENDER_OPERATOR_ADMISSION_PORT"] = str(webhook_port)
    env["DEFENDER_OPERATOR_ADMISSION_LISTEN_ADDRESS"] = "127.0.0.1"
    args = [re.sub(r":\d+/healthz$", f":{health_port}/healthz", a) for a in container["args"]]
    args = [a.replace("0.0.0.0", "127.0.0.1") for a in args]

    log = tmp_path / "operator.log"
    with log.open("wb") as out:
        proc = popen_dying_with_parent(
            [sys.executable, "-m", "defender_operator", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2) as r:
                return r.status == 200

        _wait("the operator's /healthz", healthy, 90, log)
        # The chart's webhook configurations get the CA of the certificate the operator made.
        admission = client.AdmissionregistrationV1Api(k8s_api)
        hooks = f"{full}-operator-admission"
        _wait(
            "the operator's CA in the chart's webhook configurations",
            lambda: (
                not admission_on
                or all(
                    w.client_config.ca_bundle
                    for c in (
                        admission.read_validating_webhook_configuration(hooks),
                        admission.read_mutating_webhook_configuration(hooks),
                    )
                    for w in c.webhooks
                )
            ),
            60,
            log,
        )
        # Its own namespace: the source keyring Secret.
        _wait(
            "the keyring Secret",
            lambda: core.read_namespaced_secret("ml-defender-keyring", namespace),
            60,
            log,
        )

        sample = yaml.safe_load((REPO / "manifests" / "samples" / "sniffer.yaml").read_text())
        custom = client.CustomObjectsApi(k8s_api)
        custom.create_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, component_namespace, contract.PLURAL, sample
        )
        name = sample["metadata"]["name"]
        # A component namespace: the keyring copy, the status, the Events.
        _wait(
            "the keyring copy in the component namespace",
            lambda: core.read_namespaced_secret("ml-defender-keyring", component_namespace),
            60,
            log,
        )
        _wait(
            "status conditions on the DefenderComponent",
            lambda: (
                custom.get_namespaced_custom_object(
                    contract.API_GROUP,
                    contract.API_VERSION,
                    component_namespace,
                    contract.PLURAL,
                    name,
                )
                .get("status", {})
                .get("conditions")
            ),
            60,
            log,
        )
        # A routine create posts no Event (it would be one more API write per component), so
        # ask for one: an unfreeze command is answered with an `Unfrozen` Event.
        custom.patch_namespaced_custom_object(
            contract.API_GROUP,
            contract.API_VERSION,
            component_namespace,
            contract.PLURAL,
            name,
            {"metadata": {"annotations": {contract.UNFREEZE_ANNOTATION: "now"}}},
        )
        _wait(
            "an Event about the DefenderComponent",
            lambda: (
                core.list_namespaced_event(
                    component_namespace, field_selector=f"involvedObject.name={name}"
                ).items
            ),
            60,
            log,
        )
        # A key rotation asked for with the plugin: the operator rewrites the source Secret and
        # its copy (secrets update in both namespaces).
        from defender_cli import main as kubectl_defender

        assert (
            kubectl_defender(
                [
                    "rotate-key",
                    "--operator-namespace",
                    namespace,
                    "--kubeconfig",
                    str(kubeconfig_path),
                ],
                out=io.StringIO(),
                err=io.StringIO(),
            )
            == 0
        )

        def stage(ns: str) -> str | None:
            annotations = core.read_namespaced_secret(
                "ml-defender-keyring", ns
            ).metadata.annotations
            value = (annotations or {}).get(contract.ROTATION_STAGE_ANNOTATION)
            return value if value not in (None, "Idle") else None

        _wait("the rotation to start", lambda: stage(namespace), 60, log)
        copy_keys = _wait(
            "the new key in the component namespace's copy",
            lambda: (
                _key_ids(core, component_namespace)
                if len(_key_ids(core, component_namespace)) > 1
                else None
            ),
            90,
            log,
        )
        assert len(copy_keys) == 2
    finally:
        # The operator's finalizer stays on the DefenderComponent once the operator is gone, and
        # would keep the namespace terminating forever: delete it while the operator runs.
        _delete_component(client.CustomObjectsApi(k8s_api), component_namespace, log)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text()
    # A 403 as its own token, looked for after the line's timestamp: key fingerprints are hex
    # and may contain the digits "403", and so may a timestamp's milliseconds (",403").
    stamp = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[,.]\d+)?")
    refused = re.compile(r"(?<![0-9a-fA-F])403(?![0-9a-fA-F])|forbidden", re.IGNORECASE)
    forbidden = [ln for ln in text.splitlines() if refused.search(stamp.sub("", ln))]
    assert not forbidden, "the chart's RBAC refused the operator:\n" + "\n".join(forbidden[:10])
