"""Two thread pools behind the event loop's default executor: monitor passes run their
blocking calls on their own, smaller pool, so a new component's reconcile (claim, seed, first
status) never queues behind hundreds of periodic passes waiting on etcd.

Which pool a call takes is decided by a context variable that the monitor daemon sets in its
own task: every `asyncio.to_thread` / `run_in_executor(None, ...)` awaited from that task (or
a task it starts) goes to the monitor pool, everything else to the main pool.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_IN_MONITOR: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "defender_in_monitor", default=False
)


def enter_monitor() -> None:
    """Route this task's (and its children's) blocking calls to the monitor pool. Call it in
    the monitor daemon's own task: the variable lives in that task's context only."""
    _IN_MONITOR.set(True)


class RoutingExecutor(ThreadPoolExecutor):
    """The loop's default executor (asyncio accepts only a ThreadPoolExecutor): itself the
    main pool, with a second pool for calls made from monitor tasks."""

    def __init__(self, main_threads: int, monitor_threads: int) -> None:
        super().__init__(max_workers=main_threads, thread_name_prefix="defender")
        self.monitor = ThreadPoolExecutor(
            max_workers=monitor_threads, thread_name_prefix="defender-monitor"
        )

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        if _IN_MONITOR.get():
            return self.monitor.submit(fn, *args, **kwargs)
        return super().submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.monitor.shutdown(wait=wait, cancel_futures=cancel_futures)
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
