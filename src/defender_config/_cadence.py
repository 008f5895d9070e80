"""The heartbeat cadence of a component: one record, `control/<component>/heartbeat`.

The operator publishes `spec.heartbeat` there; every Heartbeater of the component follows it, so
the resource is the single source of the cadence and an instance's own setting is only the
fallback before the first read (or while the record is absent or unreadable).

`write_cadence` encodes and writes the record; `decode_cadence` is the only code that turns its
stored bytes into a cadence, used by `read_cadence` and by the heartbeater (which fetches the
record in the same transaction as its heartbeat put, so following it costs no extra request).
Like every control record it carries a MAC made with the shared keyring (`_records`): a reader
holding the keyring ignores a record nobody with the key wrote, so write access to etcd alone
cannot stretch a component's cadence (and with it the time a hung instance goes unnoticed).
"""

from __future__ import annotations

import logging
import math
import threading
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._bounds import MAX_ALLOWED_MISSES, MAX_HEARTBEAT_INTERVAL_SECONDS, MIN_ALLOWED_MISSES
from ._client import DefenderClient
from ._envelope import expect_plaintext
from ._errors import DefenderConfigError, RecordAuthError
from ._json_parse import parse_json
from ._records import verify_record, without_auth
from ._store_types import PutOp, StoredValue

__all__ = [
    "MIN_ALLOWED_MISSES",
    "Cadence",
    "cadence_put",
    "decode_cadence",
    "lease_ttl",
    "read_cadence",
    "write_cadence",
]

log = logging.getLogger("defender_config.cadence")


# The revision of each unreadable record already warned about: every instance reads the record
# at every beat, and one bad write must not fill the log.
_warned: dict[str, int] = {}
_warned_lock = threading.Lock()


def lease_ttl(interval_seconds: float, allowed_misses: int) -> int:
    """The lease TTL of an instance beating every `interval_seconds` that may miss
    `allowed_misses` beats: whole seconds, at least 2 (etcd's lease granularity)."""
    return max(2, math.ceil(interval_seconds * allowed_misses))


class Cadence(BaseModel):
    """How often the instances of a component beat and how many beats they may miss."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    # The DefenderComponent API's bounds (spec.heartbeat): a record outside them was not
    # written by the operator and is ignored like a garbled one.
    interval_seconds: float = Field(gt=0, le=MAX_HEARTBEAT_INTERVAL_SECONDS)
    allowed_misses: int = Field(ge=MIN_ALLOWED_MISSES, le=MAX_ALLOWED_MISSES)
    # When the operator wrote this cadence: an instance that beat later and still runs
    # another one does not follow it.
    since: datetime = Field(default_factory=lambda: datetime.now(UTC))
    by: str | None = None

    @property
    def lease_ttl_seconds(self) -> int:
        return lease_ttl(self.interval_seconds, self.allowed_misses)

    def same_rhythm(self, other: Cadence | None) -> bool:
        """Same interval and misses (who wrote it and when do not matter)."""
        return other is not None and (self.interval_seconds, self.allowed_misses) == (
            other.interval_seconds,
            other.allowed_misses,
        )


def write_cadence(client: DefenderClient, component: str, cadence: Cadence) -> None:
    """Publish `cadence` for `component` (plaintext JSON, signed when the client holds a
    keyring: it holds no secret but steers every instance)."""
    client.store.put(*_record(client, component, cadence))


def cadence_put(client: DefenderClient, component: str, cadence: Cadence) -> PutOp:
    """`write_cadence` as a put for a transaction of the caller's (a new component's seed)."""
    return PutOp(*_record(client, component, cadence))


def _record(client: DefenderClient, component: str, cadence: Cadence) -> tuple[str, bytes]:
    key = client.layout.cadence(component)
    return key, client.encode_record(key, cadence.model_dump(mode="json"))


def read_cadence(client: DefenderClient, component: str) -> Cadence | None:
    """The published cadence of `component`; None when there is none or it cannot be read
    (garbled, sealed, out of bounds), which is logged: the caller then uses its own setting.
    Store errors (etcd unreachable) are raised: they say nothing about the record."""
    key = client.layout.cadence(component)
    return decode_cadence(client, key, client.store.get(key))


def decode_cadence(client: DefenderClient, key: str, stored: StoredValue | None) -> Cadence | None:
    """The cadence in `stored` (the record at `key` as read); None when absent or unreadable,
    with one warning per bad write, and one alert per bad write when its MAC fails (a reader
    with the keyring never follows a record nobody with the key wrote)."""
    if stored is None:
        return None
    try:
        # Not client.decode_record: that alerts on every read, and this is read every beat.
        data = parse_json(expect_plaintext(stored.value, key))
        keyring = client.envelope.keyring()
        data = verify_record(keyring, key, data) if keyring is not None else without_auth(data)
        return Cadence.model_validate(data)
    except (DefenderConfigError, ValidationError, ValueError) as exc:
        with _warned_lock:
            first = _warned.get(key) != stored.mod_revision
            _warned[key] = stored.mod_revision
        if first and isinstance(exc, RecordAuthError):
            client.report(exc, path=key)
        if first:
            log.warning(
                "ignoring the unreadable heartbeat cadence %s (using the local setting): %s",
                key,
                " ".join(str(exc).split())[:300],
                extra={"reason": "CadenceUnreadable"},
            )
        return None
