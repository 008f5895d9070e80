"""One DefenderComponent per etcd name: a resource of the same name in another namespace is
refused and writes nothing (issue 16, point 1), the owner's delete-and-recreate and the
retention policies move the claim as docs/operator.md says, and data from before claims is
adopted. Against the real control plane and defender etcd."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from operator_e2e_support import SAMPLES, SECRET, OperatorRun, extra_namespace, wait_for

from defender_config import (
    REGISTRATIONS_FILE,
    ConfigStore,
    DefenderConfigError,
    Layout,
    RegistrationReplayError,
    contract,
    parse_registrations,
    validate_config,
)
from defender_config.store import EtcdStore

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]

NAME = "firewall"
FAST = {
    "heartbeat": {"intervalSeconds": 1, "missedBeforeRestart": 3, "startupGraceSeconds": 2},
    "restartBudget": {"maxRestarts": 3, "windowSeconds": 600, "backoffBaseSeconds": 1},
}


@pytest.fixture
def other_namespace(operator_run: OperatorRun) -> Iterator[str]:
    """A second namespace the operator also watches (start it with ``-n`` of it)."""
    with extra_namespace(operator_run, "t-other") as name:
        yield name


def _sample(**config: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((SAMPLES / f"{NAME}.yaml").read_text())
    doc["spec"]["config"].update(config)
    return doc


def _create(run: OperatorRun, namespace: str, doc: dict[str, Any]) -> None:
    run.custom.create_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, namespace, contract.PLURAL, doc
    )


def _get(run: OperatorRun, namespace: str) -> dict[str, Any]:
    obj: Any = run.custom.get_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, namespace, contract.PLURAL, NAME
    )
    return dict(obj)


def _condition(run: OperatorRun, namespace: str, ctype: str) -> dict[str, Any] | None:
    for c in _get(run, namespace).get("status", {}).get("conditions", []):
        if c["type"] == ctype:
            return dict(c)
    return None


def _wait_conflict(run: OperatorRun, namespace: str, reason: str) -> dict[str, Any]:
    def conflict() -> dict[str, Any] | None:
        c = _condition(run, namespace, "Conflict")
        return c if c and (c["status"], c["reason"]) == ("True", reason) else None

    return wait_for(f"{namespace}/{NAME} Conflict {reason}", conflict)


def _event_reasons(run: OperatorRun, namespace: str) -> dict[str, str]:
    found = run.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={NAME}")
    return {e.reason: e.type for e in found.items}


def _wait_event(run: OperatorRun, namespace: str, reason: str) -> str:
    return wait_for(
        f"{reason} event in {namespace}", lambda: _event_reasons(run, namespace).get(reason)
    )


def _delete(run: OperatorRun, namespace: str) -> None:
    run.custom.delete_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, namespace, contract.PLURAL, NAME
    )

    def gone() -> bool:
        try:
            _get(run, namespace)
        except k8s.ApiException as exc:
            return exc.status == 404
        return False

    wait_for(f"{namespace}/{NAME} deleted", gone)


_STORES: dict[str, EtcdStore] = {}


def _store(run: OperatorRun) -> EtcdStore:
    """One client per run with the operator's keyring (the namespace copy may not exist)."""
    if run.prefix not in _STORES:
        _STORES[run.prefix] = run.client(run.operator_keyring()).store
    return _STORES[run.prefix]


def _owner(run: OperatorRun) -> dict[str, Any] | None:
    stored = _store(run).get(f"{run.prefix}/control/{NAME}/owner")
    return None if stored is None else dict(json.loads(stored.value))


def _etcd_snapshot(run: OperatorRun) -> dict[str, int]:
    """Every key under the run's prefix with its mod revision: any write changes it."""
    return {sv.key: sv.mod_revision for sv in _store(run).list_prefix(run.prefix + "/")}


