"""Which resources the operator finalizes itself while the CRD is being deleted."""

from __future__ import annotations

from typing import Any

from defender_operator._decisions.crd_deletion import crd_deleting, held_by_retention

FIN = "mldefender.io/retention"


def _item(name: str, *, deleting: bool, finalizers: list[str]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "namespace": "ns",
        "name": name,
        "uid": f"uid-{name}",
        "resourceVersion": "7",
        "finalizers": finalizers,
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"retention": "Purge"}}


def test_a_crd_is_deleting_only_with_a_deletion_timestamp() -> None:
    assert not crd_deleting(None)
    assert not crd_deleting({"metadata": {"name": "x"}})
    assert crd_deleting({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}})


def test_nothing_is_finalized_here_while_the_crd_stays() -> None:
    items = [_item("a", deleting=True, finalizers=[FIN])]
    assert held_by_retention(False, items, FIN) == []


def test_only_resources_being_deleted_that_carry_the_finalizer_are_finalized() -> None:
    items = [
        _item("held", deleting=True, finalizers=["other.io/x", FIN]),
        _item("live", deleting=False, finalizers=[FIN]),
        _item("keep", deleting=True, finalizers=[]),
        _item("foreign", deleting=True, finalizers=["other.io/x"]),
    ]
    held = held_by_retention(True, items, FIN)
    assert [h.name for h in held] == ["held"]
    assert (held[0].uid, held[0].resource_version) == ("uid-held", "7")
    # Another controller's finalizer stays.
    assert held[0].remaining(FIN) == ["other.io/x"]
