"""Config models, validate_config, config_digest."""

from __future__ import annotations

import http.server
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from defender_config import (
    ComponentType,
    ConfigValidationError,
    FieldError,
    canonical_json,
    config_digest,
    validate_config,
)
from defender_config._models import model_for

SNIFFER: dict[str, Any] = {
    "node_id": "sniffer-01",
    "version": "1.0.0",
    "interface": "eth0",
    "capture_mode": "af_packet",
    "ring": {"block_size": 1048576, "block_count": 32, "frame_size": 2048},
    "filters": ["tcp port 443"],
}
DETECTOR: dict[str, Any] = {
    "node_id": "detector-01",
    "version": "1.0.0",
    "capabilities": ["ddos", "ransomware", "traffic", "internal"],
    "detectors": {"ddos": {"threshold": 0.8, "model_path": "/models/ddos.onnx"}},
}
FIREWALL: dict[str, Any] = {
    "node_id": "fw-01",
    "version": "2.1.0-rc.1",
    "default_policy": "deny",
    "rules": [
        {"id": "ssh", "action": "allow", "proto": "tcp", "src_cidr": "10.0.0.0/8", "ports": [22]},
        {"id": "web", "action": "allow", "proto": "tcp", "ports": ["8000-8080", 443]},
        {"id": "v6", "action": "deny", "src_cidr": "2001:db8::/32", "dst_cidr": "2001:db8:1::/48"},
    ],
}
RAG: dict[str, Any] = {
    "node_id": "rag-01",
    "version": "1.0.0",
    "log_sources": [{"name": "fw", "location": "/var/log/fw/*.json"}],
    "may_modify_active": True,
    "modifiable_components": ["firewall"],
}


@pytest.mark.parametrize(
    ("ctype", "config"),
    [("sniffer", SNIFFER), ("ml-detector", DETECTOR), ("firewall", FIREWALL), ("rag", RAG)],
)
def test_valid_configs_normalize(ctype: str, config: dict[str, Any]) -> None:
    out = validate_config(ctype, config)
    assert out["node_id"] == config["node_id"]
    # Normalized output validates again to itself (idempotent) and is JSON-ready.
    assert validate_config(ComponentType(ctype), out) == out
    canonical_json(out)
    assert model_for(ctype) is not None


def test_defaults_are_filled() -> None:
    out = validate_config("sniffer", {"node_id": "s", "version": "1.0.0", "interface": "eth0"})
    assert out["capture_mode"] == "xdp" and out["ring"]["frame_size"] == 2048
    assert validate_config("ml-detector", DETECTOR)["detectors"]["ddos"]["enabled"] is True


def _errors(ctype: str, config: Any, schema: Any = None) -> ConfigValidationError:
    with pytest.raises(ConfigValidationError) as info:
        validate_config(ctype, config, schema)
    assert info.value.reason == "ConfigInvalid"
    return info.value


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(base)
    out.update(changes)
    return out


