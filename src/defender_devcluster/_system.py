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
from ._procs import ManagedProcess, stop_pid
from ._tools import REPO_ROOT, tool

log = logging.getLogger(__name__)

OPERATOR_MODULE = "defender_operator"
RUN_DIR_ENV = "DEFENDER_DEVCLUSTER_RUN_DIR"
# The operator must survive this long after start to count as started.
_OPERATOR_SETTLE_SECONDS = 5.0


class KubectlError(DevClusterError):
    """kubectl exited non-zero; the message carries its stderr."""


def kubectl(kubeconfig: Path, *args: str, timeout: float = 120.0) -> str:
    argv = [str(tool("kubectl")), f"--kubeconfig={kubeconfig}", *args]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
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
    kubectl(kubeconfig, "wait", "--for=condition=Established", "--timeout=60s", "-f", str(crds_dir))
    return files


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


def operator_env(state: ClusterState) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "KUBECONFIG": state.kubeconfig,
            "DEFENDER_ETCD__ENDPOINTS": json.dumps(state.etcd_endpoints),
            RUN_DIR_ENV: state.run_dir,
        }
    )
    return env


def start_operator(state: ClusterState, module: str = OPERATOR_MODULE) -> ProcessRecord:
    """Run ``python -m <module>`` detached, logging to run_dir/operator/operator.log."""
    run_dir = Path(state.run_dir)
    proc = ManagedProcess(
        "operator",
        [sys.executable, "-m", module],
        run_dir / "operator",
        marker=f"{RUN_DIR_ENV}={state.run_dir}",
        env=operator_env(state),
    )
    proc.start()
    deadline = time.monotonic() + _OPERATOR_SETTLE_SECONDS
    while time.monotonic() < deadline:
        if not proc.running():
            raise ProcessStartError(
                "operator", proc.log_path, f"exited with code {proc.exit_code()}", proc.tail(30)
            )
        time.sleep(0.2)
    assert proc.pid is not None
    return ProcessRecord(name="operator", pid=proc.pid, marker=proc.marker, log=str(proc.log_path))


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
    """CRDs, operator, samples against a running local cluster; lines for the user go to ``out``."""
    state = ClusterState.read(run_dir)
    kubeconfig = Path(state.kubeconfig)
    crds = apply_crds(kubeconfig, crds_dir)
    out.append(f"CRDs applied: {', '.join(p.name for p in crds) or 'none found in crds/'}")
    if any(r.name == "operator" for r in state.processes):
        stop_operator(state)
        state.processes = [r for r in state.processes if r.name != "operator"]
    if operator_available(operator_module):
        rec = start_operator(state, operator_module)
        # First in the list: system-down and down stop it before the cluster it talks to.
        state.processes.insert(0, rec)
        state.write(Path(state.run_dir))
        out.append(f"operator running, pid {rec.pid}, log {rec.log}")
    else:
        out.append(f"operator not started: module {operator_module}.__main__ is not importable yet")
    samples = apply_samples(kubeconfig, samples_dir)
    out.append(f"samples applied: {', '.join(p.name for p in samples) or 'none'}")
    return state
