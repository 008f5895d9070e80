"""Config models per component type, `validate_config` and `config_digest`.

Unknown fields are rejected (`extra="forbid"`): a typo in a firewall rule must fail the commit,
not be silently ignored by the component. Components that need free-form settings use the
`custom` type with a JSON schema carried next to the config.
"""

from __future__ import annotations

import hashlib
import importlib
import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

import jsonschema
import referencing
import referencing.exceptions
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ._errors import ConfigValidationError, FieldError
from ._json_parse import MAX_JSON_DEPTH, check_depth, json_depth_exceeds
from ._schema_budget import budgeted, check_schema, install, validation_budget
from .contract import ComponentType

__all__ = [
    "AclRule",
    "AlertIntake",
    "ComponentType",
    "DetectorSettings",
    "FirewallConfig",
    "LogSource",
    "MlDetectorConfig",
    "RagConfig",
    "RingSettings",
    "SnifferConfig",
    "config_digest",
    "model_for",
    "validate_config",
]


NodeId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
# Semantic version, optionally with pre-release/build parts ("1.0.0", "2.1.0-rc.1").
Version = Annotated[str, Field(pattern=r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _ComponentConfig(_Strict):
    node_id: NodeId
    """Which node/instance this config describes, e.g. `detector-01`."""
    version: Version
    """Version of the component the config targets."""
    description: str | None = None


# --- sniffer -------------------------------------------------------------------------------------


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class RingSettings(_Strict):
    """Capture ring: AF_PACKET TPACKET_V3 blocks, or the XDP/AF_XDP ring in frames."""

    block_size: int = Field(default=1 << 20, ge=4096)
    block_count: int = Field(default=64, ge=1, le=4096)
    frame_size: int = Field(default=2048, ge=2048, le=65536)
    ring_entries: int = Field(default=4096, ge=64, le=1 << 20)

    @model_validator(mode="after")
    def _check(self) -> RingSettings:
        for name in ("block_size", "frame_size", "ring_entries"):
            if not _power_of_two(getattr(self, name)):
                raise ValueError(f"{name} must be a power of two")
        if self.block_size % self.frame_size:
            raise ValueError("block_size must be a multiple of frame_size")
        return self


class SnifferConfig(_ComponentConfig):
    """eBPF/XDP packet capture."""

    interface: str = Field(pattern=r"^[A-Za-z0-9_.:@-]{1,15}$")
    """Network interface (Linux names are at most 15 characters)."""
    capture_mode: Literal["xdp", "af_packet"] = "xdp"
    xdp_attach: Literal["native", "generic", "offload"] = "native"
    """XDP attach mode; ignored for af_packet."""
    ring: RingSettings = Field(default_factory=RingSettings)
    snaplen: int = Field(default=256, ge=64, le=65535)
    promiscuous: bool = False
    filters: list[str] = Field(default_factory=list)
    """BPF filter expressions; a packet is kept if any matches (empty keeps all)."""
    sample_rate: float = Field(default=1.0, gt=0.0, le=1.0)
    output_endpoint: str | None = None
    """Where flows go, e.g. the ml-detector's `tcp://detector:5571`."""

    @field_validator("filters")
    @classmethod
    def _filters(cls, value: list[str]) -> list[str]:
        for i, expr in enumerate(value):
            if not expr.strip():
                raise ValueError(f"filter {i} is empty")
        return value


# --- ml-detector ---------------------------------------------------------------------------------

Capability = Literal["ddos", "ransomware", "traffic", "internal"]


class DetectorSettings(_Strict):
    """One embedded detector."""

    enabled: bool = True
    threshold: Fraction = 0.5
    """Score above which a flow is reported, 0..1."""
    model_path: str | None = None
    window_seconds: float = Field(default=10.0, gt=0)


class MlDetectorConfig(_ComponentConfig):
    """The four embedded detectors."""

    capabilities: list[Capability] = Field(min_length=1)
    """Which detectors run: a non-empty subset of ddos, ransomware, traffic, internal."""
    detectors: dict[Capability, DetectorSettings] = Field(default_factory=dict)
    """Per-detector settings; a capability without an entry runs with the defaults."""
    input_endpoint: str | None = None
    batch_size: int = Field(default=64, ge=1, le=65536)

    @field_validator("capabilities")
    @classmethod
    def _unique(cls, value: list[Capability]) -> list[Capability]:
        dupes = sorted({c for c in value if value.count(c) > 1})
        if dupes:
            raise ValueError(f"capabilities listed twice: {', '.join(dupes)}")
        return value

    @model_validator(mode="after")
    def _detectors_in_capabilities(self) -> MlDetectorConfig:
        extra = sorted(set(self.detectors) - set(self.capabilities))
        if extra:
            raise ValueError(
                f"detectors configured but not in capabilities: {', '.join(extra)}; add them to "
                "capabilities or remove their settings"
            )
        return self


class _QuotingError(ValueError):
    """A model's problem whose message quotes the config's value (a network, a port): what the
    person who submitted the config reads (the webhook's answer, the status). `unquoted` says it
    without the value, for records (heartbeats, alerts, agent logs), as `_unquoted` does for
    JSON schema messages: a config's values are its owner's business, not every reader's of
    the alert stream."""

    def __init__(self, message: str, unquoted: str) -> None:
        super().__init__(message)
        self.unquoted = unquoted


# --- firewall ------------------------------------------------------------------------------------

# fullmatch: `$` would let "8000\n" through, and the port list keeps the text as given; [0-9],
# not \d, which takes any script's digits ("٨٠٨٠"), and int() reads them.
_PORT_RE = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")


class AclRule(_Strict):
    """One ACL rule; rules are evaluated by ascending priority, first match wins."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    action: Literal["allow", "deny", "reject", "log"]
    proto: Literal["tcp", "udp", "icmp", "any"] = "any"
    src_cidr: str | None = None
    """Source network in CIDR form; None matches any."""
    dst_cidr: str | None = None
    """Destination network in CIDR form; None matches any."""
    ports: list[int | str] = Field(default_factory=list)
    """Destination ports or ranges ("8000-8080"), tcp/udp only; empty means all."""
    priority: int = Field(default=1000, ge=0, le=65535)
    comment: str | None = None

    @field_validator("src_cidr", "dst_cidr")
    @classmethod
    def _cidr(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            # strict: "10.0.0.1/8" is almost always a typo for a host or a network.
            return str(ipaddress.ip_network(value, strict=True))
        except ValueError as exc:
            raise _QuotingError(
                f"{value!r} is not a network in CIDR form ({exc})",
                "the value is not a network in CIDR form",
            ) from None

    @field_validator("ports")
    @classmethod
    def _ports(cls, value: list[int | str]) -> list[int | str]:
        for port in value:
            if isinstance(port, int):
                lo = hi = port
            else:
                match = _PORT_RE.fullmatch(port)
                if not match:
                    raise _QuotingError(
                        f"port {port!r} must be a number or a range like 8000-8080",
                        "a port must be a number or a range like 8000-8080",
                    )
                lo = int(match.group(1))
                hi = int(match.group(2) or lo)
            if not (1 <= lo <= 65535 and 1 <= hi <= 65535 and lo <= hi):
                raise _QuotingError(
                    f"port {port!r} must be within 1-65535, low before high",
                    "a port must be within 1-65535, low before high",
                )
        return value

    @model_validator(mode="after")
    def _ports_need_l4(self) -> AclRule:
        if self.ports and self.proto not in ("tcp", "udp"):
            raise ValueError(f"ports need proto tcp or udp, not {self.proto}")
        if (
            self.src_cidr is not None
            and self.dst_cidr is not None
            and ipaddress.ip_network(self.src_cidr).version
            != ipaddress.ip_network(self.dst_cidr).version
        ):
            raise ValueError("src_cidr and dst_cidr mix IPv4 and IPv6")
        return self


class FirewallConfig(_ComponentConfig):
    """ACL agent."""

    default_policy: Literal["allow", "deny"]
    """What happens to traffic no rule matches; stated explicitly, there is no safe guess."""
    rules: list[AclRule] = Field(default_factory=list, max_length=10000)
    block_ttl_seconds: int = Field(default=3600, ge=0)
    """How long blocks requested by the ml-detector last (0 = until removed)."""
    dry_run: bool = False

    @field_validator("rules")
    @classmethod
    def _unique_ids(cls, value: list[AclRule]) -> list[AclRule]:
        ids = [r.id for r in value]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"rule ids used twice: {', '.join(dupes)}")
        return value


# --- rag -----------------------------------------------------------------------------------------


class LogSource(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    kind: Literal["file", "journald", "etcd"] = "file"
    location: str = Field(min_length=1)
    """File path or glob, journald unit, or etcd prefix."""
    format: Literal["json", "syslog", "text"] = "json"


class AlertIntake(_Strict):
    """How rag receives the library's alerts."""

    enabled: bool = True
    prefix: str = Field(default="/ml-defender/alerts/", pattern=r"^/")
    max_per_minute: int = Field(default=600, ge=1)


class RagConfig(_ComponentConfig):
    """Log analysis; also receives alerts and may edit other components' ACTIVE configs."""

    log_sources: list[LogSource] = Field(default_factory=list)
    alert_intake: AlertIntake = Field(default_factory=AlertIntake)
    may_modify_active: bool = False
    """Whether rag may commit to other components' ACTIVE configs."""
    modifiable_components: list[str] = Field(default_factory=list)
    """Which components it may modify (empty with may_modify_active = all)."""
    index_path: str | None = None
    embedding_model: str | None = None

    @model_validator(mode="after")
    def _modify(self) -> RagConfig:
        if self.modifiable_components and not self.may_modify_active:
            raise ValueError("modifiable_components is set but may_modify_active is false")
        names = [s.name for s in self.log_sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"log source names used twice: {', '.join(dupes)}")
        return self


_MODELS: dict[ComponentType, type[_ComponentConfig]] = {
    ComponentType.SNIFFER: SnifferConfig,
    ComponentType.ML_DETECTOR: MlDetectorConfig,
    ComponentType.FIREWALL: FirewallConfig,
    ComponentType.RAG: RagConfig,
}


def model_for(component_type: ComponentType | str) -> type[BaseModel] | None:
    """The pydantic model of a component type (None for `custom`)."""
    return _MODELS.get(_coerce_type(component_type))


def _coerce_type(component_type: ComponentType | str) -> ComponentType:
    try:
        return ComponentType(component_type)
    except ValueError:
        allowed = ", ".join(t.value for t in ComponentType)
        raise ConfigValidationError(
            str(component_type),
            [FieldError("", f"unknown component type {component_type!r}; allowed: {allowed}")],
        ) from None


def _pydantic_errors(exc: ValidationError) -> list[FieldError]:
    out = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        cause = (err.get("ctx") or {}).get("error")
        unquoted = cause.unquoted if isinstance(cause, _QuotingError) else None
        out.append(FieldError(loc, msg, unquoted))
    return out


# The schema comes from whoever may edit a DefenderComponent (docs/security.md), and the
# operator, its webhook and every agent validate with it: a `$ref` that jsonschema would fetch
# (its default registry opens any URL, `file://` too, with no timeout) would let that person
# make them send requests, read local files or hang. This registry retrieves nothing (its default
# `retrieve` fails for every URI), so only references inside the schema itself resolve, and the
# metaschemas jsonschema bundles.
_NO_RETRIEVAL: referencing.Registry[Any] = referencing.Registry()

# The same person writes the schema: see _schema_budget. A whole validation shares this
# budget; a real config's takes milliseconds.
_VALIDATION_BUDGET_SECONDS = 1.0
for _name in ("_keywords", "_legacy_keywords", "_utils"):
    try:
        install(importlib.import_module(f"jsonschema.{_name}"))
    except ModuleNotFoundError:  # another jsonschema layout: the tests of the budget say so
        continue


def _schema_errors(config: Mapping[str, Any], schema: dict[str, Any], who: str) -> list[FieldError]:
    """The config's problems under `schema`; ConfigValidationError at `(schema)` when the schema
    itself cannot validate anything: not a valid schema, a `$ref` that leaves it or points at
    nothing or at no schema, a `$ref` loop."""
    try:
        validator_cls = jsonschema.validators.validator_for(schema)
        with validation_budget(_VALIDATION_BUDGET_SECONDS):
            check_schema(validator_cls, schema)
            validator = budgeted(validator_cls)(schema, registry=_NO_RETRIEVAL)
            errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.path])
    except jsonschema.SchemaError as exc:
        loc = ".".join(str(p) for p in exc.path)
        raise _schema_refused(who, exc.message, loc) from exc
    except referencing.exceptions.Unresolvable as exc:
        raise _schema_refused(who, _unresolvable(exc)) from exc
    except (AttributeError, TypeError) as exc:
        # What jsonschema raises where a `$ref` (or `$schema`) leads to a value that is not a
        # schema, past `check_schema`, which never follows references.
        raise _schema_refused(
            who, f"a $ref or $schema leads to something not a schema: {exc}"
        ) from exc
    except TimeoutError as exc:
        raise _schema_refused(
            who,
            f"validating this config took over {_VALIDATION_BUDGET_SECONDS:g} s: a pattern that"
            " backtracks without end, such as (a|a)*, on a long string, or a schema that makes"
            " more work of this config than a config should need",
        ) from exc
    except RecursionError as exc:
        raise _schema_refused(
            who,
            "validation recursed too deep: a $ref that leads back to itself, or a config nested"
            " deeper than the schema can follow",
        ) from exc
    return [FieldError(".".join(str(p) for p in e.path), e.message, _unquoted(e)) for e in errors]


