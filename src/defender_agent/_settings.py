"""Agent settings: command-line flags over ``DEFENDER_AGENT_*`` environment variables.

Every field can come from a flag (``--output-path``) or from the environment
(``DEFENDER_AGENT_OUTPUT_PATH``); flags win. The instance name falls back to ``POD_NAME`` and the
node to ``NODE_NAME``, which a pod sets from the downward API. Settings are validated once at
start-up and a bad value stops the agent with exit code 2 and a message naming the field.
"""

from __future__ import annotations

import argparse
import shlex
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from defender_config import (
    MAX_ALLOWED_MISSES,
    MAX_HEARTBEAT_INTERVAL_SECONDS,
    MIN_ALLOWED_MISSES,
    ComponentType,
    LibrarySettings,
    SettingsError,
    bounded_seconds,
    load_settings,
    override_settings,
)

from ._errors import AgentSettingsError
from ._http import loopback_host, loopback_url_problem
from ._reload import parse_signal

__all__ = [
    "AgentSettings",
    "ComponentTypeName",
    "HealthCheckKind",
    "ReloadMethod",
    "build_parser",
    "load_agent_settings",
]

# The contract's enum; the old name stays for importers of the agent's settings.
ComponentTypeName = ComponentType
ReloadMethod = Literal["signal", "http", "none"]
HealthCheckKind = Literal["none", "process", "http", "tcp", "exec", "file"]


# Every duration is finite and bounded (`bounded_seconds`: a day unless said otherwise): inf or
# 1e12 was accepted and crashed the running agent (OverflowError) at its first reload, check,
# beat or poll instead of exiting 2 at start. The backoff doubles up to 2**18 times
# (`reload_retries` <= 20): a minute is its bound.
_MAX_BACKOFF_SECONDS = 60.0

