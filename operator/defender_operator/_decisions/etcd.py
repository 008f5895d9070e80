"""What the defender etcd's own health means for the components: the EtcdHealthy condition,
and when the NOSPACE alarm starts or ends (an Event and an alert each time)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from defender_operator._decisions.conditions import FALSE, TRUE, Cond

ETCD_HEALTHY = "EtcdHealthy"
NOSPACE = "NOSPACE"

NOSPACE_ADVICE = (
    "run `kubectl defender defrag --compact --disarm-nospace` or raise etcd.quotaBackendBytes"
    " (docs/troubleshooting.md#etcdnospace)"
)


@dataclass(frozen=True)
class EtcdFacts:
    """What the last health check saw (plain data: `_etcd_health` fills it)."""

    reachable: bool
    quorum: bool
    healthy_members: int
    cluster_size: int
    alarms: tuple[str, ...] = ()
    detail: str = ""


def etcd_condition(facts: EtcdFacts) -> Cond:
    """Informational (Ready does not depend on it): the other conditions already say what a
    sick etcd does to the component; this one says what is wrong with etcd itself."""
    if not facts.reachable:
        return Cond(ETCD_HEALTHY, FALSE, "EtcdUnavailable", f"no member answers: {facts.detail}")
    if not facts.quorum:
        return Cond(ETCD_HEALTHY, FALSE, "EtcdNoQuorum", f"no quorum: {facts.detail}")
    if NOSPACE in facts.alarms:
        return Cond(
            ETCD_HEALTHY,
            FALSE,
            "EtcdNoSpace",
            f"NOSPACE alarm: etcd's database reached its quota and refuses every write (commits,"
            f" heartbeats, alerts); {NOSPACE_ADVICE}",
        )
    if facts.alarms:
        return Cond(
            ETCD_HEALTHY,
            FALSE,
            "EtcdAlarm",
            f"alarm(s) {', '.join(facts.alarms)} raised; see docs/operations.md",
        )
    if facts.healthy_members < facts.cluster_size:
        return Cond(
            ETCD_HEALTHY,
            FALSE,
            "EtcdDegraded",
            f"quorum kept but {facts.detail}; one more failure stops every write",
        )
    return Cond(ETCD_HEALTHY, TRUE, "EtcdHealthy", facts.detail)


def nospace_change(before: Sequence[str], after: Sequence[str]) -> str | None:
    """'raised' when NOSPACE appears, 'cleared' when it goes, else None."""
    was, now = NOSPACE in before, NOSPACE in after
    if now and not was:
        return "raised"
    if was and not now:
        return "cleared"
    return None
