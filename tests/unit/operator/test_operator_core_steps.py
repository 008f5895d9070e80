"""Reconcile and the monitor pass, step by step, against the in-memory Backend: no cluster, no
etcd. Each test drives the operator the way kopf would (a new generation, a monitor pass) and
checks what reached etcd, the status and the Events."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import kopf
import pytest
from operator_core_support import LOG, NAME, NAMESPACE, Harness, spec

from defender_config import (
    ConflictError,
    StoreUnavailableError,
    ValueTooLargeError,
    config_digest,
    contract,
    validate_config,
)
from defender_operator import _api, _storage_budget
from defender_operator._backend import InstanceRecord
from defender_operator._decisions import conditions as cond
from defender_operator._decisions.keyring import KeyringAction, KeyringPlan
from defender_operator._decisions.ownership import (
    NAME_CLAIM_FIELD,
    NAME_CLAIMED_ELSEWHERE,
    NAME_RETAINED,
    OWNER_RECORD_RESTORED,
    Claim,
    claim_status,
)
from defender_operator._errors import KubeError
from defender_operator._reconcile import UNFREEZE_ANNOTATION, apply_retention, gone
from defender_operator._runtime import utcnow

BASE = {"node_id": "sniffer-01", "version": "1.0.0"}
ETH0 = {**BASE, "interface": "eth0"}
ETH1 = {**BASE, "interface": "eth1"}
ETH2 = {**BASE, "interface": "eth2"}
BAD = {**BASE, "interface": "not a valid interface name"}


def stored(config: dict[str, str]) -> str:
    """The digest etcd holds for `config` (normalized by the component's model)."""
    return config_digest(validate_config("sniffer", config, None))


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_the_seed_reads_no_state_of_its_own_unless_the_declare_wrote() -> None:
    # Issue 17: the seed's answer says what a new component holds, the declare's read what an
    # existing one holds; read again only after the declare re-signed or recorded something.
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    assert "claim_and_seed" in h.backend.calls and "state" not in h.backend.calls
    assert h.kube.status["activeVersion"] == 1
    h.backend.calls.clear()
    run(h.reconcile(spec(ETH0)))
    assert "declare" in h.backend.calls and "state" not in h.backend.calls
    # Seen seeded (status.activeVersion): its claim is read (and seeds nothing).
    assert "read_claim" in h.backend.calls and "claim_and_seed" not in h.backend.calls
    custom = {"componentType": "custom", "customSchema": {"type": "object"}}
    c = Harness()
    run(c.reconcile(spec(BASE, **custom)))
    c.backend.calls.clear()
    schema = {"type": "object", "properties": {"interface": {"type": "string"}}}
    run(c.reconcile(spec(BASE, **{**custom, "customSchema": schema})))
    assert c.backend.calls.count("state") == 1  # the schema was recorded: read again
    assert c.backend.components[NAME].json_schema == schema


def test_a_freeze_that_predates_a_new_component_still_stops_its_first_commit() -> None:
    # The state a new component is seeded on comes from the declare's read: a freeze marker
    # already there is in it, and the seed's answer keeps it for the commit that follows.
    h = Harness()
    h.backend.freeze(NAME, "frozen before it was created")
    run(h.reconcile(spec(ETH0)))
    assert h.kube.status["frozen"] is True


def test_a_new_name_with_a_command_or_an_invalid_spec_is_claimed_before_anything_else() -> None:
    # The claim waits for the seed only when the seed is the first write: otherwise it is
    # written first, as its own write, an invalid spec's refusal included.
    h = Harness()
    run(h.reconcile(spec(ETH0), {UNFREEZE_ANNOTATION: "now"}))
    assert h.backend.calls.index("write_claim") < h.backend.calls.index("unfreeze")
    assert "claim_and_seed" not in h.backend.calls and "seed" in h.backend.calls
    bad = Harness()
    run(bad.reconcile(spec(BAD)))
    assert bad.reasons() == ["ConfigInvalid"] and "claim_and_seed" not in bad.backend.calls
    assert bad.backend.claims[NAME][0] == Claim("default", NAME, "uid-1")
    assert bad.backend.state(NAME).active_version is None


def test_a_custom_schema_whose_ref_leads_nowhere_is_config_invalid_not_a_crash() -> None:
    h = Harness()
    dangling = {"type": "object", "properties": {"rate": {"$ref": "#/$defs/missing"}}}
    run(h.reconcile(spec({"rate": 1}, componentType="custom", customSchema=dangling)))
    assert h.reasons() == ["ConfigInvalid"]
    message = h.condition(cond.CONFIG_SYNCED)["message"]
    assert "(schema): $ref '#/$defs/missing' points at nothing in the schema" in message
    assert h.backend.state(NAME).active_version is None


def test_a_custom_schema_is_validated_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # A tenant's schema may use the whole validation budget: the event loop serves every
    # namespace meanwhile. A built-in type's model stays on the loop (no thread hand-off).
    from defender_operator import _reconcile

    threads: list[str] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return validate_config(*args, **kwargs)

    monkeypatch.setattr(_reconcile, "validate_config", recording)
    custom = {"componentType": "custom", "customSchema": {"type": "object"}}
    run(Harness().reconcile(spec({"rate": 1}, **custom)))
    run(Harness().reconcile(spec(ETH0)))
    loop_thread = threading.current_thread().name
    assert len(threads) == 2
    assert threads[0] != loop_thread and threads[1] == loop_thread


def test_a_spec_the_schema_refuses_is_a_permanent_refusal_after_the_claim() -> None:
    # An old CRD version may let through what the model refuses: not retried, said on the
    # resource, nothing seeded; and a name another resource holds is reported as such first.
    h = Harness()
    with pytest.raises(kopf.PermanentError, match="does not match the DefenderComponent schema"):
        run(h.reconcile(spec(ETH0, surprise=1)))
    assert h.condition(cond.CONFIG_SYNCED)["reason"] == "SpecRefused"
    assert "claim_and_seed" not in h.backend.calls and "seed" not in h.backend.calls
    assert h.backend.claims[NAME][0] == Claim("default", NAME, "uid-1")
    taken = Harness()
    taken.backend.write_claim(NAME, Claim("tenant-b", NAME, "uid-9"), revision=0)
    run(taken.reconcile(spec(ETH0, surprise=1)))
    assert taken.condition(cond.CONFLICT)["reason"] == NAME_CLAIMED_ELSEWHERE
    assert taken.condition(cond.CONFIG_SYNCED)["reason"] != "SpecRefused"


def test_a_new_resource_whose_name_another_holds_is_refused_and_nothing_seeded() -> None:
    h = Harness()
    h.backend.write_claim(NAME, Claim("tenant-b", NAME, "uid-9"), revision=0)
    # Its namespace measured (the operator's first storage budget decision since its start):
    # the create path's calls alone.
    run(_storage_budget.measure_namespace(h.rt, NAMESPACE))
    h.backend.calls.clear()
    run(h.reconcile(spec(ETH0)))
    # The combined write lost its compare: decided on a read of what is there, as always.
    assert h.backend.calls[:2] == ["claim_and_seed", "read_claim"]
    assert h.condition(cond.CONFLICT)["reason"] == NAME_CLAIMED_ELSEWHERE
    assert h.backend.state(NAME).active_version is None
    assert h.backend.claims[NAME][0] == Claim("tenant-b", NAME, "uid-9")


def test_a_master_already_under_a_new_name_is_claimed_first_and_never_overwritten() -> None:
    h = Harness()
    h.backend.seed(NAME, "sniffer", ETH1, json_schema=None, modified_by="someone")
    h.backend.calls.clear()
    run(h.reconcile(spec(ETH0)))
    calls = h.backend.calls
    assert calls.index("claim_and_seed") < calls.index("write_claim") < calls.index("commit")
    assert h.backend.claims[NAME][0] == Claim("default", NAME, "uid-1")
    state = h.backend.state(NAME)
    assert state.master_digest == stored(ETH1)  # MASTER is create-only
    assert (state.active_version, state.active_digest) == (2, stored(ETH0))


def test_first_visit_claims_seeds_and_shows_synced() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    state = h.backend.state(NAME)
    assert (state.active_version, state.active_digest) == (1, stored(ETH0))
    assert h.backend.claims[NAME][0] == Claim("default", NAME, "uid-1")
    assert h.reasons() == []
    synced = h.condition(cond.CONFIG_SYNCED)
    assert synced["status"] == cond.TRUE
    assert h.kube.status["activeVersion"] == 1
    assert h.kube.status["observedGeneration"] == 1
    # A new name: no read, the claim written with the seed; nothing committed.
    assert "commit" not in h.backend.calls and "write_claim" not in h.backend.calls
    assert "claim_and_seed" in h.backend.calls and "read_claim" not in h.backend.calls
    # Resuming with the same spec writes nothing more.
    kinds = ("seed", "claim_and_seed", "write_claim", "commit", "rollback")
    writes = [c for c in h.backend.calls if c in kinds]
    run(h.reconcile(spec(ETH0)))
    assert [c for c in h.backend.calls if c in kinds] == writes
    assert h.reasons() == []


def test_an_edit_commits_the_next_version() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    run(h.reconcile(spec(ETH1)))
    state = h.backend.state(NAME)
    assert (state.active_version, state.active_digest) == (2, stored(ETH1))
    assert state.master_digest == stored(ETH0)  # MASTER never changes
    assert h.reasons() == ["Committed"]
    assert h.condition(cond.CONFIG_SYNCED)["status"] == cond.TRUE
    assert h.kube.status["activeVersion"] == 2
    # The breaker now guards the change from version 1 to 2.
    change = h.mem.last_change
    assert change is not None and (change.previous_version, change.version) == (1, 2)


def test_an_invalid_config_is_refused_and_active_stays() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    run(h.reconcile(spec(BAD)))
    assert h.backend.state(NAME).active_version == 1
    assert "commit" not in h.backend.calls
    assert h.reasons() == ["ConfigInvalid"]
    synced = h.condition(cond.CONFIG_SYNCED)
    assert synced["status"] == cond.FALSE
    assert "interface" in synced["message"]
    assert h.kube.status["specConfigDigest"] == config_digest(BAD)


def test_an_invalid_config_reverts_to_master_once_when_the_spec_says_so() -> None:
    h = Harness()
    revert = {"rollout": {"onInvalidConfig": _api.InvalidConfigPolicy.REVERT_TO_MASTER.value}}
    run(h.reconcile(spec(ETH0, **revert)))
    run(h.reconcile(spec(ETH1, **revert)))
    run(h.reconcile(spec(BAD, **revert)))
    state = h.backend.state(NAME)
    assert (state.active_version, state.active_digest) == (3, stored(ETH0))
    assert h.reasons()[-2:] == ["ConfigInvalid", "RevertedToMaster"]
    # A resume with the same invalid spec does not roll back again.
    run(h.reconcile(spec(BAD, **revert)))
    assert h.backend.state(NAME).active_version == 3
    assert h.reasons()[-1] == "ConfigInvalid"


def test_rollback_command_restores_a_kept_version_and_is_consumed() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    run(h.reconcile(spec(ETH1)))
    run(h.reconcile(spec(ETH1), {_api.ROLLBACK_ANNOTATION: "1"}))
    state = h.backend.state(NAME)
    assert (state.active_version, state.active_digest) == (3, stored(ETH0))
    assert state.active_rollback
    assert h.kube.removed == [_api.ROLLBACK_ANNOTATION]
    assert h.reasons()[-1] == "RolledBack"
    # ACTIVE differs from spec.config on purpose: the unchanged spec is not re-committed.
    run(h.reconcile(spec(ETH1)))
    assert h.backend.state(NAME).active_version == 3


# Past the layout's 10 digits, and past the 4300 digits int() reads.
@pytest.mark.parametrize("target", ["yesterday", "10000000000", "9" * 5000])
def test_a_rollback_command_that_names_no_version_is_refused(target: str) -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    run(h.reconcile(spec(ETH0), {_api.ROLLBACK_ANNOTATION: target}))
    assert "rollback" not in h.backend.calls
    assert h.kube.removed == [_api.ROLLBACK_ANNOTATION]
    assert h.reasons()[-1] == "RollbackRefused"


def test_a_rollback_to_a_version_that_is_not_kept_is_refused_and_holds_nothing_up() -> None:
    # Retried, the command failed every 10 s for good and every later spec.config edit of the
    # component waited behind it; `kubectl defender rollback --to 99` sends one.
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    run(h.reconcile(spec(ETH0), {_api.ROLLBACK_ANNOTATION: "99"}))
    assert h.kube.removed == [_api.ROLLBACK_ANNOTATION]
    assert h.reasons()[-1] == "RollbackRefused"
    assert h.events[-1].type == "Warning"
    assert "version 99 is not kept (history holds [1])" in h.events[-1].message
    assert h.backend.state(NAME).active_version == 1
    run(h.reconcile(spec(ETH1)))
    state = h.backend.state(NAME)
    assert (state.active_version, state.active_digest) == (2, stored(ETH1))


def test_a_permanent_error_still_publishes_conditions_and_reason() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    too_large = ValueTooLargeError(1_900_000, 1_572_864, path="/p/components/sniffer/active")
    h.backend.fail("commit", too_large)
    with pytest.raises(kopf.PermanentError):
        run(h.reconcile(spec(ETH1)))
    synced = h.condition(cond.CONFIG_SYNCED)
    assert (synced["status"], synced["reason"]) == (cond.FALSE, too_large.reason)
    assert str(too_large) in synced["message"]
    assert h.condition(cond.READY)["status"] == cond.FALSE
    assert h.events[-1].type == "Warning" and h.events[-1].reason == too_large.reason
    assert str(too_large) in h.events[-1].message
    assert h.backend.state(NAME).active_version == 1


def test_a_config_too_large_for_one_etcd_request_is_refused_by_the_backend() -> None:
    h = Harness()
    h.backend.request_limit_bytes = 4096
    with pytest.raises(kopf.PermanentError):
        run(h.reconcile(spec({**ETH0, "filters": ["tcp"] * 2000})))
    assert h.backend.state(NAME).active_version is None
    assert h.condition(cond.CONFIG_SYNCED)["reason"] == "ValueTooLarge"


def test_a_failed_commit_never_shows_synced() -> None:
    # etcd already holds version 1 (seeded by an earlier operator); this operator starts
    # with no memory and no status, and its commit of the spec loses a compare-and-swap.
    h = Harness()
    h.backend.seed(NAME, "sniffer", ETH0, json_schema=None, modified_by="earlier")
    h.backend.fail("commit", ConflictError("/p/components/sniffer/metadata", detail="raced"))
    with pytest.raises(kopf.TemporaryError):
        run(h.reconcile(spec(ETH1)))
    assert h.condition(cond.CONFIG_SYNCED)["status"] != cond.TRUE
    run(h.reconcile(spec(ETH1)))  # kopf's retry
    assert h.condition(cond.CONFIG_SYNCED)["status"] == cond.TRUE
    assert h.backend.state(NAME).active_version == 2
    # Nor does the Synced of the previous generation stay when the next commit fails.
    h.backend.fail("commit", ConflictError("/p/components/sniffer/metadata", detail="raced"))
    with pytest.raises(kopf.TemporaryError):
        run(h.reconcile(spec(ETH2)))
    synced = h.condition(cond.CONFIG_SYNCED)
    assert (synced["status"], synced["reason"]) == (cond.UNKNOWN, "Pending")
    assert "not committed yet, retrying" in synced["message"] and "raced" in synced["message"]
    assert synced["observedGeneration"] == h.generation


def test_etcd_unavailable_is_retried_and_says_so() -> None:
    h = Harness()
    h.backend.unavailable = True
    with pytest.raises(kopf.TemporaryError) as info:
        run(h.reconcile(spec(ETH0)))
    assert isinstance(info.value.__cause__, StoreUnavailableError)
    synced = h.condition(cond.CONFIG_SYNCED)
    assert (synced["status"], synced["reason"]) == (cond.UNKNOWN, "StoreUnavailable")


def test_a_name_owned_by_another_resource_is_refused_and_nothing_is_written() -> None:
    h = Harness()
    owner = Claim("tenant-a", NAME, "uid-0")
    h.backend.write_claim(NAME, owner, revision=0)
    # Its namespace measured (the operator's first storage budget decision since its start):
    # the create path's calls alone.
    run(_storage_budget.measure_namespace(h.rt, NAMESPACE))
    h.backend.calls.clear()
    run(h.reconcile(spec(ETH0)))
    assert h.backend.state(NAME).active_version is None
    # Tried with the seed's compares (which fail: nothing written), then decided on a read. A
    # spec asking for plaintext changes nothing the operator reads for the owner's component.
    assert h.backend.calls[:2] == ["claim_and_seed", "read_claim"]
    assert not {"seed", "commit", "declare", "declare_storage"} & set(h.backend.calls)
    assert h.condition(cond.CONFLICT)["reason"] == NAME_CLAIMED_ELSEWHERE
    assert h.reasons() == [NAME_CLAIMED_ELSEWHERE]
    assert h.kube.lookups == [("tenant-a", NAME, "uid-0")]


# Replays across a record's lifetime (docs/security.md): the status, which etcd write access
# cannot change, says who holds a name; an owner record that disagrees is written back.
HOLDER = {
    "metadata": {"namespace": "tenant-y", "name": NAME, "uid": "uid-y"},
    "status": {NAME_CLAIM_FIELD: claim_status(NAME, "uid-y")},
}


def _replace_record(h: Harness, record: Claim | None) -> None:
    """What etcd write access does: put a saved authentic record back, or delete it."""
    _, revision = h.backend.read_claim(NAME)
    if record is None:
        h.backend.claims.pop(NAME)
    else:
        assert h.backend.write_claim(NAME, record, revision=revision)


def test_an_allowed_claim_is_recorded_in_the_status_and_a_refused_one_is_not() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    assert h.kube.status[NAME_CLAIM_FIELD] == {"component": NAME, "uid": "uid-1"}
    h.kube.requests.clear()
    run(h.reconcile(spec(ETH1)))
    assert h.kube.requests == ["patch_status"]  # the owner's usual visit asks nothing new
    refused = Harness()
    refused.backend.write_claim(NAME, Claim("tenant-a", NAME, "uid-0"), revision=0)
    run(refused.reconcile(spec(ETH0)))
    assert refused.condition(cond.CONFLICT)["reason"] == NAME_CLAIMED_ELSEWHERE
    assert NAME_CLAIM_FIELD not in refused.kube.status


@pytest.mark.parametrize("gone_owner", [True, False], ids=["owner-gone", "owner-live"])
def test_the_holder_writes_back_a_replayed_owner_record_and_keeps_committing(
    gone_owner: bool,
) -> None:
    # Held by default/sniffer (its status says so); tenant-x's saved record is put back. Its
    # uid gone: counted released, which alone would need an adopt annotation; alive (a
    # re-created tenant-x/sniffer): held elsewhere, which alone would refuse.
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    replayed = Claim("tenant-x", NAME, "uid-old")
    _replace_record(h, replayed)
    if gone_owner:
        h.kube.gone.add(("tenant-x", NAME))
    h.events.clear()
    run(h.reconcile(spec(ETH1)))
    assert h.backend.claims[NAME][0] == Claim(NAMESPACE, NAME, "uid-1")
    assert h.backend.state(NAME).active_version == 2  # committed: the name is still its own
    assert OWNER_RECORD_RESTORED in h.reasons()
    restored = next(e for e in h.events if e.reason == OWNER_RECORD_RESTORED)
    assert restored.type == "Warning" and "tenant-x/sniffer (uid uid-old)" in restored.message
    alerts = [a for a in h.backend.raised if a.reason == OWNER_RECORD_RESTORED]
    assert len(alerts) == 1 and alerts[0].detail == restored.message
    assert "Conflict" not in {c["type"] for c in h.kube.status["conditions"]}


def test_the_holder_writes_back_a_deleted_owner_record() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    _replace_record(h, None)
    run(h.reconcile(spec(ETH1)))
    assert h.backend.claims[NAME][0] == Claim(NAMESPACE, NAME, "uid-1")
    assert h.backend.state(NAME).active_version == 2
    assert [a.reason for a in h.backend.raised].count(OWNER_RECORD_RESTORED) == 1


def test_the_holder_writes_back_an_owner_record_that_no_longer_verifies() -> None:
    # Forged without the key, or damaged: before the status anchor, every claimant was refused,
    # the holder too, until a person deleted the record.
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    h.backend.garble_claim(NAME)
    h.events.clear()
    run(h.reconcile(spec(ETH1)))
    assert h.backend.claims[NAME][0] == Claim(NAMESPACE, NAME, "uid-1")
    assert NAME not in h.backend.garbled
    assert h.backend.state(NAME).active_version == 2
    restored = next(e for e in h.events if e.reason == OWNER_RECORD_RESTORED)
    assert "named an unreadable record" in restored.message
    assert "Conflict" not in {c["type"] for c in h.kube.status["conditions"]}


def test_an_owner_record_that_no_longer_verifies_still_refuses_who_does_not_hold_the_name() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    h.backend.garble_claim(NAME)
    other = Harness(backend=h.backend, uid="uid-2")  # same name, no status: not the holder
    run(other.reconcile(spec(ETH1)))
    assert other.condition(cond.CONFLICT)["reason"] == "OwnerRecordUnreadable"
    assert NAME in h.backend.garbled and h.backend.state(NAME).active_version == 1


def test_a_re_created_former_owner_is_refused_while_another_holds_the_name() -> None:
    # This resource is default/sniffer re-created (uid-1); its purged predecessor's record
    # (uid-0) is put back while tenant-y holds the name by status.
    h = Harness()
    h.kube.others.append(HOLDER)
    h.backend.write_claim(NAME, Claim(NAMESPACE, NAME, "uid-0"), revision=0)
    run(h.reconcile(spec(ETH0)))
    assert h.condition(cond.CONFLICT)["reason"] == NAME_CLAIMED_ELSEWHERE
    assert "tenant-y/sniffer" in h.condition(cond.CONFLICT)["message"]
    # The holder's record is written back, nothing of this resource's spec is.
    assert h.backend.claims[NAME][0] == Claim("tenant-y", NAME, "uid-y")
    assert h.backend.state(NAME).active_version is None
    assert not {"seed", "commit", "declare"} & set(h.backend.calls)
    assert h.reasons() == [OWNER_RECORD_RESTORED, NAME_CLAIMED_ELSEWHERE]
    assert [a.reason for a in h.backend.raised] == [OWNER_RECORD_RESTORED]
    assert NAME_CLAIM_FIELD not in h.kube.status
    # Its next visit finds the record agreeing: an ordinary refusal, no second alert.
    run(h.reconcile(spec(ETH1)))
    assert [a.reason for a in h.backend.raised] == [OWNER_RECORD_RESTORED]


def test_a_new_resource_does_not_seed_a_name_emptied_in_etcd_while_another_holds_it() -> None:
    # etcd write access deleted every key of tenant-y's component: the seed's compares would
    # pass; the status of tenant-y's resource still holds the name.
    h = Harness()
    h.kube.others.append(HOLDER)
    run(h.reconcile(spec(ETH0)))
    assert "claim_and_seed" not in h.backend.calls
    assert h.condition(cond.CONFLICT)["reason"] == NAME_CLAIMED_ELSEWHERE
    assert h.backend.claims[NAME][0] == Claim("tenant-y", NAME, "uid-y")
    assert h.backend.state(NAME).active_version is None
    # The holder is confirmed once, for the seed and the read after it.
    assert h.kube.lookups == [("tenant-y", NAME, "uid-y")]


def test_a_status_restored_onto_a_re_created_object_holds_nothing() -> None:
    # The status names another uid (a backup restored it): the record decides, as before.
    h = Harness()
    h.kube.status[NAME_CLAIM_FIELD] = claim_status(NAME, "uid-0")
    h.backend.write_claim(NAME, Claim("tenant-a", NAME, "uid-a"), revision=0)
    run(h.reconcile(spec(ETH0)))
    assert h.condition(cond.CONFLICT)["reason"] == NAME_CLAIMED_ELSEWHERE
    assert h.backend.claims[NAME][0] == Claim("tenant-a", NAME, "uid-a")
    assert h.kube.lookups == [("tenant-a", NAME, "uid-a")]  # the record's owner, as always


def test_a_new_component_asks_the_api_server_nothing_to_find_who_holds_its_name() -> None:
    # Issue #17: a thousand components created at once share the API server; the holders come
    # from kopf's index. The create path's one request is its status patch.
    h = Harness()
    h.kube.others.append({"metadata": {"namespace": "tenant-z", "name": "other", "uid": "uid-z"}})
    # Its namespace measured (the operator's first storage budget decision since its start):
    # the create path's calls alone.
    run(_storage_budget.measure_namespace(h.rt, NAMESPACE))
    h.backend.calls.clear()
    run(h.reconcile(spec(ETH0)))
    assert h.backend.calls[0] == "claim_and_seed"  # claimed with its seed
    assert h.backend.state(NAME).active_version == 1
    assert h.kube.requests == ["patch_status"]


def test_a_holder_the_index_keeps_after_its_deletion_refuses_nobody() -> None:
    # kopf's re-listing after a watch restart keeps the entry of a resource deleted meanwhile:
    # the API server no longer holds tenant-y/sniffer, so the name is this resource's.
    h = Harness()
    h.kube.others.append(HOLDER)
    h.kube.gone.add(("tenant-y", NAME))
    run(h.reconcile(spec(ETH0)))
    assert h.backend.claims[NAME][0] == Claim(NAMESPACE, NAME, "uid-1")
    assert h.backend.state(NAME).active_version == 1
    assert h.kube.lookups == [("tenant-y", NAME, "uid-y")]
    assert OWNER_RECORD_RESTORED not in h.reasons()


def test_without_an_answer_on_whether_a_holder_lives_nothing_is_written() -> None:
    h = Harness()
    h.kube.others.append(HOLDER)

    def unanswered(namespace: str, name: str, uid: str) -> bool:
        raise KubeError(f"cannot read DefenderComponent {namespace}/{name} (503 Unavailable)")

    h.kube.component_exists = unanswered  # type: ignore[method-assign]
    with pytest.raises(kopf.TemporaryError, match="cannot read DefenderComponent"):
        run(h.reconcile(spec(ETH0)))
    assert h.backend.claims.get(NAME) is None and h.backend.state(NAME).active_version is None
    assert not {"claim_and_seed", "write_claim", "seed"} & set(h.backend.calls)


def test_data_of_an_owner_deleted_unseen_is_adopted_only_by_annotation() -> None:
    # The owner (retention Keep, no finalizer) went while no operator watched: its claim
    # still says held. The API server says it is gone, so the name is retained, not held.
    h = Harness()
    h.backend.write_claim(NAME, Claim("tenant-a", NAME, "uid-0"), revision=0)
    h.kube.gone.add(("tenant-a", NAME))
    run(h.reconcile(spec(ETH0)))
    assert h.condition(cond.CONFLICT)["reason"] == NAME_RETAINED
    assert h.backend.state(NAME).active_version is None
    run(h.reconcile(spec(ETH0), {contract.ADOPT_ANNOTATION: f"tenant-a/{NAME}"}))
    assert h.backend.claims[NAME][0] == Claim(NAMESPACE, NAME, "uid-1")
    assert h.backend.state(NAME).active_version == 1


def test_the_keyring_pause_reads_and_writes_nothing_but_publishes_why() -> None:
    h = Harness()
    h.rt.keyring_ready = False
    h.rt.keyring_refused = KeyringPlan(
        KeyringAction.REFUSE, "KeyringMissing", "no keyring opens the stored values"
    )
    with pytest.raises(kopf.TemporaryError, match="keyring unavailable"):
        run(h.reconcile(spec(ETH0)))
    assert h.backend.calls == []
    unavailable = h.condition(cond.KEY_UNAVAILABLE)
    assert (unavailable["status"], unavailable["reason"]) == (cond.TRUE, "KeyringMissing")
    # The monitor pass is paused too: no read, no restart; the status says why.
    h.kube.status["observedGeneration"] = 1  # as if reconciled before the keyring was lost
    h.add_pod("sniffer-a")
    assert run_monitor(h) is None
    assert h.backend.calls == [] and h.kube.deleted == []
    assert h.condition(cond.KEY_UNAVAILABLE)["status"] == cond.TRUE


def run_monitor(h: Harness, raw: dict[str, object] | None = None) -> object:
    return asyncio.run(h.monitor(raw or spec(ETH0)))


def test_a_monitor_pass_judges_heartbeats_and_keys() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    run_monitor(h)
    assert h.condition(cond.HEARTBEATING)["status"] == cond.TRUE
    assert h.condition(cond.KEY_CURRENT)["status"] == cond.TRUE
    assert h.condition(cond.READY)["status"] == cond.TRUE
    assert h.kube.status["instances"] == {"alive": 1, "expected": 1}
    wanted = _api.parse_spec(spec(ETH0)).heartbeat
    assert h.backend.cadences[NAME].interval_seconds == wanted.interval_seconds


def test_the_breaker_reverts_a_change_that_breaks_instances_and_freezes_commits() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    for pod in ("sniffer-a", "sniffer-b", "sniffer-c"):
        h.add_pod(pod)
        h.beat(pod)
    run_monitor(h)
    run(h.reconcile(spec(ETH1)))  # version 2
    for pod in ("sniffer-a", "sniffer-b"):
        h.beat(pod, error="UnknownKey")  # more than maxUnhealthyInstances (1)
    run_monitor(h, spec(ETH1))
    state = h.backend.state(NAME)
    assert state.frozen
    assert (state.active_version, state.active_digest) == (3, stored(ETH0))
    assert "BlastRadiusExceeded" in h.reasons()
    assert h.condition(cond.CONFIG_SYNCED)["reason"] == "Frozen"
    assert h.mem.last_change is None  # reverted: nothing left to guard
    # The next edit is refused while frozen; the unfreeze command lets it through.
    run(h.reconcile(spec(ETH2)))
    assert h.reasons()[-1] == "CommitFrozen"
    assert h.backend.state(NAME).active_version == 3
    run(h.reconcile(spec(ETH2), {UNFREEZE_ANNOTATION: "now"}))
    assert h.reasons()[-2:] == ["Unfrozen", "Committed"]
    assert h.backend.state(NAME).active_version == 4


def test_a_pod_that_stops_beating_is_restarted() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0, heartbeat={"intervalSeconds": 1, "missedBeforeRestart": 2})))
    h.add_pod("sniffer-a")
    h.mem.watch_started = h.pods["sniffer-a"].created  # watched for longer than the deadline
    run_monitor(h, spec(ETH0, heartbeat={"intervalSeconds": 1, "missedBeforeRestart": 2}))
    assert h.kube.deleted == ["sniffer-a"]
    assert "PodRestarted" in h.reasons()
    assert h.kube.status["restarts"] == 1
    assert [a.reason for a in h.backend.raised if a.reason == "PodRestarted"] == ["PodRestarted"]


