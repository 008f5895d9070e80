"""kopf's diff base (the spec, labels and annotations last handled) kept in
status.lastHandledConfiguration and written by the reconcile's own status patch.

kopf records what it handled after every successful create/update handler, by default in an
annotation: a patch of the object of its own, one more API write per component and per
change. Here the reconcile publishes the same JSON with its status fields, and kopf's own
store is skipped when that exact value was published for the object (otherwise, e.g. after a
failed handler kopf will not retry, kopf writes it as usual).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, cast

import kopf

FIELD = "lastHandledConfiguration"


def _encode(essence: Any) -> str:
    # kopf's own encoding (compact JSON), so kopf's fetch reads back what it would have stored.
    return json.dumps(essence, separators=(",", ":"))


def _uid(body: Any) -> str:
    return str((body.get("metadata") or {}).get("uid") or "")


class PublishedDiffBase(kopf.StatusDiffBaseStorage):
    """kopf's status diff-base storage, told which values the operator already wrote.

    It remembers the last value handled per object (published by the reconcile, or stored by
    kopf) and answers kopf's `fetch` from it: kopf waits for its OWN patches to come back
    through the watch before it trusts an event, not for ours, so an event older than the
    reconcile's status patch would otherwise show the old diff base and the spec it handled
    as a change once more (handled twice: a second revert to MASTER, say). After a restart
    nothing is remembered and the object's status says."""

    def __init__(self) -> None:
        super().__init__(field=f"status.{FIELD}")
        self._handled: dict[str, str] = {}  # uid → the value last handled (kopf's JSON)

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        # kopf deep-copies the whole body, then drops status and all of metadata but labels
        # and annotations: at every watch event, for a status and managedFields of a few KB.
        # Hand it only what it keeps; the essence is the same.
        if extra_fields:
            return super().build(body=body, extra_fields=extra_fields)
        meta = body.get("metadata") or {}
        slim = {k: v for k, v in body.items() if k not in ("status", "metadata")}
        slim["metadata"] = {k: meta[k] for k in ("labels", "annotations") if k in meta}
        return super().build(body=cast(kopf.Body, slim))

    def encoded(self, body: Any) -> str:
        """The value kopf will store once this body's handlers succeed."""
        return _encode(self.build(body=body))

    def published(self, body: Any, value: str) -> None:
        """The reconcile wrote `value` for `body` with its status."""
        self._handled[_uid(body)] = value

    def forget(self, body: Any) -> None:
        self._handled.pop(_uid(body), None)

    def fetch(self, *, body: Any) -> Any:
        handled = self._handled.get(_uid(body))
        if handled is not None:
            return json.loads(handled)
        return super().fetch(body=body)

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        value = _encode(essence)
        if self._handled.get(_uid(body)) == value:
            return  # published with the reconcile's status
        super().store(body=body, patch=patch, essence=essence)
        self._handled[_uid(body)] = value


DIFFBASE = PublishedDiffBase()
