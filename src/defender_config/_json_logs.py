"""One JSON log line format for every process of the config plane (operator, sidecar agent).

Each record becomes one object: `time`, `level`, `logger`, `message`, the Kubernetes object it
is about as `object: {namespace, name}` when there is one, the `extra=` fields our own code
passes (alerts, failover events, reasons), fixed fields of the process (`static`), and
`exception`. kopf's per-object plumbing (`settings`, its whole OperatorSettings repr;
`k8s_skip`; `k8s_ref` with apiVersion, kind and uid) is not information a reader needs and was
most of each operator line's size, so only the object's namespace and name stay.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else came from `extra=`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_KOPF_PLUMBING = {"settings", "k8s_skip", "k8s_ref"}


class JsonLogFormatter(logging.Formatter):
    """Render a record as one compact JSON object (see the module docstring for the fields)."""

    def __init__(self, static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self._static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict) and ref.get("name"):
            doc["object"] = {
                k: str(ref[k]) for k in ("namespace", "name") if ref.get(k) is not None
            }
        doc.update(self._static)
        for key, value in vars(record).items():
            if key in _STANDARD or key in _KOPF_PLUMBING or key.startswith("_"):
                continue
            doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))