def test_a_pod_heard_from_on_a_fresh_read_before_its_restart_is_not_restarted() -> None:
    # Seen in CI: an agent moved to a new lease (a cadence change) just after the pass read its
    # record; the old lease, revoked, read as a silence. The restart is judged again on a
    # fresh read first.
    h = Harness()
    hb = {"intervalSeconds": 1, "missedBeforeRestart": 2}
    run(h.reconcile(spec(ETH0, heartbeat=hb)))
    h.add_pod("sniffer-a")
    h.mem.watch_started = h.pods["sniffer-a"].created
    read = h.backend.instances
    reads: list[str] = []

    def instances(component: str) -> Sequence[InstanceRecord]:
        reads.append(component)
        if len(reads) == 2:
            h.beat("sniffer-a")  # written between the pass's read and its verdict
        return read(component)

    h.backend.instances = instances  # type: ignore[method-assign]
    run_monitor(h, spec(ETH0, heartbeat=hb))
    assert reads == [NAME, NAME]
    assert h.kube.deleted == []
    assert "PodRestarted" not in h.reasons()


@pytest.mark.parametrize("who", ["reconcile", "monitor"])
def test_reconcile_and_monitor_wait_for_the_components_lock(who: str) -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    before = len(h.backend.calls)

    async def scenario() -> None:
        async with h.mem.lock:
            task = asyncio.ensure_future(
                h.reconcile(spec(ETH1)) if who == "reconcile" else h.monitor(spec(ETH0))
            )
            for _ in range(50):
                await asyncio.sleep(0)
            assert not task.done()
            assert len(h.backend.calls) == before  # blocked before its first read
        await task

    asyncio.run(scenario())
    assert len(h.backend.calls) > before


