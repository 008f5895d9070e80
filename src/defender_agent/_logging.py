"""Structured JSON logs, one object per line on stderr, for ``kubectl logs`` and log shippers
(the library's format: time, level, logger, message, extras)."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from defender_config import JsonLogFormatter

__all__ = ["configure_logging"]


def configure_logging(
    level: str, static: dict[str, Any] | None = None, stream: TextIO | None = None
) -> None:
    """Send every log record (the library's too) through the library's JSON formatter."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLogFormatter(static))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
