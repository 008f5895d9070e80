"""The registration anchor (`status.registration`): which registration of a name is current."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import kopf
import pytest
from operator_core_support import LOG, NAME, NAMESPACE, Harness, spec

from defender_config import (
    RegistrationReplayError,
    RolloutRecord,
    config_digest,
    next_record_sequence,
    validate_config,
)
from defender_operator._backend import Declared
from defender_operator._canary import rollout_fields
from defender_operator._decisions import conditions as cond
from defender_operator._decisions.breaker import ActiveChange
from defender_operator._decisions.canary import PROGRESSING
from defender_operator._decisions.ownership import Claim
from defender_operator._decisions.registration import (
    REGISTRATION_CLUSTER_FIELD,
    REGISTRATION_FIELD,
    RegistrationAction,
    ReplayAction,
    anchored_cluster,
    anchored_registration,
    cluster_fields,
    decide_refused_record,
    decide_registration,
    decide_replayed,
    registration_fields,
    seeded_registration,
)
from defender_operator._memory_backend import Stored
from defender_operator._reconcile import apply_retention
from defender_operator._runtime import utcnow


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, None), (0, None), (-3, None), (True, None), ("17", None), (17, 17)],
)
def test_only_a_positive_integer_in_status_is_an_anchor(raw: object, expected: int | None) -> None:
    status = {} if raw is None else {REGISTRATION_FIELD: raw}
    assert anchored_registration(status) == expected


def test_a_saved_registration_put_back_is_never_anchored_over_the_current_one() -> None:
    # Older (the purged registration) or newer: not the anchored one, so refused, not anchored.
    assert decide_registration(200, 100) is RegistrationAction.REPLAYED
    assert decide_registration(200, 300) is RegistrationAction.REPLAYED
    assert registration_fields(RegistrationAction.REPLAYED, 100) == {}


def test_a_record_without_registration_under_an_anchor_is_a_replay() -> None:
    # A record from before registrations, put back after the component got one.
    assert decide_registration(200, None) is RegistrationAction.REPLAYED


def test_nothing_anchored_anchors_what_is_there_and_legacy_stays_readable() -> None:
    assert decide_registration(None, 100) is RegistrationAction.ANCHOR
    assert registration_fields(RegistrationAction.ANCHOR, 100) == {REGISTRATION_FIELD: 100}
    assert decide_registration(None, None) is RegistrationAction.LEGACY
    assert registration_fields(RegistrationAction.LEGACY, None) == {}


def test_the_anchored_registration_is_kept() -> None:
    assert decide_registration(200, 200) is RegistrationAction.KEEP
    assert registration_fields(RegistrationAction.KEEP, 200) == {}


def test_the_operators_own_seed_re_anchors_after_etcd_lost_the_data() -> None:
    # An accident that emptied etcd must not lock the resource out of what it seeds again.
    assert decide_registration(200, 300, seeded=True) is RegistrationAction.ANCHOR
    assert decide_registration(200, None, seeded=True) is RegistrationAction.REPLAYED


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        ("", None),
        ("0", None),
        ("xyz", None),
        (17, None),
        ("1" * 17, None),
        ("c0ffee", 0xC0FFEE),
        ("ffffffffffffffff", 2**64 - 1),
    ],
)
def test_only_a_hex_cluster_id_in_status_is_recorded(raw: object, expected: int | None) -> None:
    status = {} if raw is None else {REGISTRATION_CLUSTER_FIELD: raw}
    assert anchored_cluster(status) == expected
    if expected is not None:
        assert cluster_fields(expected) == {REGISTRATION_CLUSTER_FIELD: raw}


def test_the_cluster_is_recorded_wherever_etcd_holds_the_anchored_registration() -> None:
    assert registration_fields(RegistrationAction.ANCHOR, 100, 0xAB) == {
        REGISTRATION_FIELD: 100,
        REGISTRATION_CLUSTER_FIELD: "ab",
    }
    assert registration_fields(RegistrationAction.KEEP, 100, 0xAB) == {
        REGISTRATION_CLUSTER_FIELD: "ab"
    }
    assert registration_fields(RegistrationAction.REPLAYED, 100, 0xAB) == {}
    assert registration_fields(RegistrationAction.LEGACY, None, 0xAB) == {}
    assert registration_fields(RegistrationAction.ANCHOR, 100, None) == {REGISTRATION_FIELD: 100}
    assert seeded_registration(300, 0xAB) == {
        REGISTRATION_FIELD: 300,
        REGISTRATION_CLUSTER_FIELD: "ab",
    }


A_CLUSTER, ANOTHER_CLUSTER = 0xA, 0xB


@pytest.mark.parametrize(
    ("stored", "anchored_on", "cluster", "expected"),
    [
        # An older registration (or data from before registrations) on another cluster than
        # the anchor's: a snapshot from before the purge, restored.
        (100, A_CLUSTER, ANOTHER_CLUSTER, ReplayAction.RESEED),
        (None, A_CLUSTER, ANOTHER_CLUSTER, ReplayAction.RESEED),
        # The same cluster: put back by etcd write access, which cannot change the id.
        (100, A_CLUSTER, A_CLUSTER, ReplayAction.REFUSE),
        (None, A_CLUSTER, A_CLUSTER, ReplayAction.REFUSE),
        # No cluster recorded (a status from before the field), or none seen yet.
        (100, None, ANOTHER_CLUSTER, ReplayAction.REFUSE),
        (100, A_CLUSTER, None, ReplayAction.REFUSE),
        # A newer registration than the anchored one (or the anchored one): no restore.
        (300, A_CLUSTER, ANOTHER_CLUSTER, ReplayAction.REFUSE),
        (200, A_CLUSTER, ANOTHER_CLUSTER, ReplayAction.REFUSE),
    ],
)
def test_only_an_older_registration_on_another_cluster_is_reseeded(
    stored: int | None, anchored_on: int | None, cluster: int | None, expected: ReplayAction
) -> None:
    assert decide_replayed(200, stored, anchored_on=anchored_on, cluster=cluster) is expected


def test_nothing_anchored_is_never_reseeded() -> None:
    assert (
        decide_replayed(None, 100, anchored_on=A_CLUSTER, cluster=ANOTHER_CLUSTER)
        is ReplayAction.REFUSE
    )


@pytest.mark.parametrize(
    ("path", "cluster", "expected"),
    [
        # The record of an older registration, on another cluster: an older lifetime restored.
        (f"/p/components/{NAME}/metadata", ANOTHER_CLUSTER, ReplayAction.RESEED),
        # The same record on the anchor's cluster: a replay.
        (f"/p/components/{NAME}/metadata", A_CLUSTER, ReplayAction.REFUSE),
        # A value of it beside the anchored record (a MASTER, a history entry put back), or
        # another component's record: no lifetime, whatever the cluster.
        (f"/p/components/{NAME}/master", ANOTHER_CLUSTER, ReplayAction.REFUSE),
        (f"/p/components/{NAME}/history/3", ANOTHER_CLUSTER, ReplayAction.REFUSE),
        (f"/p/components/x{NAME}/metadata", ANOTHER_CLUSTER, ReplayAction.REFUSE),
        (None, ANOTHER_CLUSTER, ReplayAction.REFUSE),
    ],
)
def test_only_a_refused_metadata_record_is_judged_a_restored_lifetime(
    path: str | None, cluster: int, expected: ReplayAction
) -> None:
    # One decision for a reconcile's declare and a monitor pass's read alike.
    found = decide_refused_record(NAME, path, 200, 100, anchored_on=A_CLUSTER, cluster=cluster)
    assert found is expected


# --- the reconcile, against the in-memory Backend -------------------------------------------------

ETH0 = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth0"}
ETH1 = {**ETH0, "interface": "eth1"}
ETH2 = {**ETH0, "interface": "eth2"}


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def digest(config: dict[str, str]) -> str:
    return config_digest(validate_config("sniffer", config, None))


def purged_and_registered_again() -> tuple[Harness, Stored]:
    """A resource (retention Purge) at version 3, its values saved by someone with etcd read
    access, deleted (its data purged) and created again: version 1 of a new registration.
    Returns the new resource's harness (same backend) and the saved values."""
    old = Harness()
    for config in (ETH0, ETH1, ETH2):
        run(old.reconcile(spec(config)))
    assert old.backend.state(NAME).active_version == 3
    saved = copy.deepcopy(old.backend.components[NAME])
    run(apply_retention(old.rt, old.body(spec(ETH2), {}), NAMESPACE, NAME, "Purge", LOG))
    assert NAME not in old.backend.components
    new = Harness(backend=old.backend, uid="uid-2")
    run(new.reconcile(spec(ETH0)))
    assert new.backend.state(NAME).active_version == 1
    return new, saved


