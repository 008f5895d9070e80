"""Helpers shared by the reliability suites (imported by name: pytest puts this folder on sys.path).

The hygiene ledger is process-wide on purpose: every suite registers the key material it
creates and the etcd prefixes it writes, every log record of the session is kept, and
`test_zz_secrets_hygiene.py` (collected last) searches all of it for the keys.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from defender_config import (
    Alert,
    CallableSink,
    DefenderClient,
    EtcdSettings,
    Keyring,
    LibrarySettings,
    LoggingSink,
)
from defender_config._envelope import KeyringProvider
from defender_devcluster import EtcdCluster, ProcessStartError, etcd_client_settings

# --- clients on the harness cluster --------------------------------------------------------------


def etcd_settings(cluster: EtcdCluster, **overrides: Any) -> EtcdSettings:
    return EtcdSettings.model_validate({**etcd_client_settings(cluster.endpoints), **overrides})


def make_client(
    cluster: EtcdCluster,
    prefix: str,
    keyring: Keyring | KeyringProvider,
    alerts: list[Alert] | None = None,
    *,
    etcd: dict[str, Any] | None = None,
    instance: str | None = None,
    **settings: Any,
) -> DefenderClient:
    """A DefenderClient on the harness cluster under `prefix`, alerts collected into `alerts`
    (and logged by the library's LoggingSink, so alert text reaches the hygiene ledger)."""
    lib = LibrarySettings(
        etcd=etcd_settings(cluster, **(etcd or {})),
        prefix=prefix.rstrip("/"),
        **settings,
    )
    sinks: list[Any] = [LoggingSink()]
    if alerts is not None:
        sinks.append(CallableSink(alerts.append))
    client = DefenderClient(
        lib, keyring, registry=CollectorRegistry(), alert_sinks=sinks, instance=instance
    )
    HYGIENE.prefixes.add(lib.prefix + "/")
    return client


def restart_member(cluster: EtcdCluster, i: int) -> None:
    """`cluster.restart_member(i)`, tried twice: the harness forks from this multi-threaded
    (gRPC) process and the forked child has been seen to die with SIGSEGV before exec (exit
    -11, reported to the harness owner). A second failure is raised."""
    try:
        cluster.restart_member(i)
    except ProcessStartError as exc:
        if "exited with code -11" not in str(exc):
            raise
        logging.getLogger(__name__).warning("member %d died before exec (SIGSEGV); retrying", i)
        cluster.restart_member(i)


def restore_members(cluster: EtcdCluster) -> None:
    """Restart every member a test killed or stopped, then wait for a leader."""
    for i, pid in enumerate(cluster.member_pids):
        if pid is None:
            restart_member(cluster, i)
    cluster.wait_for_leader()


def member_index(cluster: EtcdCluster, endpoint: str) -> int:
    return cluster.endpoints.index(endpoint)


# --- the secrets-hygiene ledger -----------------------------------------------------------------


def encodings(material: bytes) -> dict[str, bytes]:
    """Every form a key could leak in: raw, hex (both cases), base64 (standard, url-safe,
    padded or not)."""
    b64 = base64.b64encode(material)
    url = base64.urlsafe_b64encode(material)
    return {
        "raw": material,
        "hex": material.hex().encode(),
        "HEX": material.hex().upper().encode(),
        "base64": b64,
        "base64-unpadded": b64.rstrip(b"="),
        "base64url": url,
        "base64url-unpadded": url.rstrip(b"="),
    }


def search(haystack: bytes, materials: Iterable[bytes]) -> list[str]:
    """Which encodings of which key (by index) occur in `haystack`."""
    hits = []
    for i, material in enumerate(materials):
        for name, needle in encodings(material).items():
            if needle in haystack:
                hits.append(f"key #{i} as {name}")
    return hits


class _LedgerHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self._sink = sink
        self._fmt = logging.Formatter("%(levelname)s %(name)s %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self._fmt.format(record)
            # Structured fields passed with `extra=` are part of what a JSON log would show.
            extras = {
                k: v
                for k, v in record.__dict__.items()
                if k not in _STANDARD_RECORD_FIELDS and not k.startswith("_")
            }
            if extras:
                text += " " + repr(extras)
        except Exception as exc:  # a broken log call is itself worth seeing, not hiding
            text = f"<unformattable record from {record.name}: {exc!r}>"
        self._sink.append(text)


_STANDARD_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


@dataclass
class HygieneLedger:
    """Everything the suites produced that could hold a key, and every key they made."""

    # repr=False: an assertion message showing the ledger must not print the keys.
    keys: list[bytes] = field(default_factory=list, repr=False)
    prefixes: set[str] = field(default_factory=set)
    log_lines: list[str] = field(default_factory=list, repr=False)
    texts: dict[str, bytes] = field(default_factory=dict, repr=False)
    log_files: set[Path] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _handler: _LedgerHandler | None = None
    _old_level: int = logging.WARNING

    def register(self, keyring: Keyring) -> Keyring:
        with self.lock:
            for key in keyring:
                if key.material not in self.keys:
                    self.keys.append(key.material)
        return keyring

    def add_text(self, label: str, data: bytes | str) -> None:
        with self.lock:
            self.texts[label] = data.encode() if isinstance(data, str) else data

    def install(self) -> None:
        if self._handler is not None:
            return
        root = logging.getLogger()
        self._handler = _LedgerHandler(self.log_lines)
        self._old_level = root.level
        # DEBUG: a key leaking at debug level is a leak too.
        root.setLevel(logging.DEBUG)
        root.addHandler(self._handler)

    def uninstall(self) -> None:
        if self._handler is None:
            return
        root = logging.getLogger()
        root.removeHandler(self._handler)
        root.setLevel(self._old_level)
        self._handler = None


HYGIENE = HygieneLedger()


def new_keyring() -> Keyring:
    """A fresh keyring whose material the hygiene check will search for."""
    return HYGIENE.register(Keyring.generate())


def write_keyring_file(path: Path, keyring: Keyring) -> None:
    """Replace the mounted-Secret file atomically (as kubelet's symlink swap does)."""
    HYGIENE.register(keyring)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(keyring.to_json())
    os.replace(tmp, path)