@pytest.mark.parametrize(
    ("ctype", "config", "location", "fragment"),
    [
        ("sniffer", _with(SNIFFER, capture_mode="pcap"), "capture_mode", "'xdp' or 'af_packet'"),
        ("sniffer", _with(SNIFFER, interface="a-very-long-interface0"), "interface", "pattern"),
        (
            "sniffer",
            _with(SNIFFER, ring={"block_size": 3000}),
            "ring.block_size",
            "greater than or equal to 4096",
        ),
        ("sniffer", _with(SNIFFER, ring={"block_size": 6144}), "ring", "power of two"),
        (
            "sniffer",
            _with(SNIFFER, ring={"block_size": 4096, "frame_size": 8192}),
            "ring",
            "multiple of frame_size",
        ),
        ("sniffer", _with(SNIFFER, filters=[" "]), "filters", "filter 0 is empty"),
        ("sniffer", _with(SNIFFER, colour="red"), "colour", "Extra inputs"),
        ("sniffer", _with(SNIFFER, node_id="-bad"), "node_id", "pattern"),
        ("sniffer", _with(SNIFFER, version="one"), "version", "pattern"),
        ("ml-detector", _with(DETECTOR, capabilities=["ddos", "dns"]), "capabilities.1", "'ddos'"),
        ("ml-detector", _with(DETECTOR, capabilities=[]), "capabilities", "at least 1"),
        ("ml-detector", _with(DETECTOR, capabilities=["ddos", "ddos"]), "capabilities", "twice"),
        (
            "ml-detector",
            _with(DETECTOR, detectors={"ddos": {"threshold": 1.5}}),
            "detectors.ddos.threshold",
            "less than or equal to 1",
        ),
        (
            "ml-detector",
            _with(DETECTOR, capabilities=["ddos"], detectors={"traffic": {}}),
            "",
            "not in capabilities: traffic",
        ),
        (
            "firewall",
            _with(FIREWALL, rules=[{"id": "x", "action": "allow", "src_cidr": "10.0.0.1/8"}]),
            "rules.0.src_cidr",
            "has host bits set",
        ),
        (
            "firewall",
            _with(FIREWALL, rules=[{"id": "x", "action": "allow", "dst_cidr": "banana"}]),
            "rules.0.dst_cidr",
            "not a network in CIDR form",
        ),
        (
            "firewall",
            _with(FIREWALL, rules=[{"id": "x", "action": "allow", "proto": "icmp", "ports": [1]}]),
            "rules.0",
            "ports need proto tcp or udp",
        ),
        (
            "firewall",
            _with(FIREWALL, rules=[{"id": "x", "action": "allow", "proto": "tcp", "ports": [0]}]),
            "rules.0.ports",
            "within 1-65535",
        ),
        (
            "firewall",
            _with(
                FIREWALL,
                rules=[{"id": "x", "action": "allow", "proto": "udp", "ports": ["90-80"]}],
            ),
            "rules.0.ports",
            "low before high",
        ),
        (
            "firewall",
            _with(FIREWALL, rules=[{"id": "x", "action": "allow", "proto": "tcp", "ports": ["x"]}]),
            "rules.0.ports",
            "a number or a range",
        ),
        (
            "firewall",
            _with(
                FIREWALL,
                rules=[{"id": "x", "action": "allow", "proto": "tcp", "ports": ["8000\n"]}],
            ),
            "rules.0.ports",
            "a number or a range",
        ),
        (
            "firewall",
            _with(
                FIREWALL,
                rules=[{"id": "x", "action": "allow", "proto": "tcp", "ports": ["٨٠٨٠"]}],
            ),
            "rules.0.ports",
            "a number or a range",
        ),
        (
            "firewall",
            _with(
                FIREWALL,
                rules=[
                    {"id": "x", "action": "allow", "src_cidr": "10.0.0.0/8", "dst_cidr": "::/0"}
                ],
            ),
            "rules.0",
            "mix IPv4 and IPv6",
        ),
        (
            "firewall",
            _with(FIREWALL, rules=[{"id": "a", "action": "deny"}, {"id": "a", "action": "log"}]),
            "rules",
            "rule ids used twice: a",
        ),
        (
            "firewall",
            {k: v for k, v in FIREWALL.items() if k != "default_policy"},
            "default_policy",
            "Field required",
        ),
        ("rag", _with(RAG, may_modify_active=False), "", "may_modify_active is false"),
        (
            "rag",
            _with(
                RAG, log_sources=[{"name": "a", "location": "x"}, {"name": "a", "location": "y"}]
            ),
            "",
            "log source names used twice",
        ),
        ("rag", _with(RAG, alert_intake={"prefix": "alerts"}), "alert_intake.prefix", "pattern"),
    ],
)
def test_readable_field_errors(
    ctype: str, config: dict[str, Any], location: str, fragment: str
) -> None:
    err = _errors(ctype, config)
    assert any(e.location == location and fragment in e.message for e in err.errors), err.errors
    assert "Value error," not in str(err)
    assert f"config for '{ctype}' rejected" in str(err)


def test_all_errors_are_reported_at_once() -> None:
    err = _errors("sniffer", {"node_id": "s"})
    assert {e.location for e in err.errors} == {"version", "interface"}
    assert "(2 errors)" in str(err)


def test_error_messages_do_not_echo_input_values() -> None:
    err = _errors("rag", _with(RAG, embedding_model={"token": "sk-very-secret"}))
    assert "sk-very-secret" not in str(err) and "sk-very-secret" not in repr(err)


def test_component_name_in_the_message() -> None:
    with pytest.raises(ConfigValidationError, match="config for 'edge-fw' rejected") as info:
        validate_config("firewall", {}, component="edge-fw")
    assert info.value.component == "edge-fw"