def alerted(h: Harness) -> list[str]:
    return [a.reason for a in h.backend.raised]


def test_the_seed_anchors_its_registration_and_a_new_resource_gets_a_new_one() -> None:
    h, saved = purged_and_registered_again()
    current = h.backend.components[NAME].registration
    assert current is not None and saved.registration is not None
    assert current > saved.registration
    assert h.kube.status[REGISTRATION_FIELD] == current
    assert h.backend.state(NAME).registration == current


def test_values_of_a_purged_registration_put_back_are_refused_with_a_warning_event() -> None:
    h, saved = purged_and_registered_again()
    anchored = h.kube.status[REGISTRATION_FIELD]
    # The earlier registration's record and ACTIVE (version 3) and history 2 and 3 put back.
    h.backend.put_back(NAME, saved, history=[2, 3])
    h.events.clear()
    run(h.reconcile(spec(ETH0)))
    replayed = [e for e in h.events if e.reason == "RegistrationReplayed"]
    assert len(replayed) == 1 and replayed[0].type == "Warning"
    assert "3 value(s) of an earlier registration" in replayed[0].message
    for path in ("metadata", "history/2", "history/3"):
        assert f"/components/{NAME}/{path}" in replayed[0].message
    assert "MetadataResigned" in h.reasons()  # the record rebuilt, as the library says
    # Rebuilt from the anchored registration's own history: ACTIVE is its version 1 again.
    state = h.backend.state(NAME)
    assert (state.active_version, state.active_digest) == (1, digest(ETH0))
    assert state.registration == anchored
    assert sorted(h.backend.components[NAME].history) == [1]
    assert h.kube.status[REGISTRATION_FIELD] == anchored  # never anchored over
    assert {"RegistrationReplayed", "RegistrationReplayRemoved"} <= set(alerted(h))
    # The next commit builds on the anchored registration: its version 2, not 4.
    run(h.reconcile(spec(ETH1)))
    state = h.backend.state(NAME)
    assert (state.active_version, state.registration) == (2, anchored)


