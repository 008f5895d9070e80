"""Helpers shared by the chart tests (unit and e2e): run helm, render the chart, find objects."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


def render_notes(helm: Path, out: Path, *args: str, release: str = "rel") -> str:
    """The chart's NOTES.txt as `helm install` would print it, without a cluster.

    `helm template` leaves NOTES out, and `helm install --dry-run` needs an API server. Every
    file of a chart is a named template, so a copy of the chart gets one more template that
    includes NOTES.txt into a ConfigMap, and `helm template --show-only` renders just that.
    """
    chart = out / "notes-chart"
    shutil.copytree(CHART, chart)
    name = yaml.safe_load((CHART / "Chart.yaml").read_text())["name"]
    (chart / "templates" / "notes-probe.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-probe\ndata:\n"
        f'  notes: {{{{ include "{name}/templates/NOTES.txt" . | toJson }}}}\n'
    )
    objects = render_chart(
        helm, "--show-only", "templates/notes-probe.yaml", *args, chart=chart, release=release
    )
    return str(find(objects, "ConfigMap", "notes-probe")["data"]["notes"])


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


@contextlib.contextmanager
def secrets_api(secrets: list[dict[str, Any]], out: Path) -> Iterator[Path]:
    """A kubeconfig (written under `out`) for an API server that only knows `secrets`.

    `helm template --dry-run=server --kubeconfig <it>` then renders with Helm's `lookup` reading
    these Secrets, as `helm upgrade` or a reinstall reads the live ones: what the chart reuses
    is checked without a cluster. Only GETs of v1 Secrets are answered; anything else is 404.
    """
    by_ref = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in secrets}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].strip("/").split("/")
            body: dict[str, Any]
            if path == ["api", "v1"]:
                # Discovery: lookup maps apiVersion/kind to a resource with it.
                body = {
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": "v1",
                    "resources": [
                        {
                            "name": "secrets",
                            "singularName": "secret",
                            "namespaced": True,
                            "kind": "Secret",
                            "verbs": ["get"],
                        }
                    ],
                }
                found = True
            elif (
                len(path) == 6 and path[:3] == ["api", "v1", "namespaces"] and path[4] == "secrets"
            ):
                body = by_ref.get((path[3], path[5]), {})
                found = bool(body)
            else:
                found = False
            if not found:
                body = {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": "NotFound",
                    "code": 404,
                }
            raw = json.dumps(body).encode()
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request on stderr would bury a failing test's output

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    out.mkdir(parents=True, exist_ok=True)
    kubeconfig = out / "kubeconfig"
    port = server.server_address[1]
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "fake", "user": {}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                "current-context": "fake",
            }
        )
    )
    try:
        yield kubeconfig
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def render_with_live(
    render: Render, live: list[dict[str, Any]], out: Path, *args: str
) -> list[dict[str, Any]]:
    """The chart as `helm upgrade`/a reinstall renders it when `live` Secrets exist."""
    with secrets_api(live, out) as kubeconfig:
        return render("--dry-run=server", "--kubeconfig", str(kubeconfig), *args)
