"""Chart end-to-end tests on the real local control plane (kube-apiserver, controller-manager,
scheduler from `make tools`). There is no kubelet: pods are created and stay Pending, which is
enough to prove every object is accepted and wired (selectors, PVCs, RBAC)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from defender_devcluster import ToolNotFoundError, tool
from defender_devcluster.pytest_plugin import missing_tool

# The chart helpers (render, run helm) live with the chart unit tests; one copy for both.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "packaging"))

from packaging_chart import HelmFailed, run_helm

Kubectl = Callable[..., subprocess.CompletedProcess[str]]
Helm = Callable[..., str]


def _tool(name: str) -> Path:
    try:
        return tool(name)
    except ToolNotFoundError as exc:
        missing_tool(exc)


@pytest.fixture(scope="session")
def kubectl(kubeconfig_path: Path) -> Kubectl:
    """kubectl(*args, input=None, check=True) against the local cluster."""
    binary = _tool("kubectl")

    def _run(
        *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(binary), "--kubeconfig", str(kubeconfig_path), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    return _run


@pytest.fixture(scope="session")
def helm(kubeconfig_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """helm(*args) against the local cluster; raises HelmFailed with helm's stderr."""
    binary = _tool("helm")
    home = tmp_path_factory.mktemp("helm-home")

    def _run(*args: str) -> str:
        # A private helm home: no repositories or plugins from the machine leak in.
        env_args = (
            "--kubeconfig",
            str(kubeconfig_path),
            "--repository-config",
            str(home / "repositories.yaml"),
            "--repository-cache",
            str(home / "cache"),
        )
        return run_helm(binary, *args, *env_args)

    return _run


@pytest.fixture
def release(helm: Helm, namespace: str) -> Iterator[str]:
    """A release name unique to the test; uninstalled afterwards (the namespace goes anyway,
    but the ClusterRoles and bindings are cluster-scoped)."""
    name = f"mld-{uuid.uuid4().hex[:6]}"
    yield name
    try:
        helm("uninstall", name, "--namespace", namespace, "--wait", "--timeout", "60s")
    except HelmFailed as exc:
        if "not found" not in str(exc):
            raise