def test_history_of_a_purged_registration_put_back_alone_is_removed_with_a_warning_event() -> None:
    h, saved = purged_and_registered_again()
    h.backend.put_back(NAME, saved, record=False, history=[2, 3])
    h.events.clear()
    run(h.reconcile(spec(ETH0)))
    replayed = [e for e in h.events if e.reason == "RegistrationReplayed"]
    assert len(replayed) == 1 and replayed[0].type == "Warning"
    assert "2 value(s)" in replayed[0].message and "MetadataResigned" not in h.reasons()
    assert sorted(h.backend.components[NAME].history) == [1]
    run(h.reconcile(spec(ETH1)))
    assert h.backend.state(NAME).active_version == 2  # never steered to 4


def test_with_nothing_of_the_anchored_registration_left_nothing_is_committed_on_top() -> None:
    h, saved = purged_and_registered_again()
    anchored = h.kube.status[REGISTRATION_FIELD]
    # Every value of the earlier registration put back, history 1 included: nothing of the
    # anchored registration is left to rebuild the record from.
    h.backend.put_back(NAME, saved, history=[1, 2, 3])
    h.backend.calls.clear()
    with pytest.raises(kopf.TemporaryError) as info:  # retried: a restore is picked up
        run(h.reconcile(spec(ETH1)))
    assert isinstance(info.value.__cause__, RegistrationReplayError)
    assert "commit" not in h.backend.calls and "seed" not in h.backend.calls
    assert h.backend.state(NAME).registration == saved.registration  # left as it is
    assert h.kube.status[REGISTRATION_FIELD] == anchored
    assert "RegistrationReplayed" in alerted(h)
    synced = h.condition(cond.CONFIG_SYNCED)
    assert synced["status"] != cond.TRUE
    assert synced["reason"] == "RegistrationReplayed"
    assert f"the current one is registration {anchored}" in synced["message"]


