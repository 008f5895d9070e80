"""What the plugin's end-to-end tests share: a seeded store and a way to run the plugin."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defender_cli import main
from defender_config import ConfigStore, DefenderClient, Keyring, Registry


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
