"""A spec.config nested deeper than the library stores (MAX_JSON_DEPTH) but taken by the API
server: the raw config still has a digest, so the mutating webhook stamps it (the validating one
then refuses it with its field path) and the reconcile refuses it as ConfigInvalid."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import kopf
import pytest

from defender_config import ConfigValidationError, config_digest
from defender_config._json_parse import MAX_JSON_DEPTH
from defender_operator import _api, webhooks
from defender_operator._decisions import attribution


def nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        node = {"n": node}
    return node


def test_raw_digest_is_the_stored_digest_wherever_the_library_stores() -> None:
    for config in ({}, {"a": [1, {"b": "ü"}]}, nested(MAX_JSON_DEPTH)):
        assert _api.raw_config_digest(config) == config_digest(config)


def test_raw_digest_of_a_config_too_deep_to_store_is_stable_and_its_own() -> None:
    deep, deeper = nested(MAX_JSON_DEPTH + 1), nested(MAX_JSON_DEPTH + 50)
    with pytest.raises(ConfigValidationError):
        config_digest(deep)
    assert _api.raw_config_digest(deep) == _api.raw_config_digest(nested(MAX_JSON_DEPTH + 1))
    assert (
        len({_api.raw_config_digest(deep), _api.raw_config_digest(deeper), config_digest({})}) == 3
    )


def test_the_webhook_stamps_a_config_too_deep_to_store() -> None:
    rt = SimpleNamespace(stamp_key=b"k" * 32)
    patch = kopf.Patch()
    # Called as kopf calls it, with only the arguments it reads.
    stamp: Any = webhooks.stamp_modifier
    stamp(
        name="deep",
        namespace="ns",
        spec={"config": nested(150)},
        annotations={},
        userinfo={"username": "alice"},
        patch=patch,
        memo={"runtime": rt},
    )
    stamped = dict(patch["metadata"]["annotations"])
    assert stamped.get(attribution.STAMP_ANNOTATION) == "alice", stamped
    assert (
        attribution.verified_author(
            rt.stamp_key, "ns", "deep", stamped, _api.raw_config_digest(nested(150))
        )
        == "alice"
    )
