"""Parsing JSON that someone else wrote: etcd records, export files, settings files.

`json.loads` raises ValueError for malformed input, which every reader already handles, but a
value nested deeper than the interpreter's recursion limit (`"[" * 100000`) raises
RecursionError instead: a RuntimeError, which slips past those handlers and ends the process.
Anyone with etcd write access could crash every instance of a component that way. Readers of
such data parse it with `parse_json`, which fails the same way for both.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["parse_json"]


def parse_json(data: bytes | bytearray | str) -> Any:
    """`data` parsed as JSON; ValueError (as for any malformed input) when it is not JSON,
    not UTF-8, or nested too deeply to parse. The message quotes no input."""
    try:
        return json.loads(data)
    except RecursionError:
        # The decoder gave up part way down; the stack is unwound by now, so carrying on is
        # safe. `from None`: the chained RecursionError adds nothing a reader could act on.
        raise ValueError("JSON nested too deeply to parse") from None
