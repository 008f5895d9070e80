"""kopf's handler progress storage, without its copies of every event's object.

To tell what changed, kopf strips its own progress records from the old and the new essence
(spec, labels, annotations) of every watch event: each of the two storages of the default
`SmartProgressStorage` deep-copies the essence first, four copies of the spec (a component's
whole config) per event, even though there is almost never a record to strip. Both essences are
kopf's own fresh copies (built or parsed for this event), so when there is nothing to strip the
essence itself is the answer; otherwise kopf's own clear runs, unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf


class LeanProgressStorage(kopf.SmartProgressStorage):
    """`SmartProgressStorage` (the same records, where kopf keeps them) with a `clear` that
    copies nothing when it would remove nothing."""

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        if self._nothing_to_clear(essence):
            return essence
        return super().clear(essence=essence)

    def _nothing_to_clear(self, essence: Mapping[str, Any]) -> bool:
        """True only when every storage's clear, and kopf's pruning of empty stanzas after it,
        would leave `essence` as it is; unsure (a storage of another kind) is False."""
        meta = essence.get("metadata", {})
        if "metadata" in essence and not (isinstance(meta, Mapping) and meta):
            return False  # an empty or odd metadata stanza: kopf prunes it (or fails)
        if any(key in meta and not meta[key] for key in ("annotations", "labels")):
            return False
        if "status" in essence and not essence["status"]:
            return False
        annotations = meta.get("annotations") or {}
        for storage in self.storages:
            if isinstance(storage, kopf.AnnotationsProgressStorage):
                marker = f"{storage.prefix}/"
                if storage.prefix and any(str(k).startswith(marker) for k in annotations):
                    return False
            elif isinstance(storage, kopf.StatusProgressStorage):
                if _present(essence, storage.field):
                    return False
            else:
                return False
        return True


def _present(essence: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    """True when `path` is there, or when a stanza on the way is not a mapping (unsure: kopf
    then decides, or fails as it would have)."""
    node: Any = essence
    for key in path:
        if not isinstance(node, Mapping):
            return True
        if key not in node:
            return False
        node = node[key]
    return True