def test_a_storage_change_alone_reseals_without_a_new_version() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    run(h.reconcile(spec(ETH0, storage={"compression": {"enabled": False}})))
    state = h.backend.state(NAME)
    assert state.active_version == 1
    assert state.storage is not None and not state.storage.compress
    assert h.reasons()[-1] == "StorageChanged"


@pytest.mark.parametrize("retention", ["Purge", "Keep"])
def test_retention_by_the_owner(retention: str) -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    body = h.body(spec(ETH0), {})
    run(apply_retention(h.rt, body, "default", NAME, retention, LOG))
    if retention == "Purge":
        assert h.backend.state(NAME).active_version is None
        assert h.backend.read_claim(NAME) == (None, 0)
    else:
        assert h.backend.state(NAME).active_version == 1
        claim, _ = h.backend.read_claim(NAME)
        assert claim is not None and claim.released
    assert ("default", NAME) not in h.rt.components  # memory forgotten


@pytest.mark.parametrize("retention", ["Purge", "Keep"])
def test_retention_by_the_holder_when_the_record_was_put_back(retention: str) -> None:
    # tenant-x's saved record put back: the deleted resource's status still says it held the
    # name, so its retention applies (else Purge would leave its data to tenant-x's name).
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    _replace_record(h, Claim("tenant-x", NAME, "uid-old"))
    h.kube.gone.add(("tenant-x", NAME))
    body = h.body(spec(ETH0), {})
    run(apply_retention(h.rt, body, "default", NAME, retention, LOG))
    assert h.kube.lookups == [("tenant-x", NAME, "uid-old")]
    if retention == "Purge":
        assert h.backend.state(NAME).active_version is None
        assert h.backend.read_claim(NAME) == (None, 0)
    else:
        assert h.backend.state(NAME).active_version == 1
        claim, _ = h.backend.read_claim(NAME)
        assert claim == Claim(NAMESPACE, NAME, "uid-1", released=True)
    alerts = [a for a in h.backend.raised if a.reason == OWNER_RECORD_RESTORED]
    assert len(alerts) == 1 and "tenant-x/sniffer (uid uid-old)" in alerts[0].detail


