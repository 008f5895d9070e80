"""The journey's decisions without a cluster: when a component counts as Ready, which helm
values the chart and the workloads get, and the rendered workload itself."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from defender_devcluster import ToolNotFoundError, tool
from defender_devcluster._journey import (
    SAMPLE_COMPONENTS,
    SAMPLES_DIR,
    WORKLOAD_CHART,
    chart_args,
    component_ready,
    workload_args,
)
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