def test_unknown_type_and_non_object() -> None:
    assert "unknown component type 'router'" in str(_errors("router", {}))
    assert "must be a JSON object, not list" in str(_errors("sniffer", [1, 2]))


SCHEMA = {
    "type": "object",
    "properties": {"rate": {"type": "integer", "minimum": 1}, "name": {"type": "string"}},
    "required": ["rate"],
    "additionalProperties": False,
}


def test_custom_type_with_schema() -> None:
    assert validate_config("custom", {"rate": 5, "name": "x"}, SCHEMA) == {"rate": 5, "name": "x"}
    err = _errors("custom", {"rate": 0, "extra": True}, SCHEMA)
    locations = {e.location for e in err.errors}
    assert locations == {"", "rate"}
    assert any("0 is less than the minimum of 1" in e.message for e in err.errors)


def test_custom_config_must_be_json() -> None:
    with pytest.raises(ConfigValidationError, match="config for 'probe' rejected") as info:
        validate_config("custom", {"rate": float("inf")}, SCHEMA, component="probe")
    assert "not representable as JSON" in info.value.errors[0].message


def test_custom_type_needs_a_schema() -> None:
    assert "must carry a JSON schema" in str(_errors("custom", {"a": 1}))


def test_invalid_schema() -> None:
    err = _errors("custom", {"a": 1}, {"type": "objekt"})
    assert err.errors[0].location.startswith("(schema)")


# --- `$ref`: only inside the schema, nothing fetched, every failure typed --------------------


@pytest.fixture
def schema_server(serve_http: Callable[[type[Any]], str]) -> tuple[str, list[str]]:
    """A server that would hand out a schema accepting anything, and records who asked."""
    requested: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            body = b"{}"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return serve_http(Handler), requested


def _refused_schema(schema: dict[str, Any]) -> FieldError:
    err = _errors("custom", {"n": 1}, schema)
    assert len(err.errors) == 1 and err.errors[0].location == "(schema)"
    return err.errors[0]


@pytest.mark.parametrize("shape", ["absolute", "relative to $id", "draft-07"])
def test_a_remote_ref_is_refused_without_a_request(
    schema_server: tuple[str, list[str]], shape: str
) -> None:
    base, requested = schema_server
    ref = f"{base}/x.json"
    schema: dict[str, Any] = {
        "absolute": {"properties": {"n": {"$ref": ref}}},
        "relative to $id": {"$id": f"{base}/root.json", "properties": {"n": {"$ref": "x.json"}}},
        "draft-07": {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "properties": {"n": {"$ref": ref}},
        },
    }[shape]
    error = _refused_schema(schema)
    # Named as the schema spells it.
    assert f"$ref {schema['properties']['n']['$ref']!r} is refused" in error.message
    assert "nothing is fetched" in error.message
    assert requested == []


def test_a_file_ref_is_refused_whatever_the_file_holds(tmp_path: Path) -> None:
    # The file would accept the config: the refusal shows it was never consulted.
    accepting = tmp_path / "accepting.json"
    accepting.write_text("{}")
    error = _refused_schema({"properties": {"n": {"$ref": accepting.as_uri()}}})
    assert f"$ref '{accepting.as_uri()}' is refused" in error.message


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"$ref": "#/$defs/missing"}, "$ref '#/$defs/missing' points at nothing in the schema"),
        ({"$ref": "#nowhere"}, "$ref '#nowhere' points at nothing in the schema"),
    ],
)
def test_a_dangling_ref_is_refused(schema: dict[str, Any], message: str) -> None:
    assert _refused_schema(schema).message == message


@pytest.mark.parametrize(
    "schema",
    [
        {"properties": {"n": {"description": "a"}}, "$ref": "#/properties/n/description"},
        {"x": [1], "$ref": "#/x"},
        {"x": 5, "$ref": "#/x"},
        {"$schema": 5},
        {"$schema": {}},
    ],
    ids=["ref-to-string", "ref-to-list", "ref-to-number", "schema-number", "schema-object"],
)
def test_a_ref_or_schema_keyword_leading_to_no_schema_is_refused(schema: dict[str, Any]) -> None:
    assert _refused_schema(schema).message.startswith(
        "a $ref or $schema leads to something not a schema"
    )


