"""Which heartbeat records a real pod of the component backs.

An instance record in etcd is plaintext written by whoever holds write access to the
component's instances prefix (the agents, with their etcd user, but also anyone else with etcd
write access or a stolen agent password). The records alone therefore steer nothing that
components run: the breaker counts, and canaries are picked and judged from, only records that
name a pod the component's selector matches (the pod index the monitor already reads from the
API server) and that is not being deleted. Records naming no such pod are reported, not acted on.
Before that, only records whose MAC verifies count at all (`authentic`): a forged record could
name a real pod.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol, TypeVar


class _Checked(Protocol):
    @property
    def verified(self) -> bool: ...


_R = TypeVar("_R", bound=_Checked)


def authentic(records: Iterable[_R]) -> tuple[list[_R], list[_R]]:
    """(the records whose MAC verified, the others). Only the first steer anything: a record
    that does not verify was written without the keyring (by someone with etcd write access
    alone, or put back from another lease), whatever pod it names."""
    good: list[_R] = []
    bad: list[_R] = []
    for record in records:
        (good if record.verified else bad).append(record)
    return good, bad


def unverified_to_report(
    unverified: Sequence[str], reported: frozenset[str]
) -> tuple[frozenset[str], tuple[str, ...]]:
    """(the unverified instances reported from now on, the ones newly reported this pass):
    each once while it lasts; one that goes away is forgotten (reported again if it comes
    back). No patience, unlike unbacked records: no agent writes a record that fails."""
    now = frozenset(unverified)
    return now, tuple(sorted(now - reported))


@dataclass(frozen=True)
class Backing:
    """The instances of one pass, by what backs them."""

    serving: frozenset[str]
    """Records naming a selected pod that is not being deleted: the only ones that steer."""
    leaving: frozenset[str]
    """Records naming a selected pod being deleted (a rolling update, a scale-down, a restart):
    still the pod's own, but it is going away."""
    unbacked: frozenset[str]
    """Records naming no pod, or a pod the component does not select (or no longer holds)."""


def backing(instances: Iterable[tuple[str, str | None]], pods: Mapping[str, bool]) -> Backing:
    """`instances` as (instance, the pod its record names); `pods`: the selected pods' names,
    each with whether it is being deleted."""
    serving: set[str] = set()
    leaving: set[str] = set()
    unbacked: set[str] = set()
    for instance, pod in instances:
        if pod is None or pod not in pods:
            unbacked.add(instance)
        elif pods[pod]:
            leaving.add(instance)
        else:
            serving.add(instance)
    return Backing(frozenset(serving), frozenset(leaving - serving), frozenset(unbacked))


def unbacked_to_report(
    unbacked: Mapping[str, datetime],
    patience: Mapping[str, timedelta],
    reported: frozenset[str],
    now: datetime,
) -> tuple[frozenset[str], tuple[str, ...]]:
    """(the unbacked instances reported from now on, the ones newly reported this pass).

    `unbacked`: since when each instance's record has named no selected pod. A real pod's
    record outlives its pod by up to its lease's TTL (an agent killed before it revoked its
    lease), so a record is reported only once it stayed unbacked longer than its `patience`
    (what the heartbeat judgement allows it): what is left then is a record no agent keeps
    alive through its lease, or one written by someone else. Each is reported once while it
    lasts; one that goes away is forgotten (reported again if it comes back)."""
    due = {
        name for name, since in unbacked.items() if now - since > patience.get(name, timedelta(0))
    }
    kept = (reported & set(unbacked)) | due
    return frozenset(kept), tuple(sorted(due - reported))
