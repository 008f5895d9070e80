"""Every handler kopf calls on the way from a watch event to our reconcile and monitor is a
coroutine: kopf runs a plain function in the loop's thread pool, and an object's indexes are
computed before its handlers, so one sync index would put a thread hand-off (two GIL waits
under load) in front of every pod and DefenderComponent event (issue #17). The admission
webhooks stay plain functions on purpose: a custom schema may take its whole budget."""

from __future__ import annotations

import inspect
from typing import Any

import kopf

from defender_operator import handlers, webhooks


def _ours(handler: Any) -> bool:
    return getattr(handler, "fn", None) in vars(handlers).values()


def test_every_handler_on_the_event_path_is_a_coroutine() -> None:
    registry = kopf.get_default_registry()
    on_events = [
        h
        for group in (
            registry._indexing,
            registry._watching,
            registry._changing,
            registry._spawning,
        )
        for h in group.get_all_handlers()
        if _ours(h)
    ]
    names = {h.fn.__name__ for h in on_events}
    # The ones this pins, so a renamed or dropped registration fails here too.
    assert {"defender_pods", "name_holders", "reconcile_component", "gone"} <= names
    assert {"monitor_component", "apply_retention"} <= names
    in_threads = [h.fn.__name__ for h in on_events if not inspect.iscoroutinefunction(h.fn)]
    assert in_threads == []


def test_the_admission_webhooks_run_off_the_loop() -> None:
    assert not inspect.iscoroutinefunction(webhooks.validate_component)
    assert not inspect.iscoroutinefunction(webhooks.stamp_modifier)
