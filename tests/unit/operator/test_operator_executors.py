"""The default executor's two pools: blocking calls awaited from a monitor daemon's task take
the monitor pool, every other call (a reconcile's) the main pool, so periodic passes never
queue ahead of a reconcile."""

from __future__ import annotations

import asyncio
import threading

from defender_operator._executors import RoutingExecutor, enter_monitor


def _thread_name() -> str:
    return threading.current_thread().name


def test_monitor_tasks_and_their_children_use_the_monitor_pool_and_the_rest_the_main_one() -> None:
    async def scenario() -> dict[str, str]:
        asyncio.get_running_loop().set_default_executor(RoutingExecutor(4, 2))

        async def monitor() -> tuple[str, str]:
            enter_monitor()
            own = await asyncio.to_thread(_thread_name)
            # A task the daemon starts (e.g. a helper) inherits its context, so its pool too.
            child = await asyncio.create_task(asyncio.to_thread(_thread_name))
            return own, child

        async def reconcile() -> str:
            return await asyncio.to_thread(_thread_name)

        (own, child), other = await asyncio.gather(monitor(), reconcile())
        # The variable stays in the monitor task's context: this task is not a monitor.
        here = await asyncio.to_thread(_thread_name)
        return {"own": own, "child": child, "reconcile": other, "here": here}

    names = asyncio.run(scenario())
    assert names["own"].startswith("defender-monitor")
    assert names["child"].startswith("defender-monitor")
    assert not names["reconcile"].startswith("defender-monitor")
    assert names["reconcile"].startswith("defender")
    assert not names["here"].startswith("defender-monitor")


def test_a_full_monitor_pool_does_not_hold_up_a_reconcile() -> None:
    release = threading.Event()

    async def scenario() -> str:
        asyncio.get_running_loop().set_default_executor(RoutingExecutor(2, 1))

        async def stuck_monitor() -> None:
            enter_monitor()
            await asyncio.to_thread(release.wait, 30)

        monitors = [asyncio.create_task(stuck_monitor()) for _ in range(3)]
        await asyncio.sleep(0.05)
        try:
            # Every monitor thread is busy (and more passes wait): a reconcile still runs.
            return await asyncio.wait_for(asyncio.to_thread(_thread_name), timeout=10)
        finally:
            release.set()
            await asyncio.gather(*monitors)

    assert not asyncio.run(scenario()).startswith("defender-monitor")


def test_shutdown_stops_both_pools() -> None:
    ex = RoutingExecutor(2, 2)
    ex.submit(_thread_name).result()
    ex.monitor.submit(_thread_name).result()
    ex.shutdown(wait=True)
    for pool in (ex, ex.monitor):
        try:
            pool.submit(_thread_name)
        except RuntimeError:
            continue
        raise AssertionError("a pool still accepts work after shutdown")
