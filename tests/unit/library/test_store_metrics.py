"""Metric names and labels of the etcd layer: bounded label sets, per-store registries."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from defender_config._store_types import OPS
from defender_config.store import StoreMetrics


def test_metric_names_and_label_names() -> None:
    m = StoreMetrics(CollectorRegistry())
    m.for_op("get").start()
    m.errors.labels("put", "unavailable").inc()
    m.observe("get", 0.002)
    m.retries.labels("txn").inc()
    m.stale_reads.labels("get").inc()
    m.watch_restarts.inc()
    m.watch_stalls.inc()
    m.failovers.inc()
    m.kept_keepalives.inc(3)
    m.kept_handbacks.labels("expired").inc()
    families = {f.name: f for f in m.registry.collect()}
    assert set(families) == {
        "defender_etcd_calls",
        "defender_etcd_errors",
        "defender_etcd_call_duration_seconds",
        "defender_etcd_retries",
        "defender_etcd_stale_reads",
        "defender_etcd_watch_restarts",
        "defender_etcd_watch_stalls",
        "defender_etcd_endpoint_failovers",
        "defender_etcd_kept_keepalives",
        "defender_etcd_kept_lease_handbacks",
    }
    labels = {
        name: {k for s in fam.samples for k in s.labels if k != "le"}
        for name, fam in families.items()
    }
    assert labels["defender_etcd_calls"] == {"op"}
    assert labels["defender_etcd_errors"] == {"op", "reason"}
    assert labels["defender_etcd_call_duration_seconds"] == {"op"}
    assert labels["defender_etcd_watch_restarts"] == set()
    assert labels["defender_etcd_watch_stalls"] == set()
    assert labels["defender_etcd_kept_lease_handbacks"] == {"reason"}
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
    a.for_op("get").start()
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


def test_per_op_series_equal_what_prometheus_client_would_expose() -> None:
    # The store records calls through OpStats (cheaper than Counter + Histogram per call);
    # the series must be exactly those a prometheus_client Counter and Histogram give.
    from prometheus_client import Counter, Histogram

    from defender_config._store_types import _LATENCY_BUCKETS

    durations = [0.0001, 0.0005, 0.0007, 0.0025, 0.003, 3.0, 99.0]
    ours = StoreMetrics(CollectorRegistry())
    reference = CollectorRegistry()
    calls = Counter("defender_etcd_calls", "x", ["op"], registry=reference)
    latency = Histogram(
        "defender_etcd_call_duration_seconds",
        "x",
        ["op"],
        buckets=_LATENCY_BUCKETS,
        registry=reference,
    )
    for op, extra_start in (("get", 0), ("put", 2)):
        stats = ours.for_op(op)
        for seconds in durations:
            stats.start()
            stats.finish(seconds)
            calls.labels(op).inc()
            latency.labels(op).observe(seconds)
        for _ in range(extra_start):  # started, not finished yet
            stats.start()
            calls.labels(op).inc()

    def series(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in registry.collect()
            if fam.name in ("defender_etcd_calls", "defender_etcd_call_duration_seconds")
            for s in fam.samples
            if not s.name.endswith("_created")
        }

    def created(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        return {
            (s.name, tuple(sorted(s.labels.items())))
            for fam in registry.collect()
            if fam.name in ("defender_etcd_calls", "defender_etcd_call_duration_seconds")
            for s in fam.samples
            if s.name.endswith("_created")
        }

    assert series(ours.registry) == series(reference)
    assert created(ours.registry) == created(reference)
    assert ours.registry.get_sample_value("defender_etcd_calls_total", {"op": "put"}) == 9
    assert (
        ours.registry.get_sample_value(
            "defender_etcd_call_duration_seconds_bucket", {"op": "get", "le": "+Inf"}
        )
        == 7
    )


def test_racing_first_use_of_an_op_shares_one_recorder() -> None:
    import threading

    m = StoreMetrics(CollectorRegistry())
    barrier = threading.Barrier(8)

    def hammer() -> None:
        barrier.wait()
        for _ in range(1000):
            stats = m.for_op("txn")
            stats.start()
            stats.finish(0.001)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.registry.get_sample_value("defender_etcd_calls_total", {"op": "txn"}) == 8000
    assert (
        m.registry.get_sample_value("defender_etcd_call_duration_seconds_count", {"op": "txn"})
        == 8000
    )
