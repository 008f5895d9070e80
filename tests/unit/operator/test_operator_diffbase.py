"""kopf's diff base travels in the reconcile's status patch (status.lastHandledDigest), as a
digest: kopf's own store is skipped only for the exact value the reconcile published for that
object, kopf reads back "unchanged" for the essence published and "changed" for any other, an
earlier operator's JSON (status.lastHandledConfiguration) is still read and then removed, and
an operator rolled back to that version does not fail on what this one wrote (no cluster)."""

from __future__ import annotations

import json
from typing import Any

import kopf
import pytest

from defender_operator import handlers
from defender_operator._diffbase import CHANGED, FIELD, LEGACY_FIELD, PublishedDiffBase


def body(uid: str = "u-1", interface: str = "eth0") -> dict[str, Any]:
    return {
        "apiVersion": "mldefender.io/v1alpha1",
        "kind": "DefenderComponent",
        "metadata": {"name": "sniffer", "namespace": "ns", "uid": uid, "labels": {"a": "b"}},
        "spec": {"componentType": "sniffer", "config": {"interface": interface}},
        "status": {"activeVersion": 1},
    }


def stored_by_kopf(storage: PublishedDiffBase, b: dict[str, Any]) -> dict[str, Any]:
    patch = kopf.Patch()
    storage.store(body=kopf.Body(b), patch=patch, essence=storage.build(body=kopf.Body(b)))
    return dict(patch)


def test_a_published_value_costs_kopf_no_write_and_reads_back_as_the_diff_base() -> None:
    storage = PublishedDiffBase()
    b = body()
    value = storage.encoded(kopf.Body(b))
    storage.published(b, value)
    assert stored_by_kopf(storage, b) == {}
    # What the reconcile wrote is what kopf compares the next event against: no diff.
    b["status"][FIELD] = value
    assert storage.fetch(body=kopf.Body(b)) == storage.build(body=kopf.Body(b))


def test_an_event_older_than_the_reconciles_patch_is_no_change() -> None:
    # kopf only waits for its own patches to come back: an event from before the reconcile's
    # status patch still carries the previous diff base beside the spec just handled.
    storage = PublishedDiffBase()
    old, new = body(interface="eth0"), body(interface="eth1")
    storage.published(old, storage.encoded(kopf.Body(old)))
    stale = body(interface="eth1")
    stale["status"][FIELD] = storage.encoded(kopf.Body(old))
    storage.published(new, storage.encoded(kopf.Body(new)))
    assert storage.fetch(body=kopf.Body(stale)) == storage.build(body=kopf.Body(new))


def test_after_a_restart_the_status_says_what_was_handled() -> None:
    before = PublishedDiffBase()
    b = body()
    b["status"][FIELD] = before.encoded(kopf.Body(b))
    after = PublishedDiffBase()
    assert after.fetch(body=kopf.Body(b)) == after.build(body=kopf.Body(b))
    assert after.fetch(body=kopf.Body(body(uid="u-9"))) is None


def test_kopf_writes_what_was_not_published_and_remembers_it() -> None:
    storage = PublishedDiffBase()
    # Nothing published (a handler kopf gives up on stores its diff base itself).
    b = body()
    assert FIELD in stored_by_kopf(storage, b)["status"]
    assert storage.fetch(body=kopf.Body(body())) == storage.build(body=kopf.Body(b))
    # Published for another spec than kopf now stores: kopf's value wins.
    old = body(interface="eth0")
    storage.published(old, storage.encoded(kopf.Body(old)))
    written = stored_by_kopf(storage, body(interface="eth1"))["status"][FIELD]
    assert written == storage.encoded(kopf.Body(body(interface="eth1")))
    # Published for another object: not this one's.
    storage.published(body(uid="u-2"), storage.encoded(kopf.Body(body(uid="u-2"))))
    assert FIELD in stored_by_kopf(storage, body(uid="u-3"))["status"]
    # A deleted object is forgotten.
    storage.forget(body(uid="u-2"))
    assert storage.fetch(body=kopf.Body(body(uid="u-2"))) is None