def test_a_status_alone_does_not_purge_a_live_owners_data() -> None:
    # The record names tenant-x/sniffer, alive; this resource's status says it holds the name
    # (written with more than the operator's rights): its Purge touches nothing.
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    _replace_record(h, Claim("tenant-x", NAME, "uid-x"))
    body = h.body(spec(ETH0), {})
    run(apply_retention(h.rt, body, "default", NAME, "Purge", LOG))
    assert h.backend.state(NAME).active_version == 1
    assert h.backend.read_claim(NAME)[0] == Claim("tenant-x", NAME, "uid-x")
    assert not [a for a in h.backend.raised if a.reason == OWNER_RECORD_RESTORED]


def test_a_deletion_seen_releases_a_keep_claim_once_and_ends_the_daemon() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    body = h.body(spec(ETH0), {})
    run(gone(h.rt, body, "default", NAME, "Keep", LOG))
    claim, revision = h.backend.read_claim(NAME)
    assert claim is not None and claim.released
    assert h.rt.is_gone("uid-1") and not h.rt.is_gone("uid-2")
    assert ("default", NAME) not in h.rt.components
    run(gone(h.rt, body, "default", NAME, "Keep", LOG))  # a repeated event writes nothing
    assert h.backend.read_claim(NAME)[1] == revision