def _unquoted(error: jsonschema.ValidationError) -> str:
    """What `error` says, for records, made from its keyword and the schema alone.

    jsonschema's messages quote the config's values in many shapes: the whole value, the extra
    items (`items: false`, `additionalItems`, `unevaluatedItems`), the extra property names, a
    value inside a list of schemas. No test of the message can tell them all apart, so records
    never read it: the text comes from the schema, which etcd keeps in plaintext anyway
    (metadata). A keyword this table lacks gets the generic text."""
    keyword, value = error.validator, error.validator_value
    if keyword is None:  # a `false` schema: jsonschema sets no keyword
        return "False schema does not allow the value"
    describe = _RECORD_TEXTS.get(str(keyword))
    if describe is None:
        return f"the value fails the schema's {str(keyword)!r} rule"
    return describe(value, error)


def _schema_of(error: jsonschema.ValidationError) -> Mapping[str, Any]:
    # The schema holding the keyword (a `true`/`false` schema has no keyword to fail).
    return error.schema if isinstance(error.schema, Mapping) else {}


def _listed(value: Any) -> list[Any]:
    return [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []


def _type_names(value: Any, _: jsonschema.ValidationError) -> str:
    # Draft 3 allows schemas among the types; jsonschema names them by their `name`.
    names = [t.get("name", t) if isinstance(t, dict) else t for t in _listed(value)]
    return f"the value is not of type {', '.join(repr(n) for n in names)}"


def _bound(word: str, edge: str) -> _RecordText:
    def describe(value: Any, error: jsonschema.ValidationError) -> str:
        # Drafts 3 and 4 make `minimum`/`maximum` exclusive with a boolean beside them.
        exclusive = edge == "exclusive" or _schema_of(error).get(f"exclusive{word.title()}") is True
        relation = "less" if word == "minimum" else "greater"
        return (
            f"the value is {relation} than{' or equal to' if exclusive else ''} the {word} of"
            f" {value!r}"
        )

    return describe


def _schema_named(candidates: list[str], error: jsonschema.ValidationError) -> str | None:
    # The message names a property of the schema here; it is picked among texts made from the
    # schema, so what is returned is one of those, never the message.
    return next((c for c in candidates if c == error.message), None)


def _required(value: Any, error: jsonschema.ValidationError) -> str:
    names = _listed(value)
    if not names:  # draft 3: `required: true` inside each property's schema
        properties = _schema_of(error).get("properties")
        names = list(properties) if isinstance(properties, dict) else []
    named = _schema_named([f"{n!r} is a required property" for n in names], error)
    return named or "a required property is missing"


def _dependency(value: Any, error: jsonschema.ValidationError) -> str:
    pairs = value.items() if isinstance(value, dict) else ()
    texts = [f"{d!r} is a dependency of {p!r}" for p, deps in pairs for d in _listed(deps)]
    return _schema_named(texts, error) or "a property another one depends on is missing"


def _extra_items(value: Any, error: jsonschema.ValidationError) -> str:
    # How many items the schema allows before the extra ones: `prefixItems` (2020-12) or an
    # array of `items` (before it).
    schema = _schema_of(error)
    allowed = schema.get("prefixItems", schema.get("items"))
    count = len(allowed) if isinstance(allowed, list) else 0
    plural = "s" if count != 1 else ""
    return f"the value has more than {count} item{plural}, which the schema forbids"


def _one_of(_: Any, error: jsonschema.ValidationError) -> str:
    # jsonschema gives the error of "none valid" the subschemas' errors, that of "more than one
    # valid" none.
    if error.context:
        return "the value is not valid under any of the given schemas"
    return "the value is valid under more than one of the given schemas"


_RecordText = Callable[[Any, jsonschema.ValidationError], str]

_RECORD_TEXTS: dict[str, _RecordText] = {
    "type": _type_names,
    "enum": lambda v, _: f"the value is not one of {v!r}",
    "const": lambda v, _: f"{v!r} was expected",
    "minimum": _bound("minimum", "inclusive"),
    "maximum": _bound("maximum", "inclusive"),
    "exclusiveMinimum": _bound("minimum", "exclusive"),
    "exclusiveMaximum": _bound("maximum", "exclusive"),
    "multipleOf": lambda v, _: f"the value is not a multiple of {v!r}",
    "divisibleBy": lambda v, _: f"the value is not a multiple of {v!r}",
    "minLength": lambda v, _: f"the value is shorter than {v!r} characters",
    "maxLength": lambda v, _: f"the value is longer than {v!r} characters",
    "pattern": lambda v, _: f"the value does not match {v!r}",
    "format": lambda v, _: f"the value is not a {v!r}",
    "minItems": lambda v, _: f"the value has fewer than {v!r} items",
    "maxItems": lambda v, _: f"the value has more than {v!r} items",
    "uniqueItems": lambda v, _: "the value has non-unique elements",
    "items": _extra_items,
    "additionalItems": _extra_items,
    "unevaluatedItems": lambda v, _: "the value has items the schema does not evaluate or allow",
    "contains": lambda v, _: "the value does not contain items matching the given schema",
    "minContains": lambda v, _: f"fewer than {v!r} items match the given schema",
    "maxContains": lambda v, _: f"more than {v!r} items match the given schema",
    "minProperties": lambda v, _: f"the value has fewer than {v!r} properties",
    "maxProperties": lambda v, _: f"the value has more than {v!r} properties",
    "required": _required,
    "dependentRequired": _dependency,
    "dependencies": _dependency,
    "additionalProperties": lambda v, _: "the value has properties the schema does not allow",
    "unevaluatedProperties": lambda v, _: (
        "the value has properties the schema does not evaluate or allow"
    ),
    "anyOf": lambda v, _: "the value is not valid under any of the given schemas",
    "oneOf": _one_of,
    "not": lambda v, _: f"the value should not be valid under {v!r}",
    "disallow": lambda v, _: (
        f"the value is of a disallowed type ({', '.join(repr(t) for t in _listed(v))})"
    ),
}


def _unresolvable(exc: referencing.exceptions.Unresolvable) -> str:
    # jsonschema wraps referencing's error; the cause says which kind it is.
    cause = exc.__cause__ if isinstance(exc.__cause__, referencing.exceptions.Unresolvable) else exc
    if isinstance(cause, referencing.exceptions.PointerToNowhere):
        return f"$ref {'#' + cause.ref!r} points at nothing in the schema"
    if isinstance(cause, referencing.exceptions.NoSuchAnchor):
        return f"$ref {'#' + cause.anchor!r} points at nothing in the schema"
    return (
        f"$ref {cause.ref!r} is refused: only references inside the schema (#/$defs/...) are"
        " followed, nothing is fetched"
    )


MAX_SCHEMA_DEPTH = MAX_JSON_DEPTH - 1
"""The component's metadata record holds its schema one level below the record's top, and
readers refuse a record nested deeper than MAX_JSON_DEPTH: a deeper schema, stored, would make
the component's metadata unreadable to every reader (RecordUnauthenticated: "not JSON")."""


def _schema_refused(who: str, message: str, location: str = "") -> ConfigValidationError:
    return ConfigValidationError(
        who, [FieldError(f"(schema){'.' + location if location else ''}", message)]
    )


def validate_config(
    component_type: ComponentType | str,
    config: Mapping[str, Any],
    json_schema: Mapping[str, Any] | None = None,
    *,
    component: str | None = None,
) -> dict[str, Any]:
    """Validate `config` for its component type; return it normalized (defaults filled, CIDRs in
    canonical form) as JSON-ready data.

    `custom` requires `json_schema`; for the other types a schema, if given, is checked too.
    Raises ConfigValidationError listing every problem by dotted field path; `component` (the
    component's name) is used in the message, else the type.
    """
    ctype = _coerce_type(component_type)
    who = component or ctype.value
    if not isinstance(config, Mapping):
        raise ConfigValidationError(
            who, [FieldError("", f"config must be a JSON object, not {type(config).__name__}")]
        )
    if json_depth_exceeds(dict(config), MAX_JSON_DEPTH):
        # Refused by its depth whatever the type: a model would list field errors of the top
        # level (missing fields, an extra key), hiding why this config cannot be stored.
        raise ConfigValidationError(who, [_too_deep()])
    result: dict[str, Any]
    model = _MODELS.get(ctype)
    if model is not None:
        try:
            result = model.model_validate(config).model_dump(mode="json")
        except ValidationError as exc:
            raise ConfigValidationError(who, _pydantic_errors(exc)) from exc
    else:
        if json_schema is None:
            raise ConfigValidationError(
                who,
                [FieldError("", "a custom component must carry a JSON schema for its config")],
            )
        result = json.loads(canonical_json(config, component=who))
    if json_schema is not None:
        if json_depth_exceeds(json_schema, MAX_SCHEMA_DEPTH):
            raise _schema_refused(
                who,
                f"the schema is nested deeper than {MAX_SCHEMA_DEPTH} objects and arrays, more"
                " than the component's metadata record can hold",
            )
        errors = _schema_errors(config, dict(json_schema), who)
        if errors:
            raise ConfigValidationError(who, errors)
    return result


def _too_deep() -> FieldError:
    return FieldError("", f"nested too deeply (over {MAX_JSON_DEPTH} levels)")


def canonical_json(config: Any, *, component: str = "config") -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN: equal configs give equal bytes.

    ConfigValidationError (naming `component`) for values JSON cannot hold.
    """
    try:
        text = json.dumps(
            config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        # What readers refuse (`parse_json`) is never written: a config stored nested deeper
        # than they parse would be lost to every one of them.
        check_depth(config, text.count("[") + text.count("{"))
    except RecursionError:
        raise ConfigValidationError(component, [_too_deep()]) from None
    except (TypeError, ValueError) as exc:
        raise ConfigValidationError(
            component, [FieldError("", f"not representable as JSON: {exc}")]
        ) from exc
    return text.encode("utf-8")


def config_digest(config: Any) -> str:
    """Hex SHA-256 of the canonical JSON of `config`."""
    return hashlib.sha256(canonical_json(config)).hexdigest()
