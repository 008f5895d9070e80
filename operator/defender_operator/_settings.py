"""Operator settings: env `DEFENDER_OPERATOR_*`, validated once at start-up.

etcd connection, prefix and sealing defaults are the library's own `DEFENDER_*` settings
(`defender_config.load_settings`), so the operator and the components read one vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as EnvDecodeError

from defender_config import MAX_SETTING_SECONDS, LibrarySettings, bounded_seconds, load_settings
from defender_operator._errors import OperatorConfigurationError

# Every duration is finite and bounded (`bounded_seconds`: a day unless said otherwise): inf or
# 1e12 was accepted, then crashed a loop of the running operator on every turn (OverflowError in
# a timedelta: the rotation schedule and waits, the misconfiguration window), stopped it for
# good (a sleep of inf) or turned a liveness check off. A loop's period is at most 5 minutes, a
# cache's age an hour; a key rotation schedule needs more than a day (30 days is usual) and its
# grace may (a week).
_LOOP_SECONDS = 300
_CACHE_SECONDS = 3600
_ROTATION_EVERY_MAX_SECONDS = 366 * 86400
_ROTATION_GRACE_MAX_SECONDS = 7 * 86400


class OperatorSettings(BaseSettings):
    """Everything the operator itself decides, one documented field each."""

    model_config = SettingsConfigDict(env_prefix="DEFENDER_OPERATOR_", extra="ignore")

    namespace: str = Field(default="ml-defender", min_length=1)
    """The operator's own namespace: the source keyring Secret lives here."""
    keyring_secret: str = Field(default="ml-defender-keyring", min_length=1)
    """Name of the source keyring Secret, and of its copy in every component namespace."""
    watch_namespaces: list[str] = Field(default_factory=list)
    """Namespaces to watch for DefenderComponents; empty means the whole cluster."""
    library_settings_file: Path | None = None
    """Optional JSON/YAML file of the library settings (env DEFENDER_* still wins)."""

    monitor_interval_seconds: float = bounded_seconds(30.0, most=_LOOP_SECONDS)
    """The longest a component goes without a monitor pass. A pass runs at once when anything
    it judges changes: an instance appears, goes or changes its record, a pod of the component
    is added or changed, a key the component's view reads changes in etcd, etcd's health or the
    keyring changes, a heartbeat deadline comes, a restart backoff or an exhausted budget or a
    Misconfigured verdict's window runs out; every 5 s during a canary rollout. This bound
    covers what neither an event nor a clock it judged announces (the scrub, the refresh of
    status.lastHeartbeatTime, a pod deleted without a deletionTimestamp first)."""
    monitor_full_read_seconds: float = bounded_seconds(60.0, most=_CACHE_SECONDS, zero=True)
    """A monitor pass reuses the component as its last pass read it from etcd while the change
    watch saw no change to it and the operator wrote none, for at most this long; then it reads
    again whatever the watch says (a bound on what an unforeseen gap could hide). 0 reads every
    pass."""
    status_heartbeat_refresh_seconds: float = bounded_seconds(60.0, most=_CACHE_SECONDS, zero=True)
    """status.lastHeartbeatTime is rewritten on its own only when it is this much behind the
    newest heartbeat; a status write for any other reason carries the newest. Heartbeats live
    in etcd leases (the Heartbeating condition judges them every pass), and each refresh is a
    status write per component: 1,000 components at 30 s kept the API server busy with 33
    writes a second. 0 writes every pass."""
    secret_copy_check_seconds: float = bounded_seconds(30.0, most=_CACHE_SECONDS, zero=True)
    """How long a read of a namespace's keyring copy (its digest) is reused by monitor passes;
    the operator's own writes update it at once. 0 reads it every pass."""
    registrations_publish_seconds: float = bounded_seconds(2.0, most=_LOOP_SECONDS)
    """How often the registrations anchored in components' status are published to the
    keyring Secret of their namespace (registrations.json, read by agents and the library)."""
    worker_threads: int = Field(default=32, ge=4, le=256)
    """Threads (and API server connections) for blocking etcd and Kubernetes calls."""
    monitor_threads: int = Field(default=8, ge=1, le=256)
    """Threads for the blocking calls of monitor passes, apart from `worker_threads`: periodic
    passes over many components queue among themselves, never ahead of a reconcile."""
    api_connections: int = Field(default=32, ge=4, le=1024)
    """Connections kopf may open to the API server for requests (plus two per watched
    namespace for its watch streams); a burst of events waits for a free one."""
    etcd_health_interval_seconds: float = bounded_seconds(5.0, most=_LOOP_SECONDS)
    """How often etcd health (reachable, quorum) is measured."""
    liveness_etcd_max_unavailable_seconds: float = bounded_seconds(300.0)
    """Liveness fails when etcd has been unreachable this long (a restart may help a stuck
    client; a short outage must not restart the operator)."""
    heartbeat_resync_seconds: float = bounded_seconds(60.0, most=_CACHE_SECONDS)
    """How often every instance key is re-read in full; the watch delivers changes in between
    (a resync repairs what a watch can miss across compaction)."""
    heartbeat_watch_progress_seconds: float = bounded_seconds(5.0, most=60.0, zero=True)
    """The heartbeat and component change watches ask etcd for a progress answer whenever
    their stream was silent this long; silent for three times this, the stream counts as
    stalled: the heartbeat and change views are not trusted (passes read etcd and plan
    deadline passes) until it answers again; silent for four times this, the library replaces
    it on another member (the views trust the new stream once it answered a progress request,
    which etcd sends after the events the watch missed meanwhile).
    0: no progress requests, and a stream that stalls without an error goes unnoticed."""
    liveness_watch_stall_seconds: float = bounded_seconds(300.0)
    """Liveness fails when, with etcd healthy, the heartbeat watch's stream answered nothing
    (no event, no progress answer) this long, or (progress requests off, or between streams)
    neither a heartbeat watch event nor a successful resync arrived this long; must exceed
    heartbeat_resync_seconds."""
    misconfig_window_seconds: int = Field(default=600, ge=1, le=MAX_SETTING_SECONDS)
    """Reports (heartbeat errors, alerts) older than this no longer count as misconfiguration."""

    scrub_interval_seconds: float = bounded_seconds(300.0, zero=True)
    """Each component's sealed values (MASTER, ACTIVE, kept history) are opened and verified
    at most once per this many seconds, from its monitor pass; 0 disables the scrub. Costs one
    etcd read and (history limit + 2) decryptions per component per interval."""

    namespace_storage_budget_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    """The most bytes a namespace's components may keep in etcd (MASTER, ACTIVE, kept history,
    metadata, as stored): a commit or seed that would take the namespace over it is refused,
    nothing written. Every namespace shares etcd's backend quota (2 GiB by default), which
    refuses every namespace's writes once full. 0: unlimited."""
    namespace_storage_budgets: dict[str, int] = Field(default_factory=dict)
    """Per-namespace budgets in bytes (0: unlimited) that replace namespace_storage_budget_bytes
    for the namespaces named, as a JSON object {"namespace": bytes}."""

    rotation_every_seconds: int = Field(default=0, ge=0, le=_ROTATION_EVERY_MAX_SECONDS)
    """Rotate the shared key on this schedule; 0 rotates only on command."""
    rotation_distribute_timeout_seconds: int = Field(default=600, ge=1, le=MAX_SETTING_SECONDS)
    """How long to wait for every live instance to load a new key before promoting anyway."""
    rotation_grace_seconds: int = Field(default=3600, ge=0, le=_ROTATION_GRACE_MAX_SECONDS)
    """How long the old key stays decrypt-only after every value was rewrapped."""
    rotation_interval_seconds: float = bounded_seconds(5.0, most=_LOOP_SECONDS)
    """How often the rotation stage machine is stepped."""

    admission_enabled: bool = False
    """Serve the validating and mutating admission webhooks (`webhooks`): invalid configs are
    refused at `kubectl apply`, and commits record who changed spec.config."""
    admission_listen_address: str = "0.0.0.0"
    """Address the webhook server listens on (HTTPS)."""
    admission_port: int = Field(default=9443, ge=1, le=65535)
    """Port the webhook server listens on."""
    admission_secret: str = Field(default="ml-defender-admission", min_length=1)
    """Secret in the operator's namespace holding the stamp key and, unless
    admission_cert_dir is set, the self-signed serving certificate (created when absent)."""
    admission_cert_dir: Path | None = None
    """Directory with tls.crt, tls.key and ca.crt (e.g. a cert-manager Certificate's Secret);
    unset: the operator generates a self-signed certificate into admission_secret."""
    admission_cert_hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1", "localhost"])
    """DNS names and IP addresses the self-signed certificate is valid for (the Service's
    names in a cluster)."""
    admission_configuration: str = Field(default="ml-defender", min_length=1)
    """Name of the ValidatingWebhookConfiguration and MutatingWebhookConfiguration."""
    admission_url: str = ""
    """Base URL the API server reaches the webhooks at. Set: the operator writes both webhook
    configurations itself (local clusters, where the API server calls 127.0.0.1). Empty: the
    chart rendered them, and the operator only fills in caBundle (see
    admission_patch_ca_bundle)."""
    admission_patch_ca_bundle: bool = True
    """With admission_url empty: put the self-signed CA into the chart's configurations'
    caBundle. False when cert-manager's CA injector does it."""
    admission_failure_policy: Literal["Ignore", "Fail"] = "Ignore"
    """What the API server does when the webhook cannot be reached (only where the operator
    writes the configurations itself; the chart sets its own). See docs/operator.md."""
    admission_timeout_seconds: int = Field(default=5, ge=1, le=30)
    """How long the API server waits for the webhook before applying the failure policy."""

    metrics_port: int = Field(default=9090, ge=0, le=65535)
    """Prometheus metrics port (0 disables the endpoint)."""
    log_format: str = Field(default="json", pattern="^(json|text)$")
    """json for machines (the default), text for a terminal."""
    log_level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")

    @field_validator("namespace_storage_budgets")
    @classmethod
    def _budgets_not_negative(cls, budgets: dict[str, int]) -> dict[str, int]:
        negative = sorted(ns for ns, b in budgets.items() if b < 0)
        if negative:
            raise ValueError(f"a budget is 0 (unlimited) or more bytes; negative: {negative}")
        return budgets

    @model_validator(mode="after")
    def _stall_after_resync(self) -> OperatorSettings:
        if self.liveness_watch_stall_seconds <= self.heartbeat_resync_seconds:
            raise ValueError(
                f"liveness_watch_stall_seconds ({self.liveness_watch_stall_seconds}) must exceed"
                f" heartbeat_resync_seconds ({self.heartbeat_resync_seconds}), or a quiet"
                " cluster with no heartbeat events would fail liveness between resyncs"
            )
        if self.liveness_watch_stall_seconds <= 4 * self.heartbeat_watch_progress_seconds:
            raise ValueError(
                f"liveness_watch_stall_seconds ({self.liveness_watch_stall_seconds}) must exceed"
                " four times heartbeat_watch_progress_seconds"
                f" ({self.heartbeat_watch_progress_seconds}), or a stalled watch would fail"
                " liveness before its stream is replaced"
            )
        return self


