"""Which handlers make kopf add the operator's finalizer: only the delete handler, and only for
retention Purge (the monitor daemon is registered without kopf's finalizer demand). The
end-to-end tests check the finalizer on real resources; this pins the registry kopf decides
from, so a kopf that renames its internals fails here."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from defender_operator import handlers
from defender_operator._spawning import without_finalizer


def _ours(handler: Any) -> bool:
    return getattr(handler, "fn", None) in vars(handlers).values()


def test_only_the_purge_delete_handler_demands_a_finalizer() -> None:
    registry = kopf.get_default_registry()
    spawning = [h for h in registry._spawning.get_all_handlers() if _ours(h)]
    assert [h.fn for h in spawning] == [handlers.monitor_component]
    assert spawning[0].requires_finalizer is False
    demanding = [
        h for h in registry._changing.get_all_handlers() if _ours(h) and h.requires_finalizer
    ]
    assert [h.fn for h in demanding] == [handlers.apply_retention]
    when = demanding[0].when
    assert when is not None
    assert when(spec={"retention": "Purge"}) is True
    assert when(spec={"retention": "Keep"}) is False
    assert when(spec={}) is False  # the CRD's default is Keep


def test_the_deleted_filter_matches_only_deletions() -> None:
    assert handlers._deleted(type="DELETED")
    assert not any(handlers._deleted(type=t) for t in ("ADDED", "MODIFIED", None))


def test_without_finalizer_refuses_a_function_that_is_not_a_daemon() -> None:
    def not_registered() -> None:
        pass

    with pytest.raises(RuntimeError, match="not a registered kopf daemon"):
        without_finalizer(not_registered, kopf.OperatorRegistry())
