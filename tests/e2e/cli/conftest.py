"""The kubectl plugin against the real 3-member defender etcd (and, for the annotation
commands, the local kube-apiserver). Data is written with the library, as components and the
operator would, under a prefix unique to each test."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from defender_cli import main
from defender_config import (
    ConfigStore,
    DefenderClient,
    EtcdSettings,
    Keyring,
    LibrarySettings,
    Registry,
)
from defender_devcluster import EtcdCluster


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Store:
    """A seeded deployment: the library objects plus the flags the plugin needs to reach it."""

    prefix: str
    endpoints: list[str]
    keyring: Keyring
    keyring_dir: Path
    client: DefenderClient
    configs: ConfigStore
    registry: Registry
    heartbeaters: list[Any] = field(default_factory=list)

    def flags(self, *, keyring: bool = False, endpoints: list[str] | None = None) -> list[str]:
        urls = ",".join(endpoints if endpoints is not None else self.endpoints)
        out = ["--etcd-endpoints", urls, "--prefix", self.prefix]
        if keyring:
            out += ["--keyring", str(self.keyring_dir)]
        return out

    def cli(
        self,
        *args: str,
        keyring: bool = False,
        colour: bool = False,
        endpoints: list[str] | None = None,
    ) -> Result:
        """Run the plugin in-process; `colour` forces colours as on a terminal."""
        out, err = io.StringIO(), io.StringIO()
        argv = [*args, *self.flags(keyring=keyring, endpoints=endpoints)]
        argv.append("--color" if colour else "--no-color")
        code = main(argv, out=out, err=err)
        return Result(code, out.getvalue(), err.getvalue())


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
