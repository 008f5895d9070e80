"""What the agent does with one ACTIVE config, free of etcd: validate, write, reload, report.

The etcd side (`_agent.py`) feeds configs and decode errors in; this part decides what reaches
the shared file and what is reported. Rules:

* only a config that passed validation is written; anything else leaves the last good file;
* the file is at most the library's cap on a decoded value (``max_file_bytes``): the shared
  volume is sized for two of them (see the chart's ``agent.sharedSizeLimit``), and indentation
  alone can make a file many times its decoded value, so a config whose indented file would be
  over the cap is written compact, and one still over it is refused (``ConfigTooLarge``);
* the file is replaced atomically and the component is told to reload only when the bytes change;
* every failure becomes ``last_error`` in the heartbeat and one alert (repeats of the same
  failure are not re-alerted, so a broken value does not flood the alert prefix);
* a write that failed (the shared volume full, read-only or not mounted yet) and a reload that
  failed (the component had not started yet, or was restarting) are retried by
  :meth:`ConfigApplier.retry` until they succeed.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from defender_config import (
    ComponentType,
    ConfigValidationError,
    DefenderConfigError,
    EnvelopeOptions,
    FieldError,
    config_digest,
    validate_config,
)

from ._errors import (
    AgentError,
    ConfigTooLargeError,
    FileDriftedError,
    ProcessNotFoundError,
    ReloadError,
    WriteError,
)
from ._reload import Reloader
from ._writer import OutputDir, file_holds, file_signature, write_atomic

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "DRIFT_ALERT_WINDOW_SECONDS",
    "ConfigApplier",
    "DriftAlerts",
    "LastError",
    "StatusSink",
    "drift_quiet",
    "next_drift_alert",
    "render_config",
]

log = logging.getLogger("defender_agent")

#: The library's default cap on a decoded value, which the chart's shared volume is sized for.
DEFAULT_MAX_FILE_BYTES = EnvelopeOptions().max_decompressed_bytes

#: At most one FileDrifted alert per this many seconds: a component that keeps rewriting its own
#: file is put back every second, and an alert record each time would flood the alert prefix.
DRIFT_ALERT_WINDOW_SECONDS = 300.0


@dataclass(frozen=True)
class DriftAlerts:
    """What the agent remembers of its FileDrifted alerts: when it wrote the last one, and how
    many drifts it has put back since without one."""

    alerted_at: float | None = None
    unalerted: int = 0


def next_drift_alert(
    state: DriftAlerts, now: float, *, drifted: bool, window: float = DRIFT_ALERT_WINDOW_SECONDS
) -> tuple[DriftAlerts, int]:
    """The state after one check of the file (``drifted``: it was found changed and put back)
    and how many drifts the alert to write now covers (0: no alert now).

    The first drift alerts at once. Drifts within ``window`` seconds of that alert are only
    counted; the first check once the window is over writes one alert for all of them (and the
    drift it found, if any), and a new window starts. A count of 0 when the window is over
    writes nothing and leaves the window over, so the next drift alerts at once again.
    """
    count = state.unalerted + (1 if drifted else 0)
    over = state.alerted_at is None or now - state.alerted_at >= window
    if not over or count == 0:
        return DriftAlerts(state.alerted_at, count), 0
    return DriftAlerts(now, 0), count


def drift_held(state: DriftAlerts, now: float, window: float = DRIFT_ALERT_WINDOW_SECONDS) -> bool:
    """Whether a drift found ``now`` falls in a window whose alert already went out: it is then
    only counted (:func:`next_drift_alert`), and its put-back logged at debug."""
    return state.alerted_at is not None and now - state.alerted_at < window


def drift_quiet(
    drifted_at: float | None, now: float, window: float = DRIFT_ALERT_WINDOW_SECONDS
) -> bool:
    """Whether ``FileDrifted`` may leave the heartbeat's ``last_error``: no drift was put back
    in the last ``window`` seconds (``drifted_at``: when the last one was, None: never).

    Cleared at the first intact check, a file rewritten every other second cost two record
    writes per drift (set, cleared), each an etcd put, for the whole time it went on. Held for
    the window the alerts are limited to, a run of drifts is one write when it starts and one
    when it has been over for a window: at most two per window, whatever the rate of edits."""
    return drifted_at is None or now - drifted_at >= window


@dataclass(frozen=True)
class LastError:
    """The heartbeat's ``last_error``: a stable reason word and a human detail; ``cause``, the
    exception it was made of (not compared, never shown), for a caller that decides from it
    when the error is over."""

    reason: str
    detail: str
    cause: BaseException | None = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "detail": self.detail}


class StatusSink(Protocol):
    """Where the applier reports: the heartbeat fields and the alert records."""

    def update_heartbeat(self, **fields: Any) -> None: ...

    def alert(self, kind: str, detail: str) -> None: ...


def render_config(config: Mapping[str, Any], max_bytes: int | None = None) -> bytes:
    """The bytes written for the component: indented JSON, keys in the order they were stored;
    compact JSON when the indented form is over ``max_bytes``. :class:`ConfigTooLargeError`
    when even that is over it."""
    # Chunk by chunk into one buffer: json.dumps with an indent joins a list of every chunk
    # (a str per number, key and separator), which took ~35x the config's size at its peak
    # for small values, half the agent's whole peak (docs/agent.md, Memory).
    buf = io.BytesIO()
    encoder = json.JSONEncoder(indent=2, ensure_ascii=False, allow_nan=False)
    for chunk in encoder.iterencode(config):
        buf.write(chunk.encode())
        if max_bytes is not None and buf.tell() > max_bytes:
            break  # too large indented: no need to render the rest
    else:
        buf.write(b"\n")
        if max_bytes is None or buf.tell() <= max_bytes:
            return buf.getvalue()
    del buf
    assert max_bytes is not None  # only a limit stops the indented render
    compact = json.dumps(config, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    data = (compact + "\n").encode()
    if len(data) > max_bytes:
        raise ConfigTooLargeError(len(data), max_bytes)
    return data


def error_of(exc: BaseException) -> LastError:
    """Reason and detail of any failure; unexpected exceptions get reason ``InternalError``."""
    reason = getattr(exc, "reason", None)
    if not isinstance(reason, str):
        reason = "InternalError"
    # The detail goes to the log, the heartbeat and the alert: never a config's values.
    detail = exc.record_message if isinstance(exc, DefenderConfigError) else str(exc)
    return LastError(reason, detail or type(exc).__name__, exc)


class ConfigApplier:
    """Validates and delivers configs to the component. Thread-safe: the watch thread, the
    keyring poller and the main loop all call it."""

    def __init__(
        self,
        *,
        component: str,
        component_type: str | None,
        output_path: Path,
        reloader: Reloader,
        sink: StatusSink,
        file_mode: int = 0o640,
        json_schema: Mapping[str, Any] | None = None,
        process_grace_seconds: float = 0.0,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        mount_points: Collection[str] | None = None,
        drift_alert_window: float = DRIFT_ALERT_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._component = component
        self._max_file_bytes = max_file_bytes
        self._type = component_type
        self._grace = process_grace_seconds
        self._pending_since: float | None = None
        self._path = output_path
        # Resolved once: a link that appears later in the output path's directories is refused,
        # not followed (`_writer.OutputDir`). `mount_points`: for tests, default the process's.
        self._dir = OutputDir.resolve(output_path, mount_points)
        log.info(
            "the config file is written in %s, reached from / without following a link",
            self._dir.path,
        )
        self._mode = file_mode
        self._schema = json_schema
        self._reloader = reloader
        self._sink = sink
        self._lock = threading.RLock()
        self.config_version: int | None = None
        self.config_digest: str | None = None
        self.last_error: LastError | None = None
        self.reload_pending = False
        self._alerted: LastError | None = None
        self.applied = 0
        # (bytes, digest, version) of a valid config whose write failed; retried by retry().
        self._unwritten: tuple[bytes, str, int | None] | None = None
        # The bytes last delivered to the file and its lstat signature then: check_file()
        # reads the file again only when the signature changed.
        self._delivered: bytes | None = None
        self._seen: tuple[int, ...] | None = None
        self._drift_window = drift_alert_window
        self._clock = clock
        self._drift_alerts = DriftAlerts()
        # The drift last put back and reported, for a summary alert written without a new one.
        self._last_drift: LastError | None = None
        # When a drift was last put back: FileDrifted stays the record's last_error until a
        # whole window has passed without one (drift_quiet).
        self._drifted_at: float | None = None

    # --- the two ways in --------------------------------------------------------------------

    def apply(
        self,
        config: Any,
        version: int | None = None,
        *,
        json_schema: Mapping[str, Any] | None = None,
        component_type: str | None = None,
    ) -> bool:
        """Deliver ``config`` (decoded ACTIVE) to the component. True if it is now in the file;
        never raises: failures are reported. ``json_schema`` and ``component_type`` (as stored in
        the component's metadata) are used where the agent was not given its own."""
        with self._lock:
            try:
                checked = self._validate(
                    config,
                    self._schema if self._schema is not None else json_schema,
                    self._type or component_type or ComponentType.CUSTOM.value,
                )
                data = render_config(checked, self._max_file_bytes)
                digest = config_digest(checked)
            except (ConfigValidationError, ConfigTooLargeError) as exc:
                self._fail(exc, version)
                return False
            except ValueError as exc:
                # NaN/Infinity slip through Python's JSON decoder but are not JSON.
                bad = ConfigValidationError(
                    self._component, [FieldError("", f"not representable as JSON: {exc}")]
                )
                self._fail(bad, version)
                return False
            return self._deliver(data, digest, version)

    def _deliver(
        self, data: bytes, digest: str, version: int | None, *, again: bool = False
    ) -> bool:
        # Called with the lock held. `again`: a retry, which does not report the same failure
        # every tick.
        try:
            changed = not file_holds(self._path, data, directory=self._dir)
            if changed:
                write_atomic(self._path, data, self._mode, directory=self._dir)
        except WriteError as exc:
            # Kept and written again every tick: a shared volume briefly full, read-only or not
            # yet mounted must not leave the component on the old config until the next commit.
            self._unwritten = (data, digest, version)
            if changed and file_holds(self._path, data, directory=self._dir):
                # Only the directory flush failed: the rename happened and the component may
                # read the new file already. The retry finds the file holding the config and
                # would write nothing, so it must still send the reload this write owes.
                self.reload_pending = True
            if not (again and error_of(exc) == self.last_error):
                self._fail(exc, version)
            return False
        self._unwritten = None
        self._delivered = data
        self._seen = file_signature(self._path, directory=self._dir)
        self.config_version = version
        self.config_digest = digest
        self.applied += 1
        self._sink.update_heartbeat(config_version=version, config_digest=digest)
        log.info(
            "config version %s %s %s",
            version,
            "written to" if changed else "already in",
            self._path,
            extra={"config_version": version, "config_digest": digest[:16]},
        )
        if changed or self.reload_pending:
            self.reload_pending = True
            self._reload()
        else:
            self._clear_error()
        return True

    def reject(
        self, exc: BaseException, version: int | None = None, *, alerted: bool = False
    ) -> None:
        """ACTIVE could not be decoded or read: keep the last good file and report why.
        ``alerted``: the library has already written the alert for this error."""
        with self._lock:
            self._fail(exc, version, alerted=alerted)

    def clear_error(self, reason: str, *, when: Callable[[], bool] | None = None) -> bool:
        """The cause of errors with ``reason`` is gone: clear ``last_error`` if it is one (and
        ``when``, asked under the lock that reporting an error holds, agrees). True if cleared."""
        with self._lock:
            if self.last_error is None or self.last_error.reason != reason:
                return False
            if when is not None and not when():
                return False
            self._clear_error()
            return True

    @property
    def pending(self) -> bool:
        """A config still to write (the write failed) or a reload still to send."""
        return self._unwritten is not None or self.reload_pending

    def retry(self) -> bool:
        """Retry what failed earlier: writing the last good config, else telling the component
        to reload. True when nothing is pending any more."""
        with self._lock:
            if self._unwritten is not None:
                self._deliver(*self._unwritten, again=True)
            elif self.reload_pending:
                self._reload()
            return not self.pending

    def check_file(self) -> bool:
        """Put the delivered config back when the file no longer holds it. True if it did.

        The component's container can write the shared volume, and a person may edit the file
        by hand: the heartbeat would go on reporting the delivered digest while the component
        runs (after its next reload or restart) whatever the file now holds, until the next
        config, keyring change or agent restart. Cheap in the steady state: a walk of the
        directories and one ``lstat``; the file is read only when that changed. Reports
        ``FileDrifted``: a warning per put-back, at most one alert per ``drift_alert_window``
        (:func:`next_drift_alert`), and the heartbeat's ``last_error`` until a check finds the
        file intact once a window has passed without a drift (:func:`drift_quiet`); a
        write-back that fails is ``WriteFailed``, retried like any other write.

        Every put-back tells the component to reload, even when the bytes put back are what it
        was last told to load: the agent cannot know it did not read the edit meanwhile (it
        restarted, someone sent it the signal by hand, it watches its file), and a reload left
        out then would leave it running the edit while the record shows the delivered digest.
        What bounds the reloads is the check: at most one per check, whatever the edit rate."""
        with self._lock:
            restored, drift = self._check_file()
            self._alert_drift(drift)
            return restored

    def _check_file(self) -> tuple[bool, LastError | None]:
        """check_file() but the alert, with the lock held: (put back, the drift to alert if it
        was put back and the component told)."""
        data = self._delivered
        if data is None or self._unwritten is not None:
            return False, None  # nothing delivered yet, or retry() is writing it already
        seen = file_signature(self._path, directory=self._dir)
        if seen is not None and seen == self._seen:
            if (
                self.last_error is not None
                and self.last_error.reason == FileDriftedError.reason
                and drift_quiet(self._drifted_at, self._clock(), self._drift_window)
            ):
                self._clear_error()
            return False, None
        if file_holds(self._path, data, directory=self._dir):
            self._seen = seen  # touched, or written again with the same bytes
            return False, None
        assert self.config_digest is not None  # set with _delivered
        self._drifted_at = self._clock()
        drifted = FileDriftedError(str(self._path), self.config_version, self.config_digest)
        # Inside a window whose alert went out, a put-back is counted into the next alert and
        # logged at debug: a file rewritten in a loop made three lines a second (this warning,
        # the reload, the held-back alert). The window's summary is logged with its alert.
        held = drift_held(self._drift_alerts, self._drifted_at, self._drift_window)
        level = logging.DEBUG if held else logging.WARNING
        log.log(
            level,
            "%s: %s",
            drifted.reason,
            drifted,
            extra={"reason": drifted.reason, "config_version": self.config_version},
        )
        try:
            write_atomic(self._path, data, self._mode, directory=self._dir)
        except WriteError as exc:
            self._unwritten = (data, self.config_digest, self.config_version)
            if file_holds(self._path, data, directory=self._dir):
                self.reload_pending = True  # only the directory flush failed
            self._fail(exc, self.config_version)
            return True, None
        self._seen = file_signature(self._path, directory=self._dir)
        self.reload_pending = True
        # An error already reported (the newest commit refused, the keyring unreadable) is
        # not over because the file was put back: it stays the heartbeat's last_error, and
        # the drift is the warning and an alert only.
        standing = self.last_error
        self._reload(clear=False, quiet=held)
        if self.reload_pending:
            return True, None  # the reload's failure is what is reported
        drift = error_of(drifted)
        if standing is None or (standing.reason == drift.reason and standing != drift):
            # Shown until a check finds the file intact once the drift window is over (see
            # drift_quiet); the alert is check_file()'s. Reported again while the record already
            # says so, it would cost an etcd request per drift (every update wakes the
            # heartbeater), for nothing a reader would learn.
            self._report(drift, self.config_version, alerted=True)
        return True, drift

    def _alert_drift(self, drift: LastError | None) -> None:
        """The FileDrifted alert, at most one per window: the first drift at once, those after
        it counted and written as one alert at the first check once the window is over."""
        previous = self._drift_alerts
        now = self._clock()
        self._drift_alerts, count = next_drift_alert(
            previous, now, drifted=drift is not None, window=self._drift_window
        )
        if drift is not None:
            self._last_drift = drift
        last = self._last_drift
        if count == 0 or last is None:
            if drift is not None:
                log.debug(
                    "FileDrifted alert held back: %d drift(s) since the last alert, which are "
                    "at most one per %g s",
                    self._drift_alerts.unalerted,
                    self._drift_window,
                    extra={"reason": drift.reason},
                )
            return
        detail = last.detail
        if count > 1 or drift is None:
            since = (
                ""
                if previous.alerted_at is None
                else f" in the {now - previous.alerted_at:.0f} s since the last FileDrifted alert"
            )
            detail = (
                f"put back {count} times{since} (at most one alert per {self._drift_window:g} s);"
                f" the last time: {detail}"
            )
            # The put-backs counted here were logged at debug only (see _check_file).
            log.warning("%s: %s", last.reason, detail, extra={"reason": last.reason})
        self._alert(LastError(last.reason, detail), self.config_version)

    # --- internals --------------------------------------------------------------------------

    def _validate(
        self, config: Any, schema: Mapping[str, Any] | None, component_type: str
    ) -> dict[str, Any]:
        if component_type == ComponentType.CUSTOM.value and schema is None:
            # No model and no schema: the component owns the format; only insist on an object,
            # which is what the shared file must hold.
            if not isinstance(config, Mapping):
                raise ConfigValidationError(
                    self._component,
                    [FieldError("", f"config must be a JSON object, not {type(config).__name__}")],
                )
            return dict(config)
        validate_config(component_type, config, schema, component=self._component)
        # The normalized form fills defaults the component never asked for; deliver what was
        # committed, now known to be valid.
        return dict(config)

    def _reload(self, *, clear: bool = True, quiet: bool = False) -> None:
        now = time.monotonic()
        if self._pending_since is None:
            self._pending_since = now
        try:
            what = self._reloader.reload()
        except ProcessNotFoundError as exc:
            if now - self._pending_since < self._grace:
                # Usually the component container is still starting; it reads the file when it
                # starts, and the signal is retried meanwhile.
                log.warning("no process to reload yet, will retry: %s", exc.detail)
                return
            self._fail(exc, self.config_version)
            return
        except ReloadError as exc:
            self._fail(exc, self.config_version)
            return
        self.reload_pending = False
        self._pending_since = None
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "reload triggered: %s",
            what,
            extra={"config_version": self.config_version},
        )
        if clear:
            self._clear_error()

    def _clear_error(self) -> None:
        if self.last_error is not None:
            log.info("recovered from %s", self.last_error.reason)
            self.last_error = None
            self._alerted = None
            self._sink.update_heartbeat(last_error=None)

    def _fail(self, exc: BaseException, version: int | None, *, alerted: bool = False) -> None:
        error = error_of(exc)
        self.last_error = error
        known = isinstance(exc, AgentError) or hasattr(exc, "reason")
        log.error(
            "%s (keeping the last good file, version %s): %s",
            error.reason,
            self.config_version,
            error.detail,
            exc_info=None if known else exc,
            extra={"reason": error.reason, "rejected_version": version},
        )
        self._report(error, version, alerted=alerted)

    def _report(self, error: LastError, version: int | None, *, alerted: bool = False) -> None:
        """``error`` becomes ``last_error`` in the heartbeat and, once, an alert."""
        self.last_error = error
        self._sink.update_heartbeat(last_error=error.as_dict())
        if error != self._alerted:
            self._alerted = error
            if not alerted:
                self._alert(error, version)

    def _alert(self, error: LastError, version: int | None) -> None:
        detail = error.detail if version is None else f"version {version}: {error.detail}"
        try:
            self._sink.alert(error.reason, detail)
        except Exception:  # an alert that cannot be stored must not stop config delivery
            log.exception("could not record the %s alert", error.reason)