def test_same_name_in_another_namespace_is_refused_and_writes_nothing(
    operator_run: OperatorRun, other_namespace: str
) -> None:
    # The measured takeover: the samples in one namespace, a `firewall` that allows everything
    # in a second one, both watched by one operator.
    run = operator_run
    run.start("-n", other_namespace)
    run.apply_sample(NAME)
    run.wait_active_version(NAME, 1)
    run.wait_condition(NAME, "ConfigSynced", status="True", reason="Committed")
    owner = _owner(run)
    assert owner is not None
    assert (owner["namespace"], owner["name"], owner["uid"], owner["released"]) == (
        run.namespace,
        NAME,
        run.get(NAME)["metadata"]["uid"],
        False,
    )
    etcd_before = _etcd_snapshot(run)
    owner_before = run.get(NAME)["status"]
    owner_events = _event_reasons(run, run.namespace)

    # Heartbeat settings under which an owner would restart a silent pod within seconds.
    intruder = _sample(default_policy="allow", block_ttl_seconds=7)
    intruder["spec"].update(FAST)
    _create(run, other_namespace, intruder)
    pod = _silent_pod(run, other_namespace)
    created = time.monotonic()
    conflict = _wait_conflict(run, other_namespace, "NameClaimedElsewhere")
    assert f"{run.namespace}/{NAME}" in conflict["message"]
    assert _wait_event(run, other_namespace, "NameClaimedElsewhere") == "Warning"
    ready = _condition(run, other_namespace, "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == (
        "False",
        "NameClaimedElsewhere",
    )
    # An edit of the refused resource is refused the same way.
    _set_ttl(run, other_namespace, 8)
    wait_for(
        "the edit handled",
        lambda: _condition(run, other_namespace, "Conflict")["observedGeneration"] == 2,  # type: ignore[index]
    )
    # Several monitor passes (1 s), and past the grace + threshold after which an owner would
    # restart the pod that never heartbeats (pods never run here).
    time.sleep(max(3.0, 15.0 - (time.monotonic() - created)))
    # The monitor judged nothing for the refused resource: its pod was not restarted.
    names = [p.metadata.name for p in run.core.list_namespaced_pod(other_namespace).items]
    assert names == [pod]
    assert "PodRestarted" not in _event_reasons(run, other_namespace)
    assert "restarts" not in _get(run, other_namespace).get("status", {})

    # Nothing was written by the second resource: no etcd key changed ...
    assert _etcd_snapshot(run) == etcd_before
    active = run.configs().get_active(NAME)
    assert active.version == 1 and active.config["default_policy"] == "deny"
    # ... no keyring copy went to its namespace ...
    with pytest.raises(k8s.ApiException) as info:
        run.core.read_namespaced_secret(SECRET, other_namespace)
    assert info.value.status == 404
    # ... and the owner's status and Events are as they were: nothing blames another cause.
    owner_after = run.get(NAME)["status"]
    for field in ("activeVersion", "activeDigest", "specConfigDigest", "conditions"):
        assert owner_after.get(field) == owner_before.get(field), field
    assert _event_reasons(run, run.namespace) == owner_events
    assert "Conflict" not in {c["type"] for c in owner_after["conditions"]}

    # Deleting the refused resource with retention Purge purges nothing of the owner's.
    _patch(run, other_namespace, {"spec": {"retention": "Purge"}})
    _delete(run, other_namespace)
    assert _etcd_snapshot(run) == etcd_before
    assert _owner(run) == owner


def _silent_pod(run: OperatorRun, namespace: str) -> str:
    """A Deployment of the firewall labels in `namespace`; its pod never heartbeats."""
    run.deployment(NAME, {"app.kubernetes.io/name": NAME}, namespace=namespace)
    pods = wait_for(f"a pod in {namespace}", lambda: run.core.list_namespaced_pod(namespace).items)
    return str(pods[0].metadata.name)


def _patch(run: OperatorRun, namespace: str, body: dict[str, Any]) -> None:
    run.custom.patch_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, namespace, contract.PLURAL, NAME, body
    )


def _set_ttl(run: OperatorRun, namespace: str, ttl: int) -> None:
    _patch(run, namespace, {"spec": {"config": _sample(block_ttl_seconds=ttl)["spec"]["config"]}})