# Signals no process can catch: "reload" with them ends or freezes the component.
_NEVER_A_RELOAD = frozenset({signal.SIGKILL, signal.SIGSTOP})


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class AgentSettings(BaseSettings):
    """Everything the agent needs to know; one documented field per knob."""

    model_config = SettingsConfigDict(
        env_prefix="DEFENDER_AGENT_",
        extra="forbid",
        populate_by_name=True,
        # The docstring under each field becomes its description (shown by --help).
        use_attribute_docstrings=True,
    )

    component: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """Component name, as in the DefenderComponent resource and the etcd path."""

    component_type: ComponentTypeName | None = None
    """Which config model validates the config. Default: the type stored in the component's
    metadata. ``custom`` accepts any JSON object, or what the JSON schema (``schema_path`` or the
    one stored with the component) allows."""

    instance: str = Field(
        min_length=1,
        validation_alias=AliasChoices("instance", "DEFENDER_AGENT_INSTANCE", "POD_NAME"),
    )
    """This instance's name: the pod name from the downward API (``POD_NAME``)."""

    node_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("node_id", "DEFENDER_AGENT_NODE_ID", "NODE_NAME"),
    )
    """Node the pod runs on (``NODE_NAME`` from the downward API); shown in heartbeats."""

    output_path: Path
    """Where the decoded config is written, on a volume shared with the component."""

    file_mode: int = Field(default=0o640, ge=0, le=0o777)
    """Permissions of the written file (default 0640: owner read/write, group read)."""

    restore_edited_file: bool = True
    """Put the delivered config back (and tell the component to reload) when the file at
    ``output_path`` no longer holds it, checked every second: edited by hand or by the
    component's container (``FileDrifted``). Turn off only for a component that rewrites its
    own config file on purpose, which would otherwise be put back and reloaded each second."""

    seed_config_path: Path | None = None
    """Optional JSON file with the component's own default config. On first start it is
    registered as MASTER (create-only: an existing MASTER is never changed)."""

    schema_path: Path | None = None
    """Optional JSON schema the config must also satisfy."""

    settings_file: Path | None = None
    """The shared library settings file (JSON/YAML, the chart's ``defender.json``): etcd
    connection, envelope options, prefix, keyring path. The ``etcd_*``, ``prefix`` and
    ``keyring_path`` settings below override it; ``DEFENDER_*`` variables apply as usual."""

    etcd_endpoints: Annotated[list[str] | None, NoDecode] = None
    """etcd client URLs, comma-separated; any member will do. Overrides the settings file."""

    etcd_ca_file: Path | None = None
    """CA bundle that signed the etcd members' certificates (turns TLS on)."""
    etcd_cert_file: Path | None = None
    """Client certificate for mutual TLS (with ``etcd_key_file``)."""
    etcd_key_file: Path | None = None
    """Key of the client certificate."""
    etcd_user: str | None = None
    """etcd user, when etcd authentication is on (with ``etcd_password``)."""
    etcd_password: SecretStr | None = None
    """etcd password; never logged. Prefer the environment variable, from a Secret."""

    prefix: str | None = None
    """Root of the defender layout in etcd (default from the settings file: ``/ml-defender``)."""

    keyring_path: Path | None = None
    """Directory where the key Secret is mounted (holds ``keyring.json``, and the operator's
    ``registrations.json`` when it publishes one); default from the settings file. Changes to
    the mounted Secret are picked up without a restart."""

    allow_plaintext: bool = False
    """Accept this component's configs unencrypted: only for a component stored in plaintext
    on purpose (``spec.storage.encryption.enabled: false``). Otherwise an unencrypted config is
    refused, whatever the records in etcd say. Same as listing the component in the library's
    ``plaintext_components``."""

    max_config_bytes: int | None = Field(default=None, ge=1)
    """The largest decoded config (bytes) the agent takes in; a larger one is refused
    (``ConfigTooLarge``, the last good file kept). Default: what the container's memory limit
    affords, about (limit - the agent's own ~70 MiB) / 56; without a limit only the library's
    cap (``envelope.max_decompressed_bytes``) applies."""

    reload_method: ReloadMethod = "signal"
    """How the component is told to reload: ``signal``, ``http`` or ``none`` (the component
    watches the file itself)."""

    reload_process: str | None = None
    """Process name to signal (``comm`` or base name of ``argv[0]``); needs
    ``shareProcessNamespace: true`` on the pod."""

    reload_pidfile: Path | None = None
    """Alternative to ``reload_process``: a file holding the pid to signal."""

    reload_signal: str = "SIGHUP"
    """Signal to send, e.g. ``SIGHUP`` or ``USR1``."""

    reload_url: str | None = None
    """URL to call when ``reload_method`` is ``http``: ``http://`` to ``localhost``,
    ``127.x.x.x`` or ``[::1]`` only (the component in this pod)."""

    reload_grace_seconds: float = bounded_seconds(30.0, zero=True)
    """How long a missing target process is normal (the component container still starting:
    it reads the file when it starts) before it is reported as ProcessNotFound."""

    reload_http_method: Literal["GET", "POST", "PUT"] = "POST"
    """HTTP method of the reload call."""
    reload_timeout_seconds: float = bounded_seconds(5.0)
    """Timeout of one reload call."""
    reload_retries: int = Field(default=3, ge=1, le=20)
    """Attempts of a reload call (connection errors, timeouts and 5xx are retried, 4xx not)."""
    reload_backoff_seconds: float = bounded_seconds(0.2, most=_MAX_BACKOFF_SECONDS, zero=True)
    """First wait between reload call attempts; doubles each attempt."""

    heartbeat_interval_seconds: float | None = bounded_seconds(
        None, most=MAX_HEARTBEAT_INTERVAL_SECONDS
    )
    """Seconds between heartbeats (lease keep-alives); default from the settings file (30)."""

    heartbeat_misses: int | None = Field(default=None, ge=MIN_ALLOWED_MISSES, le=MAX_ALLOWED_MISSES)
    """Missed heartbeats before the lease expires and the operator restarts the pod (at least
    2, as `spec.heartbeat.missedBeforeRestart`: one expires whenever a beat is late at all)."""

    health_check: HealthCheckKind = "none"
    """How the agent checks that the component itself is well before each heartbeat:
    ``process`` (alive and not stopped, from /proc; needs shareProcessNamespace), ``http``,
    ``tcp``, ``exec`` or ``file`` (a file the component touches). While the check fails the
    agent stops renewing the lease, so the operator restarts the pod. ``none``: the agent's
    heartbeat only says the agent runs."""

    health_process: str | None = None
    """``process`` check: the process name; default ``reload_process``."""

    health_pidfile: Path | None = None
    """``process`` check: a file holding the pid, instead of a name; default
    ``reload_pidfile``."""

    health_url: str | None = None
    """``http`` check: URL that answers 2xx/3xx while the component is well; ``http://`` to
    ``localhost``, ``127.x.x.x`` or ``[::1]`` only (the component in this pod)."""

    health_tcp: str | None = None
    """``tcp`` check: ``host:port`` that accepts connections while the component is well; the
    host is ``localhost``, ``127.x.x.x`` or ``[::1]`` (the component in this pod)."""

    health_exec: str | None = None
    """``exec`` check: command line (split like a shell would, no shell features) that exits
    0 while the component is well; run in the agent's container."""

    health_file: Path | None = None
    """``file`` check: the file the component touches while it works (on the shared volume)."""

    health_file_max_age_seconds: float | None = bounded_seconds(None)
    """``file`` check: the oldest the file may be; at least two of the component's touch
    periods, so one late touch is not a failure."""

    health_timeout_seconds: float = bounded_seconds(2.0)
    """Timeout of one ``http``, ``tcp`` or ``exec`` check."""

    health_start_grace_seconds: float = bounded_seconds(30.0, zero=True)
    """Seconds after the agent starts during which a failing check is reported but the lease
    still renewed: the component container may still be starting."""

    status_port: int | None = Field(default=None, ge=1, le=65535)
    """Serve ``GET /status`` (JSON: health, cadence, last error) and ``GET /healthz`` on this
    port; off by default."""

    status_address: str = "0.0.0.0"
    """Address the status endpoint listens on."""

    keyring_poll_seconds: float | None = bounded_seconds(None)
    """How often the mounted Secret is checked for a new keyring (and new registrations)."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level; logs are JSON lines on stderr."""

    @field_validator("etcd_endpoints", mode="before")
    @classmethod
    def _endpoints_from_csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("etcd_endpoints")
    @classmethod
    def _endpoints_present(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("give at least one etcd endpoint")
        return value

    @field_validator("file_mode", mode="before")
    @classmethod
    def _octal_mode(cls, value: Any) -> Any:
        # "0640" from a flag or env var is octal, as chmod reads it, not decimal 640.
        if isinstance(value, str):
            try:
                return int(value, 8)
            except ValueError:
                raise ValueError(f"{value!r} is not an octal mode such as 0640") from None
        return value

    @field_validator("reload_signal")
    @classmethod
    def _known_signal(cls, value: str) -> str:
        sig = parse_signal(value)
        if sig in _NEVER_A_RELOAD:
            raise ValueError(
                f"{sig.name} cannot be handled by the component, so it cannot mean reload "
                "(it would kill or freeze it on every config change); use e.g. SIGHUP or SIGUSR1"
            )
        return sig.name

    @field_validator("reload_process", "health_process")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and ("/" in value or not value.strip()):
            raise ValueError("a process name, not a path (e.g. 'sniffer', not '/usr/bin/sniffer')")
        return value

    @field_validator("reload_url", "health_url")
    @classmethod
    def _own_pod_url(cls, value: str | None) -> str | None:
        # Whoever sets the agent's environment must not turn it into a client of other
        # addresses (it runs with the pod's network identity and etcd credentials beside).
        if value is not None:
            problem = loopback_url_problem(value)
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("health_tcp")
    @classmethod
    def _own_pod_tcp(cls, value: str | None) -> str | None:
        host = (value or "").rpartition(":")[0]
        if value is not None and host and not loopback_host(host):
            raise ValueError(
                "must reach the component in its own pod: the host must be localhost, "
                "127.x.x.x or [::1]"
            )
        return value

    @model_validator(mode="after")
    def _reload_target_given(self) -> AgentSettings:
        one_target = (self.reload_process is None) != (self.reload_pidfile is None)
        if self.reload_method == "signal" and not one_target:
            raise ValueError(
                "reload_method=signal needs exactly one of reload_process or reload_pidfile"
            )
        if self.reload_method == "http" and self.reload_url is None:
            raise ValueError("reload_method=http needs reload_url (http://localhost:<port>/...)")
        if self.output_path.name in ("", ".", ".."):
            raise ValueError("output_path must name a file")
        self._health_target_given()
        return self

    def _health_target_given(self) -> None:
        kind = self.health_check
        if self.health_process is not None and self.health_pidfile is not None:
            raise ValueError("give at most one of health_process or health_pidfile")
        if kind == "process" and self.health_target_process == (None, None):
            raise ValueError(
                "health_check=process needs health_process or health_pidfile"
                " (or reload_process / reload_pidfile)"
            )
        if kind == "http" and self.health_url is None:
            raise ValueError("health_check=http needs health_url (http://localhost:<port>/...)")
        if kind == "tcp":
            host, _, port = (self.health_tcp or "").rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("health_check=tcp needs health_tcp as host:port")
        if kind == "exec" and not shlex.split(self.health_exec or ""):
            raise ValueError("health_check=exec needs health_exec (a command line)")
        if kind == "file" and (
            self.health_file is None or self.health_file_max_age_seconds is None
        ):
            raise ValueError("health_check=file needs health_file and health_file_max_age_seconds")

    @property
    def health_target_process(self) -> tuple[str | None, Path | None]:
        """(process name, pidfile) of the ``process`` check: its own, else the reload target."""
        if self.health_process is not None or self.health_pidfile is not None:
            return self.health_process, self.health_pidfile
        return self.reload_process, self.reload_pidfile

    @property
    def reload_signum(self) -> signal.Signals:
        return parse_signal(self.reload_signal)


# Flags are derived from the fields so a new field cannot be forgotten on the command line.
_FLAG_HELP_SKIP = {"etcd_password"}
_FLAG_ALIASES = {"settings_file": ["--settings"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defender-agent",
        description=(
            "Sidecar that registers a component, keeps its heartbeat, writes its decoded config "
            "to a shared file and tells it to reload. Every flag can also be set as "
            "DEFENDER_AGENT_<FLAG> in the environment, named after its first spelling ("
            + "; ".join(
                f"{alias} is DEFENDER_AGENT_{name.upper()}"
                for name, aliases in _FLAG_ALIASES.items()
                for alias in aliases
            )
            + ")."
        ),
    )
    for name, info in AgentSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = " ".join((info.description or "").split()).replace("%", "%%") or None
        if name in _FLAG_HELP_SKIP:
            help_text = "prefer DEFENDER_AGENT_ETCD_PASSWORD from a Secret over this flag"
        parser.add_argument(
            flag, *_FLAG_ALIASES.get(name, []), dest=name, default=None, help=help_text
        )
    return parser


def load_agent_settings(argv: Sequence[str] | None = None) -> AgentSettings:
    """Parse flags, merge with the environment, validate; :class:`AgentSettingsError` if bad."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(namespace).items() if v is not None}
    try:
        return AgentSettings(**overrides)
    except ValidationError as exc:
        raise AgentSettingsError(
            f"invalid agent settings: {_problems(exc)} (set flags or DEFENDER_AGENT_* "
            "variables; the instance comes from POD_NAME)"
        ) from exc


def _problems(exc: ValidationError) -> str:
    """One line naming each bad setting, never the value given (it may be a password) nor
    pydantic's URLs."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc or 'settings'}: {err['msg']}")
    return "; ".join(parts)


def library_settings(agent: AgentSettings) -> LibrarySettings:
    """The shared library's settings: the settings file and ``DEFENDER_*`` variables, with the
    agent's own etcd/prefix/keyring/heartbeat flags on top. Raises ``SettingsError`` (from the
    library) or :class:`AgentSettingsError`."""
    base = load_settings(agent.settings_file)
    etcd: dict[str, Any] = {}
    for field_name in ("endpoints", "ca_file", "cert_file", "key_file", "user", "password"):
        value = getattr(agent, f"etcd_{field_name}")
        if value is not None:
            etcd[field_name] = value
    update: dict[str, Any] = {}
    if agent.prefix is not None:
        update["prefix"] = agent.prefix
    if agent.keyring_path is not None:
        update["keyring_path"] = agent.keyring_path
    if agent.heartbeat_interval_seconds is not None:
        update["heartbeat_interval_seconds"] = agent.heartbeat_interval_seconds
    if agent.heartbeat_misses is not None:
        update["heartbeat_allowed_misses"] = agent.heartbeat_misses
    if agent.keyring_poll_seconds is not None:
        update["keyring_poll_seconds"] = agent.keyring_poll_seconds
    if agent.allow_plaintext and agent.component not in base.plaintext_components:
        update["plaintext_components"] = [*base.plaintext_components, agent.component]
    # Each override meets the library's own rules here, at start-up (exit 2, one line), not
    # when the client is first built (a crash).
    try:
        return override_settings(base, etcd=etcd, **update)
    except SettingsError as exc:
        if not exc.problems:
            raise
        raise AgentSettingsError(f"invalid agent settings: {_named(exc.problems)}") from None


def _named(problems: tuple[tuple[str, str], ...]) -> str:
    """One line naming each bad setting as the agent's own (``etcd.endpoints`` is its
    ``etcd_endpoints``), never the value given (it may be a password)."""
    parts = []
    for where, why in problems:
        head, _, rest = where.partition(".")
        name = f"etcd_{rest}" if head == "etcd" and rest else where or "settings"
        parts.append(f"{name}: {why}")
    return "; ".join(parts)
