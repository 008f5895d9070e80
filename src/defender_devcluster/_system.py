"""`make up` beyond the cluster: CRDs, the operator run locally, the samples."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from ._cluster import ClusterState, ProcessRecord
from ._errors import DevClusterError, ProcessStartError
from ._http import http_ok
from ._procs import ManagedProcess, free_ports, stop_pid
from ._tools import REPO_ROOT, tool
from ._wait import poll

log = logging.getLogger(__name__)

OPERATOR_MODULE = "defender_operator"
RUN_DIR_ENV = "DEFENDER_DEVCLUSTER_RUN_DIR"
DEFAULT_OPERATOR_NAMESPACE = "ml-defender"
# kopf answers its liveness probe once start-up handlers are done (keyring Secret created).
_OPERATOR_READY_SECONDS = 90.0


class KubectlError(DevClusterError):
    """kubectl exited non-zero; the message carries its stderr."""


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None, timeout: float = 120.0) -> str:
    argv = [str(tool("kubectl")), f"--kubeconfig={kubeconfig}", *args]
    try:
        out = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise KubectlError(f"kubectl {' '.join(args)} timed out after {timeout:.0f}s") from exc
    if out.returncode != 0:
        raise KubectlError(f"kubectl {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def yaml_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml"))


def apply_crds(kubeconfig: Path, crds_dir: Path) -> list[Path]:
    files = yaml_files(crds_dir)
    if not files:
        return []
    kubectl(kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", str(crds_dir))
    wait_established(kubeconfig, crds_dir)
    return files


def wait_established(kubeconfig: Path, crds_dir: Path, timeout: float = 60.0) -> None:
    """Poll until every CRD in ``crds_dir`` is Established.

    Not `kubectl wait`: on a CRD created a moment ago it fails outright because
    `.status.conditions` is still null.
    """
    pending: list[str] = []

    def established() -> bool:
        doc = json.loads(kubectl(kubeconfig, "get", "-f", str(crds_dir), "-o", "json"))
        items = doc.get("items", [doc]) if doc.get("kind") == "List" else [doc]
        pending[:] = [
            item["metadata"]["name"]
            for item in items
            if not any(
                c.get("type") == "Established" and c.get("status") == "True"
                for c in (item.get("status") or {}).get("conditions") or []
            )
        ]
        return not pending

    done, _ = poll(established, timeout, 0.5)
    if done is None:
        raise KubectlError(f"CRDs not Established after {timeout:.0f}s: {', '.join(pending)}")


def apply_samples(kubeconfig: Path, samples_dir: Path) -> list[Path]:
    files = yaml_files(samples_dir)
    for f in files:
        kubectl(kubeconfig, "apply", "-f", str(f))
    return files


def operator_available(module: str = OPERATOR_MODULE) -> bool:
    try:
        return importlib.util.find_spec(f"{module}.__main__") is not None
    except ModuleNotFoundError:
        return False


def operator_namespace() -> str:
    """The operator's own namespace (where its keyring Secret lives), as the operator reads it."""
    return os.environ.get("DEFENDER_OPERATOR_NAMESPACE", DEFAULT_OPERATOR_NAMESPACE)


def operator_env(state: ClusterState, metrics_port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "KUBECONFIG": state.kubeconfig,
            "DEFENDER_ETCD__ENDPOINTS": json.dumps(state.etcd_endpoints),
            "DEFENDER_OPERATOR_NAMESPACE": operator_namespace(),
            # The operator's fixed default port would clash with a second local run.
            "DEFENDER_OPERATOR_METRICS_PORT": str(metrics_port),
            RUN_DIR_ENV: state.run_dir,
        }
    )
    return env


def ensure_namespace(kubeconfig: Path, name: str) -> None:
    doc = json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    kubectl(kubeconfig, "apply", "-f", "-", stdin=doc)


