"""The monitor daemon's loop (`_monitor.run`): it sleeps the interval between passes, wakes
early for a heartbeat event, ends promptly when kopf stops it, and a sleeping component costs
one waiting task besides its own (not tasks created per pause)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from operator_core_support import LOG, NAME, NAMESPACE, Harness, spec

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


def _daemon(
    monkeypatch: pytest.MonkeyPatch, interval: float, due: list[datetime] | None = None
) -> tuple[Harness, list[str]]:
    """The daemon with its passes faked: each records what started it; the first ones answer
    the deadlines in `due` (then none)."""
    h = Harness()
    h.rt.settings = OperatorSettings(monitor_interval_seconds=interval)
    passes: list[str] = []
    deadlines = list(due or ())

    async def one_pass(*_: Any, trigger: str, **__: Any) -> datetime | None:
        passes.append(trigger)
        return deadlines.pop(0) if deadlines else None

    monkeypatch.setattr(_monitor, "_pass", one_pass)
    return h, passes


def _start(h: Harness, body: dict[str, Any] | None = None) -> tuple[Stopped, asyncio.Task[None]]:
    """The daemon as kopf runs it, in a task of its own (call inside the running loop)."""
    stopped = Stopped()
    return stopped, asyncio.create_task(
        _monitor.run(h.rt, stopped, body or {}, NAMESPACE, NAME, LOG, h.index())
    )


def _wake(h: Harness) -> None:
    """A heartbeat event for the component whose daemon runs."""
    waker = h.rt.heartbeats.waker(NAME)
    assert waker is not None, "no daemon waits"
    waker.set()


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
        assert h.mem.monitors == 1  # this replica monitors it: it publishes its registration
        stopped.set()
        await asyncio.wait_for(task, timeout=10)  # not the 300 s interval
        assert task.exception() is None
        assert h.mem.monitors == 0  # stopped (peering paused this replica): no longer
        assert h.rt.heartbeats.waker(NAME) is None  # nor anything to wake it by
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
        _wake(h)
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
        _wake(h)
        await asyncio.wait_for(task, timeout=10)  # not the 300 s interval, and no stop
        assert task.exception() is None
        await _until(lambda: len(passes) == 3, "the successor's pass the wake brought")
        assert not successor.done()
        _wake(h)  # the old daemon's end left the successor its wake-ups
        await _until(lambda: len(passes) == 4, "the successor woken again")
        successor.cancel()
        await asyncio.gather(successor, return_exceptions=True)
        assert h.rt.heartbeats.waker(NAME) is None

    asyncio.run(scenario())


def _counting_ticks(monkeypatch: pytest.MonkeyPatch) -> tuple[Harness, list[int]]:
    """A component already reconciled (status published) whose monitor passes are counted."""
    h = Harness()
    h.rt.settings = OperatorSettings(monitor_interval_seconds=300)
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    asyncio.run(h.reconcile(spec(), first_pass=True))
    ticks: list[int] = []
    tick = _monitor.tick

    async def counted(*args: Any) -> Any:
        ticks.append(1)
        return await tick(*args)

    monkeypatch.setattr(_monitor, "tick", counted)
    return h, ticks


def test_a_daemon_pass_that_waited_out_a_reconciles_pass_is_not_repeated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As kopf runs a new resource: the daemon starts beside the create handler and waits for
    # the component's lock while the reconcile (and its first pass) hold it.
    h, ticks = _counting_ticks(monkeypatch)
    mem = h.mem
    body = h.body(spec(), {})

    async def scenario() -> None:
        async with mem.lock:
            stopped, task = _start(h, body)
            await asyncio.sleep(0.05)  # the daemon cleared its wake-up and waits for the lock
            visit = _monitor._visit(h.rt, body, NAMESPACE, NAME, LOG, dict(h.kube.status))
            await _monitor.tick(visit, mem, h.index())  # the reconcile's pass
        await asyncio.sleep(0.5)  # past the floor between passes: in its long pause
        assert len(ticks) == 1, "the daemon repeated the pass the reconcile ran"
        # Skipped once, not for good: an event after that pass brings one.
        _wake(h)
        await _until(lambda: len(ticks) == 2, "a pass woken by the heartbeat event")
        stopped.set()
        await asyncio.wait_for(task, timeout=10)

    asyncio.run(scenario())


def test_a_reconcile_whose_pass_ran_does_not_wake_the_daemon_one_without_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h, ticks = _counting_ticks(monkeypatch)
    wake = h.rt.heartbeats.attach(NAME, NAMESPACE)  # the daemon waits
    # A same-named resource's daemon in another namespace: this reconcile is no news to it.
    twin = h.rt.heartbeats.attach(NAME, "t-tenant")
    asyncio.run(h.reconcile(spec(), first_pass=True))
    assert len(ticks) == 1 and not wake.is_set()
    # No pass could run with it (etcd's health not measured yet): the daemon is woken.
    h.rt.etcd = type(h.rt.etcd)()
    asyncio.run(h.reconcile(spec(), first_pass=True))
    assert len(ticks) == 1 and wake.is_set()
    assert not twin.is_set()


def test_each_pass_says_what_started_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first pass, a deadline the pass answered, the interval, then a wake-up: what
    # `defender_operator_monitor_passes_total{trigger}` counts (issue #17's bench reads it).
    soon = datetime.now(UTC) + timedelta(seconds=0.3)
    h, passes = _daemon(monkeypatch, interval=0.6, due=[soon])

    async def scenario() -> None:
        stopped, task = _start(h)
        await _until(lambda: len(passes) == 3, "the deadline's and the interval's passes")
        assert passes == ["first", "due", "interval"]
        _wake(h)
        await _until(lambda: len(passes) == 4, "the woken pass")
        assert passes[3] == "wake"
        stopped.set()
        await asyncio.wait_for(task, timeout=10)

    asyncio.run(scenario())


def test_a_refused_same_named_daemon_does_not_swallow_a_wake_the_owner_has_not_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tenant's resource named like this namespace's component, in its own namespace, is
    refused but has a monitor daemon. A wake (by name) lands while the owner's pass runs; the
    refused daemon's quick round begins by clearing its wake. The owner must still run a pass
    for it at once, not a monitor interval later."""
    h = Harness()
    h.rt.settings = OperatorSettings(monitor_interval_seconds=60)
    passes: dict[str, int] = {NAMESPACE: 0, "tenant": 0}
    gate = asyncio.Event()

    async def one_pass(rt: Any, body: Any, namespace: str, *_: Any, **__: Any) -> None:
        passes[namespace] += 1
        if namespace == NAMESPACE and passes[namespace] == 2:
            await gate.wait()  # the owner's pass is still reading etcd

    monkeypatch.setattr(_monitor, "_pass", one_pass)

    async def scenario() -> None:
        stop_owner, owner = _start(h)
        stop_refused = Stopped()
        refused = asyncio.create_task(
            _monitor.run(h.rt, stop_refused, {}, "tenant", NAME, LOG, h.index())
        )
        await _until(lambda: passes == {NAMESPACE: 1, "tenant": 1}, "both first passes")
        await asyncio.sleep(0.3)  # both in their long pause
        h.rt.wake(NAME, "instance-new")  # the name's data: every daemon of the name
        await _until(lambda: passes[NAMESPACE] == 2, "the owner's second pass begun")
        await _until(lambda: passes["tenant"] == 2, "the refused one's second pass")
        await asyncio.sleep(0.3)  # the refused daemon back in its pause
        h.rt.wake(NAME, "etcd-change")  # what the owner's running pass may have read too early
        await _until(lambda: passes["tenant"] == 3, "the refused one woken again")
        await asyncio.sleep(0.3)  # its next round has begun (and cleared its wake)
        gate.set()
        await _until(lambda: passes[NAMESPACE] == 3, "the owner's pass for the second wake")
        for stopped, task in ((stop_owner, owner), (stop_refused, refused)):
            stopped.set()
            await asyncio.wait_for(task, timeout=10)

    asyncio.run(scenario())
