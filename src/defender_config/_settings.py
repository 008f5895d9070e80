"""Library settings: one place, documented fields, validated at start-up.

Sources, strongest first: `DEFENDER_*` environment variables (nested with `__`, e.g.
`DEFENDER_ETCD__TIMEOUT_SECONDS=2`), then the JSON/YAML file given to `load_settings`, then the
defaults below. A bad file or value raises `SettingsError` naming the field and the source.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from ._bounds import (
    MAX_ALLOWED_MISSES,
    MAX_HEARTBEAT_INTERVAL_SECONDS,
    MIN_ALLOWED_MISSES,
    bounded_seconds,
)
from ._codecs import cipher_names, compression_names
from ._errors import SettingsError
from ._files import read_file_bounded
from ._json_parse import parse_json
from .contract import DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT

__all__ = [
    "ETCD_REQUEST_LIMIT_BYTES",
    "EnvelopeOptions",
    "EtcdSettings",
    "LibrarySettings",
    "load_settings",
    "override_settings",
]

#: etcd's default `--max-request-bytes` (1.5 MiB). A put carries the key, the value and a little
#: framing, so the envelope checks key + value against this.
ETCD_REQUEST_LIMIT_BYTES = 1_572_864
_MiB = 1024 * 1024
# The chart's and the API's bounds: more retries only hold a caller longer on an etcd that does
# not answer; more kept versions than spec.rollout.historyLimit allows are never asked for.
_MAX_RETRIES = 100


def _split_list(value: Any) -> Any:
    """A list setting from the environment: comma separated, or a JSON list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return parse_json(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class EnvelopeOptions(BaseModel):
    """How values are sealed. Per store (settings) and overridable per call.

    Frozen so one instance can be shared between threads and used as a cache key.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    compress: bool = True
    """Compress values of at least `threshold_bytes` before encrypting."""
    encrypt: bool = True
    """Encrypt with the keyring's primary key. When True, readers also refuse unencrypted values."""
    compression: str = "zstd"
    """Compression codec used when writing (a registered name; `zstd` built in). Readers decode
    whatever the header names."""
    cipher: str = "aes-256-gcm"
    """AEAD used when writing: `aes-256-gcm` (default) or `chacha20-poly1305`, which is faster on
    CPUs without AES instructions (Raspberry Pi 4 and older)."""
    level: int = Field(default=3, ge=1, le=22)
    """zstd level; 3 is zstd's default and compresses a 4 KiB JSON config in a few µs."""
    threshold_bytes: int = Field(default=256, ge=0)
    """Values shorter than this are stored uncompressed (flag clear): zstd's frame overhead eats
    the gain on tiny values."""
    max_decompressed_bytes: int = Field(default=16 * _MiB, ge=1)
    """Readers refuse values that declare or produce more than this (decompression bombs)."""
    # Finite: with `nan` no ratio is ever over it, and the check is silently off.
    max_ratio: float = Field(default=1000.0, gt=1.0, allow_inf_nan=False)
    """Readers refuse values whose declared size is over `max_ratio` x compressed size, once the
    declared size is over `ratio_floor_bytes`. Real configs compress 3-20x."""
    ratio_floor_bytes: int = Field(default=64 * 1024, ge=0)
    """Below this declared size the ratio is not checked: a small value cannot be a bomb."""
    request_limit_bytes: int = Field(default=ETCD_REQUEST_LIMIT_BYTES, ge=1024)
    """etcd's `--max-request-bytes`; sealing refuses key + value over it (ValueTooLargeError)."""

    @field_validator("compression")
    @classmethod
    def _known_compression(cls, value: str) -> str:
        return _writing_codec(value, compression_names(), "compression", "compress: false")

    @field_validator("cipher")
    @classmethod
    def _known_cipher(cls, value: str) -> str:
        return _writing_codec(value, cipher_names(), "cipher", "encrypt: false")


def _writing_codec(value: str, names: list[str], what: str, off: str) -> str:
    """`value` if it names a registered codec to write with: not "none", which only marks a
    value stored without it (`off` is how to say that instead)."""
    known = [n for n in names if n != "none"]
    if value not in known:
        raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(known)} (or {off})")
    return value


