"""kopf's record of each handler's progress, read so that no value in it stops the operator.

kopf keeps a handler's progress (started, retries, delayed...) as JSON in an annotation of the
object it handles (`kopf.zalando.org/<handler id>`), and reads it back at every change of the
object before calling any handler. Whoever may patch a DefenderComponent writes its
annotations: a string there nested 5,000 deep raised RecursionError in kopf's `json.loads`, one
that is not JSON JSONDecodeError, a list or a field of the wrong type (a time without a zone, a
count that is text) TypeError or AttributeError a little later. Each of these is raised in the
object's kopf worker: kopf throttled that object and never ran its handlers again while the
annotation stayed (its spec changes were never committed; other objects were not affected,
measured against a real API server in tests/e2e/operator/test_operator_e2e_tenants.py).

A well-formed record is no safer: kopf skips a handler whose record says it succeeded or
failed (`{"success": true}`, whatever the purpose) and stores the diff base as if the change was
handled, and it puts off one whose record is `delayed` (to the year 2999, say). Such a record,
planted alone (an annotation change is no change to kopf) or with a spec change, made the
operator skip the next reconcile of that object: its spec change was never committed.

`_deep_json.install` makes kopf's decoder cut the depth, as for whole objects;
`CheckedProgressStorage` seals each record it stores (an HMAC, under a key this process draws
at start-up and never writes anywhere, of the object's uid, the handler id and the record) and
takes any record without this process's seal, or that kopf could not use, as no record (a
warning names the object, the handler and what is wrong, never the value, once per object and
value): the handler runs as for a new change. kopf's next write of the object's progress removes
the record: the retry it stores, or the purge of every handler's record once a change is
handled (a record of a handler that is not run, the delete handler's on a live object, was
otherwise left for kopf's purge, and read and warned about at every retry until then). Every
handler of the operator is idempotent, so "run again when in doubt" is safe; a record of an
operator before a restart is such a doubt (its retry comes at once, not after its delay).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
from collections import OrderedDict
from typing import Any, Final

import kopf
from kopf._core.actions.progression import parse_iso8601

__all__ = ["SEAL", "CheckedProgressStorage", "unusable"]

log = logging.getLogger("defender_operator.progress")

_TIMES: Final = ("started", "stopped", "delayed")
SEAL: Final = "defenderSeal"
"""The field of a stored record holding its seal (kopf ignores fields it does not know)."""
IGNORED_OBJECTS: Final = 4096
"""Objects whose ignored records are remembered (to warn once and remove them); the oldest is
forgotten first, and then at worst warned about once more."""
# kopf makes an annotation key of each sub-handler id when it purges a record: one the API
# server refuses as a key would fail that patch at every change of the object.
_HANDLER_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.<>/-]{0,252}")


def unusable(record: Any) -> str | None:
    """Why kopf could not use `record` (decoded from its annotation) as a handler's progress,
    or None when it can. What is checked is what kopf would raise on, or fail to write back,
    as it reads a record; the flags and the message kopf converts itself, and a field it does
    not know is its to ignore. The answer quotes no value."""
    if not isinstance(record, dict):
        return f"JSON {type(record).__name__}, not an object"
    for name in _TIMES:
        value = record.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            return f"{name} is not a string"
        try:
            moment = parse_iso8601(value)
        except ValueError:  # iso8601.ParseError
            return f"{name} is not an ISO 8601 time"
        if moment.tzinfo is None:
            # kopf compares it with an aware `now`: TypeError.
            return f"{name} has no time zone"
    retries = record.get("retries")
    if retries is not None and (not isinstance(retries, int) or isinstance(retries, bool)):
        return "retries is not an integer"
    purpose = record.get("purpose")
    if purpose is not None and not isinstance(purpose, str):
        # kopf counts handlers by purpose in a dict: a list or object is unhashable.
        return "purpose is not a string"
    subrefs = record.get("subrefs")
    if subrefs is not None and not (
        isinstance(subrefs, list)
        and all(isinstance(s, str) and _HANDLER_ID.fullmatch(s) for s in subrefs)
    ):
        return "subrefs is not a list of handler ids"
    return None


class CheckedProgressStorage(kopf.SmartProgressStorage):
    """kopf's default progress storage (annotations, and the status stanza it no longer
    writes), whose records carry a seal of this process: `fetch` answers None for a record
    without it, or that kopf could not use (`unusable`)."""

    def __init__(self) -> None:
        super().__init__()
        # Per process, never persisted: after a restart no record is trusted, and the handlers
        # of each object run once more (resume does that anyway).
        self._key = secrets.token_bytes(32)
        # uid → {(handler id, storage index): fingerprint of the value} of the records read as
        # none and not yet purged by kopf: each is warned about once, and removed by kopf's
        # next write of that object's progress.
        self._ignored: OrderedDict[str, dict[tuple[str, int], str]] = OrderedDict()
        self._annotations = next(
            s for s in self.storages if isinstance(s, kopf.AnnotationsProgressStorage)
        )

    def _seal(self, key: str, body: kopf.Body, record: Any) -> str:
        # The uid and handler id: a record copied to another object or handler is no record.
        text = json.dumps([_uid(body), key, record], sort_keys=True, separators=(",", ":"))
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def store(
        self,
        *,
        key: kopf.HandlerId,
        record: kopf.ProgressRecord,
        body: kopf.Body,
        patch: kopf.Patch,
    ) -> None:
        # As kopf stores it (None is no field), which is what `fetch` gets back.
        kept = {k: v for k, v in record.items() if v is not None}
        sealed: Any = {**kept, SEAL: self._seal(key, body, kept)}
        super().store(key=key, record=sealed, body=body, patch=patch)
        # kopf writes this patch anyway: the records read as none go with it. kopf itself purges
        # every handler's record only once a change is handled, so a record of a handler that
        # is not run (the delete handler's, on a live object) stayed while the reconcile was
        # retried, read and warned about at every retry.
        # (Remembered until kopf purges them: warned about once even if this patch is lost.)
        for other, _ in list(self._ignored.get(_uid(body), {})):
            if other != key:
                super().purge(key=kopf.HandlerId(other), body=body, patch=patch)

    def purge(self, *, key: kopf.HandlerId, body: kopf.Body, patch: kopf.Patch) -> None:
        super().purge(key=key, body=body, patch=patch)
        ignored = self._ignored.get(_uid(body))
        if ignored is not None:
            for slot in [slot for slot in ignored if slot[0] == key]:
                del ignored[slot]
            if not ignored:
                del self._ignored[_uid(body)]

    def fetch(self, *, key: kopf.HandlerId, body: kopf.Body) -> kopf.ProgressRecord | None:
        for index, storage in enumerate(self.storages):
            try:
                record = storage.fetch(key=key, body=body)
            except ValueError:  # json.JSONDecodeError
                problem: str | None = "not JSON"
                record = None
            else:
                if record is None:
                    continue
                problem = unusable(record)
                if problem is None:
                    content: Any = {k: v for k, v in record.items() if k != SEAL}
                    seal = record.get(SEAL)
                    if isinstance(seal, str) and hmac.compare_digest(
                        seal, self._seal(key, body, content)
                    ):
                        # Without the seal: kopf compares it with what it would store.
                        return content  # type: ignore[no-any-return]
                    problem = (
                        "not one this operator process wrote: an editor of the object, or an"
                        " operator before a restart"
                    )
            if self._first_time(body, key, index, record):
                meta = body.get("metadata") or {}
                log.warning(
                    "kopf's progress record of handler %s on %s/%s cannot be used (%s): the"
                    " handler runs as for a new change, and kopf's next write of the object's"
                    " progress removes the record",
                    key,
                    meta.get("namespace") or "",
                    meta.get("name") or "",
                    problem,
                )
        return None

    def _first_time(self, body: kopf.Body, key: str, index: int, record: Any) -> bool:
        """Whether this value of the record is new for the object (and remember it)."""
        if record is None:  # not JSON: the annotation's text itself
            annotations = (body.get("metadata") or {}).get("annotations") or {}
            keys = self._annotations.make_keys(key, body=body)
            value: Any = [annotations.get(k) for k in keys]
        else:
            value = record
        # A cut record nests at most _deep_json.CUT_DEPTH deep: json.dumps does not recurse out.
        text = json.dumps(value, sort_keys=True, default=str)
        fingerprint = hashlib.sha256(text.encode()).hexdigest()
        uid = _uid(body)
        ignored = self._ignored.setdefault(uid, {})
        self._ignored.move_to_end(uid)
        while len(self._ignored) > IGNORED_OBJECTS:
            self._ignored.popitem(last=False)
        if ignored.get((key, index)) == fingerprint:
            return False
        ignored[(key, index)] = fingerprint
        return True


def _uid(body: Any) -> str:
    return str((body.get("metadata") or {}).get("uid") or "")
