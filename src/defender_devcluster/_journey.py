"""`make up NODE=1`: the chart on the node, the sample DefenderComponents, and one workload per
sample (the stand-in as the component, the defender-agent sidecar rendered by the chart's own
agent helper through charts/ml-defender/examples/agent-sidecar).

Shared by `system-up` on a node cluster and tests/node/test_node_journey.py, so the test checks
exactly what a person gets.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._errors import DevClusterError
from ._system import KubectlError, ensure_namespace, kubectl
from ._tools import REPO_ROOT, tool
from ._wait import poll

CHART = REPO_ROOT / "charts" / "ml-defender"
WORKLOAD_CHART = CHART / "examples" / "agent-sidecar"
SAMPLES_DIR = REPO_ROOT / "manifests" / "samples"
RELEASE = "ml-defender"
NAMESPACE = "ml-defender"
SAMPLES_NAMESPACE = "defender-samples"
# name -> componentType of manifests/samples/ (each sample is named for its type).
SAMPLE_COMPONENTS: Mapping[str, str] = {
    "sniffer": "sniffer",
    "ml-detector": "ml-detector",
    "firewall": "firewall",
    "rag": "rag",
}
# Where the agent helper mounts the shared volume (chart value agent.sharedMountPath).
SHARED_PATH = "/var/run/ml-defender/config"
# The stand-in's process name, which the agent signals on a new config.
STAND_IN_PROCESS = "stand-in"
# Fresh: within the samples' lease (3 heartbeats of 30 s) of now.
FRESH_HEARTBEAT_SECONDS = 90.0
# What the operator's mutating webhook seals a spec.config's author with
# (defender_config.contract; the harness never imports the library it tests).
STAMP_SEAL_ANNOTATION = "mldefender.io/last-modified-by-seal"
# Asked of the API server in a server-side dry run only: never stored. A name no sample has,
# so the webhook sees a create and stamps it whatever the samples' stored annotations are.
ADMISSION_PROBE: Mapping[str, Any] = {
    "apiVersion": "mldefender.io/v1alpha1",
    "kind": "DefenderComponent",
    "metadata": {"name": "journey-admission-probe"},
    "spec": {
        "componentType": "sniffer",
        "selector": {"matchLabels": {"app.kubernetes.io/name": "journey-admission-probe"}},
        "config": {"node_id": "journey-admission-probe", "version": "0.0.0", "interface": "eth0"},
    },
}


class HelmError(DevClusterError):
    """helm exited non-zero; the message carries its stderr."""


def helm(kubeconfig: Path, *args: str, timeout: float = 600.0) -> str:
    argv = [str(tool("helm")), f"--kubeconfig={kubeconfig}", *args]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise HelmError(f"helm {' '.join(args)} timed out after {timeout:.0f}s") from exc
    if out.returncode != 0:
        raise HelmError(f"helm {' '.join(args)} exited {out.returncode}: {out.stderr.strip()}")
    return out.stdout


def chart_args(components: Mapping[str, str], namespace: str) -> list[str]:
    """`helm install` arguments giving every component's agents an etcd user in ``namespace``."""
    args: list[str] = []
    for i, name in enumerate(components):
        args += [
            "--set", f"agent.components[{i}].name={name}",
            "--set", f"agent.components[{i}].namespace={namespace}",
        ]  # fmt: skip
    return args


def workload_args(component: str, component_type: str, image: str) -> list[str]:
    """`helm install` arguments of the example agent-sidecar chart running the stand-in."""
    config = f"{SHARED_PATH}/{component}.json"
    return [
        "--set", f"component={component}",
        "--set", f"componentType={component_type}",
        "--set", "replicaCount=1",
        "--set", f"componentImage={image}",
        "--set-json", f"componentArgs={json.dumps([config])}",
        "--set", f"componentProcess={STAND_IN_PROCESS}",
    ]  # fmt: skip


def stamped(dfc: Mapping[str, Any]) -> bool:
    """The object went through the operator's mutating webhook (it carries the seal)."""
    annotations = (dfc.get("metadata") or {}).get("annotations") or {}
    return STAMP_SEAL_ANNOTATION in annotations


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def component_ready(
    dfc: Mapping[str, Any], now: datetime, max_age: float = FRESH_HEARTBEAT_SECONDS
) -> bool:
    """Ready True, every expected instance alive (1/1), a heartbeat at most ``max_age`` old."""
    status = dfc.get("status") or {}
    ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    if not ready or ready[0].get("status") != "True":
        return False
    if status.get("instanceSummary") != "1/1":
        return False
    beat = status.get("lastHeartbeatTime")
    return bool(beat) and (now - _parse_time(str(beat))).total_seconds() <= max_age