def test_a_ref_loop_is_refused() -> None:
    schema = {
        "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
        "$ref": "#/$defs/a",
    }
    assert "recursed too deep" in _refused_schema(schema).message


def test_refs_inside_the_schema_still_resolve() -> None:
    schema = {
        "$id": "https://example.invalid/probe.json",
        "$defs": {"rate": {"type": "integer", "minimum": 1}},
        "properties": {"n": {"$ref": "#/$defs/rate"}, "m": {"$ref": "probe.json#/$defs/rate"}},
    }
    assert validate_config("custom", {"n": 1, "m": 2}, schema) == {"n": 1, "m": 2}
    err = _errors("custom", {"n": 0, "m": 2}, schema)
    assert [e.location for e in err.errors] == ["n"]


def test_schema_on_top_of_a_model() -> None:
    schema = {"type": "object", "properties": {"node_id": {"pattern": "^fw-"}}}
    assert validate_config("firewall", FIREWALL, schema)["node_id"] == "fw-01"
    bad = _with(FIREWALL, node_id="edge-1")
    assert _errors("firewall", bad, schema).errors[0].location == "node_id"


def test_field_error_str() -> None:
    assert str(FieldError("a.b", "bad")) == "a.b: bad"
    assert str(FieldError("", "bad")) == "bad"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), json_values, max_size=6))
def test_digest_ignores_key_order(config: dict[str, Any]) -> None:
    reordered = dict(reversed(list(config.items())))
    assert config_digest(config) == config_digest(reordered)
    assert len(config_digest(config)) == 64


def test_digest_differs_on_change_and_rejects_non_json() -> None:
    assert config_digest({"a": 1}) != config_digest({"a": 2})
    assert config_digest({"a": 1}) == config_digest({"a": 1})
    with pytest.raises(ConfigValidationError, match="not representable as JSON"):
        config_digest({"a": float("nan")})
    with pytest.raises(ConfigValidationError, match="not representable as JSON"):
        config_digest({"a": object()})


def test_schema_errors_quote_values_to_the_submitter_never_to_records() -> None:
    # The submitter is told which value is wrong; alerts and heartbeats are plaintext in etcd,
    # where the config itself is sealed, so they carry the rule and the location only.
    from defender_config import Alert

    schema = {
        "type": "object",
        "properties": {
            "token": {"type": "integer"},
            "mode": {"enum": ["a", "b"]},
            "workers": {"minimum": 1},
            "nested": {"not": {"type": "object"}},
            "closed": False,
        },
    }
    config = {
        "token": "s3cret-token-1",
        "mode": "s3cret-mode-2",
        "workers": 0,
        "nested": {"k": "s3cret-nested-3"},
        "closed": "s3cret-closed-4",
    }
    with pytest.raises(ConfigValidationError) as info:
        validate_config("custom", config, schema, component="plugin")
    err = info.value
    assert "'s3cret-token-1' is not of type 'integer'" in str(err)
    record = err.record_message
    assert "s3cret" not in record, record
    assert "token: the value is not of type 'integer'" in record
    assert "mode: the value is not one of ['a', 'b']" in record
    assert "workers: the value is less than the minimum of 1" in record
    assert "False schema does not allow the value" in record
    assert "s3cret" not in Alert.from_error(err, "plugin").detail


_SECRET = "sk-LIVE-9f8e7d6c5b4a"
_DRAFT_2020 = "https://json-schema.org/draft/2020-12/schema"
_DRAFT_7 = "http://json-schema.org/draft-07/schema#"
_DRAFT_4 = "http://json-schema.org/draft-04/schema#"
_DRAFT_3 = "http://json-schema.org/draft-03/schema#"


