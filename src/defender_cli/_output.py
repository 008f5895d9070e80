"""Tables, colours and JSON. Colour only on a terminal (and never with NO_COLOR set), so piped
output stays plain text for grep and awk."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CODES = {"red": "31", "green": "32", "yellow": "33", "blue": "34", "dim": "2", "bold": "1"}

# Words that get a colour wherever they appear in a STATUS-like cell.
_GOOD = {"RUNNING", "True", "ok", "yes"}
_WARN = {"STARTING", "Unknown", "stale", "behind"}
_BAD = {"STOPPED", "False", "error", "missing"}


def use_colour(stream: TextIO, forced: bool | None = None) -> bool:
    if forced is not None:
        return forced
    if os.environ.get("NO_COLOR"):
        return False
    return hasattr(stream, "isatty") and stream.isatty()


@dataclass
class Printer:
    out: TextIO
    colour: bool
    err: TextIO | None = None
    """Where warnings go (None: sys.stderr as it is when one is written): never into `out`,
    which `-o json` and scripts read."""

    @classmethod
    def for_stream(
        cls, out: TextIO | None = None, colour: bool | None = None, *, err: TextIO | None = None
    ) -> Printer:
        stream = out if out is not None else sys.stdout
        return cls(stream, use_colour(stream, colour), err)

    def warn(self, text: str) -> None:
        """One line on stderr, control characters escaped (it may quote an API server)."""
        (self.err if self.err is not None else sys.stderr).write(printable(text) + "\n")

    def paint(self, text: str, colour: str) -> str:
        if not self.colour or not text:
            return text
        return f"\x1b[{_CODES[colour]}m{text}\x1b[0m"

    def status(self, text: str) -> str:
        if text in _GOOD:
            return self.paint(text, "green")
        if text in _WARN:
            return self.paint(text, "yellow")
        if text in _BAD:
            return self.paint(text, "red")
        return text

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """Columns padded to the widest cell (measured without colour codes), kubectl style."""
        cells = [list(headers), *[list(r) for r in rows]]
        widths = [max(len(_ANSI.sub("", row[i])) for row in cells) for i in range(len(headers))]
        for n, row in enumerate(cells):
            padded = []
            for i, cell in enumerate(row):
                pad = widths[i] - len(_ANSI.sub("", cell))
                text = self.paint(cell, "bold") if n == 0 else cell
                padded.append(text + " " * pad if i < len(row) - 1 else text)
            self.line("   ".join(padded).rstrip())

    def json(self, data: Any) -> None:
        self.out.write(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


# Control characters (C0, DEL, C1: what starts a terminal escape sequence, moves the cursor or
# ends the line) and the bidirectional embeddings, overrides and isolates, which reorder what
# follows on the line so that a row reads as something else.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control character and bidi override written as a visible escape
    (``\\x1b``, ``\\u202e``). What the plugin shows comes from etcd, where anyone with etcd
    write (no key needed) can put an alert or heartbeat: raw, its escape sequences would clear
    the operator's screen, hide or recolour text, or start a fake row."""
    return _UNPRINTABLE.sub(_escape, text)


def printable_data(data: Any) -> Any:
    """``data`` (a command's result, as ``-o json`` shows it) with :func:`printable` applied to
    every string in it, keys included, for the table output (JSON escapes them itself)."""
    if isinstance(data, str):
        return printable(data)
    if isinstance(data, dict):
        return {printable_data(k): printable_data(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [printable_data(v) for v in data]
    return data


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot show {type(value).__name__} as JSON")


def age(then: datetime | None, now: datetime | None = None) -> str:
    """kubectl-style age: 42s, 3m, 2h, 5d; `-` when unknown."""
    if then is None:
        return "-"
    now = now or datetime.now(UTC)
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def seconds_since(then: datetime | None, now: datetime | None = None) -> float | None:
    if then is None:
        return None
    return round(((now or datetime.now(UTC)) - then).total_seconds(), 3)


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