def test_a_record_of_another_registration_after_the_declare_is_refused_not_committed_on() -> None:
    # Put back right after the declare's repair (or by a backend whose repair could not tell):
    # the reconcile's own check refuses it (alerted, retried) and commits nothing on top.
    h, saved = purged_and_registered_again()
    anchored = h.kube.status[REGISTRATION_FIELD]
    declare = h.backend.declare

    def declare_then_put_back(*args: Any, **kwargs: Any) -> Declared:
        declare(*args, **kwargs)
        h.backend.put_back(NAME, saved)
        return Declared()  # the caller reads the state again

    h.backend.declare = declare_then_put_back  # type: ignore[method-assign]
    h.backend.calls.clear()
    with pytest.raises(kopf.TemporaryError) as info:
        run(h.reconcile(spec(ETH1)))
    refused = info.value.__cause__
    assert isinstance(refused, RegistrationReplayError)
    assert (refused.found, refused.expected) == (saved.registration, anchored)
    assert "commit" not in h.backend.calls
    assert h.kube.status[REGISTRATION_FIELD] == anchored
    alerts = [a for a in h.backend.raised if a.reason == "RegistrationReplayed"]
    assert alerts and f"the metadata record of {NAME!r} in etcd" in alerts[-1].detail


@pytest.mark.parametrize("claim_lost", [False, True])
def test_the_operators_own_seed_after_etcd_lost_the_data_is_anchored_over_the_old_one(
    claim_lost: bool,
) -> None:
    # An accident that empties etcd must not lock the resource out of what it seeds again: the
    # seed of this visit writes a new registration, and the status anchors it.
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    before = h.kube.status[REGISTRATION_FIELD]
    h.backend.components.clear()
    if claim_lost:
        h.backend.claims.clear()
    h.backend.calls.clear()
    h.events.clear()
    run(h.reconcile(spec(ETH0)))
    assert "seed" in h.backend.calls  # this visit's own seed (the status still holds the name)
    after = h.backend.state(NAME).registration
    assert after is not None and after != before
    assert h.kube.status[REGISTRATION_FIELD] == after
    assert "RegistrationReplayed" not in h.reasons() + alerted(h)
    run(h.reconcile(spec(ETH1)))  # and commits on it
    assert h.backend.state(NAME).active_version == 2


RESTORED_CLUSTER = 0xC0FFEE  # the id of the cluster `kubectl defender restore` makes


def restored_from_before_the_purge(h: Harness, saved: Stored, *, cluster: int | None) -> None:
    """etcd restored from a snapshot taken before the purge and re-creation: the name holds
    the earlier registration alone (MASTER, record, ACTIVE, history) and the earlier
    resource's owner record. `cluster`: the cluster id etcd answers with afterwards (the
    backend's before: an etcd-write attacker putting the saved values back instead)."""
    h.backend.components[NAME] = copy.deepcopy(saved)
    h.backend.claims[NAME] = (Claim(NAMESPACE, NAME, "uid-1"), h.backend.claims[NAME][1])
    if cluster is not None:
        h.backend.cluster_id = cluster


def test_the_cluster_the_anchor_was_taken_on_is_recorded_beside_it() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    assert h.kube.status[REGISTRATION_CLUSTER_FIELD] == "5eed"
    # A status from before the field: recorded on the next pass that finds the anchored one.
    del h.kube.status[REGISTRATION_CLUSTER_FIELD]
    h.backend.cluster_id = RESTORED_CLUSTER  # e.g. restored since, from a snapshot of it
    run(h.reconcile(spec(ETH0)))
    assert h.kube.status[REGISTRATION_CLUSTER_FIELD] == "c0ffee"


