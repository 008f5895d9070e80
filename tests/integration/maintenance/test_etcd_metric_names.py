"""The etcd metrics the chart's alert rules and dashboard read are ones the etcd this project
builds (hack/tools.env ETCD_VERSION) really exports: a rename upstream fails here, not silently
in someone's Prometheus."""

from __future__ import annotations

import importlib.util
import urllib.request
from pathlib import Path

import pytest

from defender_devcluster import EtcdCluster

pytestmark = pytest.mark.etcd

_NAMES = Path(__file__).resolve().parents[2] / "unit" / "packaging" / "monitoring_names.py"


def _etcd_metrics_the_chart_reads() -> frozenset[str]:
    spec = importlib.util.spec_from_file_location("monitoring_names", _NAMES)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names: frozenset[str] = module.ETCD_METRICS
    return names


def test_every_etcd_metric_the_chart_reads_is_exported(defender_etcd: EtcdCluster) -> None:
    with urllib.request.urlopen(f"{defender_etcd.endpoints[0]}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    exported = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    wanted = _etcd_metrics_the_chart_reads()
    assert wanted, "monitoring_names.ETCD_METRICS is empty"
    assert wanted <= exported, f"etcd does not export {sorted(wanted - exported)}"
