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


def pod_record(name: str, meta: Mapping[str, Any]) -> Pod | None:
    """The `Pod` a watch event describes; None when it lacks what a record needs."""
    uid = meta.get("uid")
    created = meta.get("creationTimestamp")
    if not uid or not created:
        return None
    when = created if isinstance(created, datetime) else parse_rfc3339(created)
    if when is None:
        return None
    return Pod(
        name=name,
        uid=str(uid),
        created=when,
        deleting=meta.get("deletionTimestamp") is not None,
    )


def index_keys(namespace: str | None, name: str, meta: Mapping[str, Any]) -> dict[PodKey, Pod]:
    """The index entries of one pod: one per label."""
    labels = meta.get("labels") or {}
    record = pod_record(name, meta)
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
