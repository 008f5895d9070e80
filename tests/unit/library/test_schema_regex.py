"""A custom schema's patterns cannot hang whoever validates with it (the operator's event loop,
its webhook, an agent): they run under a time budget (defender_config._schema_regex)."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest

from defender_config import ConfigValidationError, validate_config
from defender_config._schema_regex import regex_budget

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

    with regex_budget(0.0), pytest.raises(TimeoutError):
        _keywords.re.search("a", "a")
    assert _keywords.re.search("a", "a")  # the budget ended with the block