@pytest.mark.parametrize(
    ("schema", "config", "record"),
    [
        # Messages that quote only part of the value: the extra items, the extra names.
        (
            {"$schema": _DRAFT_2020, "prefixItems": [{"type": "string"}], "items": False},
            ["k1", _SECRET],
            "the value has more than 1 item, which the schema forbids",
        ),
        (
            {"$schema": _DRAFT_7, "items": [{}, {}], "additionalItems": False},
            ["k1", "k2", _SECRET],
            "the value has more than 2 items, which the schema forbids",
        ),
        (
            {"$schema": _DRAFT_2020, "prefixItems": [{}], "unevaluatedItems": False},
            ["k1", _SECRET],
            "the value has items the schema does not evaluate or allow",
        ),
        (
            {"type": "object", "properties": {"a": {}}, "additionalProperties": False},
            {"a": 1, _SECRET: 1},
            "the value has properties the schema does not allow",
        ),
        (
            {"type": "object", "patternProperties": {"^a": {}}, "additionalProperties": False},
            {_SECRET: 1},
            "the value has properties the schema does not allow",
        ),
        (
            {"$schema": _DRAFT_2020, "properties": {"a": {}}, "unevaluatedProperties": False},
            {_SECRET: 1},
            "the value has properties the schema does not evaluate or allow",
        ),
        # Messages that quote the whole value, first or inside.
        ({"enum": ["a", "b"]}, _SECRET, "the value is not one of ['a', 'b']"),
        ({"const": "a"}, _SECRET, "'a' was expected"),
        ({"pattern": "^x"}, _SECRET, "the value does not match '^x'"),
        ({"maxLength": 4}, _SECRET, "the value is longer than 4 characters"),
        ({"minLength": 40}, _SECRET, "the value is shorter than 40 characters"),
        ({"type": "integer"}, _SECRET, "the value is not of type 'integer'"),
        ({"uniqueItems": True}, [_SECRET, _SECRET], "the value has non-unique elements"),
        ({"maxItems": 0}, [_SECRET], "the value has more than 0 items"),
        ({"contains": {"type": "integer"}}, [_SECRET], "the value does not contain items"),
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, _SECRET, "not valid under any"),
        ({"oneOf": [{"type": "string"}, {"minLength": 1}]}, _SECRET, "more than one"),
        ({"not": {"type": "string"}}, _SECRET, "should not be valid under {'type': 'string'}"),
        ({"propertyNames": {"maxLength": 3}}, {_SECRET: 1}, "longer than 3 characters"),
        ({"maxProperties": 0}, {_SECRET: 1}, "the value has more than 0 properties"),
        ({"$schema": _DRAFT_7, "items": False}, [_SECRET], "False schema does not allow the value"),
        ({"required": ["b"]}, {"a": _SECRET}, "'b' is a required property"),
        ({"dependentRequired": {"a": ["b"]}}, {"a": _SECRET}, "'b' is a dependency of 'a'"),
        (
            {"$schema": _DRAFT_4, "minimum": 5, "exclusiveMinimum": True},
            5,
            "the value is less than or equal to the minimum of 5",
        ),
        ({"exclusiveMaximum": 5}, 5, "the value is greater than or equal to the maximum of 5"),
        (
            {"$schema": _DRAFT_3, "properties": {"b": {"required": True}}},
            {"a": _SECRET},
            "field.b: 'b' is a required property",
        ),
        ({"$schema": _DRAFT_3, "dependencies": {"a": "b"}}, {"a": _SECRET}, "'b' is a dependency"),
        ({"$schema": _DRAFT_3, "disallow": "string"}, _SECRET, "disallowed type ('string')"),
    ],
)
def test_schema_error_records_quote_no_part_of_the_value(
    schema: dict[str, Any], config: Any, record: str
) -> None:
    # jsonschema quotes a config's values in many shapes, parts of it too (the extra items of
    # `items: false`); records are made from the keyword and the schema alone.
    from defender_config import Alert

    schema = {"type": "object", "properties": {"field": schema}}
    if "$schema" in schema["properties"]["field"]:
        schema["$schema"] = schema["properties"]["field"].pop("$schema")
    with pytest.raises(ConfigValidationError) as info:
        validate_config("custom", {"field": config}, schema, component="plugin")
    err = info.value
    assert len(err.errors) == 1, err.errors
    assert err.errors[0].location.startswith("field")
    assert record in err.errors[0].for_record()
    assert _SECRET not in err.errors[0].for_record()
    assert _SECRET not in err.record_message
    assert _SECRET not in Alert.from_error(err, "plugin").detail


def test_a_schema_error_record_never_falls_back_on_the_message() -> None:
    # A keyword the record texts do not know (a newer jsonschema's), or a message that names no
    # property of the schema: the record says the rule, not what jsonschema says.
    import jsonschema

    from defender_config._models import _unquoted

    def error(keyword: str, value: Any) -> jsonschema.ValidationError:
        return jsonschema.ValidationError(
            f"{_SECRET!r} is wrong", validator=keyword, validator_value=value, schema={}
        )

    assert _unquoted(error("newKeyword", 1)) == "the value fails the schema's 'newKeyword' rule"
    assert _unquoted(error("required", ["a"])) == "a required property is missing"
    assert _unquoted(error("required", True)) == "a required property is missing"
    assert _unquoted(error("dependentRequired", {"a": ["b"]})) == (
        "a property another one depends on is missing"
    )


