"""Every Prometheus metric the docs name is one the code exports: a `defender_*` name in the
docs (a counter with the `_total` prometheus_client adds, a histogram's `_bucket`/`_count`/
`_sum` series) must be declared by the library, the agent or the operator."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DOC_FILES = [
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "README.md",
    REPO / "charts" / "ml-defender" / "README.md.in",
]
PACKAGES = {"defender_config", "defender_agent", "defender_operator", "defender_cli"}
PACKAGES |= {"defender_devcluster"}
_SERIES = re.compile(r"_(total|bucket|count|sum|created)$")


@cache
def declared() -> frozenset[str]:
    """Every `defender_*` string in the code: metric names are declared as literals."""
    found = set()
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "operator").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            value = node.value if isinstance(node, ast.Constant) else None
            if isinstance(value, str) and re.fullmatch(r"defender_[a-z0-9_]+", value):
                found.add(value)
    return frozenset(found)


def metric_drift(doc: Path) -> list[str]:
    names = set(re.findall(r"(?<![\w./-])(defender_[a-z0-9_]+)(?![\w./-])", doc.read_text()))
    return [
        f"{doc.name}: {name} is no metric the code exports"
        for name in sorted(names - PACKAGES)
        if name not in declared() and _SERIES.sub("", name) not in declared()
    ]


def test_every_metric_the_docs_name_is_exported() -> None:
    problems = [p for doc in DOC_FILES for p in metric_drift(doc)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("snippet", "problems"),
    [
        ("`defender_operator_etcd_alarm{alarm}` and `defender_etcd_calls_total`", 0),
        ("`defender_etcd_call_duration_seconds_bucket`, `defender_config` (the package)", 0),
        ("`defender_operator_etcd_alarms`", 1),
        ("`defender_etcd_call_total`", 1),
    ],
)
def test_a_misnamed_metric_is_reported(tmp_path: Path, snippet: str, problems: int) -> None:
    doc = tmp_path / "probe.md"
    doc.write_text(snippet + "\n")
    assert len(metric_drift(doc)) == problems, metric_drift(doc)
