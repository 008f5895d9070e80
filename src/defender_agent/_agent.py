"""The agent process: register, heartbeat, watch ACTIVE, deliver, follow the keyring, stop cleanly.

Threads: the library's watch thread calls :meth:`Agent._on_active`, its heartbeat thread keeps the
lease, the keyring poller calls :meth:`Agent._on_keyring_change`, and the main thread waits for a
signal while retrying failed writes and reloads and re-reading the registrations the operator
publishes beside the keyring. All of them meet in the thread-safe ConfigApplier.
"""

from __future__ import annotations

import logging
import shlex
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from defender_config import (
    ActiveConfig,
    ComponentType,
    ConfigStore,
    DefenderClient,
    DefenderConfigError,
    EnvelopeError,
    ErrorInfo,
    Heartbeater,
    Keyring,
    KeyringError,
    KeyringSource,
    LibrarySettings,
    RegistrationsFileError,
    RegistrationsSource,
    Registry,
    Rollouts,
    StoreAuthError,
    StoreError,
    StoreUnavailableError,
    parse_json,
)

from ._core import ConfigApplier
from ._errors import AgentSettingsError
from ._health import (
    UNHEALTHY,
    ExecCheck,
    FileCheck,
    HealthCheck,
    HealthGate,
    HttpCheck,
    ProcessCheck,
    TcpCheck,
)
from ._memory import MemoryBudget
from ._reload import HttpReloader, NoReload, Reloader, SignalReloader
from ._settings import AgentSettings
from ._status import StatusServer

__all__ = ["Agent", "EtcdAnswers", "build_health_check", "build_reloader", "store_error_over"]

log = logging.getLogger("defender_agent")

# How often the main loop retries a failed write or reload and checks for a stop request.
_TICK_SECONDS = 1.0
# Longest wait between two attempts to reach etcd at start-up.
_MAX_START_BACKOFF = 30.0


def build_reloader(settings: AgentSettings) -> Reloader:
    if settings.reload_method == "signal":
        return SignalReloader(
            settings.reload_signum,
            process_name=settings.reload_process,
            pidfile=settings.reload_pidfile,
        )
    if settings.reload_method == "http":
        assert settings.reload_url is not None  # checked by AgentSettings
        return HttpReloader(
            settings.reload_url,
            method=settings.reload_http_method,
            timeout_seconds=settings.reload_timeout_seconds,
            retries=settings.reload_retries,
            backoff_seconds=settings.reload_backoff_seconds,
        )
    return NoReload()


def build_health_check(settings: AgentSettings) -> HealthCheck | None:
    """The component check the settings choose; None for ``none``."""
    kind, timeout = settings.health_check, settings.health_timeout_seconds
    if kind == "process":
        name, pidfile = settings.health_target_process
        return ProcessCheck(process_name=name, pidfile=pidfile)
    if kind == "http":
        assert settings.health_url is not None  # checked by AgentSettings
        return HttpCheck(settings.health_url, timeout)
    if kind == "tcp":
        host, _, port = (settings.health_tcp or "").rpartition(":")
        return TcpCheck(host.strip("[]"), int(port), timeout)
    if kind == "exec":
        return ExecCheck(shlex.split(settings.health_exec or ""), timeout)
    if kind == "file":
        assert settings.health_file is not None
        assert settings.health_file_max_age_seconds is not None
        return FileCheck(settings.health_file, settings.health_file_max_age_seconds)
    return None


