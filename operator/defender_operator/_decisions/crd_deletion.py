"""Which DefenderComponents the operator finalizes itself while their CRD is being deleted.

kopf stops serving a resource whose CRD is terminating (the API server's discovery then lists
no `patch` verb for it, and kopf serves no resource it cannot patch), so no `on.delete` handler
runs again for it: a resource held by the retention finalizer would hold the CRD's deletion
(and every namespace's) for good. The operator finalizes those itself, through the same
retention step kopf would have called."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Held:
    """A resource being deleted that still carries the retention finalizer."""

    namespace: str
    name: str
    uid: str
    resource_version: str
    finalizers: tuple[str, ...]
    body: Mapping[str, Any]

    def remaining(self, finalizer: str) -> list[str]:
        """The finalizers left once the retention one is removed (others stay: not ours)."""
        return [f for f in self.finalizers if f != finalizer]


def crd_deleting(crd: Mapping[str, Any] | None) -> bool:
    """True when the CRD exists and carries a deletion timestamp."""
    if not crd:
        return False
    return bool((crd.get("metadata") or {}).get("deletionTimestamp"))


def held_by_retention(
    crd_is_deleting: bool, items: Iterable[Mapping[str, Any]], finalizer: str
) -> list[Held]:
    """The resources to finalize here: none while the CRD is not being deleted (kopf does it);
    else every one being deleted that still carries `finalizer`."""
    if not crd_is_deleting:
        return []
    held: list[Held] = []
    for item in items:
        meta = item.get("metadata") or {}
        finalizers = tuple(str(f) for f in meta.get("finalizers") or ())
        if not meta.get("deletionTimestamp") or finalizer not in finalizers:
            continue
        held.append(
            Held(
                namespace=str(meta.get("namespace") or ""),
                name=str(meta.get("name") or ""),
                uid=str(meta.get("uid") or ""),
                resource_version=str(meta.get("resourceVersion") or ""),
                finalizers=finalizers,
                body=item,
            )
        )
    return held
