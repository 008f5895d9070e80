"""What the operator keeps of the objects kopf hands it.

kopf keeps every daemon's latest body for the daemon's lifetime (its "live" body, replaced by
each watch event). Most of a DefenderComponent's body in memory is `metadata.managedFields`,
the API server's field-ownership bookkeeping: measured on a Ready component, ~40 KB of Python
dicts for a 10 KB object, ~30 MiB at 1,000 components. Neither kopf nor the operator reads it,
so the operator drops it from the body it is handed: every event's, in the name index that
sees each event before any handler (`handlers.name_holders`), and again before each monitor
pass (kopf puts an event's body in place before it decides whether to process the event: one
it skips while throttling errors reaches no index).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any


def shed_managed_fields(body: Any) -> None:
    """Drop `metadata.managedFields` from `body`: a kopf Body (its source mapping, which kopf
    keeps) or a plain dict. Anything else, or a kopf whose Body is built otherwise, is left
    alone: this only saves memory, it never changes what a handler sees of spec or status."""
    raw = body if isinstance(body, MutableMapping) else getattr(body, "_src", None)
    if not isinstance(raw, MutableMapping):
        return
    meta = raw.get("metadata")
    if isinstance(meta, MutableMapping):
        meta.pop("managedFields", None)