def test_a_purge_applied_by_the_finalizer_is_not_applied_again_when_the_resource_goes() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    body = h.body(spec(ETH0), {})
    run(apply_retention(h.rt, body, "default", NAME, "Purge", LOG))
    assert h.rt.is_gone("uid-1")  # the daemon ends even if kopf's stop came late
    calls = len(h.backend.calls)
    run(gone(h.rt, body, "default", NAME, "Purge", LOG))
    assert len(h.backend.calls) == calls


def test_a_keep_release_that_fails_leaves_the_claim_and_raises_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # No finalizer, so no retry: the claim stays held, and `decide_claim` treats it as
    # released once the API server says its owner is gone (test above).
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    h.backend.fail("read_claim", StoreUnavailableError(["http://etcd:2379"], "down"))
    run(gone(h.rt, h.body(spec(ETH0), {}), "default", NAME, "Keep", LOG))
    assert h.backend.read_claim(NAME)[0] == Claim("default", NAME, "uid-1")
    assert h.rt.is_gone("uid-1") and ("default", NAME) not in h.rt.components
    assert "retention Keep of deleted default/sniffer not applied" in caplog.text


def test_retention_by_another_resource_touches_nothing() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    intruder = {**h.body(spec(ETH0), {}), "metadata": {"uid": "uid-9"}}
    run(apply_retention(h.rt, intruder, "tenant-b", NAME, "Purge", LOG))
    assert h.backend.state(NAME).active_version == 1
    assert h.backend.read_claim(NAME)[0] == Claim("default", NAME, "uid-1")


