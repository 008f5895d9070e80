"""A JSON decoder for Kubernetes objects that survives any nesting the API server takes.

The API server stores objects nested up to ~10,000 levels (Go's decoder limit), and anyone who
may create a DefenderComponent can send one (`spec.config` is free-form). Python's `json.loads`
raises RecursionError near 1,000 levels, and every recursive copy or diff of a decoded object
near 500: kopf's watch stream, its list/patch calls, its webhook server and the kubernetes
client all decode with `json.loads`, so one such object stopped the operator for every
namespace (and kept it from starting again) until it was deleted by hand.

`loads` decodes what `json.loads` decodes, equal, and replaces every object or array nested
deeper than CUT_DEPTH (counting the outermost as 1) by MARKER. Kubernetes objects nest < 30
levels; a component's config and customSchema may nest 100 under `spec`, so a config cut here
is still deeper than the library stores and refused as ConfigInvalid by the usual check.
`install` points the decoders that read Kubernetes objects in this process at it.
"""

from __future__ import annotations

import json
import json.scanner
import math
import re
from collections.abc import Callable
from types import ModuleType
from typing import Any, Final

__all__ = ["CUT_DEPTH", "MARKER", "TooDeep", "install", "loads", "loads_uncut"]

CUT_DEPTH: Final = 128
"""Objects and arrays inside one another kept, counting the outermost as 1."""
MARKER: Final = f"<cut: nested deeper than {CUT_DEPTH} levels>"

_scanstring: Final[Callable[[str, int, bool], tuple[str, int]]] = json.decoder.scanstring  # type: ignore[attr-defined]  # public, untyped in typeshed
_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = json.scanner.NUMBER_RE
# Outside strings, JSON is brackets and these (whitespace, separators, numbers, literals).
_BRACKETS_ONLY: Final = str.maketrans("{[]}", "(())", " \t\n\r:,0123456789+-.eEtruefalsnNaIiy")
_CONSTANTS: Final[dict[str, Any]] = {
    "null": None,
    "true": True,
    "false": False,
    "NaN": math.nan,
    "Infinity": math.inf,
    "-Infinity": -math.inf,
}


def loads(s: str | bytes | bytearray) -> Any:
    """`json.loads(s)`, with anything nested deeper than CUT_DEPTH replaced by MARKER.
    Malformed input raises json.JSONDecodeError (a ValueError) as `json.loads` does."""
    # The hot path (every watch event and API response): no object with fewer openers than
    # CUT_DEPTH can nest deeper, and counting is C-speed.
    openers = s.count("{") + s.count("[") if isinstance(s, str) else s.count(b"{") + s.count(b"[")
    if openers <= CUT_DEPTH:
        return json.loads(s)
    text = s if isinstance(s, str) else s.decode(json.detect_encoding(s), "surrogatepass")
    if not nests_deeper(text, CUT_DEPTH):
        return json.loads(text)
    try:
        value = json.loads(text)
    except RecursionError:
        # The C decoder gave up part way down; the stack is unwound by now.
        value = parse_iteratively(text)
    return cut(value)


class TooDeep(ValueError):
    """JSON nested deeper than CUT_DEPTH where a cut value would be wrong (`loads_uncut`)."""


def loads_uncut(s: str | bytes | bytearray) -> Any:
    """`json.loads(s)` for a value the caller writes back, where a cut one would lose what was
    cut: nesting deeper than CUT_DEPTH raises TooDeep, malformed input json.JSONDecodeError,
    both ValueError (never RecursionError)."""
    openers = s.count("{") + s.count("[") if isinstance(s, str) else s.count(b"{") + s.count(b"[")
    if openers <= CUT_DEPTH:
        return json.loads(s)
    text = s if isinstance(s, str) else s.decode(json.detect_encoding(s), "surrogatepass")
    if nests_deeper(text, CUT_DEPTH):
        # Not decoded at all: the nesting measure is string operations, the decoder recursion.
        raise TooDeep(f"JSON nested deeper than {CUT_DEPTH} levels")
    return json.loads(text)


def nests_deeper(text: str, limit: int) -> bool:
    """Whether objects and arrays nest deeper than `limit` in `text` (valid JSON; any answer for
    other text, which the decoder refuses anyway). C-speed string operations only: a big
    shallow object (a Pod's managedFields have hundreds of brackets) costs no Python walk."""
    # Drop escaped backslashes, then escaped quotes: what is left between quotes is strings.
    plain = text.replace("\\\\", "").replace('\\"', "")
    brackets = "".join(plain.split('"')[::2]).translate(_BRACKETS_ONLY)
    # Each round removes the containers that hold no other: one level of nesting.
    for _ in range(limit):
        if not brackets:
            return False
        brackets = brackets.replace("()", "")
    return bool(brackets)


