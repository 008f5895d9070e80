"""Plain records and pure helpers of the etcd access layer (no gRPC here, so they unit-test fast).

The `_store` package is the only code that talks to etcd; what it hands out is defined here.
"""

from __future__ import annotations

import random
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Literal

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

__all__ = [
    "OPS",
    "Compare",
    "DeleteOp",
    "GetOp",
    "HealthReport",
    "Lease",
    "MemberHealth",
    "PutOp",
    "StoreMetrics",
    "StoredValue",
    "TxnResult",
    "WatchEvent",
    "backoff_delay",
]


@dataclass(frozen=True, slots=True)
class StoredValue:
    """One key as read from etcd. `stale` is True when etcd could not be reached and the value
    comes from the last-known-good cache: it was true at `mod_revision`, maybe not now."""

    key: str
    value: bytes = field(repr=False)
    mod_revision: int
    create_revision: int
    version: int
    lease_id: int = 0
    stale: bool = False

    def __repr__(self) -> str:
        # Values are usually sealed, but plaintext records still do not belong in logs.
        return (
            f"StoredValue(key={self.key!r}, bytes={len(self.value)}, "
            f"mod_revision={self.mod_revision}, version={self.version}, stale={self.stale})"
        )


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change under a watched prefix. A lease expiry arrives as kind="delete".

    `resync` marks synthetic events sent after the watch had to restart from a compacted
    revision (or on another cluster): a "delete" for every key the watch had handed out as
    present that is gone (`mod_revision` is the listing's), then a "put" with the current value
    of every key. A key never handed out that was deleted in the gap is not reported."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes = field(repr=False)
    mod_revision: int
    version: int
    lease_id: int = 0
    prev_value: bytes | None = field(default=None, repr=False)
    resync: bool = False


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted etcd lease. Keys put with it vanish when it expires or is revoked."""

    id: int
    ttl: int


_CompareTarget = Literal["version", "mod", "create", "value"]
_CompareOp = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True, slots=True)
class Compare:
    """One condition of a transaction, e.g. `Compare.absent(key)`."""

    key: str
    target: _CompareTarget
    op: _CompareOp
    value: int | bytes

    @staticmethod
    def absent(key: str) -> Compare:
        return Compare(key, "create", "==", 0)

    @staticmethod
    def present(key: str) -> Compare:
        return Compare(key, "create", ">", 0)

    @staticmethod
    def mod_revision_is(key: str, revision: int) -> Compare:
        """0 means "the key does not exist"."""
        return Compare(key, "mod", "==", revision)

    @staticmethod
    def version_is(key: str, version: int) -> Compare:
        return Compare(key, "version", "==", version)


@dataclass(frozen=True, slots=True)
class PutOp:
    key: str
    value: bytes = field(repr=False)
    lease_id: int = 0


@dataclass(frozen=True, slots=True)
class DeleteOp:
    """Delete `key`; every key under it with `prefix`; or the range [key, range_end)."""

    key: str
    prefix: bool = False
    range_end: str | None = None


@dataclass(frozen=True, slots=True)
class GetOp:
    key: str
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class TxnResult:
    """`gets` holds, in order, the result of every GetOp of the branch that ran."""

    succeeded: bool
    revision: int
    gets: tuple[tuple[StoredValue, ...], ...] = ()


@dataclass(frozen=True, slots=True)
class MemberHealth:
    """What one endpoint said. `healthy` means it answered a linearizable read (it sees a
    leader and a quorum)."""

    endpoint: str
    healthy: bool
    member_id: int | None = None
    name: str | None = None
    is_leader: bool = False
    raft_term: int | None = None
    raft_index: int | None = None
    db_size_bytes: int | None = None
    version: str | None = None
    error: str | None = None
    # What etcd 3.4+ also reports (see _store/_maintenance.status_extras).
    db_size_in_use_bytes: int | None = None
    db_size_quota_bytes: int | None = None
    revision: int | None = None
    is_learner: bool = False
    alarms: tuple[str, ...] = ()
    # It answered a linearizable read. Unlike `healthy`, an alarm does not clear it: a member
    # with NOSPACE still serves reads, and maintenance (defrag) must still reach it.
    serving: bool = False


@dataclass(frozen=True, slots=True)
class HealthReport:
    members: tuple[MemberHealth, ...]
    cluster_size: int
    leader_id: int | None
    quorum: bool

    @property
    def healthy_count(self) -> int:
        return sum(1 for m in self.members if m.healthy)

    @property
    def leader(self) -> MemberHealth | None:
        return next((m for m in self.members if m.is_leader), None)

    @property
    def alarms(self) -> tuple[str, ...]:
        """Every alarm any member reports (NOSPACE, CORRUPT), each once, sorted."""
        return tuple(sorted({a for m in self.members for a in m.alarms}))

    @property
    def degraded(self) -> bool:
        """Serving, but not at full strength: a member down or unhealthy, or an alarm on."""
        return self.healthy_count < self.cluster_size or bool(self.alarms)


@dataclass(frozen=True, slots=True)
class SnapshotFile:
    """A snapshot streamed from one member by `EtcdStore.snapshot`."""

    path: str
    size_bytes: int
    revision: int
    member: str
    hash_ok: bool


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (0-based): exponential, capped, with full jitter.

    Full jitter (uniform over [0, min(cap, base·2^attempt)]) spreads the retries of many
    components that lost etcd at the same moment, so they do not return in lock-step.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    ceiling = min(cap, base * (2 ** min(attempt, 62)))
    return (rng or random).uniform(0.0, ceiling)


#: Every value the `op` label takes: a fixed set, so the metrics have bounded cardinality.
OPS: tuple[str, ...] = (
    "get",
    "list",
    "count",
    "put",
    "delete",
    "delete_prefix",
    "put_if_absent",
    "compare_and_swap",
    "txn",
    "lease_grant",
    "lease_keepalive",
    "lease_revoke",
    "lease_ttl",
    "watch",
    "revision",
    "status",
    "authenticate",
    # Maintenance (docs/operations.md): one chosen member, rare calls.
    "snapshot",
    "defragment",
    "compact",
    "wait_compacted",
    "alarms",
    "disarm_alarm",
)

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class OpStats:
    """Call count and latency histogram of one etcd operation: what every store call records.

    prometheus_client's `Counter.inc` + `Histogram.observe` cost about eleven Python calls and
    three lock round trips per store call: 6-17 µs in situ on a 0.6 ms get (measured against
    no-op metrics, interleaved). Here it is two short critical sections on one lock; the
    `_OpsCollector` turns the numbers into the same Prometheus series.
    """

    __slots__ = ("_lock", "buckets", "created", "started", "total")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = 0
        #: Non-cumulative counts: index i = first bucket bound >= the duration (last = +Inf).
        self.buckets = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.created = time.time()

    def start(self) -> None:
        """One call of this operation began."""
        with self._lock:
            self.started += 1

    def finish(self, seconds: float) -> None:
        """One call ended after `seconds` (retries included)."""
        # Prometheus buckets are "less or equal": the first bound >= seconds.
        i = bisect_left(_LATENCY_BUCKETS, seconds)
        with self._lock:
            self.buckets[i] += 1
            self.total += seconds

    def snapshot(self) -> tuple[int, list[int], float]:
        with self._lock:
            return self.started, list(self.buckets), self.total


class _OpsCollector(Collector):
    """Exposes `defender_etcd_calls` (counter) and `defender_etcd_call_duration_seconds`
    (histogram) by op, from the OpStats of one store."""

    def __init__(self, per_op: dict[str, OpStats]) -> None:
        self._per_op = per_op

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "defender_etcd_calls",
            "etcd operations started by the library, by operation.",
            labels=["op"],
        )
        latency = HistogramMetricFamily(
            "defender_etcd_call_duration_seconds",
            "Duration of etcd operations including retries, by operation.",
            labels=["op"],
        )
        for op, stats in sorted(self._per_op.items()):
            started, buckets, total = stats.snapshot()
            calls.add_metric([op], started, created=stats.created)
            latency.add_metric(
                [op], list(zip(_BUCKET_LABELS, accumulate(buckets), strict=True)), total
            )
            latency.samples.append(Sample(latency.name + "_created", {"op": op}, stats.created))
        yield calls
        yield latency


# `le` labels as prometheus_client writes them (str() matches its Go-style format for these).
_BUCKET_LABELS = (*(str(b) for b in _LATENCY_BUCKETS), "+Inf")


class StoreMetrics:
    """The Prometheus series of one EtcdStore, on `registry` (a private one if None).

    Pass the process registry (`prometheus_client.REGISTRY`) to expose them; tests pass fresh
    registries so several stores can live in one process. Per-call counts and latencies are
    recorded through `for_op(op)` (an `OpStats`); the rarer events are prometheus Counters.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._per_op: dict[str, OpStats] = {}
        self.registry.register(_OpsCollector(self._per_op))
        self.errors = Counter(
            "defender_etcd_errors",
            "etcd operations that failed after retries, by operation and reason.",
            ["op", "reason"],
            registry=self.registry,
        )
        self.retries = Counter(
            "defender_etcd_retries",
            "Retries after a transient etcd error, by operation.",
            ["op"],
            registry=self.registry,
        )
        self.stale_reads = Counter(
            "defender_etcd_stale_reads",
            "Reads served from the last-known-good cache while etcd was unreachable.",
            ["op"],
            registry=self.registry,
        )
        self.watch_restarts = Counter(
            "defender_etcd_watch_restarts",
            "Watches re-established after their stream broke (member down, failover).",
            registry=self.registry,
        )
        self.watch_stalls = Counter(
            "defender_etcd_watch_stalls",
            "Watch streams given up because they stalled: silent past their bound though"
            " progress was asked (each watch on one is then re-established, a watch restart).",
            registry=self.registry,
        )
        self.kept_keepalives = Counter(
            "defender_etcd_kept_keepalives",
            "Lease keep-alives sent by the store's keeper thread (leases given to keep_lease).",
            registry=self.registry,
        )
        self.kept_handbacks = Counter(
            "defender_etcd_kept_lease_handbacks",
            "Kept leases the keeper gave back to their owner, by reason (expired, "
            "stream_failed, timeout, no_stream, closed, tick_failed, keeper_ended).",
            ["reason"],
            registry=self.registry,
        )
        self.failovers = Counter(
            "defender_etcd_endpoint_failovers",
            "Switches of the client to another etcd endpoint.",
            registry=self.registry,
        )

    def for_op(self, op: str) -> OpStats:
        """The call count and latency recorder of `op` (made on first use)."""
        stats = self._per_op.get(op)
        if stats is None:
            # setdefault is atomic: two threads racing on a new op share one recorder.
            stats = self._per_op.setdefault(op, OpStats())
        return stats

    def observe(self, op: str, seconds: float) -> None:
        """Record the duration of one call of `op` (its start is counted by `start`)."""
        self.for_op(op).finish(seconds)
