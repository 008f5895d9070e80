"""The per-namespace storage budget: the pure decision, and reconciles through the in-memory
harness (a commit or seed that would take its namespace over the budget is refused, nothing
written; other namespaces, rollbacks and shrinking writes are never refused)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Coroutine
from typing import Any

import kopf
import pytest
from operator_core_support import LOG, NAME, NAMESPACE, Harness, spec
from pydantic import ValidationError
from test_operator_canary_steps import PODS, beat
from test_operator_registration import (
    ETH0,
    ETH1,
    RESTORED_CLUSTER,
    purged_and_registered_again,
    refused_on_read,
    restored_from_before_the_purge,
)

from defender_config import (
    RegistrationReplayError,
    StoreUnavailableError,
    canonical_json,
    config_digest,
    contract,
)
from defender_operator import _api, _storage_budget
from defender_operator._backend import Declared
from defender_operator._decisions import conditions as cond
from defender_operator._decisions.ownership import Claim
from defender_operator._decisions.registration import REGISTRATION_FIELD
from defender_operator._decisions.storage_budget import (
    STORAGE_BUDGET_EXCEEDED,
    VALUE_OVERHEAD_BYTES,
    Footprint,
    after_commit,
    after_seed,
    decide_budget,
    namespace_budget,
    schema_fits,
    seed_bytes,
)
from defender_operator._memory_backend import Stored
from defender_operator._metrics import StorageGauges
from defender_operator._reconcile import apply_retention
from defender_operator._settings import OperatorSettings

BASE = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth0"}


def big(tag: str, filters: int = 1600) -> dict[str, Any]:
    """A config of about 6 bytes per filter (~10 KB by default), distinct per `tag`."""
    return {**BASE, "filters": [f"port {tag}"] + ["tcp"] * filters}


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def budgeted(h: Harness, every: int, per_namespace: dict[str, int] | None = None) -> None:
    h.rt.settings = h.rt.settings.model_copy(
        update={
            "namespace_storage_budget_bytes": every,
            "namespace_storage_budgets": dict(per_namespace or {}),
        }
    )


def with_history(config: dict[str, Any], limit: int) -> dict[str, Any]:
    return spec(config, rollout={"historyLimit": limit})


# --- the decision ---------------------------------------------------------------------------


def test_a_write_under_the_budget_is_allowed() -> None:
    assert decide_budget("a", "c", budget=1000, others=400, before=100, after=600) is None


def test_a_write_over_the_budget_is_refused_naming_namespace_usage_and_budget() -> None:
    refused = decide_budget("team-a", "c", budget=1000, others=400, before=100, after=601)
    assert refused is not None and refused.reason == STORAGE_BUDGET_EXCEEDED
    message = str(refused)
    assert "'team-a'" in message and "500 bytes" in message and "1001 bytes" in message
    assert "1000 bytes" in message and "ACTIVE is unchanged" in message


def test_an_unlimited_budget_refuses_nothing() -> None:
    assert decide_budget("a", "c", budget=0, others=10**12, before=0, after=10**12) is None


def test_a_write_that_does_not_grow_the_component_is_never_refused() -> None:
    # A namespace over its budget (the budget lowered since) may still shrink or keep.
    assert decide_budget("a", "c", budget=10, others=1000, before=500, after=500) is None
    assert decide_budget("a", "c", budget=10, others=1000, before=500, after=200) is None


def test_a_commit_prunes_what_falls_below_the_oldest_kept_version() -> None:
    now = Footprint(total=1000 + 100 + 3 * 200, active=100, history={3: 200, 4: 200, 5: 200})
    # Version 6 with a limit of 3 keeps 4, 5, 6: history/3 goes.
    assert after_commit(now, 300, 6, 3) == 1700 - 100 - 200 + 600
    # A raised limit prunes nothing: what it keeps is counted.
    assert after_commit(now, 300, 6, 10) == 1700 - 100 + 600


def test_a_seed_counts_master_active_history_and_the_metadata() -> None:
    assert seed_bytes(100, 50) == 3 * (100 + VALUE_OVERHEAD_BYTES) + 50 + VALUE_OVERHEAD_BYTES


def test_a_namespace_of_its_own_in_the_settings_replaces_the_default() -> None:
    assert namespace_budget("a", 100, {"a": 5, "b": 0}) == 5
    assert namespace_budget("b", 100, {"a": 5, "b": 0}) == 0
    assert namespace_budget("c", 100, {"a": 5}) == 100


def test_the_settings_default_to_256_mib_and_refuse_a_negative_budget() -> None:
    fields = OperatorSettings.model_fields
    assert fields["namespace_storage_budget_bytes"].default == 256 * 1024 * 1024
    with pytest.raises(ValidationError):
        OperatorSettings(namespace_storage_budgets={"a": -1})
    with pytest.raises(ValidationError):
        OperatorSettings(namespace_storage_budget_bytes=-1)


# --- reconciles -----------------------------------------------------------------------------


def test_a_commit_over_the_budget_is_refused_and_active_left_as_it_is() -> None:
    h = Harness()
    budgeted(h, 15_000)
    run(h.reconcile(spec(BASE)))
    before = h.backend.state(NAME)
    refusals = _storage_budget.REFUSALS.labels(NAMESPACE)
    counted = refusals._value.get()
    with pytest.raises(kopf.PermanentError):
        run(h.reconcile(spec(big("a"))))
    assert refusals._value.get() == counted + 1
    assert "commit" not in h.backend.calls
    after = h.backend.state(NAME)
    assert (after.active_version, after.active_digest) == (1, before.active_digest)
    synced = h.condition(cond.CONFIG_SYNCED)
    assert (synced["status"], synced["reason"]) == (cond.FALSE, STORAGE_BUDGET_EXCEEDED)
    assert f"namespace {NAMESPACE!r}" in synced["message"] and "15000 bytes" in synced["message"]
    assert (h.events[-1].type, h.events[-1].reason) == ("Warning", STORAGE_BUDGET_EXCEEDED)
    assert h.kube.status["activeVersion"] == 1


def test_the_same_commit_goes_through_under_a_larger_budget_of_its_namespace() -> None:
    h = Harness()
    budgeted(h, 15_000, {NAMESPACE: 64_000})
    run(h.reconcile(spec(BASE)))
    run(h.reconcile(spec(big("a"))))
    assert h.backend.state(NAME).active_version == 2
    assert h.condition(cond.CONFIG_SYNCED)["status"] == cond.TRUE
    # What it keeps now is remembered for the namespace's next decisions.
    assert h.mem.stored_bytes is not None and h.mem.stored_bytes > 20_000


def test_other_components_of_the_namespace_count_and_other_namespaces_do_not() -> None:
    h = Harness()
    budgeted(h, 64_000)
    run(h.reconcile(spec(BASE)))
    h.rt.memory("team-b", "elsewhere").stored_bytes = 10**9  # another namespace: not counted
    run(h.reconcile(spec(big("a"))))
    assert h.backend.state(NAME).active_version == 2
    h.rt.memory(NAMESPACE, "neighbour").stored_bytes = 50_000
    with pytest.raises(kopf.PermanentError):
        run(h.reconcile(spec(big("b"))))
    assert h.backend.state(NAME).active_version == 2
    assert h.condition(cond.CONFIG_SYNCED)["reason"] == STORAGE_BUDGET_EXCEEDED


def test_a_higher_history_limit_is_refused_once_what_it_keeps_exceeds_the_budget() -> None:
    def commits_until_refused(limit: int) -> int:
        h = Harness()
        budgeted(h, 60_000)
        run(h.reconcile(with_history(BASE, limit)))
        for n in range(1, 9):
            try:
                run(h.reconcile(with_history(big(str(n)), limit)))
            except kopf.PermanentError:
                assert h.condition(cond.CONFIG_SYNCED)["reason"] == STORAGE_BUDGET_EXCEEDED
                return n
        return 0

    # One kept version: the history does not grow, every commit fits.
    assert commits_until_refused(1) == 0
    # Ten kept: each commit keeps ~10 KB more, until the 60 KB budget refuses one.
    refused_at = commits_until_refused(10)
    assert 2 <= refused_at <= 6


def test_a_new_component_whose_seed_exceeds_the_budget_is_refused_with_nothing_written() -> None:
    h = Harness()
    budgeted(h, 15_000)
    with pytest.raises(kopf.PermanentError):
        run(h.reconcile(spec(big("a"))))
    assert NAME not in h.backend.components and NAME not in h.backend.claims
    assert h.condition(cond.CONFIG_SYNCED)["reason"] == STORAGE_BUDGET_EXCEEDED
    assert (h.events[-1].type, h.events[-1].reason) == ("Warning", STORAGE_BUDGET_EXCEEDED)


def test_a_new_component_costs_no_read_and_an_unknown_one_is_measured_once() -> None:
    h = Harness()
    budgeted(h, 64_000)
    run(h.reconcile(spec(BASE)))
    # The create path: what the seed wrote is known without a read.
    assert "footprint" not in h.backend.calls and h.mem.stored_bytes
    # A restarted operator (a new runtime, the same etcd) measures it at its reconcile, once.
    again = Harness(backend=h.backend, kube=h.kube)
    budgeted(again, 64_000)
    again.backend.calls.clear()
    run(again.reconcile(spec(BASE)))
    run(again.reconcile(spec(BASE)))
    assert again.backend.calls.count("footprint") == 1
    assert again.mem.stored_bytes == h.backend.footprint(NAME).total


def test_no_budget_reads_nothing() -> None:
    h = Harness()
    budgeted(h, 0)
    run(h.reconcile(spec(BASE)))
    run(h.reconcile(spec(big("a", filters=100_000))))  # ~600 KB, no budget to refuse it
    assert "footprint" not in h.backend.calls
    assert h.backend.state(NAME).active_version == 2


def test_a_rollback_to_master_is_never_refused() -> None:
    h = Harness()
    budgeted(h, 64_000)
    run(h.reconcile(spec(BASE)))
    run(h.reconcile(spec(big("a"))))
    budgeted(h, 1_000)  # lowered below what the namespace keeps
    run(h.reconcile(spec(big("a")), {_api.ROLLBACK_ANNOTATION: "master"}))
    state = h.backend.state(NAME)
    assert state.active_version == 3 and state.active_digest == state.master_digest
    assert STORAGE_BUDGET_EXCEEDED not in h.reasons()


def test_a_commit_reserves_what_it_will_keep_before_it_writes() -> None:
    # Two components of one namespace deciding one after the other, neither written yet (their
    # commits run concurrently): the second counts the first's reservation.
    h = Harness()
    budgeted(h, 30_000)
    config = big("a")

    def check(name: str) -> Any:
        return _storage_budget.check_commit(
            h.rt, NAMESPACE, name, name, config, version=2, history_limit=10
        )

    kept = run(check("first"))
    assert h.rt.memory(NAMESPACE, "first").stored_bytes == kept > 20_000
    with pytest.raises(kopf.PermanentError):
        run(check("second"))
    # A refused one reserves nothing: what it keeps stays as measured.
    assert h.rt.memory(NAMESPACE, "second").stored_bytes == 0


def test_a_seed_that_wrote_nothing_gives_its_reservation_back() -> None:
    h = Harness()
    budgeted(h, 64_000)
    h.backend.fail("claim_and_seed", StoreUnavailableError(["memory://"], "injected"))
    with pytest.raises(kopf.TemporaryError):
        run(h.reconcile(spec(BASE)))
    assert h.mem.stored_bytes is None


def test_data_a_keep_deletion_leaves_still_counts_until_the_name_is_taken_again() -> None:
    h = Harness()
    budgeted(h, 64_000)
    run(h.reconcile(spec(BASE)))
    run(h.reconcile(spec(big("a"))))
    left = h.mem.stored_bytes
    assert left is not None and left > 20_000
    run(apply_retention(h.rt, h.body(spec(big("a")), {}), NAMESPACE, NAME, "Keep", LOG))
    assert (NAMESPACE, NAME) not in h.rt.components  # the resource is gone, its data is not

    def check(namespace: str, name: str) -> Any:
        return _storage_budget.check_commit(
            h.rt, namespace, name, name, big("n", filters=4000), version=2, history_limit=10
        )

    # ~49 KB more: over the budget beside what the deleted resource left, in its namespace only.
    with pytest.raises(kopf.PermanentError):
        run(check(NAMESPACE, "neighbour"))
    run(check("team-b", "elsewhere"))
    # The name taken again (the resource re-created): counted once, as the new resource's.
    h.uid = "uid-2"
    run(h.reconcile(spec(big("a"))))
    assert NAME not in h.rt.storage_retained
    assert h.mem.stored_bytes == h.backend.footprint(NAME).total


def test_a_purge_deletion_frees_what_the_namespace_counts() -> None:
    h = Harness()
    budgeted(h, 64_000)
    run(h.reconcile(spec(BASE)))
    run(h.reconcile(spec(big("a"))))
    # What an earlier Keep deletion of the name left, not yet taken over by a measurement of
    # this resource (its reconcile stopped before one): the purge deletes that data too.
    h.rt.storage_retained[NAME] = (NAMESPACE, 50_000)
    run(apply_retention(h.rt, h.body(spec(big("a")), {}), NAMESPACE, NAME, "Purge", LOG))
    assert NAME not in h.rt.storage_retained
    assert _storage_budget.others(h.rt, NAMESPACE, "neighbour", "neighbour") == 0


def test_a_namespaces_usage_is_kept_as_its_components_change_not_summed_per_decision() -> None:
    # A thousand components created at once in one namespace (issue 17): each seed's decision
    # summed every remembered component (a quadratic burst, ~10 % of the operator's CPU).
    h = Harness()
    rt = h.rt
    rt.memory("a", "one").stored_bytes = 100
    rt.memory("a", "two").stored_bytes = 50
    rt.memory("b", "one").stored_bytes = 7
    assert rt.storage_used == {"a": 150, "b": 7}
    rt.memory("a", "two").stored_bytes = 20
    rt.memory("a", "one").stored_bytes = None  # measured again later
    assert rt.storage_used["a"] == 20
    mem = rt.memory_of("a", "two", "uid-1")
    assert mem is not None and mem.stored_bytes == 20
    # A same-named successor starts from a fresh memory: the predecessor's bytes leave the sum.
    successor = rt.memory_of("a", "two", "uid-2")
    assert successor is not None and successor.stored_bytes is None
    assert rt.storage_used["a"] == 0
    successor.stored_bytes = 30
    rt.forget("a", "two", "uid-2")
    assert rt.storage_used == {"a": 0, "b": 7}

    class Unlisted(dict[Any, Any]):
        def items(self) -> Any:
            raise AssertionError("a decision went through every component")

    rt.memory("a", "three").stored_bytes = 40
    rt.components = Unlisted(rt.components)
    assert _storage_budget.others(rt, "a", "four", "four") == 40
    assert _storage_budget.others(rt, "a", "three", "three") == 0


def test_each_namespaces_usage_and_budget_are_exported_at_scrape_time() -> None:
    h = Harness()
    budgeted(h, 64_000, {"team-c": 1_000})
    run(h.reconcile(spec(BASE)))
    h.rt.memory("team-b", "other").stored_bytes = 500
    h.rt.storage_retained["gone"] = ("team-b", 200)  # deleted with Keep: still in etcd
    gauges = StorageGauges()
    assert [f.samples for f in gauges.collect()] == [[], []]  # no operator yet: no series
    gauges.source = lambda: _storage_budget.usage(h.rt)
    used, limit = gauges.collect()
    assert used.name == "defender_operator_storage_used_bytes"
    assert {s.labels["namespace"]: s.value for s in used.samples} == {
        NAMESPACE: float(h.mem.stored_bytes or 0),
        "team-b": 700.0,
        "team-c": 0.0,  # a budget of its own, nothing stored yet
    }
    assert {s.labels["namespace"]: s.value for s in limit.samples} == {
        NAMESPACE: 64_000.0,
        "team-b": 64_000.0,
        "team-c": 1_000.0,
    }
    assert (h.mem.stored_bytes or 0) > 0
    # A namespace whose components are all forgotten leaves the series (no stale value).
    h.rt.forget("team-b", "other", "")
    h.rt.storage_retained.clear()
    assert "team-b" not in {s.labels["namespace"] for s in next(iter(gauges.collect())).samples}


# --- every seed, and what a restart forgot -----------------------------------------------------


def planted(
    h: Harness, component: str, namespace: str, config: dict[str, Any], **claim: Any
) -> int:
    """`component` seeded in etcd and owned by a resource of `namespace` (released: deleted with
    retention Keep), by an earlier run of the operator: this one remembers nothing of it.
    Returns what it keeps."""
    h.backend.seed(component, "sniffer", config, json_schema=None, modified_by="earlier")
    owner = Claim(namespace, component, f"uid-{component}", **claim)
    assert h.backend.write_claim(component, owner, revision=0)
    return h.backend.footprint(component).total


def test_a_seed_where_the_name_lost_its_data_is_refused_over_the_budget() -> None:
    # The resource was seeded (its status shows an activeVersion) and its data then deleted in
    # etcd: its visit seeds through `seed`, not the create's transaction, a full seed again.
    h = Harness()
    budgeted(h, 64_000)
    run(h.reconcile(spec(BASE)))
    h.backend.purge(NAME)
    h.rt.memory(NAMESPACE, "neighbour").stored_bytes = 40_000
    refusals = _storage_budget.REFUSALS.labels(NAMESPACE)
    counted = refusals._value.get()
    h.backend.calls.clear()
    with pytest.raises(kopf.PermanentError):
        run(h.reconcile(spec(big("a"))))
    assert "seed" not in h.backend.calls and NAME not in h.backend.components
    assert refusals._value.get() == counted + 1
    synced = h.condition(cond.CONFIG_SYNCED)
    assert (synced["status"], synced["reason"]) == (cond.FALSE, STORAGE_BUDGET_EXCEEDED)
    assert synced["message"].startswith(f"seed of {NAME!r} refused")
    assert (h.events[-1].type, h.events[-1].reason) == ("Warning", STORAGE_BUDGET_EXCEEDED)
    # Room made in the namespace: the same seed goes through, and what it wrote is measured.
    h.rt.memory(NAMESPACE, "neighbour").stored_bytes = 0
    run(h.reconcile(spec(big("a"))))
    assert h.backend.state(NAME).active_version == 1
    assert h.mem.stored_bytes == h.backend.footprint(NAME).total > 20_000


def test_a_reseed_after_a_restore_over_the_budget_purges_nothing() -> None:
    h, saved = purged_and_registered_again()
    budgeted(h, 64_000)
    restored_from_before_the_purge(h, saved, cluster=RESTORED_CLUSTER)
    h.rt.memory(NAMESPACE, "neighbour").stored_bytes = 62_000
    h.backend.calls.clear()
    with pytest.raises(kopf.PermanentError):
        run(h.reconcile(spec(ETH1)))
    # The restored data stays as it is (every reader refuses it, as before): no name emptied.
    assert "purge" not in h.backend.calls and "claim_and_seed" not in h.backend.calls
    assert h.backend.components[NAME].registration == saved.registration
    assert h.condition(cond.CONFIG_SYNCED)["reason"] == STORAGE_BUDGET_EXCEEDED
    assert "ReseededAfterRestore" not in h.reasons()
    # Room made: re-seeded as always.
    h.rt.memory(NAMESPACE, "neighbour").stored_bytes = 0
    run(h.reconcile(spec(ETH1)))
    assert "ReseededAfterRestore" in h.reasons()
    assert h.backend.state(NAME).active_version == 1


def test_a_monitor_pass_whose_reseed_is_over_the_budget_fails_on_the_replay() -> None:
    h, saved = purged_and_registered_again()
    budgeted(h, 64_000)
    anchored = h.kube.status[REGISTRATION_FIELD]
    restored_from_before_the_purge(h, saved, cluster=RESTORED_CLUSTER)
    refused_on_read(h, saved, anchored)
    h.rt.memory(NAMESPACE, "neighbour").stored_bytes = 62_000
    h.backend.calls.clear()
    with pytest.raises(RegistrationReplayError):
        run(h.monitor(spec(ETH0)))
    assert "purge" not in h.backend.calls and "claim_and_seed" not in h.backend.calls
    assert h.backend.components[NAME].registration == saved.registration


def test_after_a_restart_what_the_namespace_keeps_is_measured_before_its_first_decision() -> None:
    # An earlier run of the operator left, in this namespace, a resource's data deleted with
    # retention Keep and a resource's not reconciled by this run yet; another namespace's too.
    h = Harness()
    budgeted(h, 64_000)
    kept = planted(h, "kept", NAMESPACE, big("k"), released=True)
    live = planted(h, "live", NAMESPACE, big("l", filters=800))
    planted(h, "elsewhere", "team-b", big("e"))
    h.backend.calls.clear()
    with pytest.raises(kopf.PermanentError):
        run(h.reconcile(spec(big("a"))))
    assert NAME not in h.backend.components and NAME not in h.backend.claims
    assert h.condition(cond.CONFIG_SYNCED)["reason"] == STORAGE_BUDGET_EXCEEDED
    assert h.rt.storage_retained == {"kept": (NAMESPACE, kept), "live": (NAMESPACE, live)}
    assert _storage_budget.usage(h.rt)[NAMESPACE] == (kept + live, 64_000)
    assert "elsewhere" not in h.rt.storage_retained
    # Once per namespace: the next decision reads nothing more of what it keeps.
    assert (h.backend.calls.count("owners"), h.backend.calls.count("footprint")) == (1, 2)
    # Another namespace's first decision measures what it owns, the owner records read once
    # per start (every one written since is this operator's own claim).
    run(_storage_budget.check_seed(h.rt, "team-b", "other", "other", 100, None))
    assert h.rt.storage_retained["elsewhere"][0] == "team-b"
    assert (h.backend.calls.count("owners"), h.backend.calls.count("footprint")) == (1, 3)
    # The live resource's reconcile measures it: counted once, as its own.
    run(_storage_budget.measure_unknown(h.rt, NAMESPACE, "live", "live"))
    assert "live" not in h.rt.storage_retained
    assert _storage_budget.others(h.rt, NAMESPACE, NAME, NAME) == kept + live
    # The kept data purged (its resource re-created and deleted with Purge): room made.
    _storage_budget.purged(h.rt, "kept")
    h.backend.calls.clear()
    run(h.reconcile(spec(big("a"))))
    assert h.backend.state(NAME).active_version == 1
    assert "owners" not in h.backend.calls and "footprint" not in h.backend.calls


def test_a_failed_measurement_fails_the_decision_and_is_made_again_by_the_next() -> None:
    h = Harness()
    budgeted(h, 64_000)
    kept = planted(h, "kept", NAMESPACE, big("k"), released=True)
    h.backend.fail("owners", StoreUnavailableError(["memory://"], "injected"))
    with pytest.raises(kopf.TemporaryError):
        run(h.reconcile(spec(BASE)))
    assert NAME not in h.backend.components  # nothing decided, nothing written
    assert NAMESPACE not in h.rt.storage_measured
    synced = h.condition(cond.CONFIG_SYNCED)
    assert (synced["status"], synced["reason"]) == (cond.UNKNOWN, "StoreUnavailable")
    h.backend.fail("footprint", StoreUnavailableError(["memory://"], "injected"))
    with pytest.raises(kopf.TemporaryError):
        run(h.reconcile(spec(BASE)))
    assert NAMESPACE not in h.rt.storage_measured and NAME not in h.backend.components
    run(h.reconcile(spec(BASE)))
    assert h.rt.storage_retained == {"kept": (NAMESPACE, kept)}
    assert h.backend.state(NAME).active_version == 1


def test_what_is_purged_or_taken_over_while_the_namespace_is_measured_is_not_charged() -> None:
    h = Harness()
    budgeted(h, 64_000)
    planted(h, "purged", NAMESPACE, big("p"), released=True)
    planted(h, "taken", NAMESPACE, big("t"), released=True)
    measure = h.backend.footprint

    def meanwhile(component: str) -> Any:
        found = measure(component)
        # Lands while the read's answer is on its way.
        if component == "purged":
            _storage_budget.purged(h.rt, component)
        else:
            h.rt.memory(NAMESPACE, component).stored_bytes = 123
        return found

    h.backend.footprint = meanwhile  # type: ignore[method-assign]
    run(_storage_budget.measure_namespace(h.rt, NAMESPACE))
    assert h.rt.storage_retained == {}
    assert _storage_budget.others(h.rt, NAMESPACE, NAME, NAME) == 123
    assert h.rt.storage_purged is None  # a purge later is no measurement's business


def test_a_component_adopted_into_another_namespace_is_charged_to_the_one_measuring_it() -> None:
    # Its owner record, read at the start, named its earlier namespace; its resource in this
    # one (adopted) measured it since: the earlier namespace is not charged it too.
    h = Harness()
    budgeted(h, 64_000)
    planted(h, NAME, "team-old", big("a"), released=True)
    run(_storage_budget.measure_namespace(h.rt, "team-z"))  # the owner records read, once
    run(h.reconcile(spec(BASE), {contract.ADOPT_ANNOTATION: f"team-old/{NAME}"}))
    assert h.backend.claims[NAME][0].namespace == NAMESPACE
    assert h.mem.stored_bytes
    run(_storage_budget.measure_namespace(h.rt, "team-old"))
    assert NAME not in h.rt.storage_retained
    assert _storage_budget.others(h.rt, "team-old", "x", "x") == 0


def test_a_monitor_pass_re_raises_a_reseed_refusal_that_is_not_the_budgets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h, saved = purged_and_registered_again()
    anchored = h.kube.status[REGISTRATION_FIELD]
    restored_from_before_the_purge(h, saved, cluster=RESTORED_CLUSTER)
    refused_on_read(h, saved, anchored)

    async def other_refusal(*args: Any, **kwargs: Any) -> None:
        raise kopf.PermanentError("refused for another reason")

    monkeypatch.setattr(_storage_budget, "check_seed_in_place", other_refusal)
    with pytest.raises(kopf.PermanentError, match="another reason"):
        run(h.monitor(spec(ETH0)))


def test_a_seed_adds_to_what_the_name_keeps_unless_it_is_purged_first() -> None:
    assert after_seed(700, 300, purging=False) == 1000
    assert after_seed(700, 300, purging=True) == 300


def test_the_component_deciding_is_measured_by_its_decision_not_twice() -> None:
    h = Harness()
    budgeted(h, 64_000)
    planted(h, NAME, NAMESPACE, BASE)  # an earlier run's, this resource's (its claim)
    h.backend.calls.clear()
    run(h.reconcile(spec(big("a"))))  # a commit: what it prunes read once
    assert h.backend.calls.count("footprint") == 1
    assert h.backend.state(NAME).active_version == 2


# --- spec.customSchema changes ----------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"rate": {"type": "integer"}}}
RATE = {"rate": 1}


def custom(schema: dict[str, Any]) -> dict[str, Any]:
    return spec(RATE, componentType="custom", customSchema=schema)


def described(size: int) -> dict[str, Any]:
    """SCHEMA, `size` bytes larger (its description)."""
    return {**SCHEMA, "description": "x" * size}


def test_a_schema_that_does_not_grow_the_record_fits_any_cap() -> None:
    assert schema_fits(-5, -100) and schema_fits(0, -1)  # a namespace over its budget too
    assert schema_fits(10**9, None)  # no budget applies
    assert schema_fits(10, 10) and not schema_fits(11, 10) and not schema_fits(1, 0)


def test_a_schema_change_over_the_budget_is_refused_and_nothing_of_it_recorded() -> None:
    h = Harness()
    budgeted(h, 15_000)
    run(h.reconcile(custom(SCHEMA)))
    refusals = _storage_budget.REFUSALS.labels(NAMESPACE)
    counted = refusals._value.get()
    with pytest.raises(kopf.PermanentError):
        run(h.reconcile(custom(described(20_000))))
    assert refusals._value.get() == counted + 1
    assert h.backend.components[NAME].json_schema == SCHEMA  # the record as it was
    assert h.backend.state(NAME).active_version == 1
    synced = h.condition(cond.CONFIG_SYNCED)
    assert (synced["status"], synced["reason"]) == (cond.FALSE, STORAGE_BUDGET_EXCEEDED)
    assert "spec.customSchema change of" in synced["message"] and "15000 bytes" in synced["message"]
    assert (h.events[-1].type, h.events[-1].reason) == ("Warning", STORAGE_BUDGET_EXCEEDED)


def test_schema_changes_are_judged_once_and_counted_for_the_namespace() -> None:
    h = Harness()
    budgeted(h, 50_000)
    run(h.reconcile(custom(SCHEMA)))
    for size in (20_000, 40_000):
        h.backend.calls.clear()
        run(h.reconcile(custom(described(size))))
        assert h.backend.components[NAME].json_schema == described(size)
        # Judged on one measurement, then declared again with what was judged.
        assert h.backend.calls.count("footprint") == 1 and h.backend.calls.count("declare") == 2
        assert h.mem.stored_bytes == h.backend.footprint(NAME).total
    # What it keeps now counts against the namespace's other components' changes...
    with pytest.raises(kopf.PermanentError):
        run(_storage_budget.check_schema(h.rt, NAMESPACE, "other", "other", 20_000))
    # ...and its own.
    with pytest.raises(kopf.PermanentError):
        run(h.reconcile(custom(described(60_000))))
    assert h.backend.components[NAME].json_schema == described(40_000)
    assert h.condition(cond.CONFIG_SYNCED)["reason"] == STORAGE_BUDGET_EXCEEDED


def test_a_schema_that_does_not_grow_is_never_refused_nor_judged_even_over_the_budget() -> None:
    h = Harness()
    budgeted(h, 64_000)
    run(h.reconcile(custom(described(40_000))))
    budgeted(h, 1_000)  # lowered below what the namespace keeps
    h.backend.calls.clear()
    run(h.reconcile(custom(described(40_000))))  # unchanged
    assert "footprint" not in h.backend.calls and h.backend.calls.count("declare") == 1
    kept, counted = h.backend.footprint(NAME).total, h.mem.stored_bytes
    h.backend.calls.clear()
    run(h.reconcile(custom(described(30_000))))  # smaller
    assert h.backend.components[NAME].json_schema == described(30_000)
    assert STORAGE_BUDGET_EXCEEDED not in h.reasons()
    assert "footprint" not in h.backend.calls and h.backend.calls.count("declare") == 1
    # What it freed is counted at once.
    assert counted is not None and h.mem.stored_bytes == counted - 10_000
    assert h.backend.footprint(NAME).total == kept - 10_000


def test_a_schema_change_under_no_budget_is_recorded_unjudged() -> None:
    h = Harness()
    budgeted(h, 0)
    run(h.reconcile(custom(SCHEMA)))
    h.backend.calls.clear()
    run(h.reconcile(custom(described(100_000))))
    assert h.backend.components[NAME].json_schema == described(100_000)
    assert "footprint" not in h.backend.calls and h.backend.calls.count("declare") == 1
    # The budget lifted between the declare and its judgment: nothing judged, no cap.
    assert run(_storage_budget.check_schema(h.rt, NAMESPACE, NAME, NAME, 10**9)) is None


def test_a_schema_change_reserves_what_it_grows_before_it_is_written() -> None:
    # Two components of one namespace judged one after the other, neither declared again yet:
    # the second counts the first's reservation.
    h = Harness()
    budgeted(h, 30_000)
    assert run(_storage_budget.check_schema(h.rt, NAMESPACE, "first", "first", 20_000)) == 20_000
    assert h.rt.memory(NAMESPACE, "first").stored_bytes == 20_000
    with pytest.raises(kopf.PermanentError):
        run(_storage_budget.check_schema(h.rt, NAMESPACE, "second", "second", 20_000))
    assert h.rt.memory(NAMESPACE, "second").stored_bytes == 0


def test_a_record_grown_between_the_judgment_and_the_write_is_judged_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Harness()
    budgeted(h, 64_000)
    run(h.reconcile(custom(SCHEMA)))
    declare = h.backend.declare
    caps: list[int | None] = []

    def grown_meanwhile(*args: Any, schema_cap: int | None = None, **kwargs: Any) -> Declared:
        caps.append(schema_cap)
        if len(caps) == 2 and schema_cap is not None:
            # The record grew by 10 bytes since the judgment (a commit landed): over the cap.
            return Declared(schema_growth=schema_cap + 10, schema_capped=True)
        return declare(*args, schema_cap=schema_cap, **kwargs)

    monkeypatch.setattr(h.backend, "declare", grown_meanwhile)
    run(h.reconcile(custom(described(20_000))))
    assert h.backend.components[NAME].json_schema == described(20_000)
    assert len(caps) == 3 and caps[0] == 0 and caps[2] == caps[1] + 10  # type: ignore[operator]


def test_a_schema_recorded_by_the_commit_is_counted_by_the_commits_judgment() -> None:
    # ACTIVE is not valid under the new schema: the declare does not record it, the commit of
    # spec.config that comes with it does. Each fits alone; together they would not.
    h = Harness()
    budgeted(h, 64_000)
    run(h.reconcile(custom(SCHEMA)))
    strict = {
        "type": "object",
        "properties": {"rate": {"type": "string"}},
        "description": "x" * 20_000,
    }
    growth = len(canonical_json(strict)) - len(canonical_json(SCHEMA))
    budgeted(h, h.backend.footprint(NAME).total + growth + 50)
    with pytest.raises(kopf.PermanentError):
        run(h.reconcile(spec({"rate": "fast"}, componentType="custom", customSchema=strict)))
    synced = h.condition(cond.CONFIG_SYNCED)
    assert synced["reason"] == STORAGE_BUDGET_EXCEEDED and synced["message"].startswith("commit")
    assert h.backend.components[NAME].json_schema == SCHEMA
    assert h.backend.state(NAME).active_version == 1
    # Counted by that judgment only: a commit without it is judged on what etcd holds.
    assert h.mem.schema_unrecorded == 0


def custom_record_put_back() -> tuple[Harness, Stored]:
    """A custom component (SCHEMA) whose resource was deleted (Purge) and created again (a new
    registration), then the earlier registration's record and ACTIVE put back by someone with
    etcd access: its next declare re-signs the record, rebuilt with the spec's schema."""
    old = Harness()
    run(old.reconcile(custom(SCHEMA)))
    saved = copy.deepcopy(old.backend.components[NAME])
    run(apply_retention(old.rt, old.body(custom(SCHEMA), {}), NAMESPACE, NAME, "Purge", LOG))
    h = Harness(backend=old.backend, uid="uid-2")
    run(h.reconcile(custom(SCHEMA)))
    h.backend.put_back(NAME, saved)
    return h, saved


