"""kopf's handler progress records are honoured only when this operator process stored them.

Whoever may patch a DefenderComponent writes its annotations, kopf's progress records among
them (`kopf.zalando.org/<handler id>`). kopf skips a handler whose record says it succeeded or
failed, puts off one whose record is delayed, and then stores the diff base as if the change was
handled: the spec change is never reconciled. These tests run kopf's own processing of a change
(`process_changing_cause`, the operator's handlers with their ids and filters, the handler
functions replaced by a recorder) with the persistence the operator's startup configures."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

import kopf
import pytest
from kopf._cogs.structs import bodies, diffs, patches
from kopf._core.actions import lifecycles, loggers
from kopf._core.intents import causes, registries
from kopf._core.reactor import processing
from kopf._core.reactor.inventory import ResourceMemory

from defender_operator import _diffbase, _progress, handlers
from defender_operator._progress import SEAL, CheckedProgressStorage

RESOURCE = kopf.Resource(*handlers.RESOURCE)
RECONCILE = "kopf.zalando.org/reconcile_component"
RETENTION = "kopf.zalando.org/apply_retention"
Reason = causes.Reason

# Records an editor can write that kopf's own storage takes as "nothing to do (yet)".
PLANTED = {
    "success": '{"success": true}',
    "failure": '{"failure": true, "message": "x"}',
    "success-of-another-purpose": '{"purpose": "create", "success": true}',
    "delayed-to-2999": '{"delayed": "2999-01-01T00:00:00+00:00"}',
}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail = False


def _registry(rec: Recorder) -> registries.OperatorRegistry:
    """The operator's change handlers (ids, causes, `when` filters), their functions recorded."""
    registry = registries.OperatorRegistry()
    ours = kopf.get_default_registry()._changing.get_all_handlers()
    # Every registration: kopf's own lookup answers one per id (resume, create and update of
    # the reconcile share theirs).
    for handler in [h for h in ours if h.selector is not None and h.selector.check(RESOURCE)]:

        async def fn(*, _id: str = handler.id, **_: Any) -> None:
            rec.calls.append(_id)
            if rec.fail:
                raise kopf.TemporaryError("not now", delay=30.0)

        registry._changing.append(dataclasses.replace(handler, fn=fn))
    return registry


def _settings(storage: kopf.ProgressStorage | None = None) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    handlers.configure_persistence(settings)
    settings.persistence.diffbase_storage = _diffbase.PublishedDiffBase()
    if storage is not None:
        settings.persistence.progress_storage = storage
    return settings


def _raw(annotations: dict[str, str], uid: str = "u-1", retention: str = "Keep") -> dict[str, Any]:
    return {
        "apiVersion": "mldefender.io/v1alpha1",
        "kind": "DefenderComponent",
        "metadata": {"namespace": "tenant", "name": "fw", "uid": uid, "annotations": annotations},
        "spec": {"componentType": "firewall", "retention": retention, "config": {"v": 2}},
    }


def _process(
    raw: dict[str, Any], reason: causes.Reason, settings: kopf.OperatorSettings, rec: Recorder
) -> tuple[list[str], list[float], dict[str, Any]]:
    """kopf's handling of one change of `raw`: the handlers called, the delays, the patch."""

    async def run() -> tuple[list[str], list[float], dict[str, Any]]:
        rec.calls.clear()
        body = bodies.Body(raw)  # type: ignore[arg-type]
        patch = patches.Patch()
        cause = causes.ChangingCause(
            logger=loggers.LocalObjectLogger(body=body, settings=settings),
            indices={},
            resource=RESOURCE,
            patch=patch,
            body=body,
            memo=kopf.Memo(),  # type: ignore[arg-type]
            initial=reason == Reason.RESUME,
            reason=reason,
            diff=diffs.EMPTY,
            old={"spec": {"config": {"v": 1}}},
            new={"spec": {"config": {"v": 2}}},
        )
        delays = await processing.process_changing_cause(
            lifecycle=lifecycles.all_at_once,
            registry=_registry(rec),
            settings=settings,
            memory=ResourceMemory(),
            cause=cause,
        )
        written: dict[str, Any] = json.loads(json.dumps(patch))
        return list(rec.calls), list(delays), written

    return asyncio.run(run())