def test_recreate_keep_and_adopt_move_the_claim_as_documented(
    operator_run: OperatorRun, other_namespace: str
) -> None:
    run = operator_run
    run.start("-n", other_namespace)
    run.apply_sample(NAME)  # retention Keep
    run.wait_active_version(NAME, 1)
    first_uid = run.get(NAME)["metadata"]["uid"]

    # Keep: the data stays, the claim is released but still names the old owner.
    _delete(run, run.namespace)
    wait_for("claim released", lambda: (_owner(run) or {}).get("released") is True)
    assert (_owner(run) or {})["uid"] == first_uid
    assert run.configs().get_active(NAME).version == 1

    # Another namespace may not take kept data without saying so.
    before = _etcd_snapshot(run)
    _create(run, other_namespace, _sample(block_ttl_seconds=7))
    conflict = _wait_conflict(run, other_namespace, "NameRetained")
    assert f"{contract.ADOPT_ANNOTATION}={run.namespace}/{NAME}" in conflict["message"]
    assert _etcd_snapshot(run) == before

    # The owner re-created under the same namespace/name (a new uid) takes its claim back.
    run.apply_sample(NAME)
    second_uid = run.get(NAME)["metadata"]["uid"]
    wait_for("claim taken back", lambda: (_owner(run) or {}).get("uid") == second_uid)
    assert (_owner(run) or {})["released"] is False
    run.wait_condition(NAME, "ConfigSynced", status="True")
    run.wait_event(NAME, "NameAdopted")

    # Released again; now the other namespace adopts it by the annotation naming the old owner.
    _delete(run, run.namespace)
    wait_for("claim released again", lambda: (_owner(run) or {}).get("released") is True)
    adopt = {contract.ADOPT_ANNOTATION: f"{run.namespace}/{NAME}"}
    _patch(run, other_namespace, {"metadata": {"annotations": adopt}})
    wait_for("adopted", lambda: (_owner(run) or {}).get("namespace") == other_namespace)
    wait_for("Conflict gone", lambda: _condition(run, other_namespace, "Conflict") is None)
    expected = validate_config(NAME, _sample(block_ttl_seconds=7)["spec"]["config"])
    wait_for("its spec committed", lambda: run.configs().get_active(NAME).config == expected)
    synced = _condition(run, other_namespace, "ConfigSynced")
    assert synced is not None and synced["status"] == "True"


def test_a_keep_resource_goes_without_an_operator_and_its_data_is_adopted_only_by_annotation(
    operator_run: OperatorRun, other_namespace: str
) -> None:
    run = operator_run
    run.start("-n", other_namespace)
    run.apply_sample(NAME)  # retention Keep: no finalizer
    run.wait_active_version(NAME, 1)
    first_uid = run.get(NAME)["metadata"]["uid"]
    assert contract.FINALIZER not in (run.get(NAME)["metadata"].get("finalizers") or [])
    # No operator at all: the deletion does not wait for one, and nobody releases the claim.
    run.stop()
    _delete(run, run.namespace)
    owner = _owner(run) or {}
    assert (owner.get("uid"), owner.get("released")) == (first_uid, False)
    assert run.configs().get_active(NAME).version == 1

    # The API server no longer holds that owner: the data is retained, not held.
    run.start("-n", other_namespace)
    before = _etcd_snapshot(run)
    _create(run, other_namespace, _sample(block_ttl_seconds=7))
    conflict = _wait_conflict(run, other_namespace, "NameRetained")
    assert f"{contract.ADOPT_ANNOTATION}={run.namespace}/{NAME}" in conflict["message"]
    assert _etcd_snapshot(run) == before
    adopt = {contract.ADOPT_ANNOTATION: f"{run.namespace}/{NAME}"}
    _patch(run, other_namespace, {"metadata": {"annotations": adopt}})
    wait_for("adopted", lambda: (_owner(run) or {}).get("namespace") == other_namespace)
    expected = validate_config(NAME, _sample(block_ttl_seconds=7)["spec"]["config"])
    wait_for("its spec committed", lambda: run.configs().get_active(NAME).config == expected)


def test_a_keep_resource_from_an_older_operator_loses_its_finalizer_and_still_releases(
    operator_run: OperatorRun,
) -> None:
    # An older operator held every resource with the finalizer: after the upgrade a Keep
    # resource is let go (kopf removes the finalizer nothing needs) and its deletion still
    # releases the claim.
    run = operator_run
    doc = _sample()
    doc["metadata"]["finalizers"] = [contract.FINALIZER]
    _create(run, run.namespace, doc)
    run.start()
    run.wait_active_version(NAME, 1)
    wait_for(
        "the old finalizer removed",
        lambda: (
            contract.FINALIZER not in (_get(run, run.namespace)["metadata"].get("finalizers") or [])
        ),
    )
    _delete(run, run.namespace)
    wait_for("claim released", lambda: (_owner(run) or {}).get("released") is True)
    assert run.configs().get_active(NAME).version == 1


