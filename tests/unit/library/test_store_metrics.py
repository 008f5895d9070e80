"""Metric names and labels of the etcd layer: bounded label sets, per-store registries."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from defender_config import StoreMetrics
from defender_config._store_types import OPS


def test_metric_names_and_label_names() -> None:
    m = StoreMetrics(CollectorRegistry())
    m.calls.labels("get").inc()
    m.errors.labels("put", "unavailable").inc()
    m.observe("get", 0.002)
    m.retries.labels("txn").inc()
    m.stale_reads.labels("get").inc()
    m.watch_restarts.inc()
    m.failovers.inc()
    families = {f.name: f for f in m.registry.collect()}
    assert set(families) == {
        "defender_etcd_calls",
        "defender_etcd_errors",
        "defender_etcd_call_duration_seconds",
        "defender_etcd_retries",
        "defender_etcd_stale_reads",
        "defender_etcd_watch_restarts",
        "defender_etcd_endpoint_failovers",
    }
    labels = {
        name: {k for s in fam.samples for k in s.labels if k != "le"}
        for name, fam in families.items()
    }
    assert labels["defender_etcd_calls"] == {"op"}
    assert labels["defender_etcd_errors"] == {"op", "reason"}
    assert labels["defender_etcd_call_duration_seconds"] == {"op"}
    assert labels["defender_etcd_watch_restarts"] == set()
    assert (
        m.registry.get_sample_value(
            "defender_etcd_call_duration_seconds_bucket", {"op": "get", "le": "0.0025"}
        )
        == 1
    )
    assert (
        m.registry.get_sample_value(
            "defender_etcd_call_duration_seconds_bucket", {"op": "get", "le": "0.001"}
        )
        == 0
    )


def test_two_stores_do_not_collide() -> None:
    # Each store gets its own registry unless one is passed: no duplicate-series errors.
    a, b = StoreMetrics(), StoreMetrics()
    a.calls.labels("get").inc()
    assert a.registry is not b.registry
    assert b.registry.get_sample_value("defender_etcd_calls_total", {"op": "get"}) is None


def test_op_labels_used_by_the_store_are_a_fixed_set() -> None:
    import re
    from pathlib import Path

    from defender_config import _store

    package = Path(_store.__file__).parent
    source = "\n".join(p.read_text() for p in sorted(package.glob("*.py")))
    used = set(re.findall(r'_call\(\s*"([a-z_]+)"', source)) | set(
        re.findall(r'self\._txn\(\s*"([a-z_]+)"', source)
    )
    used |= set(re.findall(r'stale_reads\.labels\("([a-z_]+)"\)', source))
    assert used, "found no op labels: the pattern is stale"
    assert used <= set(OPS), used - set(OPS)
