"""The operator's JSON decoder for Kubernetes objects: equal to `json.loads` for what that
decodes, any nesting the API server takes cut at CUT_DEPTH, and installed where kopf, aiohttp
and the kubernetes client decode objects (pinned: an upgrade that moves one fails here)."""

from __future__ import annotations

import json
import math
from typing import Any

import aiohttp
import kopf
import kopf._cogs.clients.api as kopf_api
import kopf._cogs.configs.diffbase as kopf_diffbase
import kopf._cogs.configs.progress as kopf_progress
import kopf._kits.webhooks as kopf_webhooks
import pytest
from kubernetes.client import api_client

from defender_config import ConfigValidationError, validate_config
from defender_config._json_parse import MAX_JSON_DEPTH
from defender_operator import _api, _deep_json, _diffbase
from defender_operator._deep_json import (
    CUT_DEPTH,
    MARKER,
    TooDeep,
    loads,
    loads_uncut,
    parse_iteratively,
)

POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "sniffer-7d9c-abcde",
        "namespace": "defender",
        "labels": {"app.kubernetes.io/name": "sniffer", "pod-template-hash": "7d9c"},
        "annotations": {"note": 'a {"quoted": [json]} string \\ with \u00fc'},
        "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "sniffer-7d9c", "uid": "u1"}
        ],
        "managedFields": [
            {
                "manager": "kube-controller-manager",
                "operation": "Update",
                "fieldsType": "FieldsV1",
                "fieldsV1": {
                    "f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                    "f:spec": {
                        "f:containers": {
                            f'k:{{"name":"c{i}"}}': {".": {}, "f:image": {}, "f:env": {}}
                            for i in range(30)
                        }
                    },
                },
            }
        ],
    },
    "spec": {
        "containers": [
            {
                "name": f"c{i}",
                "image": "registry.local/sniffer:1.2.3",
                "env": [{"name": "A", "value": "[{"}, {"name": "N", "value": "1e3"}],
                "resources": {"limits": {"cpu": "100m"}, "requests": {"memory": "64Mi"}},
                "ports": [{"containerPort": 8080 + i, "protocol": "TCP"}],
            }
            for i in range(30)
        ],
        "terminationGracePeriodSeconds": 30,
        "hostNetwork": False,
        "priority": None,
    },
    "status": {"phase": "Running", "podIP": "10.0.0.7", "ratio": -0.5e-3},
}


def nested_text(depth: int, opener: str = '{"n":', closer: str = "}", leaf: str = "1") -> str:
    return opener * depth + leaf + closer * depth


def depth_of(value: Any) -> int:
    depth = 0
    while isinstance(value, dict | list):
        depth += 1
        value = value["n"] if isinstance(value, dict) else value[0]
    return depth


def innermost(value: Any) -> Any:
    while isinstance(value, dict | list):
        value = value["n"] if isinstance(value, dict) else value[0]
    return value


@pytest.mark.parametrize("kind", ["dict", "list"])
@pytest.mark.parametrize("depth", [1, CUT_DEPTH - 1, CUT_DEPTH, CUT_DEPTH + 1, 500, 5000, 10000])
def test_any_depth_decodes_and_is_cut_at_the_limit(kind: str, depth: int) -> None:
    text = nested_text(depth) if kind == "dict" else nested_text(depth, "[", "]")
    for given in (text, text.encode()):
        value = loads(given)
        assert depth_of(value) == min(depth, CUT_DEPTH)
        assert innermost(value) == (1 if depth <= CUT_DEPTH else MARKER)
    if depth <= CUT_DEPTH:
        assert loads(text) == json.loads(text)


def test_the_iterative_parser_equals_json_loads() -> None:
    texts = [
        json.dumps(POD),
        json.dumps(POD, indent=2),
        ' { "a" : [ 1 , 2.5 , -3e2 , 1E+2 , 0 , -0.0 , true , false , null ] , "b" : { } } ',
        '"esc \\" \\\\ \\/ \\b \\f \\n \\r \\t \\u00fc \\ud83d\\ude00 [{"',
        '{"k":1,"k":2}',
        '[[], {}, [[]], {"a": {}}]',
        "12345678901234567890",
        "-Infinity",
        "Infinity",
        '"x"',
        "null",
    ]
    for text in texts:
        assert parse_iteratively(text) == json.loads(text), text
    assert math.isnan(parse_iteratively("NaN"))
    deep = nested_text(3000, '{"a": [1, "]}", {"b": null}], "n": ', "}")
    assert same(parse_iteratively(deep), _deep_loads(deep))


def same(a: Any, b: Any) -> bool:
    # `==` on values this deep recurses past the limit: compare with a stack.
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, dict):
            if list(x) != list(y):
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif isinstance(x, list):
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif x != y:
            return False
    return True


