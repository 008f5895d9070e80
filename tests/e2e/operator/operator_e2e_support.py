"""Helpers for the operator end-to-end tests (imported by conftest and tests).

The operator end to end: the real local control plane, the real 3-member defender etcd, the
operator as a subprocess (`python -m defender_operator`), kubectl from the built tools.

Pods never run (no kubelet): tests play the component instances themselves, writing heartbeats
with the library's Heartbeater under the pod names their Deployments created.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client as k8s

from defender_config import (
    ConfigStore,
    DefenderClient,
    Heartbeater,
    Keyring,
    LibrarySettings,
    Registry,
    contract,
)
from defender_devcluster import EtcdCluster, key_forms, popen_dying_with_parent, tools_bin
from defender_devcluster import wait_for as shared_wait_for

REPO = Path(__file__).resolve().parents[3]
SAMPLES = REPO / "manifests" / "samples"
CRD = REPO / "crds" / "defendercomponents.yaml"
SECRET = "ml-defender-keyring"
T = TypeVar("T")
# The sniffer sample's pods, and a heartbeat/restart spec fast enough for tests: a silent pod
# is restarted 3 s after its last heartbeat (5 s after it was created).
SNIFFER_LABELS = {"app.kubernetes.io/name": "sniffer"}
FAST_RESTARTS = {
    "heartbeat": {"intervalSeconds": 1, "missedBeforeRestart": 3, "startupGraceSeconds": 5},
    "restartBudget": {"maxRestarts": 3, "windowSeconds": 600, "backoffBaseSeconds": 1},
}


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 60.0, every: float = 0.5) -> T:
    """The shared wait with this suite's defaults: ``fn`` reads an operator and API objects that
    are still appearing, so any error it raises means "not yet" (the last one is in the failure)."""
    return shared_wait_for(what, fn, timeout, every, ignore=(Exception,))


def metric(metrics_port: int, line_prefix: str) -> float:
    """One sample of the operator's metrics (0 when absent), by its exact name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(line_prefix + " "):
                return float(line.split()[-1])
    return 0.0


def kubectl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(tools_bin() / "kubectl"), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# What the end-to-end tests change from the operator's defaults (no metrics server; intervals
# of 1 s, so a test waits seconds, not minutes; text logs). A benchmark puts the defaults back
# (bench_operator.operator_defaults).
E2E_SETTINGS = {
    "DEFENDER_OPERATOR_METRICS_PORT": "0",
    "DEFENDER_OPERATOR_MONITOR_INTERVAL_SECONDS": "1",
    "DEFENDER_OPERATOR_ETCD_HEALTH_INTERVAL_SECONDS": "1",
    "DEFENDER_OPERATOR_ROTATION_INTERVAL_SECONDS": "1",
    "DEFENDER_OPERATOR_LOG_FORMAT": "text",
}