def _applied(raw: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`raw` after the annotations of kopf's merge patch."""
    out: dict[str, Any] = json.loads(json.dumps(raw))
    annotations = out["metadata"]["annotations"]
    for key, value in ((patch.get("metadata") or {}).get("annotations") or {}).items():
        if value is None:
            annotations.pop(key, None)
        else:
            annotations[key] = value
    return out


@pytest.mark.parametrize("reason", [Reason.CREATE, Reason.UPDATE, Reason.RESUME])
@pytest.mark.parametrize("record", PLANTED.values(), ids=PLANTED.keys())
def test_a_record_an_editor_wrote_does_not_skip_the_reconcile(
    record: str, reason: causes.Reason
) -> None:
    rec = Recorder()
    raw = _raw({RECONCILE: record})
    # The reproduction: kopf's own storage trusts it, and the change is skipped.
    calls, _, _ = _process(raw, reason, _settings(kopf.SmartProgressStorage()), rec)
    assert calls == []
    calls, delays, patch = _process(raw, reason, _settings(), rec)
    assert calls == ["reconcile_component"] and delays == []
    # kopf's write of the handled change removes it.
    assert patch["metadata"]["annotations"] == {RECONCILE: None}


def test_a_planted_record_of_the_purge_handler_does_not_skip_the_purge() -> None:
    rec = Recorder()
    raw = _raw({RETENTION: '{"success": true}'}, retention="Purge")
    raw["metadata"]["deletionTimestamp"] = "2026-12-06T00:00:00Z"
    raw["metadata"]["finalizers"] = [handlers.FINALIZER]
    calls, _, _ = _process(raw, Reason.DELETE, _settings(kopf.SmartProgressStorage()), rec)
    assert calls == []
    calls, _, _ = _process(raw, Reason.DELETE, _settings(), rec)
    assert calls == ["apply_retention"]


def test_a_record_this_process_stored_is_honoured_and_only_as_stored() -> None:
    rec = Recorder()
    settings = _settings()
    rec.fail = True
    calls, delays, patch = _process(_raw({}), Reason.UPDATE, settings, rec)
    assert calls == ["reconcile_component"] and 29.0 < delays[0] <= 30.0
    stored = json.loads(patch["metadata"]["annotations"][RECONCILE])
    assert stored["retries"] == 1 and isinstance(stored[SEAL], str)
    retrying = _applied(_raw({}), patch)
    # The next event of the same object: kopf waits for the delay, as it would with its own.
    calls, delays, patch = _process(retrying, Reason.UPDATE, settings, rec)
    assert calls == [] and 29.0 < delays[0] <= 30.0 and patch == {}

    def edited(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        raw: dict[str, Any] = json.loads(json.dumps(retrying))
        record = json.loads(raw["metadata"]["annotations"][RECONCILE])
        change(record)
        raw["metadata"]["annotations"][RECONCILE] = json.dumps(record)
        return raw

    def put_off(record: dict[str, Any]) -> None:
        record["delayed"] = "2999-01-01T00:00:00.000000+00:00"

    def unsealed(record: dict[str, Any]) -> None:
        del record[SEAL]

    def other_object(record: dict[str, Any]) -> None:
        pass

    copied = edited(other_object)
    copied["metadata"]["uid"] = "u-2"
    for raw in (edited(put_off), edited(unsealed), copied):
        calls, _, _ = _process(raw, Reason.UPDATE, settings, rec)
        assert calls == ["reconcile_component"]
    # Another process (the operator restarted) does not trust it either.
    calls, _, _ = _process(retrying, Reason.UPDATE, _settings(), rec)
    assert calls == ["reconcile_component"]


def test_the_create_path_writes_no_progress() -> None:
    """Issue #17: one API write per component until Ready. kopf stores the handler's record
    and purges it in the same patch: nothing of it is written, sealed or not."""
    rec = Recorder()
    for reason in (Reason.CREATE, Reason.UPDATE, Reason.RESUME):
        _, _, patch = _process(_raw({}), reason, _settings(), rec)
        assert "metadata" not in patch, patch


def test_a_sealed_record_reads_back_as_kopf_stored_it() -> None:
    storage = CheckedProgressStorage()
    record: Any = {"started": "2026-12-06T03:00:00.000000+00:00", "retries": 2, "success": False}
    body = kopf.Body(_raw({}))  # type: ignore[arg-type]
    patch = kopf.Patch()
    storage.store(key=kopf.HandlerId("reconcile_component"), record=record, body=body, patch=patch)
    raw = _raw({RECONCILE: patch["metadata"]["annotations"][RECONCILE]})
    assert (
        storage.fetch(key=kopf.HandlerId("reconcile_component"), body=kopf.Body(raw))  # type: ignore[arg-type]
        == record
    )
    assert storage.fetch(key=kopf.HandlerId("apply_retention"), body=kopf.Body(raw)) is None  # type: ignore[arg-type]


# --- records read as none: warned about once, removed in kopf's next write --------------------


def _warnings(caplog: pytest.LogCaptureFixture, handler: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "defender_operator.progress" and f"handler {handler} on" in r.getMessage()
    ]


@pytest.mark.parametrize("record", ['{"success": true}', "[]", "{not json"])
def test_a_record_of_a_handler_not_run_goes_with_the_retry_kopf_writes(record: str) -> None:
    """The delete handler's record on a live object: not run, so kopf itself purged it only
    once the change was handled; while the reconcile is retried, the retry's patch takes it."""
    rec = Recorder()
    rec.fail = True
    calls, _, patch = _process(_raw({RETENTION: record}), Reason.UPDATE, _settings(), rec)
    assert calls == ["reconcile_component"]
    annotations = patch["metadata"]["annotations"]
    assert annotations[RETENTION] is None
    assert SEAL in json.loads(annotations[RECONCILE])  # the retry itself is kept


def test_a_record_read_as_none_is_warned_about_once_per_object_and_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec = Recorder()
    rec.fail = True  # the reconcile is retried: kopf does not purge
    settings = _settings()
    with caplog.at_level(logging.WARNING, "defender_operator.progress"):
        # Twice the same event (as if the patch that removes it had not come back yet).
        for _ in range(2):
            _process(_raw({RETENTION: '{"success": true}'}), Reason.UPDATE, settings, rec)
        assert len(_warnings(caplog, "apply_retention")) == 1
        _process(_raw({RETENTION: '{"failure": true}'}), Reason.UPDATE, settings, rec)
        _process(_raw({RETENTION: '{"failure": true}'}, uid="u-2"), Reason.UPDATE, settings, rec)
    assert len(_warnings(caplog, "apply_retention")) == 3  # another value, another object
    assert "success" not in caplog.text and "failure" not in caplog.text


def test_an_object_kopf_purged_is_forgotten_and_the_memory_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_progress, "IGNORED_OBJECTS", 3)
    storage = CheckedProgressStorage()
    settings = _settings(storage)
    rec = Recorder()
    # Handled at once: kopf's purge removes the record, and the storage forgets the object.
    _, _, patch = _process(_raw({RETENTION: "[]"}), Reason.UPDATE, settings, rec)
    assert patch["metadata"]["annotations"] == {RETENTION: None}
    assert not storage._ignored
    rec.fail = True
    for uid in ("a", "b", "c", "d", "e"):
        _process(_raw({RETENTION: "[]"}, uid=uid), Reason.UPDATE, settings, rec)
    assert list(storage._ignored) == ["c", "d", "e"]
