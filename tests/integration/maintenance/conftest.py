"""Backup, restore, defragmentation and NOSPACE against real 3-member etcd clusters.

Restore destroys every member's data and NOSPACE fills a quota, so these tests start clusters
of their own (`fresh_etcd`, `small_quota_etcd`) instead of the session's `defender_etcd`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from defender_cli import main
from defender_devcluster import EtcdCluster
from defender_devcluster.pytest_plugin import private_etcd

pytestmark = pytest.mark.etcd

# Small enough that a test fills it in seconds, large enough for etcd to start (its empty
# database is ~20 KiB, a defragmented one with our keys well under 1 MiB).
SMALL_QUOTA_BYTES = 2 * 1024 * 1024


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run_cli(*argv: str) -> Result:
    out, err = io.StringIO(), io.StringIO()
    code = main([*argv, "--no-color"], out=out, err=err)
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture(autouse=True)
def _plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The plugin reads DEFENDER_* too: keep the machine's environment out of the test.
    kept = ("DEFENDER_TOOLS_BIN", "DEFENDER_TOOLS_DIR")
    for name in list(os.environ):
        if name.startswith("DEFENDER_") and name not in kept:
            monkeypatch.delenv(name)


@pytest.fixture
def fresh_etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A 3-member cluster of this test alone (its data may be destroyed)."""
    yield from private_etcd(tmp_path / "etcd", "restore")


@pytest.fixture
def small_quota_etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A 3-member cluster whose backend quota is SMALL_QUOTA_BYTES: NOSPACE is reachable."""
    yield from private_etcd(
        tmp_path / "etcd", "nospace", extra_args=(f"--quota-backend-bytes={SMALL_QUOTA_BYTES}",)
    )


@pytest.fixture
def small_quota_proxied_etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """`small_quota_etcd` whose members reach each other through the harness' peer proxy, so
    a test can cut one off and let it fall behind."""
    yield from private_etcd(
        tmp_path / "etcd",
        "lagging",
        extra_args=(f"--quota-backend-bytes={SMALL_QUOTA_BYTES}",),
        peer_proxy=True,
    )


@pytest.fixture
def cli() -> Callable[..., Result]:
    return run_cli