def test_data_from_before_claims_is_adopted_by_the_first_reconciler(
    operator_run: OperatorRun,
) -> None:
    run = operator_run
    run.start()
    # Seeded the way an older operator did: MASTER/ACTIVE/metadata and no owner record.
    configs = ConfigStore(run.client(run.operator_keyring()))
    configs.seed(NAME, validate_config(NAME, _sample()["spec"]["config"]), NAME, by="older")
    assert _owner(run) is None
    run.apply_sample(NAME)
    run.wait_condition(NAME, "ConfigSynced", status="True")
    owner = wait_for("claim recorded", lambda: _owner(run))
    assert (owner["namespace"], owner["uid"]) == (run.namespace, run.get(NAME)["metadata"]["uid"])
    meta = configs.get_metadata(NAME)
    assert meta is not None and (meta.version, meta.modified_by) == (1, "older")


def _alert_kinds(run: OperatorRun) -> list[str]:
    found = _store(run).list_prefix(f"{run.prefix}/alerts/{NAME}/")
    return [json.loads(a.value)["kind"] for a in found]


def test_a_saved_owner_record_put_back_does_not_move_the_name_to_its_old_namespace(
    operator_run: OperatorRun, other_namespace: str
) -> None:
    # docs/security.md, "Replays across a record's lifetime": etcd write access (no key) puts
    # back the authentic owner record of a purged owner. Kubernetes (the holder's status) says
    # who holds the name, so the current owner keeps it and the old namespace writes nothing.
    run = operator_run
    run.start("-n", other_namespace)
    key = f"{run.prefix}/control/{NAME}/owner"
    # The earlier owner: namespace X (other_namespace), retention Purge, a config of its own.
    x_doc = _sample(default_policy="allow", block_ttl_seconds=7)
    x_doc["spec"]["retention"] = "Purge"
    _create(run, other_namespace, x_doc)
    wait_for("X owns the name", lambda: (_owner(run) or {}).get("namespace") == other_namespace)
    wait_for("X seeded", lambda: _get(run, other_namespace).get("status", {}).get("activeVersion"))
    saved = _store(run).get(key)
    assert saved is not None
    _delete(run, other_namespace)  # Purge: the data and the record go
    assert _owner(run) is None

    # Namespace Y (run.namespace) claims the name since and runs its own config.
    run.apply_sample(NAME)
    run.wait_active_version(NAME, 1)
    run.wait_condition(NAME, "ConfigSynced", status="True")
    y_uid = run.get(NAME)["metadata"]["uid"]
    held = wait_for("Y holds the name by status", lambda: run.get(NAME)["status"].get("nameClaim"))
    assert held == {"component": NAME, "uid": y_uid}
    y_config = validate_config(NAME, _sample()["spec"]["config"])
    x_config = validate_config(NAME, x_doc["spec"]["config"])

    # The attack: X's saved authentic record put back with a raw etcd put, then X re-created.
    _store(run).put(key, saved.value)
    assert (_owner(run) or {}).get("namespace") == other_namespace
    _create(run, other_namespace, x_doc)

    def judged() -> dict[str, Any] | None:
        # X's visit is over once it is refused (Conflict) or has synced a config of its own.
        status = _get(run, other_namespace).get("status", {})
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        synced = conditions.get("ConfigSynced", {}).get("status")
        return conditions if "Conflict" in conditions or synced == "True" else None

    conditions = wait_for("X's claim decided", judged)
    # Nothing of X's config reached the name's keys: Y's config, at Y's version, everywhere.
    configs = run.configs()
    active = configs.get_active(NAME)
    assert x_config != y_config
    assert (active.version, active.config) == (1, y_config)
    assert configs.get_master(NAME) == y_config
    meta = configs.get_metadata(NAME)
    assert meta is not None and meta.version == 1
    # X is refused, the record names Y again, and a person is told (Event, alert).
    conflict = conditions["Conflict"]
    assert (conflict["status"], conflict["reason"]) == ("True", "NameClaimedElsewhere")
    assert f"{run.namespace}/{NAME}" in conflict["message"]
    owner = _owner(run) or {}
    assert (owner.get("namespace"), owner.get("uid"), owner.get("released")) == (
        run.namespace,
        y_uid,
        False,
    )
    assert _wait_event(run, other_namespace, "OwnerRecordRestored") == "Warning"
    assert "OwnerRecordRestored" in _alert_kinds(run)
    assert "nameClaim" not in _get(run, other_namespace).get("status", {})
    assert run.condition(NAME, "Conflict") is None

    # The replayed record's owner gone (X deleted again): Y, edited meanwhile, re-takes its
    # name without an adopt annotation and commits.
    _delete(run, other_namespace)
    _store(run).put(key, saved.value)
    _set_ttl(run, run.namespace, 9)
    run.wait_active_version(NAME, 2)
    assert configs.get_active(NAME).config["block_ttl_seconds"] == 9
    owner = _owner(run) or {}
    assert (owner.get("namespace"), owner.get("uid")) == (run.namespace, y_uid)
    run.wait_event(NAME, "OwnerRecordRestored")
    assert run.condition(NAME, "Conflict") is None


