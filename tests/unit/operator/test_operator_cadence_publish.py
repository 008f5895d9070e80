"""The monitor's publication of spec.heartbeat as the component's cadence: written only when the
record (as the pass read it) says otherwise, kept (with its publication time) when it already
matches, and a failed write costs a warning and a metric, never the pass."""

from __future__ import annotations

import asyncio
import functools
import logging
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from defender_config import Cadence, StoreUnavailableError
from defender_operator import _api
from defender_operator._changes import ChangeView
from defender_operator._decisions import conditions as c
from defender_operator._metrics import ERRORS
from defender_operator._monitor import Observed, Pass, cadence_step
from defender_operator._outcome import remember
from defender_operator._runtime import ComponentMemory, Runtime

LOG = logging.getLogger("test.cadence")
SPEC = _api.parse_spec(
    {
        "componentType": "sniffer",
        "config": {"interface": "eth0"},
        "selector": {"matchLabels": {"app": "sniffer"}},
        "heartbeat": {"intervalSeconds": 5, "missedBeforeRestart": 2},
    }
)


class Backend:
    def __init__(self, stored: Cadence | None, fail: bool = False) -> None:
        self.stored = stored
        self.fail = fail
        self.writes: list[Cadence] = []

    def publish_cadence(self, component: str, cadence: Cadence) -> None:
        if self.fail:
            raise StoreUnavailableError(["127.0.0.1:2379"], "etcd unreachable")
        self.writes.append(cadence)
        self.stored = cadence


def publish(backend: Backend, mem: ComponentMemory) -> None:
    rt: Any = SimpleNamespace(backend=backend, identity="op-0", changes=ChangeView())
    rt.write = functools.partial(Runtime.write, rt)
    p = Pass(rt, {}, "default", "sniffer", 1, SPEC, {}, LOG, datetime.now(UTC))
    seen = Observed(etcd_ok=True, cadence=backend.stored)
    remember(mem, asyncio.run(cadence_step(p, seen, mem)))


def test_absent_or_different_record_is_written() -> None:
    backend, mem = Backend(None), ComponentMemory()
    publish(backend, mem)
    [written] = backend.writes
    assert (written.interval_seconds, written.allowed_misses, written.by) == (5, 2, "operator:op-0")
    assert mem.cadence == written
    assert mem.cadence_condition is not None and mem.cadence_condition.status == c.TRUE
    # A record overwritten by hand is put right on the next pass.
    backend.stored = Cadence(interval_seconds=3600, allowed_misses=100)
    publish(backend, mem)
    assert len(backend.writes) == 2 and backend.writes[-1].interval_seconds == 5


def test_matching_record_is_kept_with_its_time() -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)
    backend = Backend(Cadence(interval_seconds=5, allowed_misses=2, since=since, by="old-op"))
    mem = ComponentMemory()
    publish(backend, mem)
    assert backend.writes == []
    assert mem.cadence is not None and mem.cadence.since == since


def test_etcd_failure_is_a_warning_not_a_failed_pass(caplog: pytest.LogCaptureFixture) -> None:
    before = ERRORS.labels("cadence")._value.get()
    mem = ComponentMemory()
    with caplog.at_level(logging.WARNING, logger="test.cadence"):
        publish(Backend(None, fail=True), mem)
    assert "cannot publish the heartbeat cadence" in caplog.text
    assert ERRORS.labels("cadence")._value.get() == before + 1
    assert mem.cadence is None and mem.cadence_condition is None
