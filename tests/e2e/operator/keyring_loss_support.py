"""The lost-keyring scenarios of issue #14, shared by the operator e2e tests and the reliability
suite: a deployment with stored values, the keyring Secret deleted while the operator is down,
and what the operator and the plugin must (and must not) do afterwards.

Everything is real: the local kube-apiserver, the 3-member defender etcd, the operator as a
subprocess, the plugin in-process (`defender_cli.main`).
"""

from __future__ import annotations

import io
import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from operator_e2e_support import SECRET, OperatorRun, wait_for

from defender_cli import main
from defender_config import Envelope, EnvelopeError, Keyring, is_envelope
from defender_config.store import EtcdStore

COMPONENT = "firewall"


@dataclass
class Cli:
    code: int
    out: str
    err: str


def cli(run: OperatorRun, kubeconfig: Path, *args: str) -> Cli:
    """`kubectl defender ...` in-process against this run's API server, etcd and prefix."""
    out, err = io.StringIO(), io.StringIO()
    argv = [
        *args,
        "--kubeconfig",
        str(kubeconfig),
        "--etcd-endpoints",
        ",".join(run.etcd.endpoints),
        "--prefix",
        run.prefix,
        "--operator-namespace",
        run.operator_namespace,
        "--no-color",
    ]
    code = main(argv, out=out, err=err)
    return Cli(code, out.getvalue(), err.getvalue())


def store(run: OperatorRun) -> EtcdStore:
    return EtcdStore(run.library_settings().etcd)


def snapshot(run: OperatorRun) -> dict[str, tuple[int, bytes]]:
    """Every key under the run's prefix: mod revision and value."""
    s = store(run)
    try:
        return {sv.key: (sv.mod_revision, sv.value) for sv in s.list_prefix(run.prefix + "/")}
    finally:
        s.close()


def sealed_values(snap: dict[str, tuple[int, bytes]]) -> dict[str, bytes]:
    return {k: v for k, (_, v) in snap.items() if is_envelope(v)}


def unreadable(run: OperatorRun, keyring: Keyring) -> list[str]:
    """Keys of the sealed values `keyring` cannot open (empty: all readable)."""
    envelope = Envelope(keyring)
    bad = []
    for key, blob in sealed_values(snapshot(run)).items():
        try:
            envelope.open(blob, key)
        except EnvelopeError as exc:
            bad.append(f"{key}: {exc.reason}")
    return bad


def source(run: OperatorRun) -> Any | None:
    try:
        return run.core.read_namespaced_secret(SECRET, run.operator_namespace)
    except k8s.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def source_keyring(run: OperatorRun) -> Keyring | None:
    found = source(run)
    return Keyring.from_secret_data(dict(found.data)) if found is not None else None


def deploy(run: OperatorRun) -> Keyring:
    """Operator up, the firewall sample seeded and committed once more (MASTER, ACTIVE v2 and
    history in etcd), the keyring copy in the component namespace. Returns the keyring."""
    run.start()
    run.apply_sample(COMPONENT)
    run.wait_active_version(COMPONENT, 1)
    config = dict(run.get(COMPONENT)["spec"]["config"])
    config["block_ttl_seconds"] = int(config.get("block_ttl_seconds", 60)) + 1
    run.patch(COMPONENT, {"spec": {"config": config}})
    run.wait_active_version(COMPONENT, 2)
    keyring = wait_for("the keyring copy", run.keyring_copy)
    assert source_keyring(run) == keyring
    assert len(sealed_values(snapshot(run))) >= 3  # MASTER, ACTIVE, history
    return keyring


def delete_source(run: OperatorRun) -> None:
    run.core.delete_namespaced_secret(SECRET, run.operator_namespace)
    wait_for("the source Secret gone", lambda: source(run) is None, timeout=30)


def delete_copy(run: OperatorRun) -> None:
    run.core.delete_namespaced_secret(SECRET, run.namespace)


def copy_exists(run: OperatorRun) -> bool:
    try:
        run.core.read_namespaced_secret(SECRET, run.namespace)
    except k8s.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def liveness_ok(run: OperatorRun) -> bool:
    url = f"http://127.0.0.1:{run.liveness_port}/healthz"
    with urllib.request.urlopen(url, timeout=5) as response:
        return int(response.status) == 200


def events_with(run: OperatorRun, reason: str) -> list[str]:
    return [e.message or "" for e in run.events(COMPONENT) if e.reason == reason]


def wait_restored(run: OperatorRun, keyring: Keyring) -> Any:
    """Wait for the source Secret to be back with exactly `keyring`; returns the Secret."""

    def back() -> Any | None:
        found = source(run)
        if found is None:
            return None
        assert Keyring.from_secret_data(dict(found.data)) == keyring, "a different keyring"
        return found

    return wait_for("the source Secret restored", back, timeout=90)


def export_file(run: OperatorRun, kubeconfig: Path, path: Path, passphrase: Path | None) -> Cli:
    args = ["keyring", "export", "-f", str(path), "-o", "json"]
    if passphrase is not None:
        args += ["--passphrase-file", str(passphrase)]
    return cli(run, kubeconfig, *args)


def listed_keys(result: Cli) -> list[dict[str, Any]]:
    return list(json.loads(result.out)["keys"])
