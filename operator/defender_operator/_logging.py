"""Structured JSON logs (one object per line), or plain text for a terminal."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# kopf attaches its whole OperatorSettings (a 1.7 KB repr) and a posting flag to every
# per-object record: plumbing, not information, and most of each line's size.
_KOPF_PLUMBING = {"settings", "k8s_skip"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # kopf's per-object logger puts the object in `k8s_ref`; keep any structured extras.
        for key, value in vars(record).items():
            if key in _STANDARD or key in _KOPF_PLUMBING or key.startswith("_"):
                continue
            if key == "k8s_ref" and isinstance(value, dict):
                doc[key] = {k: str(v) for k, v in value.items() if v is not None}
            else:
                doc[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure(fmt: str, level: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
