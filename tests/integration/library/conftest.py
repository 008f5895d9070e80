"""Fixtures for the library against the real 3-member etcd of the harness (no mocks).

Every test keeps to its own `etcd_prefix`; tests that kill or stop members restart them before
the next test (`members_restored`), so each test starts with three healthy members.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry

from defender_config import (
    Alert,
    CallableSink,
    DefenderClient,
    EtcdAlertSink,
    EtcdSettings,
    Keyring,
    LibrarySettings,
)
from defender_config.store import EtcdStore
from defender_devcluster import EtcdCluster, etcd_client_settings

pytestmark = pytest.mark.etcd


def etcd_settings(cluster: EtcdCluster, **overrides: object) -> EtcdSettings:
    return EtcdSettings.model_validate({**etcd_client_settings(cluster.endpoints), **overrides})


def library_settings(cluster: EtcdCluster, prefix: str, **overrides: object) -> LibrarySettings:
    return LibrarySettings(
        etcd=etcd_settings(cluster),
        prefix=prefix.rstrip("/"),
        **overrides,  # type: ignore[arg-type]
    )


@pytest.fixture
def make_etcd_settings(defender_etcd: EtcdCluster) -> Callable[..., EtcdSettings]:
    """EtcdSettings for the harness cluster, with overrides (e.g. fewer retries)."""
    return lambda **overrides: etcd_settings(defender_etcd, **overrides)


@pytest.fixture
def restart_members(defender_etcd: EtcdCluster) -> Callable[[], None]:
    return lambda: restart_all(defender_etcd)


@pytest.fixture
def members_restored(defender_etcd: EtcdCluster) -> Iterator[EtcdCluster]:
    """The cluster, with every member that a test killed or stopped restarted afterwards."""
    yield defender_etcd
    restart_all(defender_etcd)


def restart_all(cluster: EtcdCluster) -> None:
    """Restart every stopped member at once: one member alone has no quorum, so restarting
    them one by one (each waiting to be healthy) would never finish."""
    down = [i for i, pid in enumerate(cluster.member_pids) if pid is None]
    errors: list[BaseException] = []

    def restart(i: int) -> None:
        try:
            cluster.restart_member(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=restart, args=(i,)) for i in down]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    cluster.wait_for_leader()


@pytest.fixture
def store(defender_etcd: EtcdCluster) -> Iterator[EtcdStore]:
    s = EtcdStore(etcd_settings(defender_etcd), registry=CollectorRegistry())
    yield s
    s.close()


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.generate()


@pytest.fixture
def alerts() -> list[Alert]:
    return []


@pytest.fixture
def settings(defender_etcd: EtcdCluster, etcd_prefix: str) -> LibrarySettings:
    return library_settings(defender_etcd, etcd_prefix, history_limit=3)


@pytest.fixture
def client(
    settings: LibrarySettings, keyring: Keyring, alerts: list[Alert]
) -> Iterator[DefenderClient]:
    c = DefenderClient(settings, keyring, registry=CollectorRegistry(), alert_sinks=[])
    c.alerter.add_sink(CallableSink(alerts.append))
    c.alerter.add_sink(EtcdAlertSink(c.store, c.layout, ttl_seconds=600))
    yield c
    c.close()