def test_misconfiguration_is_announced_once_and_alerted() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    h.add_pod("sniffer-a")
    h.beat("sniffer-a", error="UnknownKey")
    run_monitor(h)
    run_monitor(h)
    assert h.condition(cond.MISCONFIGURED)["status"] == cond.TRUE
    assert h.reasons().count("UnknownKey") == 1  # the Event when it starts, not every pass
    assert [a.reason for a in h.backend.raised].count("Misconfigured") == 1


def test_a_misconfiguration_is_judged_again_when_its_reports_leave_the_window() -> None:
    h = Harness()
    h.rt.settings = h.rt.settings.model_copy(update={"misconfig_window_seconds": 3})
    run(h.reconcile(spec(ETH0)))
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    healthy_due = run_monitor(h)
    began = utcnow()
    h.beat("sniffer-a", error="UnknownKey")
    due = run_monitor(h)
    assert h.condition(cond.MISCONFIGURED)["status"] == cond.TRUE
    # The pass asks to run again when the report leaves the 3 s window, not at the interval
    # bound (30 s) or the pod's heartbeat deadline (what it asked for without the report).
    assert isinstance(due, datetime) and isinstance(healthy_due, datetime)
    assert began <= due <= utcnow() + timedelta(seconds=3)
    assert healthy_due > utcnow() + timedelta(seconds=3)


