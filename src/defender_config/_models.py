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
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import jsonschema
import referencing
import referencing.exceptions
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ._errors import ConfigValidationError, FieldError
from ._json_parse import MAX_JSON_DEPTH, check_depth
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

_PORT_RE = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")


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
                match = _PORT_RE.match(port)
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


def _unquoted(error: jsonschema.ValidationError) -> str | None:
    """`error.message` without the config value jsonschema quotes in it (``'s3cret' is not of
    type 'integer'``), None when it quotes none. jsonschema puts the value's repr first (or,
    for a false schema, last); a message that holds it anywhere else is replaced whole."""
    shown, message = repr(error.instance), error.message
    if message.startswith(shown):
        return "the value" + message[len(shown) :]
    if message.endswith(shown):
        return message[: -len(shown)] + "the value"
    if shown in message:
        return f"the value fails the schema's {error.validator!r} rule"
    return None


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
        errors = _schema_errors(config, dict(json_schema), who)
        if errors:
            raise ConfigValidationError(who, errors)
    return result


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
        raise ConfigValidationError(
            component, [FieldError("", f"nested too deeply (over {MAX_JSON_DEPTH} levels)")]
        ) from None
    except (TypeError, ValueError) as exc:
        raise ConfigValidationError(
            component, [FieldError("", f"not representable as JSON: {exc}")]
        ) from exc
    return text.encode("utf-8")


def config_digest(config: Any) -> str:
    """Hex SHA-256 of the canonical JSON of `config`."""
    return hashlib.sha256(canonical_json(config)).hexdigest()
