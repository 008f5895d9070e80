"""The operator keeps one copy of each component's status: once a watch event shows the status
it last wrote, the dict kopf keeps in the body stands in for its own (`Runtime.adopt_status`,
called from the name index that sees every event). Neither copy is ever edited in place."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import kopf
from operator_core_support import NAME, NAMESPACE, Harness, spec

from defender_operator import handlers


def _ready() -> Harness:
    h = Harness()
    h.inform()
    asyncio.run(h.reconcile(spec(), first_pass=True))
    assert h.mem.status is not None
    return h


def _event_body(h: Harness, status: dict[str, Any]) -> dict[str, Any]:
    body = h.body(spec(), {})
    body["status"] = status
    return body


def test_an_event_showing_the_status_written_last_replaces_the_operator_s_copy() -> None:
    h = _ready()
    kopfs = copy.deepcopy(h.mem.status)  # what the watch event decoded: equal, not the same
    assert kopfs is not h.mem.status
    h.rt.adopt_status(NAMESPACE, NAME, kopfs)
    assert h.mem.status is kopfs


def test_an_event_that_lags_the_operator_s_write_leaves_its_copy() -> None:
    h = _ready()
    ours = h.mem.status
    assert ours is not None
    older = copy.deepcopy(ours)
    older["activeVersion"] = 0  # the body before our write
    h.rt.adopt_status(NAMESPACE, NAME, older)
    assert h.mem.status is ours
    h.rt.adopt_status(NAMESPACE, NAME, None)  # an event without a status
    h.rt.adopt_status(NAMESPACE, NAME, "odd")
    assert h.mem.status is ours


def test_a_component_without_a_written_status_or_unknown_adopts_nothing() -> None:
    h = Harness()
    h.rt.memory(NAMESPACE, NAME)
    h.rt.adopt_status(NAMESPACE, NAME, {"observedGeneration": 1})
    assert h.mem.status is None
    h.rt.adopt_status(NAMESPACE, "never-seen", {"observedGeneration": 1})
    assert (NAMESPACE, "never-seen") not in h.rt.components


def test_the_name_index_adopts_the_status_of_every_event() -> None:
    h = _ready()
    raw = _event_body(h, copy.deepcopy(h.mem.status))
    memo = kopf.Memo()
    memo["runtime"] = h.rt
    asyncio.run(
        handlers.name_holders(body=kopf.Body(raw), namespace=NAMESPACE, name=NAME, memo=memo)
    )
    assert h.mem.status is raw["status"]


def test_passes_and_status_writes_after_adopting_never_edit_kopf_s_dict() -> None:
    h = _ready()
    kopfs = copy.deepcopy(h.mem.status)
    h.rt.adopt_status(NAMESPACE, NAME, kopfs)
    before = copy.deepcopy(kopfs)
    h.add_pod("p-1")
    h.beat("p-1")
    h.beat("p-1", error="UnknownKey")  # the pass writes new conditions
    asyncio.run(h.monitor(spec()))
    asyncio.run(h.reconcile(spec({"rules": []})))  # a new generation
    assert kopfs == before
    assert h.mem.status is not kopfs  # our write since is ours again, until an event shows it
