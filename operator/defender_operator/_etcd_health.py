"""Turn the library's per-member health report into what the operator decides on."""

from __future__ import annotations

from defender_config.store import HealthReport
from defender_operator._backend import EtcdHealth


def etcd_health(report: HealthReport) -> EtcdHealth:
    """reachable: some member answered at all (its status call succeeded, so it has a
    member id). quorum: some member served a linearizable read. A member cut off from its
    peers answers the status call but not the read: reachable without quorum, which must
    read as EtcdNoQuorum, not EtcdUnavailable."""
    reachable = any(m.healthy or m.member_id is not None for m in report.members)
    down = [m.endpoint for m in report.members if not m.healthy]
    return EtcdHealth(
        reachable=reachable,
        quorum=report.quorum and reachable,
        detail=f"{report.healthy_count}/{report.cluster_size} healthy"
        + (f", down: {', '.join(down)}" if down else ""),
    )
