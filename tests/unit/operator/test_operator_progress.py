"""kopf's progress storage without its copies (`_progress.LeanProgressStorage`): it clears
exactly what kopf's default storage clears, copies nothing when there is nothing to clear, and
is the storage the operator configures."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import kopf
import pytest

from defender_operator import _diffbase, handlers
from defender_operator._progress import LeanProgressStorage

SPEC = {"type": "firewall", "config": {"rules": [{"cidr": "10.0.0.0/8", "ports": [22, 443]}]}}
PREFIX = "kopf.zalando.org"

CASES: list[dict[str, Any]] = [
    {"spec": SPEC},
    {"spec": SPEC, "metadata": {"labels": {"app": "fw"}}},
    {"spec": SPEC, "metadata": {"annotations": {"team": "net"}, "labels": {"a": "b"}}},
    # kopf's own records, in annotations or in status
    {"spec": SPEC, "metadata": {"annotations": {f"{PREFIX}/reconcile": '{"retries": 1}'}}},
    {"spec": SPEC, "metadata": {"annotations": {f"{PREFIX}/x": "1", "team": "net"}}},
    {"spec": SPEC, "status": {"kopf": {"progress": {"reconcile": {"retries": 2}}}}},
    {"spec": SPEC, "status": {"kopf": {"progress": {}}, "phase": "x"}},
    {"spec": SPEC, "status": {"kopf": {"dummy": "y"}}},
    {"spec": SPEC, "status": {"kopf": "odd"}},
    {"spec": SPEC, "status": {"phase": "x"}},
    # empty stanzas kopf prunes
    {"spec": SPEC, "metadata": {}},
    {"spec": SPEC, "metadata": {"annotations": {}}},
    {"spec": SPEC, "metadata": {"labels": {}, "annotations": {"a": "b"}}},
    {"spec": SPEC, "status": {}},
    # a prefix-like annotation that is not kopf's
    {"spec": SPEC, "metadata": {"annotations": {f"{PREFIX}.other/x": "1"}}},
    {},
]


@pytest.mark.parametrize("essence", CASES)
def test_it_clears_what_kopf_s_default_storage_clears(essence: dict[str, Any]) -> None:
    def outcome(storage: kopf.ProgressStorage) -> Any:
        try:
            return storage.clear(essence=copy.deepcopy(essence))  # type: ignore[arg-type]
        except Exception as exc:  # an odd shape kopf fails on: ours fails alike
            return type(exc)

    assert outcome(LeanProgressStorage()) == outcome(kopf.SmartProgressStorage())


@pytest.mark.parametrize("essence", CASES)
def test_what_it_clears_is_a_copy_and_the_essence_it_was_given_is_untouched(
    essence: dict[str, Any],
) -> None:
    given = copy.deepcopy(essence)
    try:
        cleared = LeanProgressStorage().clear(essence=given)  # type: ignore[arg-type]
    except TypeError:
        return  # kopf's own clear failed on an odd shape (the case above compares)
    assert given == essence
    if cleared != essence:
        assert cleared is not given


def test_an_essence_with_nothing_to_clear_is_returned_without_a_copy() -> None:
    essence = {"spec": SPEC, "metadata": {"labels": {"app": "fw"}}}
    assert LeanProgressStorage().clear(essence=essence) is essence  # type: ignore[arg-type]


def test_a_storage_of_another_kind_gets_kopf_s_clear() -> None:
    class Odd(kopf.ProgressStorage):
        def fetch(self, **_: Any) -> None:
            return None

        def store(self, **_: Any) -> None:
            pass

        def purge(self, **_: Any) -> None:
            pass

        def touch(self, **_: Any) -> None:
            pass

        def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
            cleared = dict(essence)
            cleared.pop("spec", None)
            return cleared  # type: ignore[return-value]

    lean = LeanProgressStorage()
    lean.storages = [*lean.storages, Odd()]
    assert LeanProgressStorage.clear(lean, essence={"spec": SPEC}) == {}  # type: ignore[typeddict-item]


def test_the_essence_of_a_real_event_has_nothing_to_clear() -> None:
    # What kopf clears at every event: the diff base built from the object and the one
    # fetched from its status. Neither carries progress records (the operator keeps none
    # there), so neither is copied.
    body = kopf.Body(
        {
            "apiVersion": "defender.example/v1",
            "kind": "DefenderComponent",
            "metadata": {"name": "fw", "uid": "u-1", "labels": {"app": "fw"}},
            "spec": SPEC,
            "status": {"observedGeneration": 1},
        }
    )
    new = _diffbase.DIFFBASE.build(body=body)
    assert LeanProgressStorage().clear(essence=new) is new


def test_the_operator_configures_it_first_thing_at_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = kopf.OperatorSettings()
    handlers.configure_kopf(settings)
    assert isinstance(settings.persistence.progress_storage, LeanProgressStorage)
    assert settings.persistence.diffbase_storage is _diffbase.DIFFBASE
    seen: list[kopf.OperatorSettings] = []

    def configured(given: kopf.OperatorSettings) -> None:
        seen.append(given)
        raise RuntimeError("enough")

    monkeypatch.setattr(handlers, "configure_kopf", configured)
    fresh = kopf.OperatorSettings()
    with pytest.raises(RuntimeError, match="enough"):
        asyncio.run(handlers.startup(settings=fresh, memo=kopf.Memo()))
    assert seen == [fresh]
