"""The chart's alert rules under the real promtool (built by hack/tools.sh from the Prometheus
Go module): they load, and every alert fires on the series of its trouble and stays quiet
otherwise (prometheus-rules.test.yaml). Under CI=true a missing promtool fails the run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from monitoring_names import (
    ETCD_METRICS,
    RULE_TESTS,
    RULES,
    metric_names,
    operator_metrics,
    rules,
)

from defender_devcluster import ToolNotFoundError, tool
from defender_devcluster.pytest_plugin import missing_tool


@pytest.fixture(scope="module")
def promtool() -> Path:
    try:
        return tool("promtool")
    except ToolNotFoundError as exc:
        missing_tool(exc)


def run(promtool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_rules_load(promtool: Path) -> None:
    proc = run(promtool, "check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules())} rules found" in proc.stdout


def test_every_alert_fires_on_its_trouble_and_only_then(promtool: Path) -> None:
    proc = run(promtool, "test", "rules", str(RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_fails_a_wrong_expectation(promtool: Path, tmp_path: Path) -> None:
    """The check above can fail: the same tests with one expectation turned around do."""
    doc = yaml.safe_load(RULE_TESTS.read_text())
    doc["rule_files"] = [str(RULES)]
    first = doc["tests"][0]["alert_rule_test"][0]
    assert first["exp_alerts"] == []
    first["exp_alerts"] = [{"exp_labels": {"severity": "warning", "component": "sniffer"}}]
    wrong = tmp_path / "wrong.test.yaml"
    wrong.write_text(yaml.safe_dump(doc))
    proc = run(promtool, "test", "rules", str(wrong))
    assert proc.returncode != 0
    assert "FAILED" in proc.stdout + proc.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = [
        case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]  # fmt: skip
    for name in {rule["alert"] for rule in rules()}:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no case where it stays quiet"


def test_the_rules_read_only_metrics_that_exist() -> None:
    known = operator_metrics() | ETCD_METRICS
    for rule in rules():
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule['alert']} reads metrics nobody exports: {sorted(unknown)}"


def test_metric_names_sees_through_promql() -> None:
    expr = (
        'sum by (component) (increase(a_total{x="b c"}[1h])) > 0'
        " or (b_gauge / on (instance) c_bytes unless d offset 1h) == bool 0"
    )
    assert metric_names(expr) == {"a_total", "b_gauge", "c_bytes", "d"}