@pytest.mark.parametrize("forged", [False, True], ids=["garbled", "forged-unsigned"])
def test_an_unreadable_owner_record_refuses_every_claimant(
    operator_run: OperatorRun, forged: bool
) -> None:
    run = operator_run
    run.start()
    configs = ConfigStore(run.client(run.operator_keyring()))
    key = configs.client.layout.owner(NAME)
    if forged:
        # Write access to etcd alone: a well-formed record handing the name to another
        # namespace, without the keyring's MAC, is not obeyed.
        record = {"namespace": "attacker", "name": NAME, "uid": str(uuid.uuid4())}
        configs.client.put_json(key, {**record, "released": False, "since": "2026-01-01T00:00:00Z"})
    else:
        configs.client.store.put(key, b"not an owner record")
    run.apply_sample(NAME)
    conflict = wait_for(
        "Conflict OwnerRecordUnreadable",
        lambda: (
            (c := run.condition(NAME, "Conflict")) and c["reason"] == "OwnerRecordUnreadable" and c
        ),
    )
    assert key in conflict["message"] and "etcdctl del" in conflict["message"]
    assert configs.get_metadata(NAME) is None  # nothing seeded
    # Repaired by a person: the next change of the resource claims the name and seeds it.
    configs.client.store.delete(key)
    run.patch(NAME, {"metadata": {"annotations": {"retry": "1"}}})
    run.wait_active_version(NAME, 1)
    wait_for("Conflict gone", lambda: run.condition(NAME, "Conflict") is None)


def test_an_operator_given_one_namespace_never_touches_another(
    operator_run: OperatorRun, other_namespace: str
) -> None:
    # Found by CI: an operator started with `-n` handled only that namespace, but its keyring
    # fan-out and keyguard listed DefenderComponents cluster-wide, so it wrote the keyring into
    # (and posted Events to) namespaces it was never given.
    run = operator_run
    run.start()  # `-n run.namespace` only
    _create(run, other_namespace, _sample())
    run.apply_sample(NAME)
    run.wait_active_version(NAME, 1)
    wait_for("the keyring copy in the watched namespace", run.keyring_copy)
    # Several fan-out and monitor passes (1 s each).
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        with pytest.raises(k8s.ApiException) as info:
            run.core.read_namespaced_secret(SECRET, other_namespace)
        assert info.value.status == 404, "the keyring was written to an unwatched namespace"
        time.sleep(0.5)
    assert run.core.list_namespaced_event(other_namespace).items == []
    assert "status" not in _get(run, other_namespace)
    assert other_namespace not in run.log_path.read_text()


def _purged_later(run: OperatorRun) -> tuple[EtcdStore, Layout, dict[str, Any]]:
    """The operator started and NAME created with retention Purge, at ACTIVE version 1: the
    store (the operator's keyring: the namespace has no copy before its first component), the
    layout and the resource as created."""
    run.start()
    store = _store(run)
    lay = run.client(run.operator_keyring()).layout
    doc = _sample(default_policy="allow", block_ttl_seconds=7)
    doc["spec"]["retention"] = "Purge"
    _create(run, run.namespace, doc)
    run.wait_active_version(NAME, 1)
    return store, lay, doc