class EtcdSettings(BaseModel):
    """How to reach the etcd cluster."""

    model_config = ConfigDict(extra="forbid")

    endpoints: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://127.0.0.1:2379"]
    )
    """Every member; clients fail over between them. Env form: comma separated or a JSON list."""
    ca_file: Path | None = None
    """CA bundle to verify the members' certificates (enables TLS)."""
    cert_file: Path | None = None
    """Client certificate for mutual TLS; needs `key_file`."""
    key_file: Path | None = None
    """Client certificate key for mutual TLS; needs `cert_file`."""
    user: str | None = None
    """etcd user for password authentication; needs `password`."""
    password: SecretStr | None = None
    """etcd password (never shown in reprs or logs)."""
    # Every duration and count below is bounded (`_bounds`): inf or 1e12 was accepted and
    # crashed the running process in a gRPC deadline, a sleep or a wait (OverflowError).
    timeout_seconds: float = bounded_seconds(5.0)
    """Deadline of one etcd call."""
    retries: int = Field(default=5, ge=0, le=_MAX_RETRIES)
    """Retries of a transient failure (unavailable, deadline) before StoreUnavailableError."""
    backoff_base_seconds: float = bounded_seconds(0.1)
    """First retry delay; doubles per retry, with full jitter."""
    backoff_max_seconds: float = bounded_seconds(5.0)
    """Upper bound of one retry delay."""

    @field_validator("endpoints", mode="before")
    @classmethod
    def _split_endpoints(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("endpoints")
    @classmethod
    def _check_endpoints(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one endpoint is required")
        for endpoint in value:
            if "://" in endpoint and not endpoint.startswith(("http://", "https://")):
                raise ValueError(f"endpoint {endpoint!r} must use http:// or https://")
            hostport = endpoint.split("://", 1)[-1].rstrip("/")
            host, sep, port = hostport.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"endpoint {endpoint!r} must look like [scheme://]host:port")
        return value

    @model_validator(mode="after")
    def _check_pairs(self) -> EtcdSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together (mutual TLS)")
        if (self.user is None) != (self.password is None):
            raise ValueError("user and password must be set together (etcd auth)")
        if self.backoff_max_seconds < self.backoff_base_seconds:
            raise ValueError("backoff_max_seconds must be >= backoff_base_seconds")
        return self


class LibrarySettings(BaseSettings):
    """Everything the library needs, from env `DEFENDER_*` and/or a file (`load_settings`)."""

    model_config = SettingsConfigDict(
        env_prefix="DEFENDER_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    etcd: EtcdSettings = Field(default_factory=EtcdSettings)
    """etcd connection."""
    envelope: EnvelopeOptions = Field(default_factory=EnvelopeOptions)
    """Store-wide sealing options."""
    prefix: str = Field(default="/ml-defender", pattern=r"^/[A-Za-z0-9._/-]*[A-Za-z0-9._-]$")
    """Root of every key this library writes."""
    keyring_path: Path | None = None
    """Mounted keyring Secret (directory or `keyring.json`). Needed when `envelope.encrypt`."""
    plaintext_components: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Components whose configs this reader accepts unencrypted (a deliberately plaintext
    component, `spec.storage.encrypt: false`). Every other component must be encrypted when
    `envelope.encrypt` is on, whatever its metadata in etcd says: etcd content never lowers a
    reader's requirement. Env form: comma separated or a JSON list."""
    keyring_poll_seconds: float = bounded_seconds(2.0)
    """How often the keyring file is checked for a new version."""
    history_limit: int = Field(default=DEFAULT_HISTORY_LIMIT, ge=1, le=MAX_HISTORY_LIMIT)
    """Versions of ACTIVE kept under `history/`."""
    heartbeat_interval_seconds: float = bounded_seconds(30.0, most=MAX_HEARTBEAT_INTERVAL_SECONDS)
    """Heartbeat refresh interval (the old design used 30 s)."""
    heartbeat_allowed_misses: int = Field(default=3, ge=MIN_ALLOWED_MISSES, le=MAX_ALLOWED_MISSES)
    """Lease TTL = interval x allowed misses: an instance is gone after this many misses. At
    least 2: a lease of one interval expires whenever a renewal is late at all."""

    @field_validator("plaintext_components", mode="before")
    @classmethod
    def _split_components(cls, value: Any) -> Any:
        return _split_list(value)

    def requires_encryption(self, component: str) -> bool:
        """Whether this reader refuses an unencrypted MASTER/ACTIVE/history value of
        `component`: decided by these settings alone, never by a record in etcd."""
        return self.envelope.encrypt and component not in self.plaintext_components

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The deployer's environment wins over the file (passed as init kwargs by load_settings),
        # so one image and one file serve every environment.
        return (env_settings, init_settings)


# A Python repr of a string, as PyYAML quotes input in its problem texts.
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"')


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What PyYAML found wrong and where, without the file's text: its str() shows the offending
    line (an unterminated `password: "...` shows the password), and its problem and context
    texts quote input too (the alias or tag an unquoted `password: *...` or `!...` is read as).
    The context says where the broken construct began (the opening quote)."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem is None:
        return "the file cannot be parsed"
    parts = [(exc.context, exc.context_mark), (exc.problem, exc.problem_mark)]
    return ": ".join(_yaml_part(text, mark) for text, mark in parts if text)


def _yaml_part(text: str, mark: yaml.Mark | None) -> str:
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return _QUOTED.sub("'…'", text) + where


def _unconvertible(suffix: str) -> str:
    digits = sys.get_int_max_str_digits()
    if suffix == ".json":
        return f"not valid JSON: it holds a number over {digits} digits, more than Python reads"
    return (
        "not valid YAML: a value cannot be read as the type YAML takes it for (a date that does"
        f" not exist such as 2020-13-45, an integer over {digits} digits, or a tag such as !!int"
        " on a value not of its type); quote a value that is meant as a string"
    )


# The chart's settings come from a ConfigMap, which holds at most 1 MiB.
MAX_SETTINGS_FILE_BYTES = 1024 * 1024


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = read_file_bounded(path, MAX_SETTINGS_FILE_BYTES).decode("utf-8")
    except OSError as exc:
        raise SettingsError(
            f"cannot read it ({exc.strerror or exc}); check the path and the mount",
            path=str(path),
        ) from exc
    except UnicodeDecodeError:
        # Not the decoder's message: it quotes the bytes, and the file may hold a password.
        raise SettingsError(
            "not UTF-8 text; check that the path names the settings file", path=str(path)
        ) from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data: Any = json.loads(text)
        else:
            # YAML is a superset of JSON, so unknown suffixes are parsed as YAML.
            data = yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        # The decoder's message quotes no input, only a position.
        raise SettingsError(f"not valid JSON: {exc}", path=str(path)) from exc
    except yaml.YAMLError as exc:
        # Not chained: the YAMLError's own text quotes the file, secrets included.
        raise SettingsError(f"not valid YAML: {_yaml_problem(exc)}", path=str(path)) from None
    except RecursionError:
        # Both parsers recurse per level: a file nested thousands deep is no settings file.
        raise SettingsError("nested too deeply to parse", path=str(path)) from None
    except (ValueError, OverflowError, LookupError, TypeError, AttributeError):
        # Past the syntax, both parsers convert each value to the type it reads as, and fail
        # with whatever the conversion raises: ValueError for an integer over Python's digit
        # limit or a date that does not exist (`2020-13-45`); PyYAML also raises the others for
        # an explicit tag on a value not of its type (`!!bool x`, `!!timestamp [..]`). Those
        # messages quote the value, which may be the password: neither shown nor chained.
        raise SettingsError(_unconvertible(suffix), path=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(
            f"top level must be a mapping of settings, found {type(data).__name__}",
            path=str(path),
        )
    return data


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"])
        env = "DEFENDER_" + "__".join(str(p) for p in err["loc"]).upper()
        parts.append(f"{loc or '(top)'}: {err['msg']} (file key {loc!r} or env {env})")
    return "; ".join(parts)


def load_settings(path: str | Path | None = None) -> LibrarySettings:
    """Load settings from a JSON or YAML file (optional) and `DEFENDER_*` environment variables.

    Raises SettingsError naming every bad field.
    """
    data: dict[str, Any] = {}
    shown: str | None = None
    if path is not None:
        file_path = Path(path)
        shown = str(file_path)
        data = _read_file(file_path)
    # Neither error is chained: a logged traceback prints the cause, and pydantic's quotes each
    # rejected input (a password typed under a misspelt key, `pasword:`).
    try:
        return LibrarySettings(**data)
    except ValidationError as exc:
        raise SettingsError(_describe(exc), path=shown) from None
    except ValueError as exc:  # pydantic-settings raises plain ValueError for undecodable env
        # Its message names the field and the source; the JSON decoder's, its cause, a position.
        cause = exc.__cause__
        where = f" ({cause})" if isinstance(cause, json.JSONDecodeError) else ""
        raise SettingsError(f"{exc}{where}; check the DEFENDER_* environment", path=shown) from None


class _Given(LibrarySettings):
    """LibrarySettings validated from the values given alone: the settings file and the
    ``DEFENDER_*`` environment were read into the base already, and read again here they
    would override the overrides."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def override_settings(
    base: LibrarySettings, *, etcd: Mapping[str, Any] | None = None, **fields: Any
) -> LibrarySettings:
    """`base` (as `load_settings` gave it) with a program's own overrides on top: `etcd`, fields
    of `EtcdSettings` merged over `base.etcd`; `fields`, top-level fields replaced (a model, such
    as `EnvelopeOptions`, or its plain values). The result meets every rule `load_settings`
    checks, across fields too (a client certificate without its key, a password without a
    user), and neither the file nor the environment is read again.

    Raises SettingsError with `problems`: each refused field's dotted location and why, never
    the value (it may be a password), for the caller to name as its own flag."""
    data = base.model_dump()
    if etcd:
        data["etcd"] = {**data["etcd"], **etcd}
    for name, value in fields.items():
        data[name] = value.model_dump() if isinstance(value, BaseModel) else value
    try:
        given = _Given.model_validate(data)
    except ValidationError as exc:
        problems = tuple(
            (
                ".".join(str(p) for p in err["loc"]),
                str(err["msg"]).removeprefix("Value error, "),
            )
            for err in exc.errors(include_url=False, include_input=False)
        )
        shown = "; ".join(f"{where or '(top)'}: {why}" for where, why in problems)
        raise SettingsError(f"override refused: {shown}", problems=problems) from None
    # The validated values as the library's own type (built without reading any source).
    return LibrarySettings.model_construct(
        given.model_fields_set,
        **{name: getattr(given, name) for name in LibrarySettings.model_fields},
    )
