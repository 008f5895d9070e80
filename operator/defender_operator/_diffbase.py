"""kopf's diff base (the spec, labels and annotations last handled) kept in
status.lastHandledConfiguration and written by the reconcile's own status patch.

kopf records what it handled after every successful create/update handler, by default in an
annotation: a patch of the object of its own, one more API write per component and per
change. Here the reconcile publishes the same JSON with its status fields, and kopf's own
store is skipped when that exact value was published for the object (otherwise, e.g. after a
failed handler kopf will not retry, kopf writes it as usual).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import kopf

FIELD = "lastHandledConfiguration"


def _encode(essence: Any) -> str:
    # kopf's own encoding (compact JSON), so kopf's fetch reads back what it would have stored.
    return json.dumps(essence, separators=(",", ":"))


def _uid(body: Any) -> str:
    return str((body.get("metadata") or {}).get("uid") or "")


class PublishedDiffBase(kopf.StatusDiffBaseStorage):
    """kopf's status diff-base storage, told which values the operator already wrote."""

    def __init__(self) -> None:
        super().__init__(field=f"status.{FIELD}")
        # uid → SHA-256 of the value published; a digest, not the value, to keep memory small.
        self._published: dict[str, str] = {}

    def encoded(self, body: Any) -> str:
        """The value kopf will store once this body's handlers succeed."""
        return _encode(self.build(body=body))

    def published(self, body: Any, value: str) -> None:
        """The reconcile wrote `value` for `body` with its status."""
        self._published[_uid(body)] = hashlib.sha256(value.encode()).hexdigest()

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        done = self._published.pop(_uid(body), None)
        if done is not None and done == hashlib.sha256(_encode(essence).encode()).hexdigest():
            return
        super().store(body=body, patch=patch, essence=essence)


DIFFBASE = PublishedDiffBase()
