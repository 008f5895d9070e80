"""A custom schema cannot hang whoever validates with it (the operator's event loop,
its webhook, an agent): they run under a time budget (defender_config._schema_budget)."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest

from defender_config import ConfigValidationError, validate_config
from defender_config._schema_budget import budgeted, validation_budget

# Python's `re` takes hours on each (2^31 paths); the `regex` module still needs its timeout
# for the first and finishes the others quickly. Without the budget each test hangs until
# pytest-timeout fails it.
EVIL = "^(a|a)*$"
LONG = "a" * 31 + "!"
HANGS_RE_ONLY = "^(a+)+$"

pytestmark = pytest.mark.timeout(60)


def _refusal(config: dict[str, Any], schema: dict[str, Any]) -> str:
    with pytest.raises(ConfigValidationError) as caught:
        validate_config("custom", config, schema, component="tenant-x")
    (error,) = caught.value.errors
    assert error.location == "(schema)"
    return error.message


@pytest.mark.parametrize(
    ("schema", "config"),
    [
        ({"properties": {"s": {"pattern": EVIL}}}, {"s": LONG}),
        ({"patternProperties": {EVIL: {"type": "string"}}}, {LONG: "x"}),
        ({"patternProperties": {EVIL: {}}, "additionalProperties": False}, {LONG: 1}),
        (
            {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "patternProperties": {EVIL: {}},
                "unevaluatedProperties": False,
            },
            {LONG: 1},
        ),
        ({"properties": {"s": {"items": {"pattern": EVIL}}}}, {"s": [LONG] * 50}),
        (
            {
                "$schema": "http://json-schema.org/draft-03/schema#",
                "properties": {"s": {"pattern": EVIL}},
            },
            {"s": LONG},
        ),
    ],
    ids=[
        "pattern",
        "patternProperties",
        "additionalProperties",
        "unevaluatedProperties",
        "many strings share one budget",
        "draft-03",
    ],
)
def test_a_pattern_that_backtracks_without_end_is_a_refusal_not_a_hang(
    schema: dict[str, Any], config: dict[str, Any]
) -> None:
    message = _refusal(config, schema)
    assert "took over 1 s" in message and "backtracks" in message


def test_a_pattern_only_python_re_backtracks_on_is_judged_normally() -> None:
    with pytest.raises(ConfigValidationError) as caught:
        validate_config("custom", {"s": LONG}, {"properties": {"s": {"pattern": HANGS_RE_ONLY}}})
    (error,) = caught.value.errors
    assert error.location == "s" and "does not match" in error.message


def test_ordinary_patterns_still_judge_configs() -> None:
    schema = {
        "properties": {"iface": {"pattern": "^eth[0-9]+$"}},
        "patternProperties": {"^x-": {"type": "string"}},
        "additionalProperties": False,
    }
    assert validate_config("custom", {"iface": "eth0", "x-note": "ok"}, schema)["iface"] == "eth0"
    with pytest.raises(ConfigValidationError) as caught:
        validate_config("custom", {"iface": "wlan0", "x-note": 1, "other": 1}, schema)
    assert sorted(e.location for e in caught.value.errors) == ["", "iface", "x-note"]


def test_outside_a_budget_jsonschema_uses_re_itself() -> None:
    # Other users of jsonschema in the same process see no difference.
    from jsonschema import _keywords

    assert _keywords.re.search is not re.search  # the stand-in is installed
    assert _keywords.re.compile is re.compile
    jsonschema.validate("eth0", {"pattern": "^eth"})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate("wlan0", {"pattern": "^eth"})


def test_a_used_up_budget_refuses_the_next_search() -> None:
    from jsonschema import _keywords

    with validation_budget(0.0), pytest.raises(TimeoutError):
        _keywords.re.search("a", "a")
    assert _keywords.re.search("a", "a")  # the budget ended with the block


# uniqueItems: jsonschema compares every pair of items that do not sort (objects, arrays), so
# 30,000 small objects took about 20 minutes (100,000, ~1.3 MB, fit in a resource: hours);
# pytest-timeout fails these tests if that comes back.
UNIQUE = {"properties": {"x": {"type": "array", "uniqueItems": True}}}


def test_thirty_thousand_unique_objects_are_judged_at_once() -> None:
    items: list[Any] = [{"a": i} for i in range(30_000)]
    assert len(validate_config("custom", {"x": items}, UNIQUE)["x"]) == 30_000
    with pytest.raises(ConfigValidationError) as caught:
        validate_config("custom", {"x": [*items, {"a": 5.0}]}, UNIQUE)
    (error,) = caught.value.errors
    assert error.location == "x"
    # Which items, not a repr of 100,000 objects (it reaches conditions and Events).
    assert error.message == "has non-unique elements: items 5 and 30000 are equal"


@pytest.mark.parametrize(
    "items",
    [
        [1, 1.0],
        [1, True],
        [0, False, None, "0", ""],
        [{"a": 1, "b": [1, 2]}, {"b": [1, 2], "a": 1.0}],
        [{"a": [1, 2]}, {"a": [2, 1]}],
        [[1, [True]], [1, [1]]],
        [[], {}, "", 0],
        [{"a": None}, {}],
        [2**60, float(2**60)],
        [0.1, 0.1000001],
        [["a"], "a"],
    ],
)
def test_unique_items_agrees_with_jsonschema(items: list[Any]) -> None:
    schema = {"type": "array", "uniqueItems": True}
    theirs = jsonschema.Draft202012Validator(schema).is_valid(items)
    ours = budgeted(jsonschema.Draft202012Validator)(schema).is_valid(items)
    assert ours == theirs


def test_every_keyword_spends_the_budget() -> None:
    # No pattern here: many subschemas times many items also end at the budget.
    validator = budgeted(jsonschema.Draft202012Validator)({"items": {"type": "integer"}})
    assert validator.is_valid([1, 2, 3])  # outside a budget: no limit
    with validation_budget(0.0), pytest.raises(TimeoutError):
        validator.is_valid([1, 2, 3])


def test_a_schema_that_makes_too_much_work_is_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    from defender_config import _models

    monkeypatch.setattr(_models, "_VALIDATION_BUDGET_SECONDS", 0.0)
    message = _refusal({"x": [1]}, UNIQUE)
    assert message.startswith("validating this config took over 0 s")


def test_a_schema_with_thirty_thousand_enum_objects_is_checked_at_once() -> None:
    # draft-04's metaschema wants `enum` unique: jsonschema's own check_schema compared the
    # objects pair by pair before any config was read.
    members: list[Any] = [{"a": i} for i in range(30_000)]
    schema = {"$schema": "http://json-schema.org/draft-04/schema#", "enum": members}
    assert validate_config("custom", {"a": 7}, schema) == {"a": 7}
    members.append({"a": 7.0})
    with pytest.raises(ConfigValidationError) as caught:
        validate_config("custom", {"a": 7}, schema)
    (error,) = caught.value.errors
    assert error.location == "(schema).enum"
    assert "has non-unique elements: items 7 and 30000 are equal" in error.message