# `--namespace` flags, set once by `__main__` before kopf runs. They override
# DEFENDER_OPERATOR_WATCH_NAMESPACES in every later load, so the handlers, the keyring fan-out
# and the webhook configuration all see the namespaces kopf was told to watch: an operator
# limited by flags must never write the keyring into, or post Events to, a namespace it was
# not given.
_flag_namespaces: list[str] = []


def watch_only(namespaces: list[str]) -> None:
    """Make `namespaces` (when not empty) the watched namespaces of every later load."""
    global _flag_namespaces
    _flag_namespaces = list(namespaces)


def load_operator_settings() -> tuple[OperatorSettings, LibrarySettings]:
    """Both settings objects, or OperatorConfigurationError naming every bad field (the
    library's own settings raise SettingsError). One line each, which `__main__` prints before
    it exits 2."""
    # Neither error is chained: a logged traceback prints the cause, and pydantic's quotes
    # each rejected input.
    try:
        ours = OperatorSettings()
        if _flag_namespaces:
            ours = ours.model_copy(update={"watch_namespaces": list(_flag_namespaces)})
    except ValidationError as exc:
        problems = "; ".join(
            f"{_variable(e['loc'])}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise OperatorConfigurationError(f"bad operator settings: {problems}") from None
    except EnvDecodeError as exc:
        # A list variable that is not JSON (WATCH_NAMESPACES, ADMISSION_CERT_HOSTS): raised by
        # pydantic-settings before validation, it was no OperatorConfigurationError and the
        # operator died with a traceback, again at every restart. Its message names the field;
        # the JSON decoder's, its cause, only a position.
        cause = exc.__cause__
        where = f" ({cause})" if isinstance(cause, json.JSONDecodeError) else ""
        raise OperatorConfigurationError(
            f'bad operator settings: {exc}{where}; a list is a JSON list such as \'["a", "b"]\''
        ) from None
    return ours, load_settings(ours.library_settings_file)


def _variable(loc: tuple[int | str, ...]) -> str:
    """The variable a validation error is about; a rule across fields has none."""
    return f"DEFENDER_OPERATOR_{'_'.join(str(p) for p in loc).upper()}" if loc else "settings"
