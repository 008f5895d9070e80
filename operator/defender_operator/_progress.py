"""kopf's handler progress, read back from a place anyone who may edit the object writes.

kopf keeps each handler's progress (started, retries, success, ...) as JSON in an annotation
`kopf.zalando.org/<handler id>` and decodes it with `json.loads` at every create, update,
resume and delete it handles. Annotations belong to whoever may patch the DefenderComponent.
With kopf's own storage, a value kopf cannot use (not JSON, not an object, a time without a
zone, a count that is text, nesting beyond Python's recursion limit) raised in kopf's
processing of that object: kopf throttled the object (an error traceback in the log at each
retry, 1 s, 1 s, 2 s, ... apart) and never ran its handlers again while the annotation stayed,
so its spec changes were never committed and nothing on the resource said why. Other objects
were not affected (kopf throttles per object; tests/e2e checks the other namespace).

`CheckedProgressStorage` reads the same places as kopf's default storage and hands kopf only a
record of the shape kopf writes (`checked_record`, pure). Anything else counts as no record:
the handler runs afresh, which is harmless because every handler of ours reconciles the whole
object, and kopf's next write of its progress replaces the annotation. What the record says
within that shape (a retry count, a delay) only ever concerns its own object.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final, cast

import iso8601
import kopf

log = logging.getLogger("defender_operator")

_TIMES: Final = ("started", "stopped", "delayed")
_TEXTS: Final = ("purpose", "message")
_FLAGS: Final = ("success", "failure")


class UnusableProgress(ValueError):
    """A stored progress record kopf could not use. The message names the field at fault and
    never quotes the value (it is whatever the object's editor wrote)."""


def _time(field: str, value: object) -> None:
    if not isinstance(value, str):
        raise UnusableProgress(f"{field} is not a string")
    try:
        # kopf's own parse (`progression.parse_iso8601`).
        when = iso8601.parse_date(value, default_timezone=None)
    except (iso8601.ParseError, ValueError, OverflowError) as exc:
        raise UnusableProgress(f"{field} is not an ISO 8601 time") from exc
    # kopf compares it with an aware "now": a naive time raises TypeError there.
    if when.tzinfo is None or when.utcoffset() is None:
        raise UnusableProgress(f"{field} has no time zone")


def checked_record(value: object) -> kopf.ProgressRecord:
    """`value` as a progress record kopf can use, keeping only the fields kopf reads; raises
    UnusableProgress when any of them is not of the type kopf writes."""
    if not isinstance(value, Mapping):
        raise UnusableProgress("the record is not a JSON object")
    record: dict[str, Any] = {}
    for field in _TIMES:
        if value.get(field) is not None:
            _time(field, value[field])
            record[field] = value[field]
    for field in _TEXTS:
        if value.get(field) is not None:
            if not isinstance(value[field], str):
                raise UnusableProgress(f"{field} is not a string")
            record[field] = value[field]
    for field in _FLAGS:
        if value.get(field) is not None:
            if not isinstance(value[field], bool):
                raise UnusableProgress(f"{field} is not a boolean")
            record[field] = value[field]
    retries = value.get("retries")
    if retries is not None:
        if not isinstance(retries, int) or isinstance(retries, bool):
            raise UnusableProgress("retries is not an integer")
        record["retries"] = retries
    subrefs = value.get("subrefs")
    if subrefs is not None:
        if not isinstance(subrefs, list) or not all(isinstance(s, str) for s in subrefs):
            raise UnusableProgress("subrefs is not a list of strings")
        record["subrefs"] = list(subrefs)
    return cast(kopf.ProgressRecord, record)  # each key and its type checked above


def _where(body: Any) -> str:
    meta = body.get("metadata") or {}
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"


class CheckedProgressStorage(kopf.SmartProgressStorage):
    """kopf's default progress storage (annotations, then status), whose `fetch` gives kopf
    only records `checked_record` accepts."""

    def fetch(self, *, key: kopf.HandlerId, body: kopf.Body) -> kopf.ProgressRecord | None:
        for storage in self.storages:
            try:
                content = storage.fetch(key=key, body=body)
                if content is None:
                    continue
                return checked_record(content)
            # What kopf's decoding raises on any string: JSONDecodeError and an integer of
            # too many digits are ValueErrors, nesting too deep a RecursionError.
            except (ValueError, TypeError, RecursionError) as exc:
                reason = str(exc) if isinstance(exc, UnusableProgress) else type(exc).__name__
                log.warning(
                    "%s: ignoring the stored progress of handler %s (%s): %s",
                    _where(body),
                    key,
                    type(storage).__name__,
                    reason,
                )
        return None
