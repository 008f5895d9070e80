"""Metric names the chart's alert rules and dashboard may use, and the names a PromQL
expression reads. Imported by name by the chart tests (unit and integration)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from defender_operator import _metrics
from defender_operator._metrics import PerComponentGauges

CHART_FILES = Path(__file__).resolve().parents[3] / "charts" / "ml-defender" / "files"
RULES = CHART_FILES / "prometheus-rules.yaml"
RULE_TESTS = Path(__file__).resolve().parent / "prometheus-rules.test.yaml"
DASHBOARD = CHART_FILES / "grafana-dashboard.json"

# etcd's own metrics the rules and the dashboard read; tests/integration checks that the etcd
# the project builds (hack/tools.env ETCD_VERSION) exports each of them.
ETCD_METRICS = frozenset(
    {
        "etcd_server_has_leader",
        "etcd_server_quota_backend_bytes",
        "etcd_server_leader_changes_seen_total",
        "etcd_mvcc_db_total_size_in_bytes",
        "etcd_mvcc_db_total_size_in_use_in_bytes",
    }
)

# PromQL words that look like names: functions are followed by "(" and are dropped apart.
_KEYWORDS = frozenset(
    {"by", "without", "bool", "and", "or", "unless", "on", "ignoring", "offset", "group_left",
     "group_right", "inf", "nan"}
)  # fmt: skip
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def operator_metrics() -> frozenset[str]:
    """Every series name the operator exports (a counter's as `<name>_total`)."""
    names: set[str] = set()
    for obj in vars(_metrics).values():
        # Labelled metrics, and collectors that export their series at scrape time.
        if isinstance(obj, MetricWrapperBase | PerComponentGauges):
            for family in obj.describe():
                names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return frozenset(names)


def metric_names(expr: str) -> set[str]:
    """The series names an expression reads: identifiers outside label matchers, strings,
    ranges and grouping lists that are neither functions nor keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    names = set()
    for m in _IDENT.finditer(text):
        word, rest = m.group(0), text[m.end() :].lstrip()
        if word.lower() in _KEYWORDS or rest.startswith("("):
            continue
        names.add(word)
    return names


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def load_dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded
