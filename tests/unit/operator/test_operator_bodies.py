"""The operator drops managedFields from the bodies kopf keeps for it (memory), and nothing
else: spec, status and the rest of metadata read the same afterwards."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import kopf
import pytest
from operator_core_support import LOG, NAME, NAMESPACE, Harness

from defender_operator import _monitor, handlers
from defender_operator._bodies import shed_managed_fields
from defender_operator._decisions.ownership import holder_entry


def _raw() -> dict[str, Any]:
    return {
        "apiVersion": "defender.example/v1",
        "metadata": {
            "name": NAME,
            "uid": "u-1",
            "generation": 3,
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:a": {}}}}],
        },
        "spec": {"a": 1},
        "status": {"observedGeneration": 3},
    }


def test_a_kopf_body_loses_managed_fields_in_the_source_kopf_keeps() -> None:
    raw = _raw()
    body = kopf.Body(raw)
    shed_managed_fields(body)
    assert "managedFields" not in raw["metadata"]  # the very mapping kopf holds on to
    assert dict(body.metadata) == {"name": NAME, "uid": "u-1", "generation": 3}
    assert dict(body.spec) == {"a": 1}
    assert dict(body.status) == {"observedGeneration": 3}
    shed_managed_fields(body)  # nothing left to drop: no error


@pytest.mark.parametrize(
    "body",
    [
        {"metadata": {"name": NAME}},  # no managedFields
        {"spec": {}},  # no metadata
        {"metadata": None},
        object(),  # neither a mapping nor a kopf Body
        kopf.Body({"metadata": "odd"}),
    ],
)
def test_bodies_without_managed_fields_or_of_another_shape_are_left_alone(body: Any) -> None:
    before = repr(body)
    shed_managed_fields(body)
    assert repr(body) == before


def test_a_plain_dict_body_loses_managed_fields_too() -> None:
    raw = _raw()
    shed_managed_fields(raw)
    assert raw["metadata"] == {"name": NAME, "uid": "u-1", "generation": 3}


def test_the_monitor_daemon_sheds_them_before_each_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    raw = _raw()
    body = kopf.Body(raw)
    seen: list[bool] = []

    class Stopped:
        def __bool__(self) -> bool:
            return len(seen) >= 2

        async def wait(self) -> None:
            await asyncio.Event().wait()

    async def one_pass(_rt: Any, passed: Any, *_: Any, **__: Any) -> None:
        seen.append("managedFields" in passed["metadata"])
        # A watch event between passes brings a new body with managedFields again.
        body._replace_with(_raw())

    monkeypatch.setattr(_monitor, "_pass", one_pass)
    monkeypatch.setattr(_monitor, "_MIN_PAUSE_SECONDS", 0.0)
    h.rt.settings = h.rt.settings.model_copy(update={"monitor_interval_seconds": 0.01})
    asyncio.run(_monitor.run(h.rt, Stopped(), body, NAMESPACE, NAME, LOG, h.index()))
    assert seen == [False, False]


def test_every_event_sheds_them_in_the_name_index_before_kopf_keeps_the_body() -> None:
    # kopf hands each event's body to its indexes first, then keeps that same body for the
    # daemon: between passes (30 s) a status patch's event would bring managedFields back.
    raw = _raw()
    raw["metadata"]["namespace"] = NAMESPACE
    expected = holder_entry(kopf.Body(copy.deepcopy(raw)))
    found = asyncio.run(
        handlers.name_holders(body=kopf.Body(raw), namespace=NAMESPACE, name=NAME, memo=kopf.Memo())
    )
    assert found == expected
    assert "managedFields" not in raw["metadata"]
