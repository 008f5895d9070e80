"""The monitor daemon's loop (`_monitor.run`): it sleeps the interval between passes, wakes
early for a heartbeat event, ends promptly when kopf stops it, and a sleeping component costs
one waiting task besides its own (not tasks created per pause)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from operator_core_support import LOG, NAME, NAMESPACE, Harness

from defender_operator import _monitor
from defender_operator._settings import OperatorSettings


class Stopped:
    """kopf's DaemonStopped as the daemon uses it: truthy once stopped, awaitable."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def __bool__(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    def set(self) -> None:
        self._event.set()


async def _until(predicate: Any, what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _daemon(monkeypatch: pytest.MonkeyPatch, interval: float) -> tuple[Harness, list[int]]:
    h = Harness()
    h.rt.settings = OperatorSettings(monitor_interval_seconds=interval)
    passes: list[int] = []

    async def one_pass(*_: Any) -> None:
        passes.append(1)

    monkeypatch.setattr(_monitor, "_pass", one_pass)
    return h, passes


def _start(h: Harness, body: dict[str, Any] | None = None) -> tuple[Stopped, asyncio.Task[None]]:
    """The daemon as kopf runs it, in a task of its own (call inside the running loop)."""
    stopped = Stopped()
    return stopped, asyncio.create_task(
        _monitor.run(h.rt, stopped, body or {}, NAMESPACE, NAME, LOG, h.index())
    )


def test_a_stopped_daemon_ends_without_waiting_out_its_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h, passes = _daemon(monkeypatch, interval=300)

    async def scenario() -> None:
        stopped, task = _start(h)
        await _until(lambda: passes, "the first pass")
        await asyncio.sleep(0.3)  # past the floor between passes: now in the long pause
        # Sleeping: the daemon's own task and one task relaying the stop, nothing per pause.
        others = asyncio.all_tasks() - {asyncio.current_task()}
        assert len(others) == 2, others
        stopped.set()
        await asyncio.wait_for(task, timeout=10)  # not the 300 s interval
        assert task.exception() is None
        assert asyncio.all_tasks() == {asyncio.current_task()}  # the relay is gone too
        assert len(passes) == 1

    asyncio.run(scenario())


def test_a_heartbeat_event_wakes_the_daemon_for_a_pass_before_its_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h, passes = _daemon(monkeypatch, interval=300)

    async def scenario() -> None:
        stopped, task = _start(h)
        await _until(lambda: passes, "the first pass")
        await asyncio.sleep(0.3)
        h.rt.heartbeats.waker(NAME).set()
        await _until(lambda: len(passes) == 2, "a pass woken by the heartbeat event")
        stopped.set()
        await asyncio.wait_for(task, timeout=10)

    asyncio.run(scenario())


def test_the_daemon_passes_again_after_its_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    h, passes = _daemon(monkeypatch, interval=0.3)

    async def scenario() -> None:
        stopped, task = _start(h)
        await _until(lambda: len(passes) >= 3, "passes every interval")
        stopped.set()
        await asyncio.wait_for(task, timeout=10)

    asyncio.run(scenario())


def test_a_deleted_resource_ends_its_daemon_though_kopf_never_stops_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No finalizer (retention Keep): kopf forgets the resource at its DELETED event without
    # stopping the daemon; the deletion seen (`_reconcile.gone`) ends it.
    h, passes = _daemon(monkeypatch, interval=300)

    async def scenario() -> None:
        _, task = _start(h, {"metadata": {"uid": "uid-1"}})
        _, successor = _start(h, {"metadata": {"uid": "uid-2"}})  # re-created, same name
        await _until(lambda: len(passes) == 2, "the first passes")
        await asyncio.sleep(0.3)
        h.rt.mark_gone("uid-1")
        h.rt.heartbeats.waker(NAME).set()
        await asyncio.wait_for(task, timeout=10)  # not the 300 s interval, and no stop
        assert task.exception() is None
        await _until(lambda: len(passes) == 3, "the successor's pass the wake brought")
        assert not successor.done()
        successor.cancel()

    asyncio.run(scenario())