def _deep_loads(text: str) -> Any:
    # json.loads itself, given the stack it needs (the parser's result must equal it).
    import sys
    import threading

    out: list[Any] = []

    def run() -> None:
        try:
            out.append(json.loads(text))
        except ValueError as exc:
            out.append(exc)

    limit = sys.getrecursionlimit()
    threading.stack_size(256 * 1024 * 1024)
    try:
        sys.setrecursionlimit(20000)
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
    finally:
        sys.setrecursionlimit(limit)
        threading.stack_size(0)
    if isinstance(out[0], ValueError):
        raise out[0]
    return out[0]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        " ",
        "[1,]",
        '{"a":1,}',
        '{"a" 1}',
        "{1: 2}",
        "[1 2]",
        "[",
        '{"a":1',
        "[1]x",
        "tru",
        '"abc',
        '"a\nb"',
        '"\\x"',
        "01",
        "\ufeff[]",
        "[" * 2000,
        "[" * 2000 + "]" * 1999,
        "[" * 2000 + "}" * 2000,
    ],
)
def test_invalid_json_is_refused_like_json_loads(bad: str) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        _deep_loads(bad) if bad.count("[") > 900 else json.loads(bad)
    with pytest.raises(json.JSONDecodeError) as got:
        parse_iteratively(bad)
    assert (got.value.msg, got.value.pos) == (expected.value.msg, expected.value.pos)
    with pytest.raises(json.JSONDecodeError):
        loads(bad)


def test_ordinary_objects_are_json_loads_without_a_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hot path: a real Pod (hundreds of brackets, some inside strings) decodes equal to
    json.loads and is never walked or parsed in Python."""

    def forbidden(value: Any) -> Any:
        raise AssertionError("walked")

    monkeypatch.setattr(_deep_json, "cut", forbidden)
    monkeypatch.setattr(_deep_json, "parse_iteratively", forbidden)
    text = json.dumps(POD)
    assert text.count("{") + text.count("[") > CUT_DEPTH
    assert loads(text) == json.loads(text) == POD
    assert loads(text.encode("utf-16")) == POD
    assert loads('{"a": "' + "[" * 1000 + '"}') == {"a": "[" * 1000}
    assert loads(nested_text(CUT_DEPTH)) == json.loads(nested_text(CUT_DEPTH))


def test_uncut_decoding_refuses_what_it_would_have_to_cut() -> None:
    """For a value written back (a webhook configuration the operator reads and replaces): a
    cut one would lose what was cut, so past CUT_DEPTH it is refused, as a ValueError, without
    decoding (no RecursionError however deep)."""
    text = json.dumps(POD)
    assert loads_uncut(text) == loads_uncut(text.encode()) == POD
    assert loads_uncut(nested_text(CUT_DEPTH)) == json.loads(nested_text(CUT_DEPTH))
    for deep in (nested_text(CUT_DEPTH + 1), nested_text(50_000, "[", "]"), "[" * 50_000):
        with pytest.raises(TooDeep, match=f"deeper than {CUT_DEPTH} levels"):
            loads_uncut(deep.encode())
    with pytest.raises(json.JSONDecodeError):
        loads_uncut(b"{not json")


def test_a_cut_config_is_refused_as_too_deep_and_has_a_digest() -> None:
    """A DefenderComponent whose config nests 3,000 deep, as the operator decodes it: its
    config is cut ~126 deep, still deeper than the library stores, so the usual check refuses
    it naming the limit (and the refusal has the raw digest it records)."""
    text = (
        '{"apiVersion":"ml-defender.io/v1alpha1","kind":"DefenderComponent",'
        '"metadata":{"name":"deep"},"spec":{"componentType":"custom","config":'
        + nested_text(3000)
        + "}}"
    )
    obj = loads(text)
    config = obj["spec"]["config"]
    assert depth_of(config) == CUT_DEPTH - 2 > MAX_JSON_DEPTH
    with pytest.raises(ConfigValidationError) as refused:
        validate_config("custom", config, {"type": "object"}, component="deep")
    assert f"nested too deeply (over {MAX_JSON_DEPTH} levels)" in str(refused.value)
    assert len(_api.raw_config_digest(config)) == 64


def test_install_patches_every_decoder_of_kubernetes_objects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each place is where kopf 1.45 / aiohttp 3.14 / kubernetes 37 decode objects; if an
    upgrade moves one, this fails and the new place must be patched instead."""
    defaults = aiohttp.ClientResponse.json.__kwdefaults__
    assert defaults is not None
    modules = (kopf_api, kopf_webhooks, kopf_progress, kopf_diffbase, api_client)
    for module in modules:
        monkeypatch.setattr(module, "json", json)
    monkeypatch.setitem(defaults, "loads", json.loads)
    _deep_json.install()
    _deep_json.install()  # idempotent
    for module in modules:
        assert module.json.loads is loads, module
        assert module.json.dumps is json.dumps
        assert module.json.JSONDecodeError is json.JSONDecodeError
    assert defaults["loads"] is loads
    # The call sites read these names at call time.
    import inspect

    assert "json.loads(line" in inspect.getsource(kopf_api.stream)
    assert "json.loads(text)" in inspect.getsource(kopf_webhooks.WebhookServer._serve)
    assert "json.loads(response_text)" in inspect.getsource(api_client.ApiClient.deserialize)
    for call in ("get", "post", "patch", "delete"):
        assert "await response.json()" in inspect.getsource(getattr(kopf_api, call))
    for storage in (
        kopf_progress.AnnotationsProgressStorage,
        kopf_diffbase.AnnotationsDiffBaseStorage,
        kopf_diffbase.StatusDiffBaseStorage,
    ):
        assert "json.loads(encoded)" in inspect.getsource(storage.fetch), storage