def test_a_resign_with_a_larger_schema_over_the_budget_is_refused_and_nothing_re_signed() -> None:
    h, saved = custom_record_put_back()
    budgeted(h, h.backend.footprint(NAME).total + 1_000)
    h.events.clear()
    with pytest.raises(kopf.PermanentError):
        run(h.reconcile(custom(described(20_000))))
    synced = h.condition(cond.CONFIG_SYNCED)
    assert (synced["status"], synced["reason"]) == (cond.FALSE, STORAGE_BUDGET_EXCEEDED)
    assert synced["message"].startswith(f"spec.customSchema change of {NAME!r} refused")
    assert (h.events[-1].type, h.events[-1].reason) == ("Warning", STORAGE_BUDGET_EXCEEDED)
    # The name as it was: the record put back is not re-signed, no schema recorded.
    assert "MetadataResigned" not in h.reasons()
    assert h.backend.components[NAME].registration == saved.registration
    assert h.backend.components[NAME].json_schema == SCHEMA
    # Room made: re-signed with the schema it judged.
    budgeted(h, 64_000)
    run(h.reconcile(custom(described(20_000))))
    assert "MetadataResigned" in h.reasons()
    assert h.backend.components[NAME].registration == h.kube.status[REGISTRATION_FIELD]
    assert h.backend.components[NAME].json_schema == described(20_000)
    assert h.mem.stored_bytes == h.backend.footprint(NAME).total
    assert h.mem.schema_unrecorded == 0  # recorded by the re-sign: no commit counts it again