@dataclass
class OperatorRun:
    namespace: str  # where the components live
    operator_namespace: str  # where the source keyring Secret lives
    prefix: str
    etcd: EtcdCluster
    api: k8s.ApiClient
    log_path: Path
    liveness_port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    heartbeaters: list[Heartbeater] = field(default_factory=list)
    clients: list[DefenderClient] = field(default_factory=list)
    # Real defender-agent processes and the component processes beside them.
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)
    components: list[subprocess.Popen[bytes]] = field(default_factory=list)

    # --- kubernetes helpers -------------------------------------------------------------------

    @property
    def custom(self) -> k8s.CustomObjectsApi:
        return k8s.CustomObjectsApi(self.api)

    @property
    def core(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self.api)

    def get(self, name: str) -> dict[str, Any]:
        obj: Any = self.custom.get_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, self.namespace, contract.PLURAL, name
        )
        return dict(obj)

    def patch(self, name: str, body: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, self.namespace, contract.PLURAL, name, body
        )

    def wait_active_version(self, name: str, version: int, timeout: float = 60.0) -> None:
        """Wait until the operator reports ``version`` as ``name``'s ``status.activeVersion``."""
        wait_for(
            f"{name} status.activeVersion {version}",
            lambda: self.get(name).get("status", {}).get("activeVersion") == version,
            timeout,
        )

    def condition(self, name: str, ctype: str) -> dict[str, Any] | None:
        for c in self.get(name).get("status", {}).get("conditions", []):
            if c["type"] == ctype:
                return dict(c)
        return None

    def wait_condition(
        self,
        name: str,
        ctype: str,
        *,
        status: str | None = None,
        reason: str | tuple[str, ...] | None = None,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Wait until ``name`` has condition ``ctype`` with this status and (one of) this reason;
        returns the condition."""
        reasons = (reason,) if isinstance(reason, str) else reason

        def matching() -> dict[str, Any] | None:
            c = self.condition(name, ctype)
            if c is None or (status is not None and c["status"] != status):
                return None
            return c if reasons is None or c["reason"] in reasons else None

        wanted = [f"status {status}"] if status else []
        wanted += [f"reason {' or '.join(reasons)}"] if reasons else []
        return wait_for(f"{name} {ctype} with {' and '.join(wanted)}", matching, timeout)

    def events(self, name: str) -> list[Any]:
        found = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        )
        return list(found.items)

    def event_reasons(self, name: str) -> set[str]:
        return {e.reason for e in self.events(name)}

    def wait_event(self, name: str, reason: str, timeout: float = 60.0) -> None:
        """Wait for an Event ``reason`` on ``name``. kopf posts Events from a queue of its own,
        so one may arrive after the status or etcd change it accompanies: never assert on an
        Event without waiting for it."""
        wait_for(f"{reason} event on {name}", lambda: reason in self.event_reasons(name), timeout)

    def apply_sample(self, sample: str, **spec_overrides: Any) -> dict[str, Any]:
        doc = yaml.safe_load((SAMPLES / f"{sample}.yaml").read_text())
        doc["spec"].update(spec_overrides)
        self.custom.create_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, self.namespace, contract.PLURAL, doc
        )
        return dict(doc)

    def deployment(
        self, name: str, labels: dict[str, str], replicas: int = 1, namespace: str | None = None
    ) -> None:
        """A Deployment whose pods never run (no kubelet), in ``namespace`` (default: ours)."""
        apps = k8s.AppsV1Api(self.api)
        body = k8s.V1Deployment(
            metadata=k8s.V1ObjectMeta(name=name),
            spec=k8s.V1DeploymentSpec(
                replicas=replicas,
                selector=k8s.V1LabelSelector(match_labels=labels),
                template=k8s.V1PodTemplateSpec(
                    metadata=k8s.V1ObjectMeta(labels=labels),
                    spec=k8s.V1PodSpec(
                        containers=[k8s.V1Container(name="c", image="registry.invalid/none:0")]
                    ),
                ),
            ),
        )
        apps.create_namespaced_deployment(namespace or self.namespace, body)

    def pods(self, labels: dict[str, str]) -> list[Any]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        found = self.core.list_namespaced_pod(self.namespace, label_selector=selector)
        return [p for p in found.items if p.metadata.deletion_timestamp is None]

    # --- etcd / library helpers ---------------------------------------------------------------

    def library_settings(self) -> LibrarySettings:
        return LibrarySettings(etcd={"endpoints": self.etcd.endpoints}, prefix=self.prefix)

    def keyring_copy(self) -> Keyring:
        secret: Any = self.core.read_namespaced_secret(SECRET, self.namespace)
        return Keyring.from_secret_data(dict(secret.data))

    def operator_keyring(self) -> Keyring:
        """The operator's source keyring (in its own namespace), once the operator made it:
        usable before any component namespace has a copy."""
        return wait_for(
            "the operator's keyring Secret",
            lambda: Keyring.from_secret_data(
                dict(self.core.read_namespaced_secret(SECRET, self.operator_namespace).data)
            ),
        )

    def client(self, keyring: Any = None) -> DefenderClient:
        c = DefenderClient(
            self.library_settings(), keyring if keyring is not None else self.keyring_copy()
        )
        self.clients.append(c)
        return c

    def configs(self) -> ConfigStore:
        return ConfigStore(self.client())

    def heartbeat(
        self, component: str, pod: str, client: DefenderClient | None = None, **fields: Any
    ) -> Heartbeater:
        c = client or self.client()
        hb = Heartbeater(
            c, component, pod, interval_seconds=1.0, allowed_misses=3, pod=pod, **fields
        )
        hb.start()
        hb.set_status("RUNNING")
        self.heartbeaters.append(hb)
        return hb

    def registry(self) -> Registry:
        return Registry(self.client())

    # --- real agents and components -----------------------------------------------------------

    @property
    def workdir(self) -> Path:
        return self.log_path.parent

    def start_agent(self, component: str, pod: str, *args: str) -> subprocess.Popen[bytes]:
        """A real `defender-agent` for `pod` (its instance name), with the namespace's keyring
        copy mounted as a directory, like the chart's sidecar. Pods never run here: the agent
        runs on this machine in the pod's name."""
        keyring_dir = self.workdir / "keyring"
        keyring_dir.mkdir(exist_ok=True)
        # Every file of the Secret, as a volume mount holds them (keyring.json, and
        # registrations.json once the operator published one).
        secret: Any = self.core.read_namespaced_secret(SECRET, self.namespace)
        for key, value in (secret.data or {}).items():
            (keyring_dir / key).write_bytes(base64.b64decode(value))
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEFENDER_")}
        env.update(POD_NAME=pod, NODE_NAME="node-e2e")
        log = (self.workdir / f"agent-{pod}.log").open("ab")
        proc = popen_dying_with_parent(
            [
                sys.executable,
                "-m",
                "defender_agent",
                "--component",
                component,
                "--output-path",
                str(self.workdir / f"{pod}.json"),
                "--etcd-endpoints",
                ",".join(self.etcd.endpoints),
                "--prefix",
                self.prefix,
                "--keyring-path",
                str(keyring_dir),
                "--reload-method",
                "none",
                *args,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.agents.append(proc)
        return proc

    def agent_log(self, pod: str) -> str:
        path = self.workdir / f"agent-{pod}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_component(self, name: str, script: str, *args: str) -> subprocess.Popen[bytes]:
        """A stand-in for a C++ component: a Python `script` whose process name is `name`, so
        the agent's process check finds it under /proc as it would find `sniffer`."""
        proc = subprocess.Popen(
            [name, "-c", script, *args], executable=sys.executable, start_new_session=True
        )
        self.components.append(proc)
        return proc

    def instance_record(self, component: str, pod: str) -> dict[str, Any] | None:
        client = self.clients[0] if self.clients else self.client()
        got = client.get_json(client.layout.instance(component, pod))
        return dict(got[0]) if got is not None else None

    # --- the operator process -----------------------------------------------------------------

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        full = {
            **os.environ,
            "DEFENDER_ETCD__ENDPOINTS": ",".join(self.etcd.endpoints),
            "DEFENDER_PREFIX": self.prefix,
            "DEFENDER_OPERATOR_NAMESPACE": self.operator_namespace,
            **E2E_SETTINGS,
            **env,
        }
        log = self.log_path.open("ab")
        proc = popen_dying_with_parent(
            [
                sys.executable,
                "-m",
                "defender_operator",
                "-n",
                self.namespace,
                "--liveness",
                f"http://127.0.0.1:{self.liveness_port if not self.procs else free_port()}/healthz",
                *args,
            ],
            env=full,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        """Stop one operator process (default: all of them)."""
        for p in [proc] if proc is not None else list(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
            self.procs.remove(p)

    def log_tail(self, lines: int = 80) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        for proc in [*self.agents, *self.components]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)  # a stopped process ignores SIGTERM
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        for hb in self.heartbeaters:
            # etcd may be partly down in a failing test; keep cleaning up.
            with contextlib.suppress(Exception):
                hb.stop()
        self.stop()
        for c in self.clients:
            c.close()


def new_operator_run(
    api: k8s.ApiClient, etcd: EtcdCluster, namespace: str, log_path: Path, prefix_stem: str
) -> OperatorRun:
    """A not yet started operator for the components in ``namespace``, on an operator namespace
    ``op-<hex>`` created here (the caller deletes it), an etcd prefix ``/<prefix_stem>-<hex>``
    of its own and a free liveness port."""
    core = k8s.CoreV1Api(api)
    op_ns = f"op-{uuid.uuid4().hex[:8]}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=op_ns)))
    wait_for(
        f"serviceaccount default in {op_ns}",
        lambda: core.read_namespaced_service_account("default", op_ns),
        timeout=60,
    )
    return OperatorRun(
        namespace=namespace,
        operator_namespace=op_ns,
        prefix=f"/{prefix_stem}-{uuid.uuid4().hex[:8]}",
        etcd=etcd,
        api=api,
        log_path=log_path,
        liveness_port=free_port(),
    )


def close_operator_run(run: OperatorRun, *, failed: bool) -> None:
    """Stop what `run` started, show its log when the test failed, let its resources go (the
    finalizers first, so the namespace can go even with no operator left) and delete its
    operator namespace."""
    run.close()
    if failed:
        sys.stderr.write(f"\n--- operator log ({run.log_path}) ---\n{run.log_tail()}\n")
    try:
        for item in run.custom.list_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, run.namespace, contract.PLURAL
        )["items"]:
            run.patch(item["metadata"]["name"], {"metadata": {"finalizers": None}})
    except k8s.ApiException:
        pass
    run.core.delete_namespace(run.operator_namespace)


def b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def custom_component(
    name: str, config: Any, *, app: str | None = None, **spec: Any
) -> dict[str, Any]:
    """A custom-type DefenderComponent named `name` taking any JSON object, whose selector
    matches pods labelled app.kubernetes.io/name=`app` (default: `name`)."""
    return {
        "apiVersion": contract.GROUP_VERSION,
        "kind": contract.KIND,
        "metadata": {"name": name},
        "spec": {
            "componentType": "custom",
            "selector": {"matchLabels": {"app.kubernetes.io/name": app or name}},
            "customSchema": {"type": "object"},
            "config": config,
            **spec,
        },
    }


@contextlib.contextmanager
def extra_namespace(run: OperatorRun, prefix: str) -> Iterator[str]:
    """A namespace of its own for the test (the operator watches it when started with ``-n``
    of it), deleted afterwards with its DefenderComponents' finalizers dropped: the operator
    may be stopped by then, and a finalizer left would hold the namespace forever."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    run.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        try:
            listed: Any = run.custom.list_namespaced_custom_object(
                contract.API_GROUP, contract.API_VERSION, name, contract.PLURAL
            )
            for item in listed["items"]:
                run.custom.patch_namespaced_custom_object(
                    contract.API_GROUP,
                    contract.API_VERSION,
                    name,
                    contract.PLURAL,
                    item["metadata"]["name"],
                    {"metadata": {"finalizers": None}},
                )
        except k8s.ApiException:
            pass
        run.core.delete_namespace(name)


# --- key material ----------------------------------------------------------------------------


def key_material_shown(run: OperatorRun, keyrings: list[Keyring]) -> list[str]:
    """Where any form of a key of `keyrings` shows (docs/security.md, "What never gets
    logged"): the operator's log, the Events of the component and operator namespaces, the
    DefenderComponents with their status, and every etcd key and value under the run's prefix
    (alert records, heartbeats, metadata, the key record). Empty when nowhere."""
    places: dict[str, bytes] = {"operator log": run.log_path.read_bytes()}
    for ns in (run.namespace, run.operator_namespace):
        events = run.core.list_namespaced_event(ns).items
        places[f"events in {ns}"] = str([e.to_dict() for e in events]).encode()
    components = run.custom.list_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, run.namespace, contract.PLURAL
    )
    places["DefenderComponents"] = str(components).encode()
    store = run.client(keyrings[-1]).store
    for sv in store.list_prefix(run.prefix + "/"):
        places[f"etcd {sv.key}"] = sv.key.encode() + b"\0" + sv.value
    return [
        f"{where}: key {key.key_id} as {form}"
        for where, data in places.items()
        for keyring in keyrings
        for key in keyring.keys
        for form, needle in key_forms(key.material).items()
        if needle in data
    ]
