"""A custom schema's validation, run under a time budget.

A DefenderComponent's `customSchema` comes from whoever may edit the resource, and the operator,
its admission webhook and every agent validate configs with it, holding the GIL: a validation
that takes hours hangs the operator's event loop (every namespace) or an agent. Three ways in,
each closed here:

- **Backtracking patterns.** jsonschema runs `pattern` and `patternProperties` (and
  `additionalProperties`' and `unevaluatedProperties`' view of them) with Python's `re`, which
  `^(a|a)*$` turns into hours on a string of thirty characters. jsonschema calls `re.search`
  from three of its modules; those get a stand-in whose `search`, inside `validation_budget`,
  runs the `regex` module with the time left of the budget as its timeout. Outside a budget it
  is `re` itself.
- **`uniqueItems` on objects.** jsonschema compares every pair of items that do not sort (objects,
  arrays): 4,000 small objects took 19 s, and the 1.5 MB a resource may hold fits 100,000.
  `budgeted` validators check uniqueness in one pass over hashable canonical forms instead. The
  schema itself is checked against its metaschema the same way (`check_schema`): draft-04's
  metaschema wants `enum` unique, and 4,000 objects there took 27 s before any config was read.
- **Everything else** (many subschemas times many items): each keyword a `budgeted` validator
  evaluates first checks the time left, so no sequence of keywords outlives the budget.

When the budget runs out: TimeoutError, which the caller turns into a refusal.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import jsonschema

__all__ = ["budgeted", "check_schema", "install", "validation_budget"]

_state = threading.local()

Keyword = Callable[[Any, Any, Any, Any], Any]


def _deadline() -> float | None:
    deadline: float | None = getattr(_state, "deadline", None)
    return deadline


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("validation time budget used up")
    return left


class _BudgetedRe:
    """`re`, except for `search` inside a budget."""

    def __getattr__(self, name: str) -> Any:
        return getattr(re, name)

    @staticmethod
    def search(pattern: str, string: str, flags: int = 0) -> Any:
        deadline = _deadline()
        if deadline is None:
            return re.search(pattern, string, flags)
        import regex  # only where a schema is validated: the plugin's quick paths never get here

        return regex.search(pattern, string, flags, timeout=_time_left(deadline))


_STAND_IN = _BudgetedRe()


def install(*modules: ModuleType) -> None:
    """Give each module that calls `re.search` with a schema's patterns the stand-in."""
    for module in modules:
        if getattr(module, "re", None) is re:
            module.re = _STAND_IN  # type: ignore[attr-defined]


@contextmanager
def validation_budget(seconds: float) -> Iterator[None]:
    """Every keyword a `budgeted` validator evaluates and every `re.search` the installed
    modules make meanwhile (this thread) share `seconds`."""
    before = _deadline()
    _state.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _state.deadline = before


def _canonical(value: Any) -> Any:
    """A hashable form equal exactly where JSON Schema calls two values equal: 1 and 1.0 are,
    true and 1 are not, objects regardless of key order, arrays in order."""
    if isinstance(value, bool) or value is None:
        return ("const", value)
    if isinstance(value, (int, float)):
        return ("number", value)  # Python's == and hash already agree across int and float
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, Mapping):
        return ("object", frozenset((k, _canonical(v)) for k, v in value.items()))
    if isinstance(value, Sequence):
        return ("array", tuple(_canonical(v) for v in value))
    return ("other", repr(value))  # not JSON: never from a parsed config


def _unique_items(validator: Any, unique: Any, instance: Any, schema: Any) -> Iterator[Any]:
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: dict[Any, int] = {}
    for index, item in enumerate(instance):
        first = seen.setdefault(_canonical(item), index)
        if first != index:
            yield jsonschema.ValidationError(
                f"has non-unique elements: items {first} and {index} are equal"
            )
            return


def _checked(keyword: Keyword) -> Keyword:
    def evaluate(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        deadline = _deadline()
        if deadline is not None:
            _time_left(deadline)
        return keyword(validator, value, instance, schema)

    return evaluate


_BUDGETED: dict[type[Any], type[Any]] = {}


def budgeted(validator_class: type[Any]) -> type[Any]:
    """`validator_class` with every keyword checking the budget and a linear `uniqueItems`."""
    made = _BUDGETED.get(validator_class)
    if made is None:
        keywords = {name: _checked(fn) for name, fn in validator_class.VALIDATORS.items()}
        if "uniqueItems" in keywords:
            keywords["uniqueItems"] = _checked(_unique_items)
        made = _BUDGETED[validator_class] = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
            validator_class, validators=keywords
        )
    return made


def check_schema(validator_class: type[Any], schema: Any) -> None:
    """`validator_class.check_schema(schema)` by a `budgeted` validator of its metaschema
    (jsonschema's own makes an unbudgeted one). Raises jsonschema.SchemaError."""
    meta_class = budgeted(
        jsonschema.validators.validator_for(validator_class.META_SCHEMA, default=validator_class)
    )
    meta = meta_class(validator_class.META_SCHEMA, format_checker=meta_class.FORMAT_CHECKER)
    for error in meta.iter_errors(schema):
        raise jsonschema.SchemaError.create_from(error)
