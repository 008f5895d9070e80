"""The kubectl plugin against the real 3-member defender etcd (and, for the annotation
commands, the local kube-apiserver). Data is written with the library, as components and the
operator would, under a prefix unique to each test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_e2e_support import Store

from defender_config import (
    ConfigStore,
    DefenderClient,
    EtcdSettings,
    Keyring,
    LibrarySettings,
    Registry,
)
from defender_devcluster import EtcdCluster


@pytest.fixture
def store(
    defender_etcd: EtcdCluster, etcd_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Store]:
    # The plugin reads DEFENDER_* too: keep the machine's environment out of the test.
    for name in list(os.environ):
        if name.startswith("DEFENDER_") and name != "DEFENDER_TOOLS_BIN":
            monkeypatch.delenv(name)
    prefix = etcd_prefix.rstrip("/")
    keyring = Keyring.generate()
    keyring_dir = tmp_path / "keyring"
    keyring_dir.mkdir()
    (keyring_dir / "keyring.json").write_bytes(keyring.to_json())
    settings = LibrarySettings(
        etcd=EtcdSettings(endpoints=defender_etcd.endpoints, timeout_seconds=2, retries=2),
        prefix=prefix,
    )
    client = DefenderClient(settings, keyring, instance="cli-e2e")
    configs = ConfigStore(client)
    # Set after the fixture's own settings are built (the environment wins over arguments):
    # the plugin fails fast on an unreachable endpoint.
    monkeypatch.setenv("DEFENDER_ETCD__RETRIES", "1")
    monkeypatch.setenv("DEFENDER_ETCD__TIMEOUT_SECONDS", "2")
    s = Store(
        prefix=prefix,
        endpoints=defender_etcd.endpoints,
        keyring=keyring,
        keyring_dir=keyring_dir,
        client=client,
        configs=configs,
        registry=Registry(client, configs),
    )
    try:
        yield s
    finally:
        for beat in s.heartbeaters:
            beat.stop()
        client.close()