def test_a_monitor_pass_records_the_cluster_it_reads_the_anchored_registration_on() -> None:
    # A restore of a snapshot of the anchored registration itself, run through by the operator
    # (no reconcile): its next pass records the new cluster, so an older registration put back
    # there afterwards by etcd write access is refused as a replay, not re-seeded over.
    h, saved = purged_and_registered_again()
    anchored = h.kube.status[REGISTRATION_FIELD]
    h.backend.cluster_id = RESTORED_CLUSTER
    generation = h.generation
    run(h.monitor(spec(ETH0)))
    assert h.generation == generation
    assert h.kube.status[REGISTRATION_CLUSTER_FIELD] == "c0ffee"
    assert h.kube.status[REGISTRATION_FIELD] == anchored
    restored_from_before_the_purge(h, saved, cluster=None)
    refused_on_read(h, saved, anchored)
    h.backend.calls.clear()
    with pytest.raises(RegistrationReplayError):
        run(h.monitor(spec(ETH0)))
    assert "purge" not in h.backend.calls and "ReseededAfterRestore" not in h.reasons()
    # Nor does a pass record a cluster beside a record of another registration.
    h.backend.cluster_id = 0xD1FF
    h.backend.components[NAME].registration = anchored + 1
    run(h.monitor(spec(ETH0)))
    assert h.kube.status[REGISTRATION_CLUSTER_FIELD] == "c0ffee"


def test_a_pass_that_reuses_an_earlier_read_records_no_cluster() -> None:
    # A read reused from an earlier pass (nothing changed that the change watch delivered)
    # may be of the cluster before a restore: the new cluster is recorded only beside a
    # read made on it, else an older lifetime restored there would be refused as a replay.
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    h.inform()
    run(h.monitor(spec(ETH0)))  # reads, and leaves its read to reuse
    h.backend.cluster_id = RESTORED_CLUSTER
    h.backend.calls.clear()
    run(h.monitor(spec(ETH0)))
    assert "observe" not in h.backend.calls  # reused
    assert h.kube.status[REGISTRATION_CLUSTER_FIELD] == "5eed"
    h.backend.touch(NAME)
    run(h.monitor(spec(ETH0)))
    assert "observe" in h.backend.calls
    assert h.kube.status[REGISTRATION_CLUSTER_FIELD] == "c0ffee"


def test_a_snapshot_from_before_the_purge_restored_is_reseeded_above_both() -> None:
    """etcd restored from a snapshot taken before the purge and re-creation (a new cluster
    id): it holds the earlier registration, which every reader refuses, while the status
    anchors the newer one. The reconcile seeds the name again from spec.config, as a Purge
    and re-create would, with a registration above both; readers take it by themselves."""
    h, saved = purged_and_registered_again()
    anchored = h.kube.status[REGISTRATION_FIELD]
    assert saved.registration is not None and saved.registration < anchored
    assert anchored_cluster(h.kube.status) == h.backend.cluster_id
    restored_from_before_the_purge(h, saved, cluster=RESTORED_CLUSTER)
    h.backend.calls.clear()
    h.events.clear()
    run(h.reconcile(spec(ETH1)))
    state = h.backend.state(NAME)
    assert state.registration is not None and state.registration > anchored
    assert (state.active_version, state.active_digest) == (1, digest(ETH1))
    assert sorted(h.backend.components[NAME].history) == [1]
    assert h.kube.status[REGISTRATION_FIELD] == state.registration
    assert h.kube.status[REGISTRATION_CLUSTER_FIELD] == "c0ffee"
    assert h.kube.status["activeVersion"] == 1
    assert {"purge", "claim_and_seed"} <= set(h.backend.calls)
    assert "commit" not in h.backend.calls  # nothing recommitted above the lost lifetime
    assert h.backend.claims[NAME][0].uid == "uid-2"  # the name is this resource's again
    told = [e for e in h.events if e.reason == "ReseededAfterRestore"]
    assert len(told) == 1 and told[0].type == "Warning"
    for registration in (saved.registration, anchored, state.registration):
        assert f"registration {registration}" in told[0].message
    assert "replaced" in told[0].message
    assert "RegistrationReplayed" not in h.reasons()
    assert h.condition(cond.CONFIG_SYNCED)["status"] == cond.TRUE
    assert "RegistrationReplayed" not in alerted(h)  # the restored lifetime's went with it
    # The next pass keeps it: nothing purged or seeded again, and it commits on it.
    h.backend.calls.clear()
    run(h.reconcile(spec(ETH2)))
    assert "purge" not in h.backend.calls and "claim_and_seed" not in h.backend.calls
    after = h.backend.state(NAME)
    assert (after.active_version, after.registration) == (2, state.registration)


