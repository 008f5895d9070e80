"""Fixtures for the agent end-to-end tests; the helpers live in agent_e2e_support.py."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_e2e_support import KEYRING_POLL, Plane, write_keyring

from defender_config import (
    ConfigStore,
    DefenderClient,
    EtcdSettings,
    Keyring,
    KeyringSource,
    LibrarySettings,
    Registry,
)
from defender_devcluster import EtcdCluster


@pytest.fixture
def plane(defender_etcd: EtcdCluster, etcd_prefix: str, tmp_path: Path) -> Iterator[Plane]:
    prefix = etcd_prefix.rstrip("/")
    keyring_dir = tmp_path / "keyring"
    keyring_dir.mkdir()
    write_keyring(keyring_dir, Keyring.generate())
    shared = tmp_path / "shared"
    shared.mkdir()
    settings = LibrarySettings(
        etcd=EtcdSettings(endpoints=defender_etcd.endpoints),
        prefix=prefix,
        keyring_path=keyring_dir,
    )
    source = KeyringSource(keyring_dir, poll_seconds=KEYRING_POLL)
    client = DefenderClient(settings, source, instance="e2e-test")
    configs = ConfigStore(client)
    p = Plane(
        etcd=defender_etcd,
        prefix=prefix,
        keyring_dir=keyring_dir,
        shared_dir=shared,
        component="demo",
        client=client,
        keyring=source,
        configs=configs,
        registry=Registry(client, configs),
        tmp=tmp_path,
    )
    try:
        yield p
    finally:
        for agent in p.agents:
            if agent.proc.poll() is None:
                agent.proc.send_signal(signal.SIGTERM)
                try:
                    agent.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    agent.proc.kill()
                    agent.proc.wait()
        for target in p.targets:
            if target.proc.poll() is None:
                target.proc.kill()
            target.proc.wait()
        client.close()
