"""Alerts: structured records of misconfiguration (wrong key, wrong codec, size anomaly, decode
failure, rejected config) fanned out to sinks — etcd, logs, a callable (the rag component).

`Alerter.emit` never raises: an alert that cannot be delivered is logged, and the caller's
own error handling goes on. Every EnvelopeError the library sees while reading feeds it.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from ._errors import DefenderConfigError, StoreError

if TYPE_CHECKING:
    from ._layout import Layout
    from ._store import EtcdStore
    from ._store_types import StoredValue

__all__ = [
    "Alert",
    "AlertSink",
    "Alerter",
    "CallableSink",
    "EtcdAlertSink",
    "LoggingSink",
    "decode_alerts",
]

log = logging.getLogger("defender_config.alerts")

_DETAIL_LIMIT = 2000


def _now() -> datetime:
    return datetime.now(UTC)


class Alert(BaseModel):
    """One alert. `kind` is an error's stable `.reason` (UnknownKey, CodecMismatch, ...) or an
    event kind; `detail` is the error message (never key material: errors hold none)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = Field(min_length=1, max_length=64)
    component: str
    instance: str | None = None
    detail: str = Field(max_length=_DETAIL_LIMIT)
    time: datetime = Field(default_factory=_now)
    path: str | None = None
    """The etcd key involved, if any."""

    @classmethod
    def from_error(
        cls,
        error: DefenderConfigError,
        component: str,
        *,
        instance: str | None = None,
        path: str | None = None,
    ) -> Alert:
        where = path if path is not None else getattr(error, "path", None)
        return cls(
            kind=error.reason,
            component=component,
            instance=instance,
            detail=error.record_message[:_DETAIL_LIMIT],
            path=where,
        )


class _JsonReader(Protocol):
    def decode_json(self, path: str, blob: bytes) -> Any: ...


def decode_alerts(
    client: _JsonReader, stored: Iterable[StoredValue], since: datetime
) -> tuple[Alert, ...]:
    """The alerts among `stored` (values under a component's alerts prefix) raised at or after
    `since`, oldest key first. One that does not decode is skipped with a warning: a garbled
    alert must not hide the others."""
    out = []
    for sv in stored:
        try:
            alert = Alert.model_validate(client.decode_json(sv.key, sv.value))
        except (DefenderConfigError, ValueError) as exc:
            log.warning("skipping unreadable alert %s: %s", sv.key, exc)
            continue
        if alert.time >= since:
            out.append(alert)
    return tuple(out)


@runtime_checkable
class AlertSink(Protocol):
    """Where alerts go. `emit` may raise; the Alerter catches and logs it."""

    def emit(self, alert: Alert) -> None: ...


class LoggingSink:
    """Structured log line per alert (WARNING), on logger `defender_config.alerts`."""

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.WARNING) -> None:
        self._log = logger or log
        self._level = level

    def emit(self, alert: Alert) -> None:
        self._log.log(
            self._level,
            "alert %s component=%s instance=%s: %s",
            alert.kind,
            alert.component,
            alert.instance or "-",
            alert.detail,
            extra={"alert": alert.model_dump(mode="json")},
        )


class CallableSink:
    """Hands each alert to a function: the rag component's intake, a test's list.append."""

    def __init__(self, fn: Callable[[Alert], Any]) -> None:
        self._fn = fn

    def emit(self, alert: Alert) -> None:
        self._fn(alert)


class EtcdAlertSink:
    """Writes alerts as JSON under `<prefix>/alerts/<component>/<time-ns>-<rand>`, bound to a
    lease of `ttl_seconds` so they expire instead of piling up. One lease is shared by the
    alerts of half a TTL, so a burst costs one put per alert, not one grant."""

    def __init__(self, store: EtcdStore, layout: Layout, ttl_seconds: int = 7 * 24 * 3600) -> None:
        if ttl_seconds < 10:
            raise ValueError("alert TTL must be at least 10 seconds")
        self._store = store
        self._layout = layout
        self._ttl = ttl_seconds
        self._lock = threading.Lock()
        self._lease_id = 0
        self._lease_renew_at = 0.0

    def _lease(self) -> int:
        with self._lock:
            now = time.monotonic()
            if self._lease_id == 0 or now >= self._lease_renew_at:
                self._lease_id = self._store.grant_lease(self._ttl).id
                self._lease_renew_at = now + self._ttl / 2
            return self._lease_id

    def emit(self, alert: Alert) -> None:
        key = self._layout.alert(alert.component, time.time_ns(), secrets.token_hex(4))
        body = json.dumps(alert.model_dump(mode="json"), sort_keys=True).encode()
        try:
            self._store.put(key, body, lease=self._lease())
        except StoreError as exc:
            if exc.reason != "NotFound":
                raise
            # The shared lease was revoked or expired early: take a new one once.
            with self._lock:
                self._lease_id = 0
            self._store.put(key, body, lease=self._lease())


class Alerter:
    """Fans alerts out to every sink. Thread-safe; never raises into the caller."""

    def __init__(self, sinks: Iterable[AlertSink] = ()) -> None:
        self._sinks: list[AlertSink] = list(sinks)
        self._lock = threading.Lock()
        self.delivered = 0
        self.failed = 0

    def add_sink(self, sink: AlertSink) -> None:
        with self._lock:
            self._sinks.append(sink)

    @property
    def sinks(self) -> tuple[AlertSink, ...]:
        with self._lock:
            return tuple(self._sinks)

    def emit(self, alert: Alert) -> None:
        for sink in self.sinks:
            try:
                sink.emit(alert)
            except Exception as exc:
                # An alert path must never turn into an outage of the caller.
                with self._lock:
                    self.failed += 1
                log.error(
                    "alert sink %s failed for %s/%s: %s",
                    type(sink).__name__,
                    alert.kind,
                    alert.component,
                    exc,
                )
            else:
                with self._lock:
                    self.delivered += 1

    def error(
        self,
        error: DefenderConfigError,
        component: str,
        *,
        instance: str | None = None,
        path: str | None = None,
    ) -> None:
        """Alert about a library error (its `.reason` becomes the kind)."""
        try:
            alert = Alert.from_error(error, component, instance=instance, path=path)
        except Exception as exc:  # e.g. a component name that fails validation
            log.error("cannot build alert for %s: %s", error.reason, exc)
            return
        self.emit(alert)

    def event(self, kind: str, component: str, detail: str, *, instance: str | None = None) -> None:
        """Alert about something that is not an exception (drift, rollback, freeze)."""
        try:
            alert = Alert(kind=kind, component=component, instance=instance, detail=detail)
        except Exception as exc:
            log.error("cannot build alert %s: %s", kind, exc)
            return
        self.emit(alert)
