"""Prometheus metrics of the operator (the library adds its own etcd call metrics)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from defender_operator._decisions import conditions as cond

RECONCILES = Counter(
    "defender_operator_reconciles_total", "Reconciles of DefenderComponents", ["result"]
)
ERRORS = Counter("defender_operator_errors_total", "Errors by kind", ["kind"])
LOOP_FAILURES = Counter(
    "defender_operator_loop_unexpected_errors_total",
    "Unexpected errors a background loop survived (a bug, or a failure nobody typed)",
    ["loop"],
)
RESTARTS = Counter(
    "defender_operator_pod_restarts_total", "Pods restarted for missed heartbeats", ["component"]
)
COMMITS = Counter("defender_operator_commits_total", "ACTIVE versions committed", ["component"])
BREAKER_TRIPS = Counter(
    "defender_operator_breaker_trips_total", "Blast-radius breaker trips", ["component"]
)
ROTATION_STAGE = Gauge(
    "defender_operator_rotation_stage",
    "Key rotation stage (1 for the current stage, 0 for the others)",
    ["stage"],
)
ETCD_AVAILABLE = Gauge(
    "defender_operator_etcd_available", "1 when defender etcd is reachable with quorum"
)
ETCD_MEMBERS_HEALTHY = Gauge(
    "defender_operator_etcd_members_healthy", "defender etcd members that serve without alarm"
)
ETCD_MEMBER_HEALTHY = Gauge(
    "defender_operator_etcd_member_healthy", "1 when the member serves without alarm", ["member"]
)
ETCD_MEMBER_LEADER = Gauge(
    "defender_operator_etcd_member_is_leader", "1 for the member that leads", ["member"]
)
ETCD_DB_SIZE = Gauge(
    "defender_operator_etcd_db_size_bytes", "Size of the member's database file", ["member"]
)
ETCD_DB_SIZE_IN_USE = Gauge(
    "defender_operator_etcd_db_size_in_use_bytes",
    "Bytes of the member's database in use (the rest is freed by a defrag)",
    ["member"],
)
ETCD_REVISION = Gauge("defender_operator_etcd_revision", "Highest revision a member reported")
ETCD_ALARM = Gauge(
    "defender_operator_etcd_alarm", "1 while etcd reports this alarm (NOSPACE, CORRUPT)", ["alarm"]
)
HEARTBEAT_EVENTS = Counter(
    "defender_operator_heartbeat_events_total",
    "Instance key events from the heartbeat watch (a delete: stopped or lease expired;"
    " replayed: an authentic record older than the one it replaced, ignored)",
    ["kind"],
)
HEARTBEAT_RESYNCS = Counter(
    "defender_operator_heartbeat_resyncs_total", "Full re-reads of every instance key"
)
SCRUB_VALUES = Counter(
    "defender_operator_scrub_values_checked_total",
    "Sealed values (MASTER, ACTIVE, history) the scrub opened and verified",
    ["component"],
)
SCRUB_FAILURES = Counter(
    "defender_operator_scrub_failures_total",
    "Values that failed a scrub (counted per scrub), by kind (master, active, history, metadata)",
    ["component", "kind"],
)
SCRUB_REPAIRS = Counter(
    "defender_operator_scrub_repairs_total",
    "ACTIVE values restored from their verified history entry",
    ["component", "result"],
)
HEARTBEAT_DIRECT_READS = Counter(
    "defender_operator_heartbeat_direct_reads_total",
    "Monitor passes that read heartbeats from etcd because the watch view was not trusted",
)
CHANGE_EVENTS = Counter(
    "defender_operator_component_change_events_total",
    "Changes of keys a monitor pass reads, from the change watch (replayed: the current keys"
    " handed out again after a compaction, which makes the watch untrusted until a resync)",
    ["kind"],
)
CHANGE_RESYNCS = Counter(
    "defender_operator_component_change_resyncs_total",
    "Resyncs of the change watch (it is trusted again from that revision on)",
)
MONITOR_WAKES = Counter(
    "defender_operator_monitor_wakes_total",
    "Requests that a component's monitor run a pass now rather than at its interval, by what"
    " asked (several that come together make one pass: `defender_operator_monitor_reads_total`"
    " counts passes)",
    ["reason"],
)
MONITOR_READS = Counter(
    "defender_operator_monitor_reads_total",
    "Monitor passes by whether they read the component from etcd (read) or reused the view"
    " they read before (skipped), and why (`_decisions.reads.ReadReason`)",
    ["result", "reason"],
)
MONITOR_PASSES = Counter(
    "defender_operator_monitor_passes_total",
    "Monitor passes by what started them: reconcile (the pass a reconcile runs for its status),"
    " first (a monitor's first pass), wake (something it judges changed), due (a heartbeat"
    " deadline or grace came), interval (monitor_interval_seconds passed)",
    ["trigger"],
)
CANARY_ABORTS = Counter(
    "defender_operator_canary_aborts_total",
    "Canary rollouts the operator aborted, by reason: CanaryFailed (a canary lost its heartbeat"
    " or reported an error), CanaryNotAdopted (progress deadline), Command (kubectl defender"
    " abort)",
    ["component", "reason"],
)
CANARY_ABORT_REASONS = ("CanaryFailed", "CanaryNotAdopted", "Command")

_STATUSES = (cond.TRUE, cond.FALSE, cond.UNKNOWN)


@dataclass
class _Series:
    """One component's gauge values (None: never set, so not exported)."""

    conditions: dict[str, str | None] = field(default_factory=dict)  # type → status
    frozen: float | None = None
    budget_exhausted: float | None = None
    heartbeat_age: float | None = None
    alive: float | None = None
    unbacked: float | None = None
    unverified: float | None = None