def test_records_of_a_builtin_model_do_not_quote_networks_or_ports() -> None:
    # What the person validating reads names the value; what goes to heartbeats, alerts and
    # status does not (as for JSON schema messages above).
    from defender_config import Alert

    config = {
        "node_id": "fw-01",
        "version": "1.0.0",
        "default_policy": "deny",
        "rules": [
            {"id": "a", "action": "deny", "proto": "tcp", "src_cidr": "10.77.0.1/8"},
            {"id": "b", "action": "deny", "proto": "tcp", "ports": ["s3cret-port"]},
            {"id": "c", "action": "deny", "proto": "tcp", "ports": [70000]},
        ],
    }
    with pytest.raises(ConfigValidationError) as info:
        validate_config("firewall", config)
    err = info.value
    assert len(err.errors) == 3, err.errors
    shown = str(err)
    assert "'10.77.0.1/8' is not a network in CIDR form" in shown
    assert "port 's3cret-port' must be a number" in shown and "port 70000 must be within" in shown
    record = err.record_message
    for quoted in ("10.77", "s3cret", "70000"):
        assert quoted not in record, record
        assert quoted not in Alert.from_error(err, "fw").detail
    assert "rules.0.src_cidr: the value is not a network in CIDR form" in record
    assert "rules.1.ports: a port must be a number or a range like 8000-8080" in record
    assert "rules.2.ports: a port must be within 1-65535, low before high" in record


def _schema_of_depth(depth: int) -> dict[str, Any]:
    """A schema nesting `depth` objects (the outermost counts as 1)."""
    schema: dict[str, Any] = (
        {"type": "object"} if depth % 2 else {"type": "object", "properties": {}}
    )
    for _ in range((depth - 1) // 2):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_a_schema_deeper_than_its_metadata_record_can_hold_is_refused() -> None:
    from defender_config._json_parse import MAX_JSON_DEPTH, json_depth_exceeds

    deepest, deeper = _schema_of_depth(MAX_JSON_DEPTH - 1), _schema_of_depth(MAX_JSON_DEPTH)
    assert not json_depth_exceeds({"json_schema": deepest}, MAX_JSON_DEPTH)
    assert json_depth_exceeds({"json_schema": deeper}, MAX_JSON_DEPTH)
    assert validate_config("custom", {"x": 1}, deepest, component="c") == {"x": 1}
    with pytest.raises(ConfigValidationError) as info:
        validate_config("custom", {"x": 1}, deeper, component="c")
    (error,) = info.value.errors
    assert error.location == "(schema)"
    assert "metadata record" in error.message and info.value.component == "c"


def _config_of_depth(depth: int, top: dict[str, Any] | None = None) -> dict[str, Any]:
    """`top` with a key nesting the whole config `depth` objects deep (the outermost counts)."""
    node: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 2):
        node = {"n": node}
    return {**(top or {}), "deep": node}


@pytest.mark.parametrize("ctype", [t.value for t in ComponentType])
@pytest.mark.parametrize("depth", [101, 300, 450])
def test_a_config_too_deep_to_store_is_refused_by_its_depth_whatever_the_type(
    ctype: str, depth: int
) -> None:
    """A typed component's model listed its field errors (missing fields, an extra key) for a
    config the library cannot store anyway; every type now says why, as `custom` does."""
    from defender_config._json_parse import MAX_JSON_DEPTH

    schema = {"type": "object"}
    with pytest.raises(ConfigValidationError) as info:
        validate_config(ctype, _config_of_depth(depth), schema, component="c")
    assert [(e.location, e.message) for e in info.value.errors] == [
        ("", f"nested too deeply (over {MAX_JSON_DEPTH} levels)")
    ]
    # One level less is the model's (or the schema's) to judge, as before.
    shallow = _config_of_depth(MAX_JSON_DEPTH)
    try:
        validate_config(ctype, shallow, schema, component="c")
    except ConfigValidationError as exc:
        assert "nested too deeply" not in str(exc)
