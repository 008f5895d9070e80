"""Helpers shared by the chart tests (unit and e2e): run helm, render the chart, find objects."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "ml-defender"
TOOLS_ENV = REPO / "hack" / "tools.env"
# The last commit of the chart before etcd was locked down by default: the chart an existing
# (plain) install was made with, for the upgrade tests.
PLAIN_CHART_COMMIT = "9398a48"
KEEP_PLAIN_VALUES = CHART / "examples" / "upgrade-keep-plain.yaml"


def kube_version() -> str:
    # The pinned Kubernetes version: a helm built from Go modules defaults its Capabilities to an
    # old version, which the chart's kubeVersion constraint refuses.
    for line in TOOLS_ENV.read_text().splitlines():
        if line.startswith("KUBERNETES_VERSION="):
            return line.split("=", 1)[1].strip().lstrip("v")
    raise AssertionError(f"KUBERNETES_VERSION missing from {TOOLS_ENV}")


class HelmFailed(Exception):
    """helm exited non-zero; the message holds its stderr."""


Render = Callable[..., list[dict[str, Any]]]


def run_helm(helm: Path, *args: str) -> str:
    proc = subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise HelmFailed(proc.stderr.strip() or proc.stdout.strip())
    return proc.stdout


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def render_chart(
    helm: Path,
    *args: str,
    chart: Path = CHART,
    namespace: str = "ml-defender",
    release: str = "rel",
) -> list[dict[str, Any]]:
    """`helm template` with the pinned Kubernetes version; the objects, without empty documents."""
    out = run_helm(
        helm,
        "template",
        release,
        str(chart),
        "--namespace",
        namespace,
        "--kube-version",
        kube_version(),
        *args,
    )
    return [doc for doc in yaml.safe_load_all(out) if doc]


def chart_at(commit: str, out: Path) -> Path:
    """charts/ml-defender as it was at `commit` (from the repository's history), under `out`."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "charts/ml-defender"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert archive.returncode == 0, (
        f"git archive {commit} failed (a shallow clone? fetch the history): "
        + archive.stderr.decode()
    )
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True, timeout=60)
    return out / "charts" / "ml-defender"