def cut(value: Any) -> Any:
    """`value` (decoded JSON) with every dict or list deeper than CUT_DEPTH replaced by MARKER,
    in place. Iterative: the walk that guards against deep nesting must not recurse."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        slots: Any = list(node.items()) if isinstance(node, dict) else enumerate(node)
        for slot, child in slots:
            if isinstance(child, dict | list):
                if depth >= CUT_DEPTH:
                    node[slot] = MARKER
                else:
                    stack.append((child, depth + 1))
    return value


def parse_iteratively(s: str) -> Any:
    """`json.loads(s)` for a str, with an explicit stack instead of recursion: any depth.
    Strings decode with the json module's own scanner, numbers by its number pattern."""
    if s.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", s, 0)
    # One frame per open container: [list, None] or [dict, the key whose value comes next].
    stack: list[list[Any]] = []
    i = _skip(s, 0)
    while True:
        value: Any
        c = s[i : i + 1]
        if c == "{":
            i = _skip(s, i + 1)
            if s[i : i + 1] == "}":
                value, i = {}, i + 1
            else:
                key, i = _key(s, i)
                stack.append([{}, key])
                continue
        elif c == "[":
            i = _skip(s, i + 1)
            if s[i : i + 1] == "]":
                value, i = [], i + 1
            else:
                stack.append([[], None])
                continue
        elif c == '"':
            value, i = _scanstring(s, i + 1, True)
        else:
            value, i = _scalar(s, i)
        # Store the value in its container; close every container that ends here.
        while True:
            i = _skip(s, i)
            if not stack:
                if i != len(s):
                    raise json.JSONDecodeError("Extra data", s, i)
                return value
            frame = stack[-1]
            container = frame[0]
            c = s[i : i + 1]
            if isinstance(container, list):
                container.append(value)
                closer = "]"
            else:
                container[frame[1]] = value
                closer = "}"
            if c == ",":
                i = _skip(s, i + 1)
                if closer == "}":
                    frame[1], i = _key(s, i)
                break
            if c != closer:
                raise json.JSONDecodeError("Expecting ',' delimiter", s, i)
            stack.pop()
            value, i = container, i + 1


def _skip(s: str, i: int) -> int:
    m = _WS.match(s, i)
    assert m is not None  # matches the empty string anywhere
    return m.end()


def _key(s: str, i: int) -> tuple[str, int]:
    if s[i : i + 1] != '"':
        raise json.JSONDecodeError("Expecting property name enclosed in double quotes", s, i)
    key, i = _scanstring(s, i + 1, True)
    i = _skip(s, i)
    if s[i : i + 1] != ":":
        raise json.JSONDecodeError("Expecting ':' delimiter", s, i)
    return key, _skip(s, i + 1)


def _scalar(s: str, i: int) -> tuple[Any, int]:
    for word, constant in _CONSTANTS.items():
        if s.startswith(word, i):
            return constant, i + len(word)
    m = _NUMBER.match(s, i)
    if m is None:
        raise json.JSONDecodeError("Expecting value", s, i)
    integer, frac, exp = m.groups()
    if frac or exp:
        return float(integer + (frac or "") + (exp or "")), m.end()
    return int(integer), m.end()


# What the patched modules call `json`: the json module with our `loads`.
_JSON: Final = ModuleType("json", "The json module with a decoder that survives any nesting.")
_JSON.__dict__.update({name: getattr(json, name) for name in json.__all__}, loads=loads)


def install() -> None:
    """Point every decoder that reads Kubernetes objects in this process at `loads`: kopf's
    watch stream and webhook server, aiohttp responses (kopf's list, get and patch calls), the
    kubernetes client, and kopf's progress and diff-base storages (JSON in an object's
    annotations and status). Idempotent. tests/unit/operator/test_operator_deep_json.py pins
    each place, so an upgrade that moves one fails there."""
    import aiohttp
    import kopf._cogs.clients.api as kopf_api
    import kopf._cogs.configs.diffbase as kopf_diffbase
    import kopf._cogs.configs.progress as kopf_progress
    import kopf._kits.webhooks as kopf_webhooks
    from kubernetes.client import api_client

    kopf_api.json = _JSON  # type: ignore[attr-defined]
    kopf_webhooks.json = _JSON  # type: ignore[attr-defined]
    # kopf's storages decode JSON strings of an object's annotations (handler progress, the
    # annotation diff base) and status: anyone who may patch the object writes them.
    kopf_progress.json = _JSON  # type: ignore[attr-defined]
    kopf_diffbase.json = _JSON  # type: ignore[attr-defined]
    api_client.json = _JSON  # type: ignore[attr-defined]
    # `loads` is a keyword default, bound when aiohttp was imported.
    defaults = aiohttp.ClientResponse.json.__kwdefaults__
    assert defaults is not None and "loads" in defaults
    defaults["loads"] = loads
