"""The canary rollout through reconcile and the monitor pass, against the in-memory Backend:
started instead of a commit, promoted after the hold, aborted (and frozen) on a failing canary,
and the promote / abort commands."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from operator_core_support import NAME, Harness, plant, spec
from prometheus_client import REGISTRY
from pydantic import ValidationError

from defender_config import ChangeKind, ConfigFrozenError, config_digest, contract, validate_config
from defender_operator import _api, _monitor
from defender_operator._backend import InstanceRecord
from defender_operator._decisions import conditions as cond
from defender_operator._decisions.canary import Action, CanaryBeat, RolloutView, judge_canary
from defender_operator._kube import Pod
from defender_operator._metrics import CANARY_ABORT_REASONS, forget_component
from defender_operator._runtime import utcnow

BASE = {"node_id": "sniffer-01", "version": "1.0.0"}
ETH0 = {**BASE, "interface": "eth0"}
ETH1 = {**BASE, "interface": "eth1"}
PODS = ("sniffer-a", "sniffer-b", "sniffer-c")


def stored(config: dict[str, str]) -> str:
    return config_digest(validate_config("sniffer", config, None))


def canary_spec(config: dict[str, str], hold: int = 0, **canary: Any) -> dict[str, Any]:
    return spec(
        config,
        rollout={"canary": {"instances": 1, "holdSeconds": hold, **canary}},
    )


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def beat(h: Harness, pod: str, digest: str, error: str | None = None) -> None:
    h.backend.add_instance(
        NAME,
        InstanceRecord(
            instance=pod,
            pod=pod,
            time=utcnow(),
            status="RUNNING",
            config_digest=digest,
            key_fingerprint=h.rt.keyring.current().primary_fingerprint,
            last_error_reason=error,
            last_error_detail="probe failed" if error else "",
            verified=True,
        ),
    )


def started(hold: int = 0) -> Harness:
    """Version 1 on three beating instances, then ETH1 under a one-instance canary."""
    h = Harness()
    run(h.reconcile(canary_spec(ETH0, hold)))
    for pod in PODS:
        h.add_pod(pod)
        beat(h, pod, stored(ETH0))
    asyncio.run(h.monitor(canary_spec(ETH0, hold)))
    run(h.reconcile(canary_spec(ETH1, hold)))
    return h


def test_a_new_config_starts_a_canary_instead_of_a_commit() -> None:
    h = started()
    record = h.backend.rollouts[NAME][0]
    assert (record.version, record.base_version, record.canaries) == (2, 1, ("sniffer-a",))
    assert record.digest == stored(ETH1)
    assert h.backend.state(NAME).active_version == 1
    assert "commit" not in h.backend.calls
    assert h.reasons() == ["CanaryStarted"]
    assert h.condition(cond.CONFIG_SYNCED)["reason"] == "CanaryInProgress"
    assert h.condition(cond.ROLLOUT)["reason"] == "Progressing"
    assert h.kube.status["rollout"]["canaries"] == ["sniffer-a"]
    # A resume with the same spec starts nothing new.
    run(h.reconcile(canary_spec(ETH1)))
    assert h.backend.calls.count("start_rollout") == 1


def test_the_monitor_waits_for_the_canary_then_promotes() -> None:
    h = started()
    asyncio.run(h.monitor(canary_spec(ETH1)))
    assert h.condition(cond.ROLLOUT)["reason"] == "Progressing"
    assert "waiting for sniffer-a" in h.kube.status["rollout"]["message"]
    beat(h, "sniffer-a", stored(ETH1))
    asyncio.run(h.monitor(canary_spec(ETH1)))
    state = h.backend.state(NAME)
    assert (state.active_version, state.active_digest) == (2, stored(ETH1))
    assert NAME not in h.backend.rollouts
    assert h.reasons()[-1] == "CanaryPromoted"
    assert h.condition(cond.ROLLOUT)["reason"] == "Promoted"
    assert h.condition(cond.CONFIG_SYNCED)["status"] == cond.TRUE
    assert h.kube.status["rollout"]["phase"] == "Promoted"
    # The breaker guards the promoted version like a commit.
    change = h.mem.last_change
    assert change is not None and (change.previous_version, change.version) == (1, 2)


def test_the_hold_must_pass_before_promotion() -> None:
    h = started(hold=3600)
    beat(h, "sniffer-a", stored(ETH1))
    asyncio.run(h.monitor(canary_spec(ETH1, 3600)))
    assert h.backend.state(NAME).active_version == 1
    assert h.kube.status["rollout"]["healthySince"] is not None
    assert "promotion in" in h.kube.status["rollout"]["message"]


def test_a_failing_canary_aborts_freezes_and_writes_the_base_again() -> None:
    h = started()
    beat(h, "sniffer-a", stored(ETH1), error="HealthCheckFailed")
    asyncio.run(h.monitor(canary_spec(ETH1)))
    state = h.backend.state(NAME)
    assert state.frozen
    assert (state.active_version, state.active_digest) == (2, stored(ETH0))
    assert h.backend.components[NAME].change is ChangeKind.CANARY_ABORT
    assert NAME not in h.backend.rollouts
    assert h.reasons()[-1] == "CanaryAborted"
    aborted = h.condition(cond.ROLLOUT)
    assert (aborted["status"], aborted["reason"]) == (cond.FALSE, "Aborted")
    assert "sniffer-a: HealthCheckFailed" in aborted["message"]
    assert h.condition(cond.CONFIG_SYNCED)["reason"] == "Frozen"
    assert any(a.reason == "CanaryAborted" for a in h.backend.raised)


def test_a_lost_canary_aborts() -> None:
    h = started()
    h.backend.remove_instance(NAME, "sniffer-a")
    asyncio.run(h.monitor(canary_spec(ETH1)))
    assert h.backend.state(NAME).frozen
    assert "heartbeat lost" in h.condition(cond.ROLLOUT)["message"]


def test_promote_and_abort_commands() -> None:
    h = started(hold=3600)
    run(h.reconcile(canary_spec(ETH1, 3600), {contract.PROMOTE_ANNOTATION: "now"}))
    assert h.backend.state(NAME).active_version == 2
    assert "CanaryPromoted" in h.reasons()
    assert contract.PROMOTE_ANNOTATION in h.kube.removed

    h = started(hold=3600)
    run(h.reconcile(canary_spec(ETH1, 3600), {contract.ABORT_ANNOTATION: "now"}))
    state = h.backend.state(NAME)
    assert state.frozen and state.active_digest == stored(ETH0)
    assert "CanaryAborted" in h.reasons()
    assert contract.ABORT_ANNOTATION in h.kube.removed


def test_an_abort_by_command_shows_frozen_as_an_abort_by_the_monitor_does() -> None:
    # Seen on `make up`: after `kubectl defender abort` the same reconcile went on to say
    # ConfigSynced True/ActiveDiffersFromSpec and Ready True, with commits frozen.
    h = started(hold=3600)
    run(h.reconcile(canary_spec(ETH1, 3600), {contract.ABORT_ANNOTATION: "now"}))
    assert h.backend.state(NAME).frozen
    synced = h.condition(cond.CONFIG_SYNCED)
    assert (synced["status"], synced["reason"]) == (cond.FALSE, "Frozen")
    assert "aborted by command" in synced["message"]
    assert h.condition(cond.READY)["status"] != cond.TRUE
    # And the monitor's next pass keeps it (it only moves Synced and ActiveDiffersFromSpec).
    asyncio.run(h.monitor(canary_spec(ETH1, 3600)))
    assert h.condition(cond.CONFIG_SYNCED)["reason"] == "Frozen"
    # A reconcile that commits nothing while the freeze holds (the operator's resume) too.
    run(h.reconcile(canary_spec(ETH1, 3600)))
    assert h.condition(cond.CONFIG_SYNCED)["reason"] == "Frozen"


def limited(config: dict[str, str], history_limit: int, hold: int = 0) -> dict[str, Any]:
    out = canary_spec(config, hold)
    out["rollout"]["historyLimit"] = history_limit
    return out


def test_the_monitor_promotes_with_the_history_limit_the_spec_holds_then() -> None:
    # Started under the default (10), edited to 1 before the promotion: the promotion is the
    # commit that prunes, so it keeps what the spec asks for now.
    h = started()
    beat(h, "sniffer-a", stored(ETH1))
    asyncio.run(h.monitor(limited(ETH1, 1)))
    assert h.backend.state(NAME).active_version == 2
    assert sorted(h.backend.components[NAME].history) == [2]


def test_the_promote_command_keeps_the_spec_history_limit_above_the_backends() -> None:
    h = started(hold=3600)
    h.backend.history_limit = 1  # what a promotion without the spec's limit would keep
    run(h.reconcile(limited(ETH1, 5, 3600), {contract.PROMOTE_ANNOTATION: "now"}))
    assert h.backend.state(NAME).active_version == 2
    assert sorted(h.backend.components[NAME].history) == [1, 2]

    h = started(hold=3600)
    run(h.reconcile(limited(ETH1, 1, 3600), {contract.PROMOTE_ANNOTATION: "now"}))
    assert sorted(h.backend.components[NAME].history) == [2]


def test_a_command_without_a_rollout_is_ignored_with_a_warning() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    run(h.reconcile(spec(ETH0), {contract.PROMOTE_ANNOTATION: "now"}))
    assert h.reasons() == ["RolloutCommandIgnored"]
    assert contract.PROMOTE_ANNOTATION in h.kube.removed
    assert h.backend.state(NAME).active_version == 1


def test_without_instances_a_canary_spec_commits_directly() -> None:
    h = Harness()
    run(h.reconcile(canary_spec(ETH0)))
    run(h.reconcile(canary_spec(ETH1)))
    assert h.backend.state(NAME).active_version == 2
    assert h.reasons() == ["Committed"]


def test_a_spec_change_back_to_active_ends_the_rollout() -> None:
    h = started()
    run(h.reconcile(canary_spec(ETH0)))
    asyncio.run(h.monitor(canary_spec(ETH0)))
    assert NAME not in h.backend.rollouts
    assert h.condition(cond.ROLLOUT)["reason"] == "Superseded"
    assert h.backend.state(NAME).active_version == 1


@pytest.mark.parametrize("canary", [{}, {"instances": 1, "percent": 10}])
def test_a_canary_needs_exactly_one_size(canary: dict[str, int]) -> None:
    with pytest.raises(ValidationError, match="exactly one of instances or percent"):
        _api.parse_spec(spec(ETH0, rollout={"canary": canary}))


def aborts(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "defender_operator_canary_aborts_total", {"component": NAME, "reason": reason}
    )
    return value or 0.0


def test_an_abort_is_counted_by_reason_and_a_promotion_is_not() -> None:
    before = {r: aborts(r) for r in CANARY_ABORT_REASONS}
    h = started()
    beat(h, "sniffer-a", stored(ETH1))
    asyncio.run(h.monitor(canary_spec(ETH1)))
    assert h.condition(cond.ROLLOUT)["reason"] == "Promoted"
    assert {r: aborts(r) for r in CANARY_ABORT_REASONS} == before

    h = started()
    beat(h, "sniffer-a", stored(ETH1), error="HealthCheckFailed")
    asyncio.run(h.monitor(canary_spec(ETH1)))
    assert aborts("CanaryFailed") == before["CanaryFailed"] + 1
    # The next pass sees no rollout any more: nothing counted twice.
    asyncio.run(h.monitor(canary_spec(ETH1)))
    assert aborts("CanaryFailed") == before["CanaryFailed"] + 1

    h = started(hold=3600)
    run(h.reconcile(canary_spec(ETH1, 3600), {contract.ABORT_ANNOTATION: "now"}))
    assert aborts("Command") == before["Command"] + 1
    assert aborts("CanaryFailed") == before["CanaryFailed"] + 1

    forget_component(NAME)  # a deleted component keeps no series that could keep an alert up
    assert (
        REGISTRY.get_sample_value(
            "defender_operator_canary_aborts_total", {"component": NAME, "reason": "Command"}
        )
        is None
    )


def test_every_abort_reason_of_the_decision_has_a_documented_label() -> None:
    now = utcnow()
    view = RolloutView(2, 1, "d" * 64, ("a",), now)
    failed = judge_canary(
        now=now,
        rollout=view,
        active_version=1,
        beats={"a": CanaryBeat(alive=False)},
        healthy_since=None,
        hold_seconds=0,
        deadline_seconds=60,
    )
    late = judge_canary(
        now=now + timedelta(seconds=61),
        rollout=view,
        active_version=1,
        beats={"a": CanaryBeat(alive=True, digest="e" * 64)},
        healthy_since=None,
        hold_seconds=0,
        deadline_seconds=60,
    )
    assert failed.action is late.action is Action.ABORT
    assert {failed.reason, late.reason} | {"Command"} == set(CANARY_ABORT_REASONS)


# --- saved rollout records put back (docs/security.md, "Replays across a record's lifetime") ---

ETH2 = {**BASE, "interface": "eth2"}


def test_the_status_anchors_the_rollout_record() -> None:
    h = started()
    record = h.backend.rollouts[NAME][0]
    shown = h.kube.status["rollout"]
    assert record.sequence > 0
    assert (shown["sequence"], shown["digest"], shown["by"]) == (
        record.sequence,
        record.digest,
        record.by,
    )
    assert shown["since"] == cond.rfc3339(record.since)


def test_a_new_rollout_takes_a_sequence_above_the_anchored_one() -> None:
    h = started(hold=3600)
    first = h.backend.rollouts[NAME][0]
    # As if the clock of another replica were behind: the anchor still wins.
    h.kube.status["rollout"]["sequence"] = first.sequence + 10**9
    run(h.reconcile(canary_spec(ETH2, 3600)))
    assert h.backend.rollouts[NAME][0].sequence == first.sequence + 10**9 + 1


def test_a_replayed_record_during_a_rollout_is_written_over_with_the_current_one() -> None:
    h = started(hold=3600)
    saved = h.backend.rollouts[NAME]
    run(h.reconcile(canary_spec(ETH2, 3600)))  # spec changed: the next rollout, same base
    current = h.backend.rollouts[NAME][0]
    assert current.sequence > saved[0].sequence and current.base_version == 1
    h.backend.rollouts[NAME] = saved  # the attacker's raw put
    asyncio.run(h.monitor(canary_spec(ETH2, 3600)))
    again = h.backend.rollouts[NAME][0]
    assert again.digest == stored(ETH2) and again.sequence > current.sequence
    assert (again.canaries, again.by, again.version) == (current.canaries, current.by, 2)
    assert h.kube.status["rollout"]["sequence"] == again.sequence
    assert h.condition(cond.ROLLOUT)["reason"] == "Progressing"
    assert "RolloutRecordReplayed" in h.reasons()
    assert any(a.reason == "RecordReplayed" for a in h.backend.raised)
    assert h.backend.state(NAME).active_version == 1
    # The next pass keeps it: nothing written again.
    starts = h.backend.calls.count("start_rollout")
    asyncio.run(h.monitor(canary_spec(ETH2, 3600)))
    assert h.backend.calls.count("start_rollout") == starts


def test_a_record_deleted_during_a_rollout_is_written_again() -> None:
    # Before, status stayed on Progressing while the canaries fell back to ACTIVE for good.
    h = started(hold=3600)
    current = h.backend.rollouts.pop(NAME)[0]  # the attacker's raw delete
    asyncio.run(h.monitor(canary_spec(ETH1, 3600)))
    again = h.backend.rollouts[NAME][0]
    assert again.digest == stored(ETH1) and again.sequence > current.sequence
    assert (again.canaries, again.by, again.version) == (current.canaries, current.by, 2)
    assert h.kube.status["rollout"]["sequence"] == again.sequence
    assert h.condition(cond.ROLLOUT)["reason"] == "Progressing"
    assert "RolloutRecordReplayed" in h.reasons()
    assert h.backend.state(NAME).active_version == 1
    # Promoted later as usual, and then no record is no rollout to resume.
    run(h.reconcile(canary_spec(ETH1, 3600), {contract.PROMOTE_ANNOTATION: "now"}))
    assert h.backend.state(NAME).active_version == 2
    starts = h.backend.calls.count("start_rollout")
    asyncio.run(h.monitor(canary_spec(ETH1, 3600)))
    assert h.backend.calls.count("start_rollout") == starts


def test_a_replayed_record_after_its_rollout_ended_is_ended_again() -> None:
    h = started(hold=3600)
    saved = h.backend.rollouts[NAME]
    run(h.reconcile(canary_spec(ETH0, 3600)))  # back to ACTIVE's config: nothing to try
    asyncio.run(h.monitor(canary_spec(ETH0, 3600)))
    assert NAME not in h.backend.rollouts
    assert h.condition(cond.ROLLOUT)["reason"] == "Superseded"
    h.backend.rollouts[NAME] = saved  # same base version as ACTIVE: would run again
    asyncio.run(h.monitor(canary_spec(ETH0, 3600)))
    assert NAME not in h.backend.rollouts
    assert "RolloutRecordReplayed" in h.reasons()
    assert h.condition(cond.ROLLOUT)["reason"] == "Superseded"
    assert h.backend.state(NAME).active_version == 1


def test_a_replay_whose_anchored_rollout_no_longer_matches_the_spec_is_ended() -> None:
    h = started(hold=3600)
    saved = h.backend.rollouts[NAME]
    run(h.reconcile(canary_spec(ETH2, 3600)))
    h.backend.rollouts[NAME] = saved
    # spec.config changed again, not reconciled yet: the anchored config is not the spec's,
    # so it is not written again (refused by its digest) and the replay is ended.
    asyncio.run(h.monitor(canary_spec({**BASE, "interface": "eth3"}, 3600)))
    assert NAME not in h.backend.rollouts
    assert "RolloutRecordReplayed" in h.reasons()


def test_a_record_from_before_sequences_is_issued_again_with_one() -> None:
    h = started(hold=3600)
    record, config = h.backend.rollouts[NAME]
    h.backend.rollouts[NAME] = (record.model_copy(update={"sequence": 0}), config)
    del h.kube.status["rollout"]["sequence"]  # status written before the field existed
    asyncio.run(h.monitor(canary_spec(ETH1, 3600)))
    again = h.backend.rollouts[NAME][0]
    assert again.sequence > 0 and again.digest == record.digest and again.by == record.by
    assert h.kube.status["rollout"]["sequence"] == again.sequence
    assert "RolloutReissued" in h.reasons() and "RolloutRecordReplayed" not in h.reasons()
    assert not any(a.reason == "RecordReplayed" for a in h.backend.raised)


def test_a_command_on_a_replayed_record_is_ignored() -> None:
    h = started(hold=3600)
    saved = h.backend.rollouts[NAME]
    run(h.reconcile(canary_spec(ETH2, 3600)))
    h.backend.rollouts[NAME] = saved
    run(h.reconcile(canary_spec(ETH2, 3600), {contract.PROMOTE_ANNOTATION: "now"}))
    # Promoting it would make the superseded candidate ACTIVE everywhere.
    assert h.backend.state(NAME).active_version == 1
    assert h.reasons()[-1] == "RolloutCommandIgnored"
    assert "not the current one" in h.events[-1].message
    assert contract.PROMOTE_ANNOTATION in h.kube.removed


def test_an_ended_record_put_back_over_a_rollout_is_written_over_with_the_current_one() -> None:
    h = started(hold=3600)
    record, config = h.backend.rollouts[NAME]
    # The ended record of an earlier rollout (no canaries, a lower sequence), put back.
    ended = record.model_copy(update={"canaries": (), "sequence": record.sequence - 1})
    h.backend.rollouts[NAME] = (ended, config)
    asyncio.run(h.monitor(canary_spec(ETH1, 3600)))
    again = h.backend.rollouts[NAME][0]
    assert again.canaries == record.canaries and again.sequence > record.sequence
    assert "RolloutRecordReplayed" in h.reasons()
    assert h.condition(cond.ROLLOUT)["reason"] == "Progressing"


def test_a_canary_in_progress_is_looked_at_again_within_the_rollout_poll() -> None:
    """Its hold and progress deadline run on the clock: the pass asks for the next one soon,
    however long monitor_interval_seconds is (nothing else would wake it)."""
    h = started(hold=600)
    due = asyncio.run(h.monitor(canary_spec(ETH1, 600)))
    assert due is not None
    assert due <= utcnow() + timedelta(seconds=_monitor.ROLLOUT_POLL_SECONDS)
    assert h.rt.settings.monitor_interval_seconds > _monitor.ROLLOUT_POLL_SECONDS


# --- canaries are instances of live pods --------------------------------------------------------


def leaving(h: Harness, pod: str) -> None:
    """A rolling update or a scale-down deletes `pod` (its agent beats until SIGTERM ends it)."""
    old = h.pods[pod]
    h.pods[pod] = Pod(old.name, old.uid, old.created, deleting=True)


def podless(
    h: Harness,
    instance: str,
    digest: str | None = None,
    *,
    pod: str | None = None,
    verified: bool = True,
) -> None:
    """A record etcd write access alone can put (`digest`: the config it claims to run): naming
    no pod, or naming `pod` with a MAC that does not verify (`verified` False)."""
    unverified = None if verified else "it carries no MAC (no 'auth' field)"
    plant(h, instance, pod, digest=digest, unverified=unverified)


@pytest.mark.parametrize(
    ("pod", "verified"),
    [(None, True), ("sniffer-b", False)],
    ids=["naming-no-pod", "unverified-naming-a-real-pod"],
)
def test_a_planted_record_is_never_picked_nor_promoted(pod: str | None, verified: bool) -> None:
    h = Harness()
    run(h.reconcile(canary_spec(ETH0)))
    for real in ("sniffer-a", "sniffer-b"):
        h.add_pod(real)
        beat(h, real, stored(ETH0))
    asyncio.run(h.monitor(canary_spec(ETH0)))
    # etcd write access alone: a key that sorts first, naming no pod or failing its MAC.
    podless(h, "aaa-ghost", pod=pod, verified=verified)
    run(h.reconcile(canary_spec(ETH1)))
    assert h.backend.rollouts[NAME][0].canaries == ("sniffer-a",)
    podless(h, "aaa-ghost", stored(ETH1), pod=pod, verified=verified)
    asyncio.run(h.monitor(canary_spec(ETH1)))
    assert h.backend.state(NAME).active_version == 1
    assert "CanaryPromoted" not in h.reasons()


def test_a_pod_being_deleted_is_never_picked() -> None:
    h = Harness()
    run(h.reconcile(canary_spec(ETH0)))
    for pod in PODS:
        h.add_pod(pod)
        beat(h, pod, stored(ETH0))
    asyncio.run(h.monitor(canary_spec(ETH0)))
    leaving(h, "sniffer-a")
    run(h.reconcile(canary_spec(ETH1)))
    assert h.backend.rollouts[NAME][0].canaries == ("sniffer-b",)


def test_only_pods_being_deleted_means_no_canary_and_a_plain_commit() -> None:
    h = Harness()
    run(h.reconcile(canary_spec(ETH0)))
    h.add_pod("sniffer-a")
    beat(h, "sniffer-a", stored(ETH0))
    asyncio.run(h.monitor(canary_spec(ETH0)))
    leaving(h, "sniffer-a")
    run(h.reconcile(canary_spec(ETH1)))
    assert NAME not in h.backend.rollouts
    assert h.backend.state(NAME).active_version == 2


def test_a_canary_whose_pod_is_deleted_is_replaced_not_failed() -> None:
    h = started()
    first = h.backend.rollouts[NAME][0]
    leaving(h, "sniffer-a")
    asyncio.run(h.monitor(canary_spec(ETH1)))
    record = h.backend.rollouts[NAME][0]
    assert record.canaries == ("sniffer-b",)
    assert (record.version, record.digest, record.by) == (first.version, first.digest, first.by)
    assert record.sequence > first.sequence
    assert h.kube.status["rollout"]["sequence"] == record.sequence
    assert h.kube.status["rollout"]["canaries"] == ["sniffer-b"]
    assert h.reasons()[-1] == "CanaryReplaced"
    assert not h.backend.state(NAME).frozen
    assert h.condition(cond.ROLLOUT)["reason"] == "Progressing"
    # The new canary takes the candidate: promoted as usual.
    beat(h, "sniffer-b", stored(ETH1))
    asyncio.run(h.monitor(canary_spec(ETH1)))
    assert h.backend.state(NAME).active_digest == stored(ETH1)
    assert h.reasons()[-1] == "CanaryPromoted"


def test_a_canary_whose_pod_and_record_are_gone_is_replaced_not_failed() -> None:
    h = started()
    asyncio.run(h.monitor(canary_spec(ETH1)))  # sees sniffer-a's record naming its pod
    # The pod terminates normally: its agent revokes its lease, then the pod is gone.
    h.backend.remove_instance(NAME, "sniffer-a")
    del h.pods["sniffer-a"]
    asyncio.run(h.monitor(canary_spec(ETH1)))
    assert h.backend.rollouts[NAME][0].canaries == ("sniffer-b",)
    assert not h.backend.state(NAME).frozen
    assert "CanaryAborted" not in h.reasons()


def test_a_canary_picked_as_its_pod_went_is_replaced_without_a_pass_between() -> None:
    # The pod a canary was picked in is remembered from the pick: no pass saw its record.
    h = started()
    h.backend.remove_instance(NAME, "sniffer-a")
    del h.pods["sniffer-a"]
    asyncio.run(h.monitor(canary_spec(ETH1)))
    assert h.backend.rollouts[NAME][0].canaries == ("sniffer-b",)
    assert "CanaryAborted" not in h.reasons()


def test_a_canary_record_rewritten_to_name_no_pod_is_replaced_not_promoted() -> None:
    h = started()
    podless(h, "sniffer-a", stored(ETH1))
    asyncio.run(h.monitor(canary_spec(ETH1)))
    assert h.backend.state(NAME).active_version == 1
    assert h.backend.rollouts[NAME][0].canaries == ("sniffer-b",)


def test_with_every_pod_going_the_rollout_waits() -> None:
    h = started()
    for pod in PODS:
        leaving(h, pod)
    asyncio.run(h.monitor(canary_spec(ETH1)))
    assert h.backend.rollouts[NAME][0].canaries == ("sniffer-a",)
    assert not h.backend.state(NAME).frozen
    assert h.condition(cond.ROLLOUT)["reason"] == "Progressing"
    assert "waiting for a live instance" in h.kube.status["rollout"]["message"]
    # A new pod comes up: it takes over.
    h.add_pod("sniffer-d")
    beat(h, "sniffer-d", stored(ETH0))
    asyncio.run(h.monitor(canary_spec(ETH1)))
    assert h.backend.rollouts[NAME][0].canaries == ("sniffer-d",)


def test_a_replacement_that_cannot_be_written_ends_the_rollout_without_freezing() -> None:
    h = started()
    leaving(h, "sniffer-a")
    h.backend.fail("start_rollout", ConfigFrozenError(NAME, why="frozen meanwhile"))
    asyncio.run(h.monitor(canary_spec(ETH1)))
    assert NAME not in h.backend.rollouts
    assert h.condition(cond.ROLLOUT)["reason"] == "Superseded"
    assert "could not be written again" in h.kube.status["rollout"]["message"]
    assert "CanaryAborted" not in h.reasons()
    assert not h.backend.state(NAME).frozen
