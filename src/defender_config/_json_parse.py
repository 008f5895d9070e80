"""Parsing JSON that someone else wrote: etcd records, export files, settings files.

`json.loads` raises ValueError for malformed input, which every reader already handles, but a
value nested deeper than the interpreter's recursion limit (`"[" * 100000`) raises
RecursionError instead: a RuntimeError, which slips past those handlers and ends the process.
Anyone with etcd write access could crash every instance of a component that way. Readers of
such data parse it with `parse_json`, which fails the same way for both.

Parsing is not the only walk: a record's MAC is computed over `json.dumps` of it, models
validate it, logs may repr it, and each of those goes a few frames deeper than the decoder did.
A value the decoder just managed would make one of them overflow instead. So `parse_json`
also refuses anything nested deeper than `MAX_JSON_DEPTH`, far below that limit and far above
any config, and writers refuse the same depth (`check_depth`) so nothing stored is unreadable.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_JSON_DEPTH", "check_depth", "json_depth_exceeds", "parse_json"]

MAX_JSON_DEPTH = 100
"""Objects and arrays inside one another, counting the outermost as 1."""


def parse_json(data: bytes | bytearray | str) -> Any:
    """`data` parsed as JSON; ValueError (as for any malformed input) when it is not JSON,
    not UTF-8, or nested deeper than MAX_JSON_DEPTH. The message quotes no input."""
    try:
        value = json.loads(data)
    except RecursionError:
        # The decoder gave up part way down; the stack is unwound by now, so carrying on is
        # safe. `from None`: the chained RecursionError adds nothing a reader could act on.
        raise ValueError("JSON nested too deeply to parse") from None
    check_depth(value, _openers(data))
    return value


def check_depth(value: Any, openers: int | None = None) -> None:
    """ValueError when `value` (parsed JSON, or what will be written as JSON) nests objects
    and arrays deeper than MAX_JSON_DEPTH. `openers`, when known, bounds the depth from above
    (the count of `[` and `{` in the text): most values need no walk at all."""
    if openers is not None and openers <= MAX_JSON_DEPTH:
        return
    if json_depth_exceeds(value, MAX_JSON_DEPTH):
        raise ValueError(f"JSON nested too deeply (over {MAX_JSON_DEPTH} levels)")


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """True when `value` nests dicts and lists (tuples too) deeper than `limit`. Iterative:
    the walk that guards against deep nesting must not recurse itself."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _openers(data: bytes | bytearray | str) -> int:
    if isinstance(data, str):
        return data.count("[") + data.count("{")
    return data.count(b"[") + data.count(b"{")