def start_operator(
    state: ClusterState,
    module: str = OPERATOR_MODULE,
    *,
    ready_timeout: float = _OPERATOR_READY_SECONDS,
) -> ProcessRecord:
    """Run ``python -m <module> --liveness=...`` detached; wait until its liveness answers 200.

    Logs go to run_dir/operator/operator.log. A process that exits while we wait is an error;
    one that runs but never answers is an error too, since `make up` would otherwise print a
    success over an operator that does nothing.
    """
    run_dir = Path(state.run_dir)
    liveness_port, metrics_port = free_ports(2)
    liveness = f"http://127.0.0.1:{liveness_port}/healthz"
    proc = ManagedProcess(
        "operator",
        [sys.executable, "-m", module, f"--liveness={liveness}"],
        run_dir / "operator",
        marker=f"{RUN_DIR_ENV}={state.run_dir}",
        env=operator_env(state, metrics_port),
    )
    proc.start()

    def live() -> bool:
        if http_ok(liveness):
            return True
        if not proc.running():
            raise ProcessStartError(
                "operator", proc.log_path, f"exited with code {proc.exit_code()}", proc.tail(30)
            )
        return False

    done, _ = poll(live, ready_timeout, 0.3)
    if done is None:
        tail = proc.tail(30)
        proc.stop()
        raise ProcessStartError(
            "operator",
            proc.log_path,
            f"{liveness} did not answer 200 within {ready_timeout:.0f}s",
            tail,
        )
    assert proc.pid is not None
    return ProcessRecord(
        name="operator",
        pid=proc.pid,
        marker=proc.marker,
        log=str(proc.log_path),
        health_url=liveness,
    )


def stop_operator(state: ClusterState) -> bool:
    stopped = False
    for rec in state.processes:
        if rec.name == "operator":
            stopped = stop_pid(rec.pid, rec.marker, rec.name) or stopped
    return stopped


def system_up(
    run_dir: Path,
    out: list[str],
    *,
    crds_dir: Path = REPO_ROOT / "crds",
    samples_dir: Path = REPO_ROOT / "manifests" / "samples",
    operator_module: str = OPERATOR_MODULE,
) -> ClusterState:
    """CRDs, operator, samples against a running local cluster; lines for the user go to ``out``.

    On a cluster with a node (`up --node`) the chart runs the operator and etcd in pods instead,
    and every sample gets a workload (_journey.py)."""
    state = ClusterState.read(run_dir)
    kubeconfig = Path(state.kubeconfig)
    if state.node_ip is not None:
        return _node_system_up(state, out)
    crds = apply_crds(kubeconfig, crds_dir)
    out.append(f"CRDs applied: {', '.join(p.name for p in crds) or 'none found in crds/'}")
    if any(r.name == "operator" for r in state.processes):
        stop_operator(state)
        state.processes = [r for r in state.processes if r.name != "operator"]
    if operator_available(operator_module):
        ensure_namespace(kubeconfig, operator_namespace())
        rec = start_operator(state, operator_module)
        # First in the list: system-down and down stop it before the cluster it talks to.
        state.processes.insert(0, rec)
        state.write(Path(state.run_dir))
        out.append(f"operator running, pid {rec.pid}, liveness {rec.health_url}, log {rec.log}")
    else:
        out.append(f"operator not started: module {operator_module}.__main__ is not importable yet")
    samples = apply_samples(kubeconfig, samples_dir)
    out.append(f"samples applied: {', '.join(p.name for p in samples) or 'none'}")
    return state


def _node_system_up(state: ClusterState, out: list[str]) -> ClusterState:
    from ._images import project_version
    from ._journey import Journey

    journey = Journey(Path(state.kubeconfig), f"ghcr.io/ml-defender/stand-in:{project_version()}")
    out.extend(journey.install())
    started = time.monotonic()
    journey.wait_ready()
    out.append(f"every sample component Ready 1/1 after {time.monotonic() - started:.0f}s")
    out.append(journey.summary().rstrip())
    return state
