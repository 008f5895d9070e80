"""A kopf daemon that does not demand kopf's finalizer.

kopf registers every daemon with `requires_finalizer=True`, so each resource it watches gets a
finalizer patch (an API write and a watch event on every create) and cannot be deleted while
no operator runs. The monitor daemon needs neither: a resource with retention Purge has the
delete handler's finalizer anyway, and for the others `handlers.gone` ends the daemon when the
deletion is seen (`_monitor.run` checks `Runtime.is_gone`).

kopf has no public switch for this; its registry holds frozen handler records, so the daemon's
record is replaced by a copy with the flag off. A unit test pins that the registry holds that
copy (a kopf that renames these internals fails it rather than silently adding finalizers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import kopf

F = TypeVar("F", bound=Callable[..., Any])


def without_finalizer(fn: F, registry: kopf.OperatorRegistry | None = None) -> F:
    """Apply above `@kopf.daemon(...)`: its handler stops requiring a finalizer."""
    spawning = (registry or kopf.get_default_registry())._spawning
    found = [h for h in spawning.get_all_handlers() if h.fn is fn]
    if not found:
        raise RuntimeError(f"{fn.__qualname__} is not a registered kopf daemon")
    spawning._handlers = [
        dataclasses.replace(h, requires_finalizer=False) if h.fn is fn else h
        for h in spawning._handlers
    ]
    return fn