class PerComponentGauges(Collector):
    """The per-component gauges, kept as plain values and turned into samples at scrape time.

    A labelled prometheus_client Gauge child costs ~0.9 KB (its own lock, value object and
    attributes); every condition type times three statuses made ~30 of them per component,
    ~28 MiB of the operator's memory at 1,000 components. The samples are the same."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_component: dict[str, _Series] = {}

    def _series(self, component: str) -> _Series:
        found = self._by_component.get(component)
        if found is None:
            found = self._by_component[component] = _Series()
        return found

    def record_conditions(self, component: str, conditions: Iterable[Mapping[str, Any]]) -> None:
        with self._lock:
            series = self._series(component)
            for c in conditions:
                kind, status, reason = str(c.get("type")), c.get("status"), c.get("reason")
                series.conditions[kind] = status if isinstance(status, str) else None
                if kind == cond.CONFIG_SYNCED:
                    series.frozen = 1.0 if reason == "Frozen" else 0.0
                elif kind == cond.HEARTBEATING:
                    exhausted = reason == "RestartBudgetExhausted"
                    series.budget_exhausted = 1.0 if exhausted else 0.0

    def record_heartbeats(self, component: str, age: float | None, alive: int) -> None:
        with self._lock:
            series = self._series(component)
            if age is not None:
                series.heartbeat_age = age
            series.alive = float(alive)

    def record_unbacked(self, component: str, count: int) -> None:
        with self._lock:
            self._series(component).unbacked = float(count)

    def record_unverified(self, component: str, count: int) -> None:
        with self._lock:
            self._series(component).unverified = float(count)

    def forget(self, component: str) -> None:
        with self._lock:
            self._by_component.pop(component, None)

    def describe(self) -> Iterator[Metric]:
        # Names only: the registry checks them for clashes without a scrape.
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            rows = [
                (
                    name,
                    dict(s.conditions),
                    s.frozen,
                    s.budget_exhausted,
                    s.heartbeat_age,
                    s.alive,
                    s.unbacked,
                    s.unverified,
                )
                for name, s in self._by_component.items()
            ]
        conditions, frozen, budget, age, alive, unbacked, unverified = self._families()
        for name, kinds, is_frozen, exhausted, seconds, count, ghosts, forged in rows:
            for kind, status in kinds.items():
                for s in _STATUSES:
                    conditions.add_metric([name, kind, s], 1.0 if s == status else 0.0)
            for family, value in ((frozen, is_frozen), (budget, exhausted)):
                if value is not None:
                    family.add_metric([name], value)
            for family, value in (
                (age, seconds),
                (alive, count),
                (unbacked, ghosts),
                (unverified, forged),
            ):
                if value is not None:
                    family.add_metric([name], value)
        yield from (conditions, frozen, budget, age, alive, unbacked, unverified)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "defender_operator_component_condition",
                "1 for the status (True, False, Unknown) a condition of the component has, 0 for"
                " the others",
                labels=["component", "condition", "status"],
            ),
            GaugeMetricFamily(
                "defender_operator_component_frozen",
                "1 while the breaker keeps the component's commits frozen (ConfigSynced reason"
                " Frozen)",
                labels=["component"],
            ),
            GaugeMetricFamily(
                "defender_operator_restart_budget_exhausted",
                "1 while the restart budget is spent and missed heartbeats no longer restart pods",
                labels=["component"],
            ),
            GaugeMetricFamily(
                "defender_operator_heartbeat_age_seconds",
                "Seconds since the newest heartbeat of a component",
                labels=["component"],
            ),
            GaugeMetricFamily(
                "defender_operator_instances_alive",
                "Instances with a live heartbeat",
                labels=["component"],
            ),
            GaugeMetricFamily(
                "defender_operator_instances_unbacked",
                "Instance records in etcd naming no pod the component selects (ignored by the"
                " breaker and the canaries)",
                labels=["component"],
            ),
            GaugeMetricFamily(
                "defender_operator_instances_unverified",
                "Instance records in etcd whose MAC does not verify (ignored by every judgement)",
                labels=["component"],
            ),
        )


PER_COMPONENT = PerComponentGauges()
REGISTRY.register(PER_COMPONENT)

# namespace -> (bytes its components keep in etcd as far as this process knows, its budget in
# bytes, 0 unlimited): what a scrape reads (`_storage_budget.usage`).
StorageUsage = Callable[[], Mapping[str, tuple[int, int]]]


class StorageGauges(Collector):
    """Each namespace's storage in etcd against its budget, read from the running operator at
    scrape time: a series per namespace that goes when the namespace's usage does (a Gauge
    child would keep the last value of a namespace whose components are all gone)."""

    def __init__(self) -> None:
        self.source: StorageUsage | None = None

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        used, budget = self._families()
        source = self.source
        for namespace, (nbytes, limit) in sorted((source() if source else {}).items()):
            used.add_metric([namespace], float(nbytes))
            budget.add_metric([namespace], float(limit))
        yield from (used, budget)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "defender_operator_storage_used_bytes",
                "Bytes a namespace's components keep in etcd (MASTER, ACTIVE, history, metadata,"
                " as stored), as this operator measured or wrote them",
                labels=["namespace"],
            ),
            GaugeMetricFamily(
                "defender_operator_storage_budget_bytes",
                "The namespace's storage budget in bytes (0: unlimited)",
                labels=["namespace"],
            ),
        )


STORAGE = StorageGauges()
REGISTRY.register(STORAGE)


def record_conditions(component: str, conditions: Iterable[Mapping[str, Any]]) -> None:
    """Export the conditions just published in a component's status (what alerts read: Ready,
    frozen, restart budget), so a rule never has to parse a reason string."""
    PER_COMPONENT.record_conditions(component, conditions)


def record_heartbeats(component: str, age_seconds: float | None, alive: int) -> None:
    """The component's newest heartbeat age (None: none seen, the last value stays) and how
    many instances are alive."""
    PER_COMPONENT.record_heartbeats(component, age_seconds, alive)


def record_unbacked(component: str, count: int) -> None:
    """How many of the component's instance records name no pod it selects."""
    PER_COMPONENT.record_unbacked(component, count)


def record_unverified(component: str, count: int) -> None:
    """How many of the component's instance records fail authentication."""
    PER_COMPONENT.record_unverified(component, count)


def count_canary_abort(component: str, reason: str) -> None:
    """An abort is an event, not a state: the Rollout condition says Aborted until the next
    rollout (also long after an unfreeze), so alerts count aborts instead of reading it."""
    CANARY_ABORTS.labels(component, reason).inc()


def forget_component(component: str) -> None:
    """Drop a deleted component's series: a last value left behind would keep an alert firing
    for something that no longer exists."""
    PER_COMPONENT.forget(component)
    for reason in CANARY_ABORT_REASONS:
        with contextlib.suppress(KeyError):  # never aborted
            CANARY_ABORTS.remove(component, reason)