def test_the_status_itself_is_not_part_of_the_diff_base() -> None:
    storage = PublishedDiffBase()
    a, b = body(), body()
    b["status"] = {"activeVersion": 9, FIELD: "{}"}
    assert storage.encoded(kopf.Body(a)) == storage.encoded(kopf.Body(b))


def test_the_essence_is_kopfs_own_built_without_copying_status_and_system_metadata() -> None:
    b = body()
    b["metadata"].update(
        {
            "annotations": {
                "mldefender.io/rollback": "master",
                "kopf.zalando.org/last-handled-configuration": "{}",
                "kubectl.kubernetes.io/last-applied-configuration": "{...}",
            },
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
            "generation": 4,
            "resourceVersion": "77",
        }
    )
    b["status"].update({FIELD: "{}", "conditions": [{"type": "Ready", "status": "True"}]})
    kopfs = kopf.StatusDiffBaseStorage(field=f"status.{FIELD}")
    ours = PublishedDiffBase().build(body=kopf.Body(b))
    assert ours == kopfs.build(body=kopf.Body(b))
    assert ours["metadata"]["annotations"] == {"mldefender.io/rollback": "master"}
    assert "status" not in ours and "managedFields" not in ours["metadata"]
    # A field handler's extra fields (none of ours asks) go kopf's whole way.
    extra = [("status", "activeVersion")]
    assert PublishedDiffBase().build(body=kopf.Body(b), extra_fields=extra) == kopfs.build(
        body=kopf.Body(b), extra_fields=extra
    )


def test_the_stored_value_is_a_digest_not_the_spec() -> None:
    storage = PublishedDiffBase()
    b = body(interface="a-long-interface-name")
    value = stored_by_kopf(storage, b)["status"][FIELD]
    assert value.startswith("sha256:") and len(value) == len("sha256:") + 64
    assert "interface" not in value
    # Deterministic: a new operator (after a restart) computes the same digest.
    assert PublishedDiffBase().encoded(kopf.Body(b)) == value


@pytest.mark.parametrize(
    "edit",
    [
        lambda b: b["spec"]["config"].update(interface="eth9"),
        lambda b: b["metadata"]["labels"].update(a="c"),
        lambda b: b["metadata"].setdefault("annotations", {}).update({"x/y": "1"}),
        lambda b: b["spec"].pop("config"),
    ],
)
def test_any_change_to_the_essence_reads_back_as_changed(edit: Any) -> None:
    # After a restart (nothing remembered), from the status alone.
    b = body()
    b["status"][FIELD] = PublishedDiffBase().encoded(kopf.Body(b))
    edit(b)
    storage = PublishedDiffBase()
    old = storage.fetch(body=kopf.Body(b))
    assert old == CHANGED
    assert old != storage.build(body=kopf.Body(b))


def test_a_change_after_a_published_value_reads_back_as_changed() -> None:
    storage = PublishedDiffBase()
    b = body()
    storage.published(b, storage.encoded(kopf.Body(b)))
    assert storage.fetch(body=kopf.Body(body(interface="eth7"))) == CHANGED


def test_an_earlier_operators_json_is_still_the_diff_base() -> None:
    # Objects reconciled by an operator that kept the essence itself: unchanged stays
    # unchanged (no second reconcile at the upgrade), a change is seen as one.
    storage = PublishedDiffBase()
    b = body()
    b["status"][LEGACY_FIELD] = _legacy_json(b)
    assert storage.fetch(body=kopf.Body(b)) == storage.build(body=kopf.Body(b))
    edited = body(interface="eth3")
    edited["status"][LEGACY_FIELD] = b["status"][LEGACY_FIELD]
    assert storage.fetch(body=kopf.Body(edited)) != storage.build(body=kopf.Body(edited))
    # The digest, once written, is what counts.
    edited["status"][FIELD] = storage.encoded(kopf.Body(edited))
    assert storage.fetch(body=kopf.Body(edited)) == storage.build(body=kopf.Body(edited))


def _legacy_json(b: dict[str, Any]) -> str:
    return json.dumps(PublishedDiffBase().build(body=kopf.Body(b)), separators=(",", ":"))


