"""Prometheus metrics of the operator (the library adds its own etcd call metrics)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import Counter, Gauge

from defender_operator._decisions import conditions as cond

RECONCILES = Counter(
    "defender_operator_reconciles_total", "Reconciles of DefenderComponents", ["result"]
)
ERRORS = Counter("defender_operator_errors_total", "Errors by kind", ["kind"])
RESTARTS = Counter(
    "defender_operator_pod_restarts_total", "Pods restarted for missed heartbeats", ["component"]
)
COMMITS = Counter("defender_operator_commits_total", "ACTIVE versions committed", ["component"])
BREAKER_TRIPS = Counter(
    "defender_operator_breaker_trips_total", "Blast-radius breaker trips", ["component"]
)
HEARTBEAT_AGE = Gauge(
    "defender_operator_heartbeat_age_seconds",
    "Seconds since the newest heartbeat of a component",
    ["component"],
)
INSTANCES_ALIVE = Gauge(
    "defender_operator_instances_alive", "Instances with a live heartbeat", ["component"]
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
    "Instance key events from the heartbeat watch (a delete: stopped or lease expired)",
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
MONITOR_READS = Counter(
    "defender_operator_monitor_reads_total",
    "Monitor passes by whether they read the component from etcd (read) or reused the view"
    " they read before (skipped), and why (`_decisions.reads.ReadReason`)",
    ["result", "reason"],
)
COMPONENT_CONDITION = Gauge(
    "defender_operator_component_condition",
    "1 for the status (True, False, Unknown) a condition of the component has, 0 for the others",
    ["component", "condition", "status"],
)
COMPONENT_FROZEN = Gauge(
    "defender_operator_component_frozen",
    "1 while the breaker keeps the component's commits frozen (ConfigSynced reason Frozen)",
    ["component"],
)
CANARY_ABORTS = Counter(
    "defender_operator_canary_aborts_total",
    "Canary rollouts the operator aborted, by reason: CanaryFailed (a canary lost its heartbeat"
    " or reported an error), CanaryNotAdopted (progress deadline), Command (kubectl defender"
    " abort)",
    ["component", "reason"],
)
CANARY_ABORT_REASONS = ("CanaryFailed", "CanaryNotAdopted", "Command")
RESTART_BUDGET_EXHAUSTED = Gauge(
    "defender_operator_restart_budget_exhausted",
    "1 while the restart budget is spent and missed heartbeats no longer restart pods",
    ["component"],
)

_STATUSES = (cond.TRUE, cond.FALSE, cond.UNKNOWN)
# (component, condition type) pairs exported, so a deleted component's series can be dropped.
_exported: set[tuple[str, str]] = set()


def record_conditions(component: str, conditions: Iterable[Mapping[str, Any]]) -> None:
    """Export the conditions just published in a component's status (what alerts read: Ready,
    frozen, restart budget), so a rule never has to parse a reason string."""
    for c in conditions:
        kind, status, reason = str(c.get("type")), c.get("status"), c.get("reason")
        _exported.add((component, kind))
        for s in _STATUSES:
            COMPONENT_CONDITION.labels(component, kind, s).set(1 if s == status else 0)
        if kind == cond.CONFIG_SYNCED:
            COMPONENT_FROZEN.labels(component).set(1 if reason == "Frozen" else 0)
        elif kind == cond.HEARTBEATING:
            exhausted = reason == "RestartBudgetExhausted"
            RESTART_BUDGET_EXHAUSTED.labels(component).set(1 if exhausted else 0)


def count_canary_abort(component: str, reason: str) -> None:
    """An abort is an event, not a state: the Rollout condition says Aborted until the next
    rollout (also long after an unfreeze), so alerts count aborts instead of reading it."""
    CANARY_ABORTS.labels(component, reason).inc()


_PER_COMPONENT = (HEARTBEAT_AGE, INSTANCES_ALIVE, COMPONENT_FROZEN, RESTART_BUDGET_EXHAUSTED)


def forget_component(component: str) -> None:
    """Drop a deleted component's gauges: a last value left behind would keep an alert firing
    for something that no longer exists."""
    for gauge in _PER_COMPONENT:
        with contextlib.suppress(KeyError):  # never exported (e.g. no heartbeat seen yet)
            gauge.remove(component)
    for reason in CANARY_ABORT_REASONS:
        with contextlib.suppress(KeyError):  # never aborted
            CANARY_ABORTS.remove(component, reason)
    for exported, kind in sorted(_exported):
        if exported == component:
            _exported.discard((exported, kind))
            for s in _STATUSES:
                COMPONENT_CONDITION.remove(component, kind, s)