def _read_json_file(path: Path, what: str) -> dict[str, Any]:
    try:
        data = parse_json(path.read_bytes())
    except OSError as exc:
        raise AgentSettingsError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise AgentSettingsError(f"the {what} {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise AgentSettingsError(f"the {what} {path} must hold a JSON object")
    return data


@dataclass(frozen=True)
class EtcdAnswers:
    """Counts of calls etcd itself answered, as the agent's heartbeater and watch keep them."""

    # Beats: a lease renewed (keep-alive) or the record put.
    beats: int = 0
    # Records put: a call every etcd version authenticates.
    writes: int = 0
    # Reads of the config the instance runs that etcd answered, not the library's cache.
    reads: int = 0


def store_error_over(
    reason: str, cause: BaseException | None, then: EtcdAnswers, now: EtcdAnswers
) -> bool:
    """Whether a store error reported when the counts were ``then`` is disproved by ``now``.

    - A read of the config answered since proves both: etcd answers, and this user may read
      the very keys that failed.
    - ``StoreUnavailable``: any beat since (etcd answered a keep-alive or a put). With a
      failing health check there are no beats, and only the read proves it.
    - ``StoreAuth`` for refused credentials (a login refused, a token not accepted): a record
      put since, which etcd accepts only with a token it takes. Keep-alives are not counted:
      etcd 3.6 checks the token on each one too (verified against 3.6.16, also on a stream
      opened before the token was invalidated), but etcd 3.5 did not, as its users report
      (patroni/patroni#2332); a put is checked by every version, and reporting the error
      changes the record, so a put follows at once. For a missing right
      (``PERMISSION_DENIED`` on the config's keys) a put of the instance key proves nothing.
    - Any other reason: never; etcd answering does not fix a config, a keyring or a component.
    """
    if reason not in (StoreUnavailableError.reason, StoreAuthError.reason):
        return False
    if now.reads > then.reads:
        return True
    if reason == StoreUnavailableError.reason:
        return now.beats > then.beats
    refused = isinstance(cause, StoreAuthError) and cause.credentials_refused
    return refused and now.writes > then.writes


class _HeartbeatSink:
    """Connects the applier to the heartbeat record and the library's alerter."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def update_heartbeat(self, **fields: Any) -> None:
        beat = self._agent.heartbeater
        if "last_error" in fields and isinstance(fields["last_error"], dict):
            error = fields["last_error"] = ErrorInfo(**fields["last_error"])
            if error.reason in (StoreUnavailableError.reason, StoreAuthError.reason):
                # Only what etcd answers after this proves the error over.
                self._agent._store_error_at = self._agent.etcd_answers()
        self._agent._pending_fields.update(fields)
        if beat is not None:
            beat.update(**fields)

    def alert(self, kind: str, detail: str) -> None:
        agent = self._agent
        if agent.client is not None:
            agent.client.alerter.event(
                kind, agent.settings.component, detail, instance=agent.settings.instance
            )


class Agent:
    """One agent process. ``run()`` blocks until :meth:`stop` (SIGTERM/SIGINT) and returns the
    exit code."""

    def __init__(self, settings: AgentSettings, library: LibrarySettings) -> None:
        self.settings = settings
        self.library = library
        self.stop_requested = threading.Event()
        self.client: DefenderClient | None = None
        self.configs: ConfigStore | None = None
        self.heartbeater: Heartbeater | None = None
        self.keyring: KeyringSource | None = None
        # The store's source of the operator's registrations.json in the keyring Secret (None:
        # no keyring path, or no store yet), the message of the error about it reported last
        # (each once), and when the main loop checks it again.
        self.registrations: RegistrationsSource | None = None
        self._registrations_error: str | None = None
        self._registrations_due = 0.0
        self._watch: Any = None
        # Heartbeat fields set before the heartbeater exists (e.g. the first delivery races it).
        self._pending_fields: dict[str, Any] = {}
        # What etcd had answered when StoreUnavailable or StoreAuth was last reported.
        self._store_error_at = EtcdAnswers()
        schema = (
            _read_json_file(settings.schema_path, "JSON schema") if settings.schema_path else None
        )
        self.schema = schema
        self.seed_config = (
            _read_json_file(settings.seed_config_path, "seed config")
            if settings.seed_config_path
            else None
        )
        self._heartbeat_sink = _HeartbeatSink(self)
        self.applier = ConfigApplier(
            component=settings.component,
            component_type=settings.component_type,
            output_path=settings.output_path,
            reloader=build_reloader(settings),
            sink=self._heartbeat_sink,
            file_mode=settings.file_mode,
            json_schema=schema,
            process_grace_seconds=settings.reload_grace_seconds,
            max_file_bytes=library.envelope.max_decompressed_bytes,
        )
        self.budget = MemoryBudget(settings.max_config_bytes)
        self._running_reported = False
        check = build_health_check(settings)
        self.health: HealthGate | None = None
        if check is not None:
            self.health = HealthGate(
                check,
                start_grace_seconds=settings.health_start_grace_seconds,
                on_fail=self._on_unhealthy,
                on_recover=self._on_healthy,
            )
        self._status: StatusServer | None = None
        if settings.status_port is not None:
            self._status = StatusServer(
                settings.status_address, settings.status_port, self.status_snapshot
            )

    # --- component health -------------------------------------------------------------------

    def _on_unhealthy(self, problem: str) -> None:
        log.error(
            "the component fails its health check; heartbeats stop until it passes: %s",
            problem,
            extra={"reason": UNHEALTHY},
        )
        try:
            self._heartbeat_sink.alert(UNHEALTHY, problem)
        except Exception:  # an alert that cannot be stored must not stop the check
            log.exception("could not record the %s alert", UNHEALTHY)

    def _on_healthy(self, problem: str) -> None:
        log.info("the component passes its health check again (was: %s)", problem)

    def status_snapshot(self) -> dict[str, Any]:
        """What `GET /status` shows."""
        beat = self.heartbeater
        health = self.health
        record = beat.record if beat is not None else None
        renewing = beat is not None and beat.held is None
        problem = health.problem if health is not None else None
        return {
            "component": self.settings.component,
            "instance": self.settings.instance,
            "healthy": renewing and problem is None,
            "renewing": renewing,
            "health_check": health.check.describe() if health is not None else "none",
            "problem": problem,
            "cadence": None
            if beat is None
            else {
                "interval_seconds": beat.interval,
                "lease_ttl_seconds": beat.ttl,
                "source": "published" if beat.cadence is not None else "local",
            },
            "beats": beat.beats if beat is not None else 0,
            # Puts or deletes of its key by someone else, each answered by writing it again.
            "overwritten": beat.overwrites if beat is not None else 0,
            "config_version": self.applier.config_version,
            "last_error": (
                beat.held.model_dump()
                if beat is not None and beat.held is not None
                else (record.last_error.model_dump() if record and record.last_error else None)
            ),
        }

    # --- start-up ---------------------------------------------------------------------------

    def _open_keyring(self) -> KeyringSource | None:
        path = self.library.keyring_path
        if path is None:
            if self.library.envelope.encrypt:
                raise KeyringError(
                    "encryption is on but no keyring path is set; mount the keyring Secret and "
                    "pass --keyring-path (DEFENDER_AGENT_KEYRING_PATH)"
                )
            return None
        source = KeyringSource(
            path,
            poll_seconds=self.library.keyring_poll_seconds,
            on_change=self._on_keyring_change,
            on_error=self._on_keyring_error,
            on_recover=self._on_keyring_recovered,
        )
        return source

    def _register(self) -> None:
        """Seed (if asked) and start the heartbeat; retried by the caller while etcd is down."""
        assert self.client is not None and self.configs is not None
        s = self.settings
        common: dict[str, Any] = {
            "pod": s.instance,
            "node_id": s.node_id,
            "interval_seconds": self.library.heartbeat_interval_seconds,
            "allowed_misses": self.library.heartbeat_allowed_misses,
            "gate": self.health,
        }
        if self.seed_config is not None:
            try:
                registration = Registry(self.client, self.configs).register(
                    s.component,
                    s.instance,
                    self.seed_config,
                    s.component_type or ComponentType.CUSTOM,
                    json_schema=self.schema,
                    **common,
                )
            except (StoreError, KeyringError):
                raise
            except DefenderConfigError as exc:
                # The seed was refused (invalid) or ACTIVE cannot be opened: run anyway with the
                # plain heartbeat, the error is in last_error and alerted.
                self.applier.reject(exc, alerted=True)
            else:
                self.heartbeater = registration.heartbeater
                self._flush_pending()
                return
        beat = Heartbeater(self.client, s.component, s.instance, **common)
        beat.update(**self._pending_fields)
        beat.start()
        self.heartbeater = beat
        beat.set_status("STARTING")

    def _flush_pending(self) -> None:
        if self.heartbeater is not None and self._pending_fields:
            self.heartbeater.update(**self._pending_fields)

    def _start(self) -> None:
        """Connect, register and start watching; every step is retried while etcd is down."""
        self.keyring = self._open_keyring()
        delay = 0.5
        while not self.stop_requested.is_set():
            try:
                self._connect_step()
                break
            except StoreAuthError:
                raise
            except StoreError as exc:
                log.warning(
                    "cannot register yet, retrying in %.1fs: %s",
                    delay,
                    exc,
                    extra={"reason": exc.reason},
                )
                self.stop_requested.wait(delay)
                delay = min(delay * 2, _MAX_START_BACKOFF)

    def config_store(self, client: DefenderClient) -> ConfigStore:
        """The agent's reader of configs: refuses, before parsing, a config its memory cannot
        take (``_memory``)."""
        budget, why = self.budget.allowance()
        log.info(
            "largest config this agent takes in: %s (%s)",
            "no cap but the library's" if budget is None else f"{budget} bytes",
            why,
        )
        return ConfigStore(client, before_parse=self.budget.check)

    def _connect_step(self) -> None:
        if self.client is None:
            # With etcd auth the client logs in when built, so building it can fail like any
            # other call while etcd is down.
            self.client = DefenderClient(
                self.library, self.keyring, instance=self.settings.instance
            )
        if self.configs is None:
            self.configs = self.config_store(self.client)
        # Before anything reads the component's config (the seed's register, the watch).
        self._poll_registrations(due=True)
        if self.heartbeater is None:
            self._register()
        if self.keyring is not None:
            self.keyring.start()
        # The config this instance must run: ACTIVE, or the candidate of a canary rollout
        # whose signed record names this instance (`defender_config.Rollouts`).
        self._watch = Rollouts(self.configs).watch(
            self.settings.component,
            self.settings.instance,
            self._on_active,
            on_error=self._on_watch_error,
        )

    # --- callbacks --------------------------------------------------------------------------

    def _on_active(self, active: ActiveConfig) -> None:
        try:
            # The record written with this ACTIVE value (authenticated by the library), not the
            # current one: a later record cannot change how this config is validated.
            meta = active.metadata
            ok = self.applier.apply(
                active.config,
                active.version,
                json_schema=meta.json_schema if meta is not None else None,
                component_type=meta.type if meta is not None else None,
            )
        except Exception as exc:  # never let a bad value kill the watch thread
            self.applier.reject(exc)
            return
        if ok and active.codec:
            # The component's own storage rule, as its ACTIVE is stored.
            self._heartbeat_sink.update_heartbeat(codec=active.codec)
        if ok and not self._running_reported and self.heartbeater is not None:
            try:
                self.heartbeater.set_status("RUNNING")
                self._running_reported = True
            except StoreError as exc:
                log.warning("could not report RUNNING yet: %s", exc)

    def _on_watch_error(self, exc: DefenderConfigError) -> None:
        # The library's canary watch alerted every other error already, as `watch_active`
        # does (client.open, record checks, client.report: a config that is not one, or over
        # this agent's budget); store errors are transient and belong in the heartbeat, not in
        # an alert record.
        self.applier.reject(exc, alerted=True)

    def _on_keyring_change(self, old: Keyring, new: Keyring) -> None:
        log.info(
            "keyring changed: primary %s, %d key(s)",
            new.primary_fingerprint,
            len(new),
            extra={"key_fingerprint": new.primary_fingerprint},
        )
        if self.heartbeater is not None:
            self.heartbeater.refresh_key_fields()
        self._reread_active()

    def _on_keyring_error(self, exc: KeyringError) -> None:
        self.applier.reject(exc)

    def _on_keyring_recovered(self) -> None:
        # The same keyring is readable again: no new key, so no re-read of ACTIVE; only the
        # KeyringInvalid this pod still reports is over.
        self.applier.clear_error(KeyringError.reason)

    def _poll_registrations(self, *, due: bool = False) -> None:
        """Check the registrations file: at start (``due``), then from the main loop once per
        keyring poll period."""
        now = time.monotonic()
        if not due and now < self._registrations_due:
            return
        self._registrations_due = now + self.library.keyring_poll_seconds
        try:
            self._check_registrations()
        except Exception:  # nothing here may stop the agent; the next poll tries again
            log.exception("checking the registrations file failed")

    def _check_registrations(self) -> None:
        """Hold this component's registration as the operator publishes it in the keyring
        Secret (``registrations.json``): a metadata record and ACTIVE of an earlier
        registration put back in etcd are then refused even when this agent started after
        they were. Only ever raises what the reader holds. No file: nothing held. A broken
        file is reported (``last_error``, alert) and the agent runs on with what it holds."""
        configs = self.configs
        if configs is None:
            return
        # The store's own (None without a keyring path): every read checks it too; here it is
        # reported, and held before the first read.
        source = self.registrations = configs.registrations
        if source is None:
            return
        source.refresh()
        self._report_registrations_error(source.last_error)
        component = self.settings.component
        registration = source.registration(component)
        if registration is None:
            return
        held = configs.held_registration(component)
        configs.hold_registrations({component: registration})
        if configs.held_registration(component) != held:
            log.info(
                "holding registration %d of %s, as published in %s (was: %s)",
                registration,
                component,
                source.path,
                held if held is not None else "none",
            )

    def _report_registrations_error(self, error: RegistrationsFileError | None) -> None:
        if error is None:
            if self._registrations_error is not None:
                self._registrations_error = None
                self.applier.clear_error(RegistrationsFileError.reason)
            return
        if str(error) != self._registrations_error:
            self._registrations_error = str(error)
            self.applier.reject(error)

    def _reread_active(self) -> None:
        """Read ACTIVE again: a value that failed with the old keyring may open with the new."""
        if self.configs is None:
            return
        try:
            active = Rollouts(self.configs).effective(
                self.settings.component, self.settings.instance
            )
        except DefenderConfigError as exc:
            if exc.reason != "NotFound":
                # Decode errors were alerted by client.open; an unreachable store is not a
                # misconfiguration and only shows in the heartbeat.
                self.applier.reject(exc, alerted=isinstance(exc, EnvelopeError | StoreError))
            return
        self._on_active(active)

    # --- run / stop -------------------------------------------------------------------------

    def stop(self) -> None:
        self.stop_requested.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self.stop()

        def ignored(signum: int, frame: FrameType | None) -> None:
            log.info("received %s: nothing for the agent to do", signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        # Their default action ends the process, and a component sharing the process namespace
        # may send them to every process it can (`kill -HUP -1`). A handler rather than SIG_IGN:
        # an ignored disposition would be inherited by the health check's commands.
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, ignored)

    def run(self) -> None:
        """Start, then loop until stopped. Raises KeyringError / StoreAuthError at start-up."""
        try:
            if self._status is not None:
                self._status.start()
            self._start()
            while not self.stop_requested.wait(_TICK_SECONDS):
                self._tick()
        finally:
            self._shutdown()

    def _tick(self) -> None:
        """One pass of the main loop."""
        if self.applier.pending:
            self.applier.retry()
        elif self.settings.restore_edited_file:
            self.applier.check_file()
        self._poll_registrations()
        self._clear_store_error_once_etcd_answers()

    def etcd_answers(self) -> EtcdAnswers:
        beat, watch = self.heartbeater, self._watch
        return EtcdAnswers(
            beats=beat.beats if beat is not None else 0,
            writes=beat.writes if beat is not None else 0,
            reads=getattr(watch, "answers", 0),
        )

    def _clear_store_error_once_etcd_answers(self) -> None:
        """Clear ``StoreUnavailable`` or ``StoreAuth`` once etcd answered what disproves it
        (:func:`store_error_over`) after it was reported.

        Both are reported by the config side (the watch could not be re-created, a read
        failed), and nothing there says when they are over: a watch re-created from the next
        revision, or a read that finds the config already delivered, hands nothing to the
        applier, so the error stayed in the instance record until the next config change.
        Beats and the watch's reads again are answers from etcd itself, never ones served from
        the library's cache as reads are during an outage. Errors of any other reason stay.
        """
        applier = self.applier
        for reason in (StoreUnavailableError.reason, StoreAuthError.reason):
            # Decided under the applier's lock: an error reported meanwhile sets its own mark
            # (the sink runs under that lock), and is not cleared by an earlier answer.
            if applier.clear_error(reason, when=partial(self._store_error_over, reason)):
                log.info("etcd answers again: %s cleared", reason)

    def _store_error_over(self, reason: str) -> bool:
        error = self.applier.last_error
        cause = error.cause if error is not None else None
        return store_error_over(reason, cause, self._store_error_at, self.etcd_answers())

    def _shutdown(self) -> None:
        if self._watch is not None:
            try:
                self._watch.cancel()
            except Exception:
                log.exception("cancelling the watch failed")
        if self.keyring is not None:
            self.keyring.stop()
        if self.heartbeater is not None:
            # Marks STOPPED and revokes the lease: the instance key disappears at once.
            self.heartbeater.stop()
        if self.client is not None:
            self.client.close()
        if self._status is not None:
            self._status.stop()
        log.info("agent stopped")