def test_a_resign_with_the_schema_the_record_holds_is_never_judged_even_over_the_budget() -> None:
    h, saved = custom_record_put_back()
    budgeted(h, 1_000)  # lowered below what the namespace keeps
    h.backend.calls.clear()
    run(h.reconcile(custom(SCHEMA)))
    assert "MetadataResigned" in h.reasons() and STORAGE_BUDGET_EXCEEDED not in h.reasons()
    assert "footprint" not in h.backend.calls and h.backend.calls.count("declare") == 1
    assert h.backend.components[NAME].registration != saved.registration


def test_a_promotion_records_no_schema_and_the_next_declare_judges_it() -> None:
    # ACTIVE is not valid under the new schema: the canary's start is judged with it (its
    # commit), but the promotion commits under the schema the record holds, so the schema is
    # recorded by a later declare, judged then like any spec.customSchema change.
    h = Harness()
    budgeted(h, 64_000)
    canary = {"canary": {"instances": 1, "holdSeconds": 0}}
    first = spec({"rate": 3}, componentType="custom", customSchema=SCHEMA, rollout=canary)
    run(h.reconcile(first))
    for pod in PODS:
        h.add_pod(pod)
        beat(h, pod, config_digest({"rate": 3}))
    run(h.monitor(first))
    strict = {
        "type": "object",
        "properties": {"rate": {"type": "integer", "maximum": 2}},
        "description": "x" * 20_000,
    }
    second = spec({"rate": 2}, componentType="custom", customSchema=strict, rollout=canary)
    run(h.reconcile(second))
    assert NAME in h.backend.rollouts and h.backend.components[NAME].json_schema == SCHEMA
    beat(h, h.backend.rollouts[NAME][0].canaries[0], config_digest({"rate": 2}))
    budgeted(h, h.backend.footprint(NAME).total + 1_000)  # the namespace filled meanwhile
    run(h.monitor(second))
    assert h.reasons()[-1] == "CanaryPromoted" and h.backend.state(NAME).active_version == 2
    assert h.backend.components[NAME].json_schema == SCHEMA
    with pytest.raises(kopf.PermanentError):
        run(h.reconcile(second))
    synced = h.condition(cond.CONFIG_SYNCED)
    assert (synced["status"], synced["reason"]) == (cond.FALSE, STORAGE_BUDGET_EXCEEDED)
    assert synced["message"].startswith(f"spec.customSchema change of {NAME!r} refused")
    assert h.backend.components[NAME].json_schema == SCHEMA
