"""kopf's diff base (the spec, labels and annotations last handled), kept as a digest in
status.lastHandledDigest and written by the reconcile's own status patch.

kopf records what it handled after every successful create/update handler, by default as the
whole essence in an annotation: a patch of the object of its own, one more API write per
component and per change, and a copy of the spec in every stored object. Here the reconcile
publishes a digest of the same essence with its status fields, and kopf's own store is skipped
when that exact value was published for the object (otherwise, e.g. after a failed handler kopf
will not retry, kopf writes it as usual).

Only a digest is kept because no handler of ours reads kopf's `old` or `diff`: each reconciles
the whole spec. kopf needs the diff base to tell "changed" from "unchanged", and a digest of the
essence answers that; a changed object's diff is reported against `CHANGED`.

Operators before the digest kept the essence's JSON in status.lastHandledConfiguration. It is
read while no digest is there, and removed when the digest is written. The digest has a field
of its own so that an operator rolled back to such a version finds no digest where it expects
JSON (it would fail every event of the object): it sees no diff base, or the JSON it wrote,
and reconciles the object once more.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any, Final, cast

import kopf

from defender_config.contract import KIND
from defender_operator import _deep_json

FIELD = "lastHandledDigest"
LEGACY_FIELD = "lastHandledConfiguration"
_DIGEST = "sha256:"

# What `fetch` returns for an object whose essence is not the one handled: it differs from any
# essence (a custom resource's schema prunes an unknown top-level field), so kopf sees a change.
CHANGED: Final = {FIELD: None}


def _encode(essence: Any) -> str:
    # kopf's own encoding (compact JSON): a digest of what kopf would have stored.
    return json.dumps(essence, separators=(",", ":"))


def _digest(essence: Any) -> str:
    return _DIGEST + hashlib.sha256(_encode(essence).encode()).hexdigest()


def _uid(body: Any) -> str:
    return str((body.get("metadata") or {}).get("uid") or "")


class PublishedDiffBase(kopf.StatusDiffBaseStorage):
    """kopf's status diff-base storage, keeping a digest, told which values the operator
    already wrote.

    It remembers the last value handled per object (published by the reconcile, or stored by
    kopf) and answers kopf's `fetch` from it: kopf waits for its OWN patches to come back
    through the watch before it trusts an event, not for ours, so an event older than the
    reconcile's status patch would otherwise show the old diff base and the spec it handled
    as a change once more (handled twice: a second revert to MASTER, say). After a restart
    nothing is remembered and the object's status says.

    The digest is of the essence `build` makes without extra fields: no handler of the
    operator names a field (handlers' `field=`), which a unit test pins."""

    def __init__(self) -> None:
        super().__init__(field=f"status.{FIELD}")
        self._handled: dict[str, str] = {}  # uid → the digest last handled
        # The essence `fetch` built to compare digests: kopf's `build` of the same event
        # follows at once (body, resourceVersion, essence).
        self._fetched: tuple[Any, Any, kopf.BodyEssence] | None = None

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        # kopf deep-copies the whole body, then drops status and all of metadata but labels
        # and annotations: at every watch event, for a status and managedFields of a few KB.
        # Hand it only what it keeps; the essence is the same.
        if extra_fields:
            return super().build(body=body, extra_fields=extra_fields)
        if body.get("kind", KIND) != KIND:
            # kopf builds the essence of every object it watches, pods too (for the pod index,
            # which does not read it): three deep copies of a pod's spec per pod event, for
            # nothing.
            return cast(kopf.BodyEssence, {})
        meta = body.get("metadata") or {}
        fetched, self._fetched = self._fetched, None
        if fetched is not None and fetched[0] is body and fetched[1] == meta.get("resourceVersion"):
            return fetched[2]
        slim = {k: v for k, v in body.items() if k not in ("status", "metadata")}
        slim["metadata"] = {k: meta[k] for k in ("labels", "annotations") if k in meta}
        return super().build(body=cast(kopf.Body, slim))

    def encoded(self, body: Any) -> str:
        """The digest of `body`'s essence: what a successful handling of it stores."""
        return _digest(self.build(body=body))

    def handled_fields(self, body: Any, essence: Any) -> dict[str, Any]:
        """The status fields that record `essence` (kopf's `new`) as handled for `body`: the
        digest, and the removal of an earlier operator's JSON (merge patch: None deletes)."""
        fields: dict[str, Any] = {FIELD: _digest(essence)}
        if (body.get("status") or {}).get(LEGACY_FIELD) is not None:
            fields[LEGACY_FIELD] = None
        return fields

    def published(self, body: Any, value: str) -> None:
        """The reconcile wrote `value` for `body` with its status."""
        self._handled[_uid(body)] = value

    def forget(self, body: Any) -> None:
        self._handled.pop(_uid(body), None)

    def fetch(self, *, body: Any) -> Any:
        status = body.get("status") or {}
        handled = self._handled.get(_uid(body)) or status.get(FIELD) or None
        if handled is None:
            return _legacy(status.get(LEGACY_FIELD))
        essence = self.build(body=body)
        self._fetched = (body, (body.get("metadata") or {}).get("resourceVersion"), essence)
        return essence if _digest(essence) == handled else CHANGED

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        fields = self.handled_fields(body, essence)
        if self._handled.get(_uid(body)) == fields[FIELD]:
            return  # published with the reconcile's status
        for key, value in fields.items():
            patch.status[key] = value
        self._handled[_uid(body)] = fields[FIELD]


def _legacy(value: Any) -> Any:
    """An earlier operator's diff base (the essence as JSON); None when there is none or it
    does not parse (kopf then handles the object as new: one more reconcile, no failure)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        # Cut, not json.loads: whoever may write the object's status wrote this string, and
        # one nested thousands deep raised RecursionError in kopf's worker (the operator stops).
        essence = _deep_json.loads(value)
    except ValueError:
        return None
    return essence if isinstance(essence, dict) else None


DIFFBASE = PublishedDiffBase()