def test_kopfs_storages_decode_an_objects_json_strings_cut_after_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kopf reads JSON strings that whoever may patch an object writes: its handlers'
    progress annotations, and the diff base in an annotation or the status. One nested
    5,000 deep raised RecursionError in the object's worker, and kopf stopped the operator."""
    for module in (kopf_progress, kopf_diffbase):
        monkeypatch.setattr(module, "json", json)
    deep = nested_text(5000)
    body = kopf.Body(
        {
            "metadata": {
                "annotations": {
                    "kopf.zalando.org/reconcile_component": deep,
                    "kopf.zalando.org/last-handled-configuration": deep,
                }
            },
            "status": {"kopf": {"last-handled-configuration": deep}},
        }
    )
    progress = kopf.AnnotationsProgressStorage()
    diffbases = (kopf.AnnotationsDiffBaseStorage(), kopf.StatusDiffBaseStorage())
    with pytest.raises(RecursionError):  # as kopf reads them
        progress.fetch(key=kopf.HandlerId("reconcile_component"), body=body)
    _deep_json.install()
    assert depth_of(progress.fetch(key=kopf.HandlerId("reconcile_component"), body=body)) == (
        CUT_DEPTH
    )
    for storage in diffbases:
        assert depth_of(storage.fetch(body=body)) == CUT_DEPTH, storage


def test_the_legacy_diff_base_in_the_status_is_decoded_cut() -> None:
    """An earlier operator's diff base (status.lastHandledConfiguration), read while no digest
    is there: a string nested thousands deep there raised RecursionError in kopf's worker."""
    status = {_diffbase.LEGACY_FIELD: nested_text(5000)}
    essence = _diffbase.PublishedDiffBase().fetch(body=kopf.Body({"status": status}))
    assert depth_of(essence) == CUT_DEPTH
    # Not JSON at all: no diff base (the object is reconciled once more), as before.
    status = {_diffbase.LEGACY_FIELD: "[" * 5000}
    assert _diffbase.PublishedDiffBase().fetch(body=kopf.Body({"status": status})) is None


def test_aiohttp_responses_decode_deep_objects_after_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kopf's list/get/patch calls decode with `await response.json()`."""
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    defaults = aiohttp.ClientResponse.json.__kwdefaults__
    assert defaults is not None
    monkeypatch.setitem(defaults, "loads", json.loads)
    _deep_json.install()

    async def deep(request: web.Request) -> web.Response:
        return web.Response(text=nested_text(3000), content_type="application/json")

    async def fetch() -> Any:
        app = web.Application()
        app.router.add_get("/", deep)
        async with TestClient(TestServer(app)) as http:
            response = await http.get("/")
            return await response.json()

    assert depth_of(asyncio.run(fetch())) == CUT_DEPTH


def test_the_kubernetes_client_deserializes_deep_objects_after_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(api_client, "json", json)
    _deep_json.install()
    client = api_client.ApiClient()
    got = client.deserialize(nested_text(3000), "object", "application/json")
    assert depth_of(got) == CUT_DEPTH


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("1", 0),
        ("[]", 1),
        ('{"a": "]]]}}}", "b": [[{}]]}', 4),
        ('["\\\\", ["\\"]]]", [[]]]]', 4),
        ('{"k\\\\\\"": ["{{{{[[[["]}', 2),
        ('[{"a": [1, 2e-3, true, null]}, [[[]]], "\\u005b"]', 4),
    ],
)
def test_the_nesting_measure_skips_strings(text: str, depth: int) -> None:
    json.loads(text)  # valid
    assert not _deep_json.nests_deeper(text, depth)
    assert depth == 0 or _deep_json.nests_deeper(text, depth - 1)
