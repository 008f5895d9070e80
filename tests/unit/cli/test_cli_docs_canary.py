"""The canary section of docs/operator.md shows what the plugin really prints: `status` while a
canary runs (the real rendering of the data `collect_status` returns), and `promote` / `abort`
(the real command path; only the API server's reply is stood in for, as the annotation itself
is tested against the real kube-apiserver in tests/e2e/cli/test_cli_kube_e2e.py)."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cli_status_support import instance, render_sniffer

from defender_cli import main
from defender_cli._commands import rollout_view
from defender_config.contract import ABORT_ANNOTATION, PROMOTE_ANNOTATION

DOC = Path(__file__).resolve().parents[3] / "docs" / "operator.md"
NOW = datetime(2026, 12, 2, 3, 24, 40, tzinfo=UTC)
OLD, NEW = "1" * 64, "2" * 64
PODS = ("sniffer-7c9d8-2xkq4", "sniffer-7c9d8-5mrtw", "sniffer-7c9d8-9hzpl")


def printed(command: str) -> list[str]:
    """The lines the canary section shows under `$ kubectl defender <command>...`."""
    section = DOC.read_text().split('<a id="canary"></a>', 1)[1].split("**The shared key.**")[0]
    lines = section.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"$ kubectl defender {command}"))
    out = []
    for ln in lines[start + 1 :]:
        if ln.startswith(("$ ", "```")):
            break
        out.append(ln)
    return out


def _instance(pod: str, node: str, version: int, digest: str, age: float) -> dict[str, Any]:
    return instance(
        pod, version, digest, NOW, node=node, age=age, software="1.0.0", key="9c1f0e7a5b3d"
    )


def test_status_while_a_canary_runs_is_what_the_docs_show() -> None:
    instances = [
        _instance(PODS[0], "node-1", 2, NEW, 2.0),
        _instance(PODS[1], "node-2", 1, OLD, 4.0),
        _instance(PODS[2], "node-3", 1, OLD, 1.0),
    ]
    record = {
        "version": 2,
        "base_version": 1,
        "digest": NEW,
        "canaries": [PODS[0]],
        "since": (NOW - timedelta(seconds=9)).isoformat(),
        "by": "kubernetes-admin",
    }
    rollout = rollout_view(record, verified=True, active_version=1, instances=instances, now=NOW)
    shown = render_sniffer(instances, rollout, modified_by="kubernetes-admin")
    assert shown.splitlines() == printed("status sniffer")


@pytest.mark.parametrize(
    ("action", "annotation"), [("promote", PROMOTE_ANNOTATION), ("abort", ABORT_ANNOTATION)]
)
def test_promote_and_abort_print_what_the_docs_show(
    action: str, annotation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubernetes.client import CustomObjectsApi

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
    )
    patched: list[tuple[Any, ...]] = []

    def patch(self: Any, *args: Any, _preload_content: bool = True) -> Any:
        patched.append(args)
        # The plugin asks for the raw answer (it does not decode the patched object) and closes it.
        return SimpleNamespace(close=lambda: None)

    monkeypatch.setattr(CustomObjectsApi, "patch_namespaced_custom_object", patch)
    out, err = io.StringIO(), io.StringIO()
    argv = [action, "sniffer", "-n", "default", "--kubeconfig", str(kubeconfig), "--no-color"]
    assert main(argv, out=out, err=err) == 0, err.getvalue()
    ((group, version, namespace, plural, name, body),) = patched
    assert (group, version) == ("mldefender.io", "v1alpha1")
    assert (namespace, plural, name) == ("default", "defendercomponents", "sniffer")
    (value,) = body["metadata"]["annotations"].values()
    assert list(body["metadata"]["annotations"]) == [annotation]
    assert re.fullmatch(r"\S+ by kubectl-defender(:\S+)?", value)
    assert out.getvalue().splitlines() == printed(action)