def test_an_earlier_registration_put_back_on_the_same_cluster_is_refused_on_every_pass() -> None:
    """The same values put back by someone with etcd write access (the cluster id does not
    change: only etcd members set it): refused on every pass as a replay, never re-seeded.
    The way out a person has: delete the resource (retention Purge) and create it again."""
    h, saved = purged_and_registered_again()
    anchored = h.kube.status[REGISTRATION_FIELD]
    restored_from_before_the_purge(h, saved, cluster=None)
    h.backend.calls.clear()
    for attempt in range(1, 4):
        with pytest.raises(kopf.TemporaryError) as info:
            run(h.reconcile(spec(ETH1)))
        assert isinstance(info.value.__cause__, RegistrationReplayError)
        assert not {"commit", "seed", "claim_and_seed", "purge"} & set(h.backend.calls)
        assert h.kube.status[REGISTRATION_FIELD] == anchored
        assert h.backend.state(NAME).registration == saved.registration
        assert alerted(h).count("RegistrationReplayed") == attempt
        assert h.condition(cond.CONFIG_SYNCED)["reason"] == "RegistrationReplayed"
    assert "ReseededAfterRestore" not in h.reasons()
    # The saved history went on the first pass, as entries of another registration.
    assert h.backend.components[NAME].history == {}
    assert "RegistrationReplayRemoved" in alerted(h)
    run(apply_retention(h.rt, h.body(spec(ETH1), {}), NAMESPACE, NAME, "Purge", LOG))
    again = Harness(backend=h.backend, uid="uid-3")
    run(again.reconcile(spec(ETH1)))
    state = again.backend.state(NAME)
    assert state.registration is not None and state.registration > anchored
    assert again.kube.status[REGISTRATION_FIELD] == state.registration
    assert (state.active_version, state.active_digest) == (1, digest(ETH1))


def test_a_restore_under_a_status_that_recorded_no_cluster_is_refused_as_before() -> None:
    # Written by an operator from before status.registrationCluster: nothing tells a restore
    # from a replay, so it is refused (a person re-creates the resource).
    h, saved = purged_and_registered_again()
    del h.kube.status[REGISTRATION_CLUSTER_FIELD]
    restored_from_before_the_purge(h, saved, cluster=RESTORED_CLUSTER)
    h.backend.calls.clear()
    with pytest.raises(kopf.TemporaryError) as info:
        run(h.reconcile(spec(ETH1)))
    assert isinstance(info.value.__cause__, RegistrationReplayError)
    assert "purge" not in h.backend.calls and "ReseededAfterRestore" not in h.reasons()
    assert REGISTRATION_CLUSTER_FIELD not in h.kube.status  # never recorded over a refusal


def test_a_record_of_an_older_registration_after_the_declare_on_a_new_cluster_is_reseeded() -> None:
    # The declare saw the anchored registration; the record read after it is the restored
    # older one (the reconcile's own check): re-seeded all the same.
    h, saved = purged_and_registered_again()
    anchored = h.kube.status[REGISTRATION_FIELD]
    declare = h.backend.declare

    def declare_then_restore(*args: Any, **kwargs: Any) -> Declared:
        declare(*args, **kwargs)
        restored_from_before_the_purge(h, saved, cluster=RESTORED_CLUSTER)
        return Declared()  # the caller reads the state again

    h.backend.declare = declare_then_restore  # type: ignore[method-assign]
    h.events.clear()
    run(h.reconcile(spec(ETH1)))
    state = h.backend.state(NAME)
    assert state.registration is not None and state.registration > anchored
    assert h.kube.status[REGISTRATION_FIELD] == state.registration
    assert "ReseededAfterRestore" in h.reasons()


def test_a_value_of_an_older_registration_beside_the_anchored_record_is_never_reseeded() -> None:
    # A MASTER of the earlier registration beside a record of the anchored one (put back, and
    # restored since on another cluster): the record is this lifetime's, so nothing is purged.
    h, saved = purged_and_registered_again()
    anchored = h.kube.status[REGISTRATION_FIELD]
    h.backend.cluster_id = RESTORED_CLUSTER
    master = RegistrationReplayError(
        f"/memory/components/{NAME}/master", saved.registration, anchored, what="MASTER"
    )
    h.backend.fail("declare", master)
    h.backend.calls.clear()
    with pytest.raises(kopf.TemporaryError) as info:
        run(h.reconcile(spec(ETH1)))
    assert info.value.__cause__ is master
    assert "purge" not in h.backend.calls and "ReseededAfterRestore" not in h.reasons()
    assert h.kube.status[REGISTRATION_FIELD] == anchored


