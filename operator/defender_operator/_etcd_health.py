"""Turn the library's per-member health report into what the operator decides on, and into
the etcd metrics (the `kubectl defender status` view, for Prometheus)."""

from __future__ import annotations

from defender_config.store import HealthReport
from defender_operator._backend import EtcdHealth
from defender_operator._metrics import (
    ETCD_ALARM,
    ETCD_DB_SIZE,
    ETCD_DB_SIZE_IN_USE,
    ETCD_MEMBER_HEALTHY,
    ETCD_MEMBER_LEADER,
    ETCD_MEMBERS_HEALTHY,
    ETCD_REVISION,
)

# Alarms etcd defines (api/etcdserverpb): each gets a 0/1 series even when not raised.
_KNOWN_ALARMS = ("NOSPACE", "CORRUPT")


def etcd_health(report: HealthReport) -> EtcdHealth:
    """reachable: some member answered at all (its status call succeeded, so it has a
    member id). quorum: some member served a linearizable read. A member cut off from its
    peers answers the status call but not the read: reachable without quorum, which must
    read as EtcdNoQuorum, not EtcdUnavailable."""
    reachable = any(m.serving or m.member_id is not None for m in report.members)
    down = [m.endpoint for m in report.members if not m.healthy]
    return EtcdHealth(
        reachable=reachable,
        quorum=report.quorum and reachable,
        detail=f"{report.healthy_count}/{report.cluster_size} healthy"
        + (f", down: {', '.join(down)}" if down else "")
        + (f", alarms: {', '.join(report.alarms)}" if report.alarms else ""),
        healthy_members=report.healthy_count,
        cluster_size=report.cluster_size,
        alarms=report.alarms,
    )


def record_metrics(report: HealthReport) -> None:
    """One series per member (by name, else endpoint); a member gone from the report keeps
    its last values until the operator restarts, which is what a scrape should show anyway:
    the healthy gauge of a member that stops answering is set to 0 here, not dropped."""
    ETCD_MEMBERS_HEALTHY.set(report.healthy_count)
    revision = 0
    for m in report.members:
        member = m.name or m.endpoint
        ETCD_MEMBER_HEALTHY.labels(member).set(1 if m.healthy else 0)
        ETCD_MEMBER_LEADER.labels(member).set(1 if m.is_leader else 0)
        if m.db_size_bytes is not None:
            ETCD_DB_SIZE.labels(member).set(m.db_size_bytes)
        if m.db_size_in_use_bytes is not None:
            ETCD_DB_SIZE_IN_USE.labels(member).set(m.db_size_in_use_bytes)
        revision = max(revision, m.revision or 0)
    if revision:
        ETCD_REVISION.set(revision)
    raised = set(report.alarms)
    for alarm in sorted(raised | set(_KNOWN_ALARMS)):
        ETCD_ALARM.labels(alarm).set(1 if alarm in raised else 0)