def test_the_earlier_json_is_removed_when_the_digest_is_written() -> None:
    storage = PublishedDiffBase()
    b = body()
    assert storage.handled_fields(b, storage.build(body=kopf.Body(b))) == {
        FIELD: storage.encoded(kopf.Body(b))
    }
    b["status"][LEGACY_FIELD] = _legacy_json(b)
    assert storage.handled_fields(b, storage.build(body=kopf.Body(b))) == {
        FIELD: storage.encoded(kopf.Body(b)),
        LEGACY_FIELD: None,
    }
    # kopf's own store (nothing published) removes it too.
    assert stored_by_kopf(PublishedDiffBase(), b)["status"] == {
        FIELD: storage.encoded(kopf.Body(b)),
        LEGACY_FIELD: None,
    }


@pytest.mark.parametrize("value", ["{not json", "[1, 2]", '"text"', "", 7])
def test_an_unreadable_earlier_json_is_no_diff_base_not_a_failure(value: Any) -> None:
    # kopf then handles the object as new: one more reconcile, never an error at every event.
    b = body()
    b["status"][LEGACY_FIELD] = value
    assert PublishedDiffBase().fetch(body=kopf.Body(b)) is None


def test_an_operator_rolled_back_to_the_json_finds_nothing_it_cannot_read() -> None:
    # The earlier operators' storage is kopf's own status storage on lastHandledConfiguration:
    # it parses that field as JSON at every event. What this operator writes never goes there.
    earlier = kopf.StatusDiffBaseStorage(field=f"status.{LEGACY_FIELD}")
    b = body()
    written = stored_by_kopf(PublishedDiffBase(), b)["status"]
    b["status"].update({k: v for k, v in written.items() if v is not None})
    assert earlier.fetch(body=kopf.Body(b)) is None  # no diff base: reconciled once more
    b["status"].update(
        PublishedDiffBase().handled_fields(b, PublishedDiffBase().build(body=kopf.Body(b)))
    )
    assert earlier.fetch(body=kopf.Body(b)) is None


def test_an_empty_status_field_is_no_diff_base() -> None:
    b = body()
    b["status"][FIELD] = ""
    assert PublishedDiffBase().fetch(body=kopf.Body(b)) is None


def test_no_handler_of_the_operator_names_fields() -> None:
    # The digest is of the essence built without extra fields: a handler with `field=` would
    # make kopf store a digest of a larger essence, and every event would read as a change.
    registry = kopf.get_default_registry()
    resource = kopf.Resource(*handlers.RESOURCE, namespaced=True)
    assert registry._changing.has_handlers(resource=resource)  # the lookup finds ours
    for kind in (registry._watching, registry._changing, registry._spawning):
        assert not kind.get_extra_fields(resource=resource)


def test_a_pods_essence_is_empty_and_costs_no_copy() -> None:
    # kopf builds an essence for every watched object; only a DefenderComponent's is read.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "uid": "p-1", "labels": {"a": "b"}},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    }
    storage = PublishedDiffBase()
    assert storage.build(body=kopf.Body(pod)) == {}
    assert storage.fetch(body=kopf.Body(pod)) is None
    # A body without a kind (never from kopf, which sets it on listed objects) is not skipped.
    kindless = body()
    del kindless["kind"]
    assert storage.build(body=kopf.Body(kindless))["spec"] == kindless["spec"]


def test_the_essence_fetch_built_is_reused_only_for_the_same_event() -> None:
    storage = PublishedDiffBase()
    b = body()
    b["metadata"]["resourceVersion"] = "1"
    b["status"][FIELD] = storage.encoded(kopf.Body(b))
    live = kopf.Body(b)
    old = storage.fetch(body=live)
    assert storage.build(body=live) is old  # kopf's build right after: the same event
    # kopf reuses one body object for a daemon's component across events: a later event's
    # build must see the later content, even if a fetch was not followed by a build.
    storage.fetch(body=live)
    b["spec"]["config"]["interface"] = "eth5"
    b["metadata"]["resourceVersion"] = "2"
    assert storage.build(body=live)["spec"]["config"]["interface"] == "eth5"
    # And once used, the kept essence is gone.
    storage.fetch(body=live)
    storage.build(body=live)
    b["spec"]["config"]["interface"] = "eth6"
    assert storage.build(body=live)["spec"]["config"]["interface"] == "eth6"
