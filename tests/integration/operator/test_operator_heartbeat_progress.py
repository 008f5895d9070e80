"""The operator's heartbeat view on the real 3-member etcd (`_loops.heartbeat_watch` through
`LibraryBackend`): with no instance event at all, the watch's progress answers keep the view
trusted (monitors plan no pass at a live leased instance's deadline); a member frozen under the
watch (SIGSTOP: the connection stays open, nothing answers) makes it untrusted within three
progress intervals, long before gRPC's keep-alive gives the connection up, until it answers
again."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from defender_config import Keyring, LibrarySettings
from defender_devcluster import EtcdCluster, etcd_client_settings
from defender_operator import _loops
from defender_operator._keys import MutableKeyringSource
from defender_operator._library_backend import LibraryBackend
from defender_operator._settings import OperatorSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "operator"))
from operator_core_support import Harness, until

pytestmark = pytest.mark.etcd

PROGRESS = 0.5


@pytest.fixture
def library(defender_etcd: EtcdCluster, etcd_prefix: str) -> Iterator[LibraryBackend]:
    settings = LibrarySettings(
        etcd=etcd_client_settings(defender_etcd.endpoints), prefix=etcd_prefix.rstrip("/")
    )
    backend = LibraryBackend(settings, MutableKeyringSource(Keyring.generate()), "progress")
    try:
        yield backend
    finally:
        backend.close()


def test_an_idle_heartbeat_watch_stays_trusted_on_its_progress_answers(
    library: LibraryBackend,
) -> None:
    h = Harness(backend=library)  # type: ignore[arg-type]
    h.rt.settings = OperatorSettings(heartbeat_watch_progress_seconds=PROGRESS)
    view = h.rt.heartbeats

    async def scenario() -> tuple[int, float]:
        task = asyncio.create_task(_loops.heartbeat_watch(h.rt))
        try:
            await until("the first resync", lambda: view.trusted, timeout=20)
            untrusted, loudest = 0, 0.0
            end = time.monotonic() + 4.0
            while time.monotonic() < end:
                untrusted += not view.trusted
                silent = view.silent_for()
                assert silent is not None, "the view does not know its stream's silence"
                loudest = max(loudest, silent)
                await asyncio.sleep(0.05)
            return untrusted, loudest
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    untrusted, loudest = asyncio.run(scenario())
    # No instance key changes: only progress answers keep the stream heard from.
    assert untrusted == 0
    assert loudest < 3 * PROGRESS


def test_a_member_frozen_under_the_heartbeat_watch_untrusts_the_view_until_it_answers(
    library: LibraryBackend, defender_etcd: EtcdCluster
) -> None:
    cluster = defender_etcd
    h = Harness(backend=library)  # type: ignore[arg-type]
    h.rt.settings = OperatorSettings(heartbeat_watch_progress_seconds=PROGRESS)
    view = h.rt.heartbeats

    async def scenario() -> float:
        task = asyncio.create_task(_loops.heartbeat_watch(h.rt))
        try:
            await until("the first resync", lambda: view.trusted, timeout=20)
            silent: Any = view._silent
            handle = silent.__self__  # the heartbeat watch's WatchHandle
            await until("the watch on a stream", lambda: handle._watcher is not None, timeout=10)
            with cluster.frozen(cluster.member_at(handle._watcher.endpoint)):
                stopped = time.monotonic()
                # gRPC's keep-alive pings (every 10 s, 5 s to answer) end the stream 5-15 s
                # after the stop; only the unanswered progress requests tell before.
                await until("the view untrusted", lambda: not view.trusted, timeout=4)
                took = time.monotonic() - stopped
            await until("the view trusted again", lambda: view.trusted, timeout=30)
            return took
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    took = asyncio.run(scenario())
    assert took < 4 * PROGRESS + 1