def test_a_pass_that_cannot_read_etcd_judges_nothing_and_still_publishes() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    run_monitor(h)
    calls = len(h.backend.calls)
    h.backend.unavailable = True  # etcd went away after its health was measured
    run_monitor(h)
    # One read failed; nothing after it touched etcd (no cadence, breaker, revert).
    assert h.backend.calls[calls:] == ["instances"]
    assert h.kube.deleted == []
    # No heartbeat read is no missed heartbeat: nothing is blamed on the pod.
    assert h.condition(cond.HEARTBEATING)["status"] != cond.FALSE


def test_a_resource_stored_with_one_miss_is_run_with_two_and_warned() -> None:
    """An object the API server kept from before the minimum became 2: reconciled, its cadence
    published with 2 misses, a HeartbeatMissesRaised Warning Event; the monitor judges it."""
    h = Harness()
    legacy = spec(ETH0, heartbeat={"intervalSeconds": 5, "missedBeforeRestart": 1})
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    run(h.reconcile(legacy, first_pass=True))
    assert h.reasons() == ["HeartbeatMissesRaised"]
    assert h.events[0].type == "Warning" and "run as 2" in h.events[0].message
    assert h.condition(cond.CONFIG_SYNCED)["status"] == cond.TRUE
    cadence = h.backend.cadences.get(NAME)
    assert cadence is not None and (cadence.interval_seconds, cadence.allowed_misses) == (5, 2)
    run_monitor(h, legacy)
    assert h.condition(cond.READY)["status"] == cond.TRUE