@dataclass
class Journey:
    """The releases and objects of one journey on a node cluster."""

    kubeconfig: Path
    stand_in_image: str
    components: Mapping[str, str] = field(default_factory=lambda: dict(SAMPLE_COMPONENTS))
    namespace: str = SAMPLES_NAMESPACE
    samples_dir: Path = SAMPLES_DIR

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 120.0) -> str:
        return kubectl(self.kubeconfig, *args, stdin=stdin, timeout=timeout)

    def install(self) -> list[str]:
        """The chart, the samples and the workloads; lines for the user."""
        # The chart writes the agents' Secrets into this namespace: it must exist first.
        ensure_namespace(self.kubeconfig, self.namespace)
        helm(
            self.kubeconfig,
            "upgrade", "--install", RELEASE, str(CHART),
            "--namespace", NAMESPACE, "--create-namespace",
            *chart_args(self.components, self.namespace),
        )  # fmt: skip
        lines = [f"chart {CHART.name} installed: release {RELEASE} in namespace {NAMESPACE}"]
        self.wait_admission()
        self.kubectl("-n", self.namespace, "apply", "-f", str(self.samples_dir))
        lines.append(f"samples applied in namespace {self.namespace}: {', '.join(self.components)}")
        for name, ctype in self.components.items():
            helm(
                self.kubeconfig,
                "upgrade", "--install", name, str(WORKLOAD_CHART),
                "--namespace", self.namespace,
                *workload_args(name, ctype, self.stand_in_image),
            )  # fmt: skip
        lines.append(
            f"workloads installed ({WORKLOAD_CHART.name} chart, stand-in + defender-agent): "
            + ", ".join(self.components)
        )
        return lines

    def wait_admission(self, timeout: float = 600.0) -> None:
        """Until the operator's admission webhook answers, as docs/install.md waits for the
        operator before `kubectl apply` of the samples. Applied before (failurePolicy Ignore),
        every sample was admitted unchecked: a ModifierUnverified Warning on each and
        `unattributed` as the author of its version 1 (docs/security.md)."""

        def answered() -> bool:
            out = self.kubectl(
                "-n", self.namespace, "create", "--dry-run=server", "-o", "json", "-f", "-",
                stdin=json.dumps(ADMISSION_PROBE),
            )  # fmt: skip
            return stamped(json.loads(out))

        # KubectlError: the CRD not served yet, or the webhook refusing while it starts.
        done, last = poll(answered, timeout, 2.0, ignore=(KubectlError,))
        if done is None:
            pods = self.kubectl("-n", NAMESPACE, "get", "pods", "-o", "wide")
            raise JourneyNotReady(
                f"the operator's admission webhook did not answer within {timeout:.0f}s"
                f" (last: {last or 'admitted without it'})\n{pods}"
            )

    def components_json(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = json.loads(
            self.kubectl("-n", self.namespace, "get", "dfc", "-o", "json")
        )["items"]
        return items

    def summary(self) -> str:
        return self.kubectl("-n", self.namespace, "get", "dfc", "-o", "wide")

    def wait_ready(
        self,
        timeout: float = 600.0,
        names: list[str] | None = None,
        also: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        """Until every component (or ``names``) is Ready 1/1 with a fresh heartbeat (and
        ``also`` holds for it); a JourneyNotReady with `kubectl get dfc` and the pods if not."""
        wanted = set(names if names is not None else self.components)

        def all_ready() -> bool:
            now = datetime.now(UTC)
            ok = {
                d["metadata"]["name"]
                for d in self.components_json()
                if component_ready(d, now) and (also is None or also(d))
            }
            return wanted <= ok

        done, _ = poll(all_ready, timeout, 2.0)
        if done is None:
            pods = self.kubectl("-n", self.namespace, "get", "pods", "-o", "wide")
            raise JourneyNotReady(
                f"{', '.join(sorted(wanted))} not Ready 1/1 with a fresh heartbeat after "
                f"{timeout:.0f}s\n{self.summary()}\n{pods}"
            )

    def uninstall(self) -> None:
        """Best effort: workloads, components, chart, namespace."""
        for name in self.components:
            _quiet_helm(self.kubeconfig, "uninstall", name, "--namespace", self.namespace)
        for args in (
            ("-n", self.namespace, "delete", "dfc", "--all", "--wait=false"),
            ("delete", "namespace", self.namespace, "--wait=false"),
        ):
            with contextlib.suppress(DevClusterError):
                self.kubectl(*args)
        _quiet_helm(self.kubeconfig, "uninstall", RELEASE, "--namespace", NAMESPACE)


def _quiet_helm(kubeconfig: Path, *args: str) -> None:
    with contextlib.suppress(DevClusterError):
        helm(kubeconfig, *args, "--wait", "--timeout", "120s", timeout=180)


class JourneyNotReady(DevClusterError):
    """The sample components did not all become Ready; the message has their state."""


def try_lines(namespace: str = SAMPLES_NAMESPACE) -> list[str]:
    """What to try next on a node cluster with the journey installed."""
    return [
        f"kubectl get dfc -n {namespace} -o wide",
        f"kubectl -n {namespace} logs deploy/sniffer -c sniffer -f   # the stand-in's config loads",
        f"kubectl -n {namespace} patch dfc sniffer --type=merge "
        """-p '{"spec":{"config":{"version":"1.0.1"}}}'   # a new config version""",
        f"kubectl -n {namespace} delete pod -l app.kubernetes.io/name=firewall   # comes back",
        f"kubectl -n {NAMESPACE} logs deploy/{RELEASE}-operator -c operator   # the operator",
        f"helm test {RELEASE} -n {NAMESPACE}",
    ]
