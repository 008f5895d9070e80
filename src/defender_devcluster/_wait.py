"""Polling until a condition holds: one loop for the harness and every test that waits on a real
process, so timeouts read the same everywhere and name what was awaited."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar, overload

T = TypeVar("T")


def poll(
    probe: Callable[[], T | bool | None],
    timeout: float,
    every: float,
    ignore: tuple[type[BaseException], ...] = (),
) -> tuple[T | None, object]:
    """Call ``probe`` until it returns something truthy or ``timeout`` seconds pass.

    Returns ``(value, None)`` on success and ``(None, last)`` on timeout, ``last`` being the last
    falsy value or ignored exception. The probe always runs at least once and once more at the
    deadline, so a short timeout still gets a fair look. Exceptions not in ``ignore`` propagate.
    For callers that must raise their own error type; tests want :func:`wait_for`.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = probe()
        except ignore as exc:
            last: object = exc
        else:
            if got:
                # bool is only "not yet"/"done": a True result carries no value of type T.
                return got, None  # type: ignore[return-value]
            last = got
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, last
        time.sleep(min(every, remaining))


@overload
def wait_for(
    what: str,
    probe: Callable[[], bool],
    timeout: float = ...,
    every: float = ...,
    *,
    ignore: tuple[type[BaseException], ...] = ...,
) -> bool: ...


@overload
def wait_for(
    what: str,
    probe: Callable[[], T | bool | None],
    timeout: float = ...,
    every: float = ...,
    *,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...


# A bool probe gets its own overload: otherwise T would be inferred as Never and mypy would take
# every line after the call for unreachable.
def wait_for(
    what: str,
    probe: Callable[[], T | bool | None],
    timeout: float = 30.0,
    every: float = 0.1,
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``probe`` every ``every`` seconds and return its first truthy result.

    A probe that raises one of ``ignore`` counts as "not yet" (for processes that are still
    starting); any other exception propagates at once. After ``timeout`` seconds this raises
    AssertionError naming ``what``, the timeout and the last value or exception, chained to that
    exception so its traceback is kept.
    """
    got, last = poll(probe, timeout, every, ignore)
    if got is not None:
        return got
    message = f"timed out after {timeout:g}s waiting for {what} (last {_describe(last)})"
    if isinstance(last, BaseException):
        raise AssertionError(message) from last
    raise AssertionError(message)


def _describe(last: object) -> str:
    if isinstance(last, BaseException):
        return f"error: {last!r}"
    return f"value: {last!r}"
