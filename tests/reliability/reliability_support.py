"""Helpers shared by the reliability suites (imported by name: pytest puts this folder on sys.path).

The hygiene ledger is process-wide on purpose: every suite registers the key material it
creates and the etcd prefixes it writes, every log record of the session is kept, and
`test_zz_secrets_hygiene.py` (collected last) searches all of it for the keys.
"""

from __future__ import annotations

import logging
import os
import random
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
    DefenderConfigError,
    EtcdSettings,
    Keyring,
    LibrarySettings,
    LoggingSink,
)
from defender_config._envelope import KeyringProvider
from defender_config.store import EtcdStore
from defender_devcluster import (
    EtcdCluster,
    ProcessStartError,
    etcd_client_settings,
    wait_for,
)
from defender_devcluster import key_forms as encodings

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


# --- a write ledger (etcd chaos and partition suites) ---------------------------------------------

FIREWALL = {
    "node_id": "fw-01",
    "version": "1.0.0",
    "default_policy": "deny",
    "rules": [{"id": "ssh", "action": "allow", "proto": "tcp", "ports": [22]}],
}


@dataclass
class LedgerWriter:
    """A thread writing sealed values to fresh keys through the library, recording exactly
    which writes etcd acknowledged (the call returned) and which raised."""

    client: DefenderClient
    prefix: str
    acked: dict[str, bytes] = field(default_factory=dict)
    failed: list[tuple[str, DefenderConfigError]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> LedgerWriter:
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        rng = random.Random(1)
        i = 0
        while not self._stop.is_set():
            key = f"{self.prefix}ledger/{i:06d}"
            # Sizes vary so some values are compressed and some are below the threshold.
            size = rng.choice((16, 900, 5000))
            payload = f"{key}|".encode() + rng.randbytes(size // 2) + b"a" * (size // 2)
            try:
                self.client.put_sealed(key, payload)
            except DefenderConfigError as exc:
                self.failed.append((key, exc))
            else:
                self.acked[key] = payload
            i += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
            assert not self._thread.is_alive(), "writer thread hung"


def assert_all_acknowledged_writes_present(
    cluster: EtcdCluster, prefix: str, keyring_client: DefenderClient, acked: dict[str, bytes]
) -> None:
    """Read every acknowledged key back through a fresh client (no cache) and compare each
    member's own copy byte for byte."""
    assert acked, "the writer acknowledged nothing: the test proved nothing"
    for key, payload in acked.items():
        got = keyring_client.get_sealed(key)
        assert got is not None, f"acknowledged write {key} is lost"
        assert not got.stale
        assert got.data == payload, f"acknowledged write {key} reads back different bytes"
    reference = {sv.key: sv.value for sv in keyring_client.store.list_prefix(prefix + "ledger/")}
    for i, endpoint in enumerate(cluster.endpoints):
        # One endpoint only: this member's applied state (a linearizable read waits until the
        # member has applied up to the leader's commit index).
        with EtcdStore(
            etcd_settings(cluster, endpoints=[endpoint]), registry=CollectorRegistry()
        ) as member:
            wait_for(
                f"member {i} to catch up",
                lambda m=member: len(m.list_prefix(prefix + "ledger/")) == len(reference),
                timeout=30,
            )
            copy = {sv.key: sv.value for sv in member.list_prefix(prefix + "ledger/")}
        missing = sorted(set(acked) - set(copy))
        assert not missing, f"member {i} lacks {len(missing)} acknowledged writes: {missing[:3]}"
        assert copy == reference, f"member {i} holds other bytes than the cluster's answer"
