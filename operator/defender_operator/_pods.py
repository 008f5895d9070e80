"""Which pods are a component's, answered from memory.

kopf keeps one watch on pods and feeds `index_keys` (registered as a kopf index in
`handlers`); every monitor pass then selects its pods from that index instead of listing pods
from the API server: at a thousand components a list per pass would be most of the API
server's load.

A pod is filed under one key per label, `(namespace, label, value)`; a `matchLabels` selector
is the intersection of its pairs' entries. The index only holds `Pod` records (name, uid,
creation time, deletion flag), never pod specs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from defender_operator._decisions.conditions import parse_rfc3339
from defender_operator._kube import Pod

PodKey = tuple[str, str, str]
# kopf's index as monitor passes read it: key -> the pods filed under it.
PodIndex = Mapping[PodKey, Iterable[Pod]]


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    return parse_rfc3339(value) if isinstance(value, str) else None


def _start_state(status: Mapping[str, Any] | None) -> tuple[datetime | None, bool]:
    """(when its containers were last all running, whether a kubelet is still starting it).

    A pod no kubelet reports on (no `startTime`) is neither: it is judged from its creation,
    as before any node existed."""
    if not status or not status.get("startTime"):
        return None, False
    if status.get("phase") not in ("Pending", "Running"):
        return None, False
    containers = status.get("containerStatuses") or []
    starts: list[datetime] = []
    for c in containers:
        running = ((c or {}).get("state") or {}).get("running") or {}
        when = _time(running.get("startedAt"))
        if when is None:
            break
        starts.append(when)
    if containers and len(starts) == len(containers):
        return max(starts), False
    # Some container waits or ended: the kubelet is starting (or restarting) it only while the
    # pod never ran all its containers; a container that crashed after running is the kubelet's
    # restart policy's business and shows as `started` None with `starting` False.
    ever_ran = any(((c or {}).get("lastState") or {}).get("terminated") for c in containers)
    return None, status.get("phase") == "Pending" and not ever_ran


def pod_record(
    name: str, meta: Mapping[str, Any], status: Mapping[str, Any] | None = None
) -> Pod | None:
    """The `Pod` a watch event describes; None when it lacks what a record needs."""
    uid = meta.get("uid")
    when = _time(meta.get("creationTimestamp"))
    if not uid or when is None:
        return None
    started, starting = _start_state(status)
    return Pod(
        name=name,
        uid=str(uid),
        created=when,
        deleting=meta.get("deletionTimestamp") is not None,
        started=started,
        starting=starting,
    )


def index_keys(
    namespace: str | None,
    name: str,
    meta: Mapping[str, Any],
    status: Mapping[str, Any] | None = None,
) -> dict[PodKey, Pod]:
    """The index entries of one pod: one per label."""
    labels = meta.get("labels") or {}
    record = pod_record(name, meta, status)
    if namespace is None or record is None or not labels:
        return {}
    return {(namespace, str(k), str(v)): record for k, v in labels.items()}


def select_pods(index: PodIndex, namespace: str, match_labels: Mapping[str, str]) -> list[Pod]:
    """Pods of `namespace` carrying every label of `match_labels`, by name.

    An empty selector selects nothing: the CRD requires at least one label, and matching every
    pod of a namespace is never what a component means."""
    chosen: dict[str, Pod] | None = None
    for key, value in sorted(match_labels.items()):
        found = index.get((namespace, key, value))
        if not found:
            return []
        by_name = {p.name: p for p in found}
        # By name: a replacement pod of the same name (new uid) may be filed under one label
        # before the other; the later record is as good as the earlier.
        chosen = by_name if chosen is None else {n: by_name[n] for n in chosen if n in by_name}
        if not chosen:
            return []
    return sorted((chosen or {}).values(), key=lambda p: p.name)


# A woken pass waits this long after a pod event: kopf files the pod after the handler returns.
WAKE_DELAY_SECONDS = 0.1


def held_pods(pods: Iterable[Pod]) -> dict[str, bool]:
    """The selected pods by name, each with whether it is being deleted (what
    `_decisions.backing` and the canary pick judge records against)."""
    return {pod.name: pod.deleting for pod in pods}
