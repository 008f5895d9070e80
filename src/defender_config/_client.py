"""DefenderClient: one EtcdStore + one Envelope + the Layout + the Alerter, shared by everything
a process does with etcd (ConfigStore, Registry, the agent, the operator)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from ._alerts import Alerter, AlertSink, EtcdAlertSink, LoggingSink
from ._envelope import Envelope, KeyringProvider, expect_plaintext, inspect, is_envelope
from ._errors import DefenderConfigError, EnvelopeError, RecordAuthError, SettingsError
from ._json_parse import parse_json
from ._keyring import Keyring, KeyringSource
from ._layout import Layout
from ._records import sign_record, verify_record, without_auth
from ._settings import EnvelopeOptions, LibrarySettings
from ._store import EtcdStore
from ._store_types import Lease, StoredValue

__all__ = ["DefenderClient", "DumpEntry", "SealedValue"]

log = logging.getLogger("defender_config.client")


@dataclass(frozen=True, slots=True)
class SealedValue:
    """An opened value and where it came from. `stale` as in StoredValue."""

    data: bytes = field(repr=False)
    stored: StoredValue

    @property
    def stale(self) -> bool:
        return self.stored.stale


@dataclass(frozen=True, slots=True)
class DumpEntry:
    """One key of a debug dump. `value` is plaintext JSON/text as stored, the opened value when
    decrypting was asked for, or None for a sealed value left sealed (`header` describes it)."""

    key: str
    mod_revision: int
    version: int
    lease_id: int
    size: int
    sealed: bool
    header: dict[str, Any] | None
    value: Any = field(repr=False)
    """Not in the repr: opened, it is a decrypted config."""
    error: str | None = None


class DefenderClient:
    """The library's entry point: `DefenderClient(load_settings(path))`.

    `keyring_source` is a KeyringSource (mounted Secret, reloaded on change), a Keyring, or
    None to load `settings.keyring_path` (required when encryption is on).
    """

    def __init__(
        self,
        settings: LibrarySettings,
        keyring_source: KeyringProvider | Keyring | None = None,
        *,
        store: EtcdStore | None = None,
        registry: CollectorRegistry | None = None,
        alert_sinks: Iterable[AlertSink] | None = None,
        instance: str | None = None,
    ) -> None:
        self.settings = settings
        self.layout = Layout(settings.prefix)
        self.instance = instance
        if keyring_source is None and settings.keyring_path is not None:
            keyring_source = KeyringSource(
                settings.keyring_path, poll_seconds=settings.keyring_poll_seconds
            )
        if keyring_source is None and settings.envelope.encrypt:
            raise SettingsError(
                "envelope.encrypt is on but there is no keyring: set keyring_path "
                "(env DEFENDER_KEYRING_PATH) to the mounted keyring Secret, pass a keyring, or "
                "set envelope.encrypt=false"
            )
        self.envelope = Envelope(keyring_source, settings.envelope)
        self._owns_store = store is None
        self.store = store if store is not None else EtcdStore(settings.etcd, registry=registry)
        sinks: list[AlertSink] = (
            list(alert_sinks)
            if alert_sinks is not None
            else [LoggingSink(), EtcdAlertSink(self.store, self.layout)]
        )
        self.alerter = Alerter(sinks)

    # --- sealed values ----------------------------------------------------------------------

    def seal(
        self,
        path: str,
        data: bytes,
        options: EnvelopeOptions | None = None,
        *,
        registration: int | None = None,
    ) -> bytes:
        """Seal `data` for etcd key `path` (the path is the AEAD associated data) and, when
        encrypted, for the component registration `registration` (in the header)."""
        return self.envelope.seal(data, path, options, registration=registration)

    def seal_many(
        self,
        paths: Sequence[str],
        data: bytes,
        options: EnvelopeOptions | None = None,
        *,
        registration: int | None = None,
    ) -> list[bytes]:
        """`seal` of one value for each of `paths`, compressed once."""
        return self.envelope.seal_many(data, paths, options, registration=registration)

    def open(
        self,
        path: str,
        blob: bytes,
        options: EnvelopeOptions | None = None,
        *,
        component: str | None = None,
    ) -> bytes:
        """Open a sealed value read from `path`. EnvelopeErrors are alerted, then raised."""
        try:
            return self.envelope.open(blob, path, options)
        except EnvelopeError as exc:
            if exc.path is None:
                exc.path = path
            self.report(exc, path=path, component=component)
            raise

    def get_sealed(self, path: str, options: EnvelopeOptions | None = None) -> SealedValue | None:
        """Read and open `path`; None if absent. Stale (cached) when etcd is unreachable."""
        stored = self.store.get(path)
        if stored is None:
            return None
        return SealedValue(self.open(path, stored.value, options), stored)

    def put_sealed(
        self,
        path: str,
        data: bytes,
        *,
        lease: Lease | int | None = None,
        options: EnvelopeOptions | None = None,
        registration: int | None = None,
    ) -> int:
        """Seal and write `data` at `path` (for the component registration `registration`,
        when encrypted: `seal`); returns the revision."""
        return self.store.put(
            path, self.seal(path, data, options, registration=registration), lease=lease
        )

    # --- plaintext JSON records (metadata, status, heartbeats, alerts) -------------------------

    def get_json(self, path: str) -> tuple[Any, StoredValue] | None:
        """Read a plaintext JSON record; None if absent."""
        stored = self.store.get(path)
        if stored is None:
            return None
        return self.decode_json(path, stored.value), stored

    def decode_json(self, path: str, blob: bytes) -> Any:
        try:
            text = expect_plaintext(blob, path)
        except EnvelopeError as exc:
            self.report(exc, path=path)
            raise
        return parse_json(text)

    @staticmethod
    def encode_json(value: Any) -> bytes:
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()

    def put_json(self, path: str, value: Any, *, lease: Lease | int | None = None) -> int:
        return self.store.put(path, self.encode_json(value), lease=lease)

    # --- authenticated control records (metadata, freeze, ...; see _records.py) -------------

    @property
    def verifies_records(self) -> bool:
        """True when this client holds a keyring: it signs the control records it writes and
        refuses ones whose MAC does not verify. A client without a keyring writes them unsigned
        and reads them unverified (it cannot tell a forged record from a real one)."""
        return self.envelope.keyring() is not None

    def encode_record(self, path: str, record: Any) -> bytes:
        """A control record (JSON-ready mapping) for `path`, signed when a keyring is held."""
        keyring = self.envelope.keyring()
        return self.encode_json(sign_record(keyring, path, record) if keyring else dict(record))

    def decode_record(
        self, path: str, blob: bytes, *, component: str | None = None, report: bool = True
    ) -> Any:
        """The record stored at `path`, without its `auth` block. With a keyring the MAC must
        verify: a RecordAuthError is alerted (unless `report` is False: the caller reports it
        itself), then raised; the caller ignores the record."""
        keyring = self.envelope.keyring()
        try:
            data = parse_json(expect_plaintext(blob, path))
        except EnvelopeError as err:
            # A sealed value where a record belongs: junk to a verifying reader like any
            # other, so callers that repair or ignore an unauthenticated record do so here too.
            if keyring is None:
                if report:
                    self.report(err, path=path, component=component)
                raise
            exc = RecordAuthError(path, "it is a sealed value, not a plaintext record")
            if report:
                self.report(exc, path=path, component=component)
            raise exc from None
        except (ValueError, UnicodeDecodeError):
            if keyring is None:
                raise
            exc = RecordAuthError(path, "it is not JSON")
            if report:
                self.report(exc, path=path, component=component)
            raise exc from None
        if keyring is None:
            return without_auth(data)
        try:
            return verify_record(keyring, path, data)
        except RecordAuthError as exc:
            if report:
                self.report(exc, path=path, component=component)
            raise

    def put_record(self, path: str, record: Any, *, lease: Lease | int | None = None) -> int:
        """Sign (with a keyring) and write a control record; returns the revision."""
        return self.store.put(path, self.encode_record(path, record), lease=lease)

    def get_record(self, path: str) -> tuple[Any, StoredValue] | None:
        """Read and verify a control record (see `decode_record`); None if absent."""
        stored = self.store.get(path)
        if stored is None:
            return None
        return self.decode_record(path, stored.value), stored

    # --- alerts ---------------------------------------------------------------------------------

    def report(
        self,
        error: DefenderConfigError,
        *,
        path: str | None = None,
        component: str | None = None,
    ) -> None:
        """Feed an error to the alerter, naming the component from the key when not given."""
        if component is None and path is not None:
            parsed = self.layout.parse(path)
            component = parsed.component if parsed is not None else None
        self.alerter.error(error, component or "unknown", instance=self.instance, path=path)

    # --- debug dump -----------------------------------------------------------------------------

    def dump(self, prefix: str | None = None, *, decrypt: bool = False) -> list[DumpEntry]:
        """Every key under `prefix` (default: the whole deployment) for debugging. Sealed values
        are shown by header only (key id, codecs, sizes) unless `decrypt=True`. Decoding
        problems are reported per entry, never raised, and not alerted (this is a read-only
        inspection tool)."""
        entries: list[DumpEntry] = []
        for sv in self.store.list_prefix(prefix or self.layout.prefix + "/"):
            sealed = is_envelope(sv.value)
            header: dict[str, Any] | None = None
            value: Any = None
            error: str | None = None
            if sealed:
                try:
                    h = inspect(sv.value)
                    header = {
                        "key_id": h.key_id,
                        "codec": h.codec,
                        "compressed": h.compressed,
                        "encrypted": h.encrypted,
                        "declared_length": h.declared_length,
                        "stored_length": h.stored_length,
                    }
                    if decrypt:
                        value = _as_text(self.envelope.open(sv.value, sv.key))
                except EnvelopeError as exc:
                    error = f"{exc.reason}: {exc}"
            else:
                value = _as_text(sv.value)
            entries.append(
                DumpEntry(
                    key=sv.key,
                    mod_revision=sv.mod_revision,
                    version=sv.version,
                    lease_id=sv.lease_id,
                    size=len(sv.value),
                    sealed=sealed,
                    header=header,
                    value=value,
                    error=error,
                )
            )
        return entries

    # --- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> DefenderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DefenderClient(prefix={self.layout.prefix!r}, store={self.store!r})"


def _as_text(data: bytes) -> Any:
    try:
        return parse_json(data)
    except (ValueError, UnicodeDecodeError):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return f"<{len(data)} bytes of binary>"
