"""A custom schema's regular expressions, run under a time budget.

A DefenderComponent's `customSchema` comes from whoever may edit the resource, and the operator,
its admission webhook and every agent validate configs with it. jsonschema runs `pattern` and
`patternProperties` (and `additionalProperties`' and `unevaluatedProperties`' view of them) with
Python's `re`, whose backtracking a pattern such as `^(a|a)*$` turns into hours on a string of
thirty characters, holding the GIL all along: the operator's event loop (every namespace) or an
agent would hang. jsonschema calls `re.search` from three of its modules; those get a stand-in
whose `search`, inside `regex_budget`, runs the `regex` module with the time left of the budget
as its timeout (TimeoutError when it runs out). Outside a budget it is `re` itself.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

__all__ = ["install", "regex_budget"]

_state = threading.local()


class _BudgetedRe:
    """`re`, except for `search` inside a budget."""

    def __getattr__(self, name: str) -> Any:
        return getattr(re, name)

    @staticmethod
    def search(pattern: str, string: str, flags: int = 0) -> Any:
        deadline: float | None = getattr(_state, "deadline", None)
        if deadline is None:
            return re.search(pattern, string, flags)
        import regex  # only where a schema is validated: the plugin's quick paths never get here

        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("regular expression time budget used up")
        return regex.search(pattern, string, flags, timeout=left)


_STAND_IN = _BudgetedRe()


def install(*modules: ModuleType) -> None:
    """Give each module that calls `re.search` with a schema's patterns the stand-in."""
    for module in modules:
        if getattr(module, "re", None) is re:
            module.re = _STAND_IN  # type: ignore[attr-defined]


@contextmanager
def regex_budget(seconds: float) -> Iterator[None]:
    """Every `re.search` the installed modules make meanwhile (this thread) shares `seconds`."""
    before = getattr(_state, "deadline", None)
    _state.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _state.deadline = before