def _saved_purged_and_created_again(
    run: OperatorRun, store: EtcdStore, comp: str
) -> tuple[dict[str, bytes], dict[str, Any], int]:
    """What etcd read access saved of the component (its heartbeats aside), then the resource
    deleted with retention Purge and created again: (saved values, the new resource, the new
    registration once anchored)."""
    saved = {sv.key: sv.value for sv in store.list_prefix(comp) if "/instances/" not in sv.key}
    _delete(run, run.namespace)  # Purge: the data goes
    assert not store.list_prefix(comp)
    new_doc = _sample()
    new_doc["spec"]["retention"] = "Purge"
    _create(run, run.namespace, new_doc)
    run.wait_active_version(NAME, 1)
    registration = wait_for(
        "the new registration anchored", lambda: run.get(NAME)["status"].get("registration")
    )
    assert isinstance(registration, int)
    return saved, new_doc, registration


def test_a_purged_registrations_values_put_back_never_become_active_again(
    operator_run: OperatorRun,
) -> None:
    # docs/security.md, "Replays across a record's lifetime": etcd read access saved the values
    # of a component; it is deleted with retention Purge and created again (a new registration
    # at version 1); etcd write access (no key) puts the saved values back at higher versions.
    # They carry the earlier registration: the operator refuses them as a repair's source,
    # rebuilds and removes, and ACTIVE stays the new registration's config.
    run = operator_run
    store, lay, _ = _purged_later(run)
    comp = lay.component_dir(NAME)
    _set_ttl(run, run.namespace, 8)
    run.wait_active_version(NAME, 2)
    _set_ttl(run, run.namespace, 11)
    run.wait_active_version(NAME, 3)
    old_registration = run.get(NAME)["status"].get("registration")
    assert isinstance(old_registration, int)
    saved, new_doc, registration = _saved_purged_and_created_again(run, store, comp)
    assert registration != old_registration
    new_config = validate_config(NAME, new_doc["spec"]["config"])
    running = run.configs()  # an agent's reader of the new registration
    assert running.get_active(NAME).config == new_config

    # The attack: the earlier registration's history above the new record, then its metadata,
    # ACTIVE and MASTER (version 3, authentic under the same paths).
    for key in (
        lay.history(NAME, 2),
        lay.history(NAME, 3),
        lay.metadata(NAME),
        lay.active_config(NAME),
        lay.master_config(NAME),
    ):
        store.put(key, saved[key])
    with pytest.raises(RegistrationReplayError):
        running.get_active(NAME)

    def restored() -> bool:
        try:
            active = run.configs().get_active(NAME)
        except DefenderConfigError:
            return False
        meta = active.metadata
        return (
            active.config == new_config and meta is not None and meta.registration == registration
        )

    wait_for("the operator restores the new registration's record and ACTIVE", restored)
    # Alerts and the removal of the entries may land a moment after the record: waited for.
    wait_for("a RegistrationReplayed alert", lambda: "RegistrationReplayed" in _alert_kinds(run))
    # The earlier registration's history entries above are removed, never taken as newer.
    wait_for(
        "only the new registration's history left",
        lambda: (
            [sv.key for sv in store.list_prefix(lay.history_dir(NAME))] == [lay.history(NAME, 1)]
        ),
    )
    assert running.get_active(NAME).config == new_config
    assert run.get(NAME)["status"].get("registration") == registration
    # The next commit builds on the new registration: version 2 of it, never the old config.
    _set_ttl(run, run.namespace, 9)
    run.wait_active_version(NAME, 2)
    after = running.get_active(NAME)
    assert after.config["block_ttl_seconds"] == 9
    assert after.config["default_policy"] == new_config["default_policy"]
    assert after.metadata is not None and after.metadata.registration == registration