# --- the monitor pass: an operator that ran through the restore ---------------------------------


def refused_on_read(h: Harness, saved: Stored, anchored: int, *, times: int = 1) -> None:
    """What the library's reader (holding the anchored registration) does with the restored
    record on a monitor pass's reads (the in-memory Backend does not refuse on reads)."""
    for operation in ("observe", "state"):
        refused = RegistrationReplayError(
            f"/memory/components/{NAME}/metadata",
            saved.registration,
            anchored,
            what="the metadata record",
        )
        h.backend.fail(operation, refused, times=times)


def test_a_monitor_pass_after_a_restore_on_another_cluster_reseeds_without_a_reconcile() -> None:
    """The operator ran through the restore (not stopped): kopf sees no change of the resource,
    so no reconcile comes. Its next monitor pass re-seeds, by the reconcile's decision and
    step, instead of failing with RegistrationReplayed on every pass."""
    h, saved = purged_and_registered_again()
    anchored = h.kube.status[REGISTRATION_FIELD]
    restored_from_before_the_purge(h, saved, cluster=RESTORED_CLUSTER)
    refused_on_read(h, saved, anchored)
    h.backend.calls.clear()
    h.events.clear()
    generation = h.generation
    run(h.monitor(spec(ETH0)))
    assert h.generation == generation  # no reconcile
    state = h.backend.state(NAME)
    assert state.registration is not None and state.registration > anchored
    assert (state.active_version, state.active_digest) == (1, digest(ETH0))
    assert {"purge", "claim_and_seed"} <= set(h.backend.calls)
    assert h.backend.claims[NAME][0].uid == "uid-2"
    assert h.kube.status[REGISTRATION_FIELD] == state.registration
    assert h.kube.status[REGISTRATION_CLUSTER_FIELD] == "c0ffee"
    assert h.kube.status["activeVersion"] == 1
    assert h.reasons().count("ReseededAfterRestore") == 1
    # The next pass judges the new registration: nothing purged or seeded again.
    h.backend.calls.clear()
    run(h.monitor(spec(ETH0)))
    assert "purge" not in h.backend.calls and "claim_and_seed" not in h.backend.calls
    assert h.reasons().count("ReseededAfterRestore") == 1
    assert h.condition(cond.CONFIG_SYNCED)["status"] == cond.TRUE


def test_a_monitor_pass_refuses_a_replay_on_the_same_cluster_as_before() -> None:
    # The same values put back with etcd write access: the pass fails on them as before
    # (retried, never re-seeded), the status keeps its anchor.
    h, saved = purged_and_registered_again()
    anchored = h.kube.status[REGISTRATION_FIELD]
    restored_from_before_the_purge(h, saved, cluster=None)
    refused_on_read(h, saved, anchored, times=3)
    h.backend.calls.clear()
    for _ in range(3):
        with pytest.raises(RegistrationReplayError):
            run(h.monitor(spec(ETH0)))
    assert not {"purge", "claim_and_seed", "seed", "commit"} & set(h.backend.calls)
    assert h.kube.status[REGISTRATION_FIELD] == anchored
    assert h.backend.components[NAME].registration == saved.registration
    assert "ReseededAfterRestore" not in h.reasons()


def test_a_monitor_pass_never_reseeds_over_a_master_of_another_registration() -> None:
    # A MASTER of the older registration refused beside the anchored record: no lifetime.
    h, saved = purged_and_registered_again()
    anchored = h.kube.status[REGISTRATION_FIELD]
    h.backend.cluster_id = RESTORED_CLUSTER
    master = RegistrationReplayError(
        f"/memory/components/{NAME}/master", saved.registration, anchored, what="MASTER"
    )
    h.backend.fail("observe", master)
    h.backend.fail("state", master)
    h.backend.calls.clear()
    with pytest.raises(RegistrationReplayError):
        run(h.monitor(spec(ETH0)))
    assert "purge" not in h.backend.calls and "ReseededAfterRestore" not in h.reasons()