def test_config_synced_keeps_the_generation_it_was_judged_on() -> None:
    """A reconcile of generation 2 that fails before judging spec.config, and the passes while
    kopf waits to retry, leave ConfigSynced and Ready at generation 1: they say nothing of 2.
    A restarted operator keeps that generation; the next reconcile that judges moves it."""
    h = Harness()
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    run(h.reconcile(spec(ETH0), first_pass=True))
    assert h.condition(cond.CONFIG_SYNCED)["observedGeneration"] == 1
    read_claim = h.backend.read_claim

    def unreachable(*_: object, **__: object) -> object:
        raise KubeError("the owner record could not be read")

    h.backend.read_claim = unreachable  # type: ignore[method-assign]
    with pytest.raises(kopf.TemporaryError):
        run(h.reconcile(spec(ETH1), first_pass=True))
    h.generation += 1  # generation 3, not reconciled either
    run_monitor(h, spec(ETH1))

    def judged_on(ctype: str) -> object:
        return h.condition(ctype)["observedGeneration"]

    assert h.condition(cond.CONFIG_SYNCED)["status"] == cond.TRUE
    assert (judged_on(cond.CONFIG_SYNCED), judged_on(cond.READY)) == (1, 1)
    assert judged_on(cond.HEARTBEATING) == 3  # judged now
    assert h.kube.status["observedGeneration"] == 1

    restarted = Harness(backend=h.backend, kube=h.kube)
    restarted.add_pod("sniffer-a")
    restarted.generation = h.generation
    run_monitor(restarted, spec(ETH1))
    assert restarted.condition(cond.CONFIG_SYNCED)["observedGeneration"] == 1

    h.backend.read_claim = read_claim  # type: ignore[method-assign]
    run(h.reconcile(spec(ETH1), first_pass=True))
    assert judged_on(cond.CONFIG_SYNCED) == judged_on(cond.READY) == 4


def _nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        node = {"n": node}
    return node


# Deeper than the library stores (MAX_JSON_DEPTH, 100), shallow enough for the API server and
# for Python's decoder: `kubectl apply` of such a config reaches the reconcile.
TOO_DEEP = {**ETH0, "extra": _nested(150)}


def test_a_config_nested_too_deep_is_refused_like_any_invalid_config() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    run(h.reconcile(spec(TOO_DEEP)))
    assert h.backend.state(NAME).active_version == 1
    assert h.reasons() == ["ConfigInvalid"]
    synced = h.condition(cond.CONFIG_SYNCED)
    assert (synced["status"], synced["reason"]) == (cond.FALSE, "ConfigInvalid")
    assert f"config for '{NAME}'" in synced["message"]
    # Why, not the sniffer model's complaint about the extra key that holds it.
    assert "nested too deeply (over 100 levels)" in synced["message"]
    assert "extra" not in synced["message"]
    # Recorded, so a resume of the same spec is told from a new one (the revert test below).
    assert h.kube.status["specConfigDigest"] not in ("", stored(ETH0))


def test_a_config_nested_too_deep_reverts_to_master_once_when_the_spec_says_so() -> None:
    h = Harness()
    revert = {"rollout": {"onInvalidConfig": _api.InvalidConfigPolicy.REVERT_TO_MASTER.value}}
    run(h.reconcile(spec(ETH0, **revert)))
    run(h.reconcile(spec(ETH1, **revert)))
    run(h.reconcile(spec(TOO_DEEP, **revert)))
    state = h.backend.state(NAME)
    assert (state.active_version, state.active_digest) == (3, stored(ETH0))
    assert h.reasons()[-2:] == ["ConfigInvalid", "RevertedToMaster"]
    run(h.reconcile(spec(TOO_DEEP, **revert)))
    assert h.backend.state(NAME).active_version == 3
    assert h.reasons()[-1] == "ConfigInvalid"