def test_a_snapshot_from_before_the_purge_restored_on_another_cluster_is_reseeded(
    operator_run: OperatorRun,
) -> None:
    # docs/operations.md, "Restore": etcd restored from a snapshot taken before the name was
    # purged and created again holds the earlier registration alone, which every reader
    # refuses. On another cluster than the anchor's, the operator's reconcile seeds the name
    # again from the spec, above both registrations, and the readers take it. One etcd plays
    # both clusters: the anchor is recorded as taken on another one (only etcd members could
    # make a new id).
    run = operator_run
    store, lay, _ = _purged_later(run)
    comp = lay.component_dir(NAME)
    _set_ttl(run, run.namespace, 8)
    run.wait_active_version(NAME, 2)
    saved, _, registration = _saved_purged_and_created_again(run, store, comp)
    cluster = wait_for(
        "its cluster recorded", lambda: run.get(NAME)["status"].get("registrationCluster")
    )
    running = run.configs()  # an agent's reader of the new registration
    assert running.get_active(NAME).version == 1

    elsewhere = f"{int(cluster, 16) ^ 0xFFFF:x}"
    run.custom.patch_namespaced_custom_object_status(
        contract.API_GROUP,
        contract.API_VERSION,
        run.namespace,
        contract.PLURAL,
        NAME,
        {"status": {"registrationCluster": elsewhere}},
    )
    store.delete_prefix(comp)
    for key, value in saved.items():
        store.put(key, value)
    with pytest.raises(RegistrationReplayError):
        running.get_active(NAME)
    # A reconcile (the operator's start after a restore makes one; here a spec edit).
    _set_ttl(run, run.namespace, 13)

    def reseeded() -> int | None:
        found = run.get(NAME)["status"].get("registration")
        return found if isinstance(found, int) and found > registration else None

    third = wait_for("a registration above both anchored", reseeded)
    run.wait_event(NAME, "ReseededAfterRestore")
    assert run.get(NAME)["status"].get("registrationCluster") == cluster
    active = running.get_active(NAME)
    assert active.version == 1 and active.config["block_ttl_seconds"] == 13
    assert active.metadata is not None and active.metadata.registration == third


def _published(run: OperatorRun) -> dict[str, int] | None:
    """registrations.json in the namespace's keyring Secret (None: not there)."""
    secret: Any = run.core.read_namespaced_secret(SECRET, run.namespace)
    raw = (secret.data or {}).get(REGISTRATIONS_FILE)
    return None if raw is None else parse_registrations(base64.b64decode(raw), source="test")


def _agent_file(run: OperatorRun, pod: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads((run.workdir / f"{pod}.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_an_agent_started_after_the_replay_is_told_the_registration_and_refuses_it(
    operator_run: OperatorRun,
) -> None:
    # docs/security.md, registrations: the residual of a reader started after an earlier
    # registration's metadata record and ACTIVE were put back together (a consistent,
    # authentic pair). The operator publishes the registration it anchors in the keyring
    # Secret the agent mounts; an agent started after the replay holds it and refuses the pair,
    # with the operator stopped (nothing repairs etcd meanwhile).
    run = operator_run
    store, lay, old_doc = _purged_later(run)
    old_registration = wait_for(
        "the first registration anchored", lambda: run.get(NAME)["status"].get("registration")
    )
    wait_for("it is published", lambda: _published(run) == {NAME: old_registration})
    saved = {key: store.get(key) for key in (lay.metadata(NAME), lay.active_config(NAME))}
    _delete(run, run.namespace)  # Purge: the data goes
    wait_for("the deleted component unpublished", lambda: _published(run) == {})

    new_doc = _sample()
    new_doc["spec"]["retention"] = "Purge"
    _create(run, run.namespace, new_doc)
    run.wait_active_version(NAME, 1)
    registration = wait_for(
        "the new registration anchored",
        lambda: (r := run.get(NAME)["status"].get("registration")) != old_registration and r,
    )
    wait_for("the new registration published", lambda: _published(run) == {NAME: registration})
    new_config = validate_config(NAME, new_doc["spec"]["config"])
    old_config = validate_config(NAME, old_doc["spec"]["config"])

    run.stop()
    for key, value in saved.items():
        assert value is not None
        store.put(key, value.value)
    # A reader not told the registration takes the pair: the residual this closes for agents.
    assert run.configs().get_active(NAME).config == old_config

    pod = "firewall-replay-0"
    agent = run.start_agent(NAME, pod)
    wait_for(
        "the agent refuses the earlier registration",
        lambda: (
            "RegistrationReplayed" in _alert_kinds(run) or "RecordReplayed" in _alert_kinds(run)
        ),
    )
    assert agent.poll() is None, run.agent_log(pod)
    assert _agent_file(run, pod) is None  # never wrote the earlier registration's config

    # The operator back: its pass rebuilds the record from the new registration's history,
    # and the agent takes that.
    run.start()
    wait_for("the agent writes the new registration's config", lambda: _agent_file(run, pod))
    assert _agent_file(run, pod) == new_config
    assert ConfigStore(run.client()).get_active(NAME).config == new_config
