"""kopf's progress annotations (`kopf.zalando.org/<handler id>`), as whoever may patch a
DefenderComponent writes them: kopf reads them before any handler of every change, in the
object's worker, where an exception stops the operator. A record kopf could not use is read
as none (`_progress.CheckedProgressStorage`), a deep one is cut (`_deep_json.install`)."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace
from typing import Any

import kopf
import kopf._cogs.configs.progress as kopf_progress
import pytest
from kopf._core.actions import progression
from kopf._core.actions.execution import Outcome

from defender_operator import _deep_json
from defender_operator._progress import CheckedProgressStorage, unusable

KEY = "reconcile_component"
ANNOTATION = f"kopf.zalando.org/{KEY}"
SECRET = "s3cret-in-the-annotation"
STARTED = "2026-12-06T03:00:00.000000+00:00"


def _body(value: str | None = None, **status: Any) -> kopf.Body:
    annotations = {} if value is None else {ANNOTATION: value}
    return kopf.Body(
        {
            "metadata": {"name": "fw", "namespace": "ns", "annotations": annotations},
            "status": status,
        }
    )


def _state(storage: kopf.ProgressStorage, body: kopf.Body) -> Any:
    """What kopf computes from the stored progress around the handler of a change: before
    it (whether it is due), after it (an outcome, a retry, and the record stored)."""

    async def compute() -> Any:
        handler: Any = SimpleNamespace(id=KEY)
        state = progression.State.from_storage(body=body, storage=storage, handlers=[handler])
        # Handlers of other causes stay passive, counted by the purpose they were run for.
        extras = state.with_purpose("update").extras
        assert all(isinstance(purpose, str) for purpose in extras)
        state = state.with_purpose("update").with_handlers([handler])
        before = state.done, list(state.delays), state.counts, state[KEY].runtime
        retried = state.with_outcomes({KEY: Outcome(final=False, delay=1.0, subrefs=["sub"])})
        retried.store(body=body, patch=kopf.Patch(), storage=storage)
        return before

    return asyncio.run(compute())


DEEP = '{"n":' * 5000 + "1" + "}" * 5000
BAD = {
    "a list nested 5,000 deep": "[" * 5000 + "]" * 5000,
    "not JSON": f"not json {SECRET}",
    "a list": f'["{SECRET}"]',
    "a string": f'"{SECRET}"',
    "a time that is an object": '{"started": {"a": 1}}',
    "a time that is no time": f'{{"started": "{SECRET}"}}',
    "a time without a zone": '{"delayed": "2026-12-06T03:00:00"}',
    "a count that is text": '{"started": "' + STARTED + '", "retries": "3"}',
    "a purpose that is a list": '{"purpose": ["update"]}',
    "sub-handlers that are objects": '{"subrefs": [{"a": 1}]}',
}


@pytest.mark.parametrize("value", BAD.values(), ids=BAD.keys())
def test_a_record_kopf_cannot_use_is_read_as_none_and_the_handler_runs(
    value: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kopf_progress, "json", json)
    _deep_json.install()
    storage = CheckedProgressStorage()
    with caplog.at_level(logging.WARNING, "defender_operator.progress"):
        assert storage.fetch(key=KEY, body=_body(value)) is None
    (warning,) = caplog.records
    message = warning.getMessage()
    done, delays, counts, _ = _state(storage, _body(value))
    assert not done and delays == [0] and counts.running == 1
    assert f"handler {KEY} on ns/fw cannot be used" in message
    assert SECRET not in message and "{" not in message


def test_kopfs_own_storage_stops_on_them_which_is_what_stopped_the_operator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reproduction: kopf's default storage (what the operator used) raises on each,
    in the worker that kopf then takes down with the operator."""
    monkeypatch.setattr(kopf_progress, "json", json)
    for value in [DEEP, *BAD.values()]:
        with pytest.raises((RecursionError, ValueError, TypeError, AttributeError)):
            _state(kopf.SmartProgressStorage(), _body(value))


def test_a_record_nested_thousands_deep_is_cut_and_the_handler_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cut by kopf's decoder (`_deep_json.install`): an object whose fields are none kopf
    knows, and without the operator's seal, so no record: the handler runs."""
    monkeypatch.setattr(kopf_progress, "json", json)
    _deep_json.install()
    storage = CheckedProgressStorage()
    assert storage.fetch(key=KEY, body=_body(DEEP)) is None
    done, delays, counts, _ = _state(storage, _body(DEEP))
    assert not done and delays == [0] and counts.running == 1


def test_records_kopf_writes_are_read_as_kopf_reads_them() -> None:
    storage = CheckedProgressStorage()

    async def stored(state: progression.HandlerState) -> kopf.Body:
        patch = kopf.Patch()
        storage.store(key=KEY, record=state.for_storage(), body=_body(), patch=patch)
        return _body(patch["metadata"]["annotations"][ANNOTATION])

    async def records() -> list[tuple[kopf.ProgressRecord | None, Any]]:
        basetime = progression._get_basetime()
        fresh = progression.HandlerState.from_scratch(basetime=basetime, purpose="update")
        failed = fresh.with_outcome(
            SimpleNamespace(final=False, delay=30.0, exception=ValueError("x"), subrefs=["a/b"])  # type: ignore[arg-type]
        )
        out = []
        for state in (fresh, failed):
            body = await stored(state)
            out.append((storage.fetch(key=KEY, body=body), state.as_in_storage()))
        return out

    for got, written in asyncio.run(records()):
        assert got == written
    assert storage.fetch(key=KEY, body=_body()) is None
    done, delays, _, _ = _state(storage, _body(json.dumps({"started": STARTED, "retries": 2})))
    assert not done and delays == [0]


def test_what_makes_a_record_unusable() -> None:
    assert unusable({}) is None
    assert unusable({"unknown": [1, {"x": None}], "retries": 0, "success": True}) is None
    assert (
        unusable({"started": STARTED, "stopped": None, "subrefs": ["h/sub-1", "h.<locals>"]})
        is None
    )
    assert unusable([]) == "JSON list, not an object"
    assert unusable({"retries": True}) == "retries is not an integer"
    assert unusable({"stopped": "2026-13-01T00:00:00+00:00"}) == "stopped is not an ISO 8601 time"
    assert unusable({"purpose": ["update"]}) == "purpose is not a string"
    # kopf converts these itself.
    assert unusable({"success": "yes", "failure": 0, "message": 5}) is None
    # kopf would make an annotation key of each sub-handler id when it purges the record: one
    # the API server refuses would fail that patch at every change of the object.
    assert unusable({"subrefs": ["a b"]}) == "subrefs is not a list of handler ids"
    assert unusable({"subrefs": "h/sub"}) == "subrefs is not a list of handler ids"
