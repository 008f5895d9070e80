"""The journey's decisions without a cluster: when a component counts as Ready, which helm
values the chart and the workloads get, and the rendered workload itself."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from defender_devcluster import ToolNotFoundError, _journey, tool
from defender_devcluster._journey import (
    ADMISSION_PROBE,
    NAMESPACE,
    SAMPLE_COMPONENTS,
    SAMPLES_DIR,
    SAMPLES_NAMESPACE,
    STAMP_SEAL_ANNOTATION,
    WORKLOAD_CHART,
    Journey,
    JourneyNotReady,
    chart_args,
    component_ready,
    stamped,
    workload_args,
)
from defender_devcluster._system import KubectlError
from defender_devcluster.pytest_plugin import missing_tool

NOW = datetime(2026, 12, 1, 22, 0, 0, tzinfo=UTC)


def _dfc(ready: str = "True", summary: str = "1/1", beat_age: float | None = 5.0) -> Any:
    status: dict[str, Any] = {
        "conditions": [{"type": "Ready", "status": ready}],
        "instanceSummary": summary,
    }
    if beat_age is not None:
        beat = NOW - timedelta(seconds=beat_age)
        status["lastHeartbeatTime"] = beat.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"metadata": {"name": "sniffer"}, "status": status}


def test_a_ready_component_with_its_instance_and_a_fresh_heartbeat_counts() -> None:
    assert component_ready(_dfc(), NOW)


@pytest.mark.parametrize(
    "dfc",
    [
        _dfc(ready="False"),
        _dfc(summary="0/1"),
        _dfc(summary="2/1"),
        _dfc(beat_age=None),
        _dfc(beat_age=300.0),
        {"metadata": {"name": "sniffer"}},
        {"metadata": {"name": "sniffer"}, "status": {"conditions": None}},
    ],
    ids=["not-ready", "no-instance", "two-instances", "no-heartbeat", "stale", "no-status", "null"],
)
def test_anything_less_does_not(dfc: Any) -> None:
    assert not component_ready(dfc, NOW)


def test_the_samples_are_the_components_the_journey_knows() -> None:
    names = {p.stem for p in SAMPLES_DIR.glob("*.yaml")}
    assert names == set(SAMPLE_COMPONENTS)
    for name, ctype in SAMPLE_COMPONENTS.items():
        assert f"componentType: {ctype}\n" in (SAMPLES_DIR / f"{name}.yaml").read_text()


def test_chart_args_list_every_component_in_the_namespace() -> None:
    args = chart_args({"sniffer": "sniffer", "rag": "rag"}, "edge")
    assert args == [
        "--set", "agent.components[0].name=sniffer",
        "--set", "agent.components[0].namespace=edge",
        "--set", "agent.components[1].name=rag",
        "--set", "agent.components[1].namespace=edge",
    ]  # fmt: skip


def test_the_workload_runs_the_stand_in_beside_the_agent_that_signals_it() -> None:
    try:
        helm = tool("helm")
    except ToolNotFoundError as exc:
        missing_tool(exc)
    out = subprocess.run(
        [
            str(helm),
            "template",
            "sniffer",
            str(WORKLOAD_CHART),
            *workload_args("sniffer", "sniffer", "ghcr.io/ml-defender/stand-in:0.1.0"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert '"/var/run/ml-defender/config/sniffer.json"' in out.stdout
    assert 'image: "ghcr.io/ml-defender/stand-in:0.1.0"' in out.stdout
    assert 'name: DEFENDER_AGENT_RELOAD_PROCESS\n              value: "stand-in"' in out.stdout
    assert "replicas: 1\n" in out.stdout
    assert json.dumps(["/var/run/ml-defender/config/sniffer.json"]) in out.stdout


def _answers(monkeypatch: pytest.MonkeyPatch, *answers: Any) -> list[tuple[tuple[str, ...], Any]]:
    """kubectl and helm of the journey replaced: kubectl gives `answers` in turn (an exception
    is raised), then the last one again; every call is recorded with its stdin."""
    calls: list[tuple[tuple[str, ...], Any]] = []
    queue = list(answers)

    def fake_kubectl(_kubeconfig: Any, *args: str, stdin: Any = None, timeout: float = 0) -> str:
        calls.append((args, stdin))
        if "--dry-run=server" not in args:
            return ""
        got = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(got, Exception):
            raise got
        return json.dumps(got)

    def fake_helm(_kubeconfig: Any, *args: str, timeout: float = 0) -> str:
        calls.append((("helm", *args), None))
        return ""

    monkeypatch.setattr(_journey, "kubectl", fake_kubectl)
    monkeypatch.setattr(_journey, "helm", fake_helm)
    monkeypatch.setattr(_journey, "ensure_namespace", lambda *_: None)
    return calls


SEALED = {"metadata": {"annotations": {STAMP_SEAL_ANNOTATION: "v1:00"}}}
UNSEALED: dict[str, Any] = {"metadata": {"name": "journey-admission-probe"}}


def test_the_samples_are_applied_only_once_the_admission_webhook_stamps_a_create(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Applied before, each sample got a ModifierUnverified Warning and an unattributed
    # version 1: the webhook's failurePolicy Ignore admitted them unchecked.
    not_served = KubectlError("no matches for kind DefenderComponent")
    calls = _answers(monkeypatch, not_served, UNSEALED, SEALED)
    monkeypatch.setattr("defender_devcluster._wait.time.sleep", lambda _s: None)
    Journey(Path("kubeconfig"), "stand-in:0").install()
    kinds = [a[0] if a[0] == "helm" else " ".join(a[:4]) for a, _ in calls]
    probes = [i for i, (a, _) in enumerate(calls) if "--dry-run=server" in a]
    apply_samples = kinds.index(f"-n {SAMPLES_NAMESPACE} apply -f")
    assert kinds[0] == "helm" and len(probes) == 3 and probes[-1] < apply_samples
    args, stdin = calls[probes[0]]
    assert args[:3] == ("-n", SAMPLES_NAMESPACE, "create")
    assert json.loads(stdin) == ADMISSION_PROBE


def test_a_webhook_that_never_stamps_stops_the_journey_with_the_operator_pods(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _answers(monkeypatch, UNSEALED)
    with pytest.raises(JourneyNotReady, match=r"did not answer within 0s \(last: admitted without"):
        Journey(Path("kubeconfig"), "stand-in:0").wait_admission(timeout=0)
    assert calls[-1][0] == ("-n", NAMESPACE, "get", "pods", "-o", "wide")


@pytest.mark.parametrize(
    ("dfc", "expected"),
    [(SEALED, True), (UNSEALED, False), ({"metadata": {"annotations": None}}, False), ({}, False)],
)
def test_stamped_means_the_seal_annotation_is_there(dfc: Any, expected: bool) -> None:
    assert stamped(dfc) is expected