def test_a_monitor_pass_whose_reseed_finds_the_name_written_meanwhile_fails_as_a_pass() -> None:
    # The reconcile's step raises kopf's retry; a pass fails as any pass does (the daemon runs
    # on) and the next one decides again on what etcd holds.
    h, saved = purged_and_registered_again()
    anchored = h.kube.status[REGISTRATION_FIELD]
    restored_from_before_the_purge(h, saved, cluster=RESTORED_CLUSTER)
    refused_on_read(h, saved, anchored)
    h.backend.claim_and_seed = lambda *args, **kwargs: None  # type: ignore[method-assign]
    with pytest.raises(RegistrationReplayError):
        run(h.monitor(spec(ETH0)))
    assert h.kube.status[REGISTRATION_FIELD] == anchored


def in_progress(h: Harness, config: dict[str, str]) -> dict[str, Any]:
    """status.rollout of a canary of `config` on ACTIVE version 1, in progress, as `_canary`
    writes it, and a breaker freeze: what the anchored lifetime's status held."""
    record = RolloutRecord(
        version=2,
        base_version=1,
        digest=digest(config),
        canaries=("sniffer-a",),
        since=utcnow(),
        by="operator:op-0",
        sequence=next_record_sequence(now=utcnow()),
    )
    return {
        **rollout_fields(record, PROGRESSING, "version 2 goes to sniffer-a first"),
        "frozen": True,
        "freezeSequence": next_record_sequence(now=utcnow()),
    }


@pytest.mark.parametrize("through", ["reconcile", "monitor"])
def test_a_reseed_ends_what_the_status_remembers_of_the_purged_lifetime(through: str) -> None:
    """A canary rollout and a freeze the status anchors belonged to the purged lifetime: the
    new one starts without them, as a resource created again does. Left in progress, the
    rollout would be written again over the new registration (its record "deleted in etcd")."""
    h, saved = purged_and_registered_again()
    anchored = h.kube.status[REGISTRATION_FIELD]
    remembered = in_progress(h, ETH0)
    h.kube.status.update(remembered)
    assert h.mem.status is not None
    h.mem.status = {**h.mem.status, **remembered}
    h.mem.last_change = ActiveChange(version=3, previous_version=2, time=utcnow())
    lifted = h.kube.status.get("freezeLiftedSequence")
    restored_from_before_the_purge(h, saved, cluster=RESTORED_CLUSTER)
    h.events.clear()
    if through == "reconcile":
        run(h.reconcile(spec(ETH0)))
    else:
        refused_on_read(h, saved, anchored)
        run(h.monitor(spec(ETH0)))
    assert "ReseededAfterRestore" in h.reasons()
    status = h.kube.status
    assert (status["frozen"], status["freezeSequence"]) == (False, None)
    assert status.get("freezeLiftedSequence") == lifted
    rollout = status["rollout"]
    assert rollout["phase"] == "Superseded" and "re-seeded after a restore" in rollout["message"]
    assert rollout["sequence"] == remembered["rollout"]["sequence"]  # a replay stays one
    assert h.condition(cond.ROLLOUT)["reason"] == "Superseded"
    assert h.mem.last_change is None
    assert h.condition(cond.CONFIG_SYNCED)["status"] == cond.TRUE
    # The next passes judge the new lifetime alone: the rollout is not written again.
    h.backend.calls.clear()
    h.events.clear()
    for _ in range(2):
        run(h.monitor(spec(ETH0)))
    assert "start_rollout" not in h.backend.calls
    assert h.backend.rollouts.get(NAME) is None
    assert "RolloutRecordReplayed" not in h.reasons() and "RecordReplayed" not in alerted(h)
    assert h.kube.status["rollout"]["phase"] == "Superseded"


def test_a_reseed_is_alerted_in_place_of_the_refusal_it_ends() -> None:
    # `kubectl defender alerts` shows the re-seed, not the RegistrationReplayed and
    # RegistrationReplayRemoved the declare's repair raised on the restored data first.
    h, saved = purged_and_registered_again()
    restored_from_before_the_purge(h, saved, cluster=RESTORED_CLUSTER)
    run(h.reconcile(spec(ETH1)))
    kinds = alerted(h)
    assert kinds.count("ReseededAfterRestore") == 1
    assert "RegistrationReplayed" not in kinds and "RegistrationReplayRemoved" not in kinds
    told = next(a for a in h.backend.raised if a.reason == "ReseededAfterRestore")
    assert f"registration {saved.registration}" in told.detail
