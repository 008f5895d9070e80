"""kopf's handler progress is read from annotations any editor of a DefenderComponent writes.

Whoever may patch a DefenderComponent could put a string kopf cannot use in
`kopf.zalando.org/reconcile_component` (with a spec change, or before an operator restart):
kopf's own storage raised in kopf's processing of the object, kopf throttled it and never ran
its handlers again while the annotation stayed. These tests read the annotation the way kopf's
processing does (`State.from_storage` with the handlers of our registry, then the state's
`done`, `delays` and counters) with the persistence settings the operator's startup applies.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import kopf
import pytest
from kopf._core.actions import execution, progression

from defender_operator import _deep_json, handlers

RESOURCE = kopf.Resource(*handlers.RESOURCE)
PREFIX = "kopf.zalando.org/"

# What an editor of the object can write there (annotation values are strings).
UNUSABLE = {
    "not-json": "{not json",
    "an-array": "[]",
    "a-number": "5",
    "time-a-number": '{"started": 5}',
    "time-not-a-time": '{"started": "yesterday"}',
    "time-without-zone": '{"started": "2020-01-01T00:00:00"}',
    "retries-text": '{"retries": "x"}',
    "retries-a-list": '{"retries": [1]}',
    "subrefs-a-number": '{"subrefs": 5}',
    "subrefs-of-objects": '{"subrefs": [{}]}',
    "nested-past-recursion": "[" * 5000 + "]" * 5000,
    "integer-of-too-many-digits": '{"retries": ' + "9" * 5000 + "}",
}


def _settings() -> kopf.OperatorSettings:
    # As the operator's main does before kopf runs (without it, the record nested past
    # recursion raised RecursionError here unless another test had installed it first).
    _deep_json.install()
    settings = kopf.OperatorSettings()
    handlers.configure_persistence(settings)
    return settings


def _body(annotations: dict[str, str], status: dict[str, Any] | None = None) -> kopf.Body:
    raw: dict[str, Any] = {
        "apiVersion": "mldefender.io/v1alpha1",
        "kind": "DefenderComponent",
        "metadata": {"namespace": "tenant-a", "name": "x", "uid": "u1", "annotations": annotations},
        "spec": {},
    }
    if status is not None:
        raw["status"] = status
    return kopf.Body(raw)  # type: ignore[arg-type]  # a plain dict stands in for the raw body


def _our_handlers() -> list[Any]:
    registry = kopf.get_default_registry()
    found = list(registry._changing.get_resource_handlers(resource=RESOURCE))
    assert {h.id for h in found} >= {"reconcile_component", "apply_retention"}
    return found


def _handler_state(one: Any) -> progression.HandlerState:
    assert isinstance(one, progression.HandlerState)
    return one


def _use(body: kopf.Body, storage: kopf.ProgressStorage) -> progression.State:
    """What kopf's `process_changing_cause` does with the stored progress."""

    async def run() -> progression.State:
        stored = progression.State.from_storage(
            body=body, storage=storage, handlers=_our_handlers()
        )
        state = stored.with_purpose("update").with_handlers(_our_handlers())
        assert isinstance(state.done, bool)
        assert all(d >= 0 for d in state.delays)
        state.counts  # noqa: B018  # kopf reads it to log the outcome
        for one in map(_handler_state, state.values()):
            assert one.runtime is not None
            assert isinstance(one.sleeping, bool)
            assert one.retries + 1 > 0 or one.retries < 0
            assert list(one.subrefs) is not None
        return stored

    return asyncio.run(run())


@pytest.mark.parametrize("handler", ["reconcile_component", "apply_retention"])
@pytest.mark.parametrize("value", list(UNUSABLE.values()), ids=list(UNUSABLE))
def test_an_unusable_progress_annotation_is_ignored_not_raised(handler: str, value: str) -> None:
    settings = _settings()
    state = _use(_body({PREFIX + handler: value}), settings.persistence.progress_storage)
    assert handler not in state  # as if absent: the handler runs afresh


def test_a_record_kopf_wrote_is_read_back_unchanged() -> None:
    async def written() -> dict[str, Any]:
        basetime = progression._get_basetime()
        one = progression.HandlerState.from_scratch(basetime=basetime, purpose="update")
        one = one.with_outcome(execution.Outcome(final=False, delay=30.0, exception=RuntimeError()))
        return dict(one.for_storage())

    record: Any = {k: v for k, v in asyncio.run(written()).items() if v is not None}
    assert {"started", "delayed", "retries", "purpose"} <= set(record)
    retries = record["retries"]
    storage = _settings().persistence.progress_storage
    key = kopf.HandlerId("reconcile_component")
    patch = kopf.Patch()
    storage.store(key=key, record=record, body=_body({}), patch=patch)
    body = _body(dict(patch["metadata"]["annotations"]))
    assert storage.fetch(key=key, body=body) == record
    read = _handler_state(_use(body, storage)[key])
    assert read.retries == retries == 1
    # The same record written by anyone else (here: without the seal) is none.
    assert storage.fetch(key=key, body=_body({PREFIX + key: json.dumps(record)})) is None


def test_a_status_record_is_not_honoured_either() -> None:
    """kopf no longer writes progress into the status, but reads it when no annotation is
    there: whoever may write the status could skip a handler with it."""
    status_record = {"started": "2026-01-01T00:00:00.000000+00:00", "success": True}
    storage = _settings().persistence.progress_storage
    for beside in ({}, {PREFIX + "reconcile_component": "[]"}):
        body = _body(beside, {"kopf": {"progress": {"reconcile_component": status_record}}})
        assert storage.fetch(key=kopf.HandlerId("reconcile_component"), body=body) is None


def test_the_warning_names_the_object_and_handler_never_the_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret_looking = '{"retries": "do-not-echo-me"}'
    storage = _settings().persistence.progress_storage
    with caplog.at_level(logging.WARNING, logger="defender_operator"):
        found = storage.fetch(
            key=kopf.HandlerId("reconcile_component"),
            body=_body({PREFIX + "reconcile_component": secret_looking}),
        )
    assert found is None
    assert "tenant-a/x" in caplog.text and "reconcile_component" in caplog.text
    assert "retries is not an integer" in caplog.text
    assert "do-not-echo-me" not in caplog.text
