"""ServiceMonitor/PodMonitor, PrometheusRule and the Grafana dashboard ConfigMap as rendered:
absent by default, present when enabled, aimed at the right pods, carrying the rule file and
dashboard as they are in the chart."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from monitoring_names import (
    ETCD_METRICS,
    RULES,
    dashboard_exprs,
    load_dashboard,
    metric_names,
    operator_metrics,
)
from packaging_chart import HelmFailed, Render, find

MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
ALL_ON = (
    "--set", "metrics.serviceMonitor.enabled=true",
    "--set", "metrics.prometheusRule.enabled=true",
    "--set", "metrics.dashboard.enabled=true",
)  # fmt: skip


def _dashboard_maps(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        o for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")
    ]  # fmt: skip


def test_nothing_is_rendered_by_default(render: Render) -> None:
    objects = render()
    assert not [o for o in objects if o["kind"] in MONITORING_KINDS]
    assert not _dashboard_maps(objects)


def test_monitors_select_the_operator_service_and_the_etcd_pods(render: Render) -> None:
    objects = render(*ALL_ON, "--set", "metrics.serviceMonitor.labels.release=prom")
    monitor = find(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    service = find(objects, "Service", "rel-ml-defender-operator")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml-defender"]}

    pods = find(objects, "PodMonitor")
    assert pods["metadata"]["labels"]["release"] == "prom"
    etcd = find(objects, "StatefulSet")
    template = etcd["spec"]["template"]
    assert pods["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    assert pods["spec"]["podMetricsEndpoints"][0]["port"] in ports


def test_no_pod_monitor_without_the_charts_etcd(render: Render) -> None:
    objects = render(
        "--set", "metrics.serviceMonitor.enabled=true", "--set", "etcd.enabled=false",
        "--set", "externalEtcd.endpoints={http://e:2379}",
    )  # fmt: skip
    find(objects, "ServiceMonitor")
    assert not [o for o in objects if o["kind"] == "PodMonitor"]


def test_the_prometheus_rule_is_the_rule_file_as_it_is(render: Render) -> None:
    objects = render("--set", "metrics.prometheusRule.enabled=true")
    rule = find(objects, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    # Prometheus's own templates reach it untouched (helm does not evaluate the file).
    annotations = [r["annotations"]["summary"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert any("{{ $labels.component }}" in a for a in annotations)


def test_the_dashboard_parses_and_reads_only_metrics_that_exist(render: Render) -> None:
    objects = render(*ALL_ON, "--set", "metrics.dashboard.namespace=grafana")
    (cm,) = _dashboard_maps(objects)
    assert cm["metadata"]["namespace"] == "grafana"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    rendered = json.loads(cm["data"]["ml-defender.json"])
    assert rendered == load_dashboard()
    known = operator_metrics() | ETCD_METRICS
    exprs = dashboard_exprs(rendered)
    assert exprs
    for expr in exprs:
        unknown = metric_names(expr) - known
        assert not unknown, f"dashboard query {expr!r} reads metrics nobody exports: {unknown}"


def test_a_bad_scrape_interval_is_refused(render: Render) -> None:
    with pytest.raises(HelmFailed, match="interval"):
        render(
            "--set", "metrics.serviceMonitor.enabled=true",
            "--set", "metrics.serviceMonitor.interval=often",
        )  # fmt: skip
