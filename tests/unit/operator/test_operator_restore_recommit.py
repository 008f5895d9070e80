"""ACTIVE went backwards (an etcd snapshot restored, or newer versions deleted): the operator
commits spec.config again when what was lost was its own commit of it, and only then. A
deliberate difference (a rollback, a breaker revert, a commit by rag) is a new, higher version:
never overwritten, and when a restore loses one a person is told instead
(`_decisions.restore`)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from operator_core_support import NAME, Harness, spec

from defender_operator import _api
from defender_operator._decisions import conditions as cond
from defender_operator._decisions.restore import (
    RECOMMITTED,
    WENT_BACK,
    RegressionAction,
    SeenActive,
    judge_regression,
    seen_active,
    went_backwards,
)
from defender_operator._memory_backend import Stored

ETH0 = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth0"}
ETH1 = {**ETH0, "interface": "eth1"}
ETH2 = {**ETH0, "interface": "eth2"}

# --- the decision --------------------------------------------------------------------------

SPEC = "spec"  # spec.config's digest, as handled (status.specConfigDigest)


@pytest.mark.parametrize(
    ("seen", "found", "action"),
    [
        # The operator's commit of spec.config (version 5) is gone: ACTIVE is version 4.
        (SeenActive(5, SPEC), (4, "old"), RegressionAction.RECOMMIT),
        # Several versions gone, the newest of them spec.config.
        (SeenActive(9, SPEC), (2, "old"), RegressionAction.RECOMMIT),
        # A rollback, a breaker revert, a commit by rag: each a HIGHER version, never judged.
        (SeenActive(5, SPEC), (6, "rolled-back"), None),
        (SeenActive(5, "rag"), (6, "rag-again"), None),
        # Nothing moved.
        (SeenActive(5, SPEC), (5, SPEC), None),
        (SeenActive(5, "rolled-back"), (5, "rolled-back"), None),
        # Gone back to the very config seen (e.g. a rollback to it lost): nothing lost.
        (SeenActive(5, "rolled-back"), (3, "rolled-back"), None),
        # What was lost was a deliberate difference: not redone, a person is told.
        (SeenActive(5, "rag"), (4, "old"), RegressionAction.KEEP),
        (SeenActive(5, "rolled-back"), (4, SPEC), RegressionAction.KEEP),
        # Frozen when seen last (a person or the breaker held commits): not lifted by a restore.
        (SeenActive(5, SPEC, frozen=True), (4, "old"), RegressionAction.KEEP),
        # Nothing published yet, or no metadata record in etcd (the seed's and repair's case).
        (None, (4, "old"), None),
        (SeenActive(5, SPEC), (None, None), None),
    ],
)
def test_judge_regression(
    seen: SeenActive | None, found: tuple[Any, Any], action: RegressionAction | None
) -> None:
    got = judge_regression(seen, found[0], found[1], SPEC, SPEC)
    assert (got.action if got is not None else None) is action


def test_a_new_spec_edit_is_left_to_the_usual_commit() -> None:
    # spec.config edited (not handled yet) while ACTIVE went back: committed as any edit is.
    assert judge_regression(SeenActive(5, SPEC), 4, "old", "new-spec", SPEC) is None


def test_messages_say_what_went_back_and_what_is_done() -> None:
    recommit = judge_regression(SeenActive(5, SPEC), 3, "old", SPEC, SPEC)
    assert recommit is not None and recommit.recommit
    assert "version 3, older than version 5" in recommit.message
    assert recommit.message.endswith("committed again")
    kept = judge_regression(SeenActive(5, "rag"), 3, "old", SPEC, SPEC)
    assert kept is not None and not kept.recommit
    assert "deliberate difference" in kept.message
    frozen = judge_regression(SeenActive(5, SPEC, frozen=True), 3, "old", SPEC, SPEC)
    assert frozen is not None and "frozen" in frozen.message


@pytest.mark.parametrize(
    ("status", "seen"),
    [
        ({"activeVersion": 3, "activeDigest": "d"}, SeenActive(3, "d")),
        ({"activeVersion": 3, "activeDigest": "d", "frozen": True}, SeenActive(3, "d", True)),
        ({}, None),
        ({"activeVersion": 0, "activeDigest": "d"}, None),  # what state_fields writes for none
        ({"activeVersion": 3, "activeDigest": ""}, None),
        ({"activeVersion": True, "activeDigest": "d"}, None),
        ({"activeVersion": "3", "activeDigest": "d"}, None),
    ],
)
def test_seen_active_reads_status(status: dict[str, Any], seen: SeenActive | None) -> None:
    assert seen_active(status) == seen


def test_went_backwards() -> None:
    assert went_backwards(SeenActive(5, "d"), 4)
    assert not went_backwards(SeenActive(5, "d"), 5)
    assert not went_backwards(SeenActive(5, "d"), 6)
    assert not went_backwards(None, 4)
    assert not went_backwards(SeenActive(5, "d"), None)


# --- the operator, on the memory backend ---------------------------------------------------


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def snapshot(h: Harness) -> Stored:
    return copy.deepcopy(h.backend.components[NAME])


def restore(h: Harness, saved: Stored) -> None:
    """Every key of the component as the snapshot held it (MASTER, ACTIVE, metadata, history)."""
    h.backend.components[NAME] = copy.deepcopy(saved)
    h.backend._changed(NAME)


def committed_after_snapshot() -> tuple[Harness, Stored]:
    """Version 1 (eth0) in the snapshot; spec.config edited to eth1, committed as version 2
    after it, and seen by a monitor pass."""
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    saved = snapshot(h)
    run(h.reconcile(spec(ETH1)))
    run(h.monitor(spec(ETH1)))
    assert h.kube.status["activeVersion"] == 2
    return h, saved


def interface(h: Harness) -> Any:
    """What ACTIVE in etcd holds (normalized: the model's defaults filled in)."""
    return h.backend.components[NAME].active["interface"]


def synced(h: Harness) -> tuple[str, str]:
    c = h.condition(cond.CONFIG_SYNCED)
    return c["status"], c["reason"]


def test_a_running_operator_commits_spec_again_after_a_restore() -> None:
    # As version 3: above version 2, which readers may have accepted before the restore.
    h, saved = committed_after_snapshot()
    restore(h, saved)
    run(h.monitor(spec(ETH1)))
    state = h.backend.state(NAME)
    assert interface(h) == "eth1"
    assert state.active_version == 3
    assert h.kube.status["activeVersion"] == 3
    assert synced(h) == ("True", "Committed")
    assert "committed again as version 3" in h.condition(cond.CONFIG_SYNCED)["message"]
    assert h.reasons()[-2:] == ["Committed", RECOMMITTED]
    assert h.events[-1].type == "Warning"
    assert h.backend.components[NAME].modified_by == "operator:op-0"  # attributed as usual


def test_a_restarted_operator_commits_spec_again_on_resume() -> None:
    h, saved = committed_after_snapshot()
    restore(h, saved)
    # A new operator process: nothing in memory, the status as the API server keeps it.
    fresh = Harness(backend=h.backend, kube=h.kube, generation=h.generation - 1)
    run(fresh.reconcile(spec(ETH1)))
    assert interface(h) == "eth1"
    assert h.backend.state(NAME).active_version == 3
    assert fresh.kube.status["activeVersion"] == 3
    assert synced(fresh) == ("True", "Committed")
    assert fresh.reasons()[-2:] == ["Committed", RECOMMITTED]
    # Nothing left to do: another pass commits nothing more.
    run(fresh.monitor(spec(ETH1)))
    assert fresh.reasons().count(RECOMMITTED) == 1
    assert h.backend.state(NAME).active_version == 3


def test_the_recommit_goes_above_every_version_the_operator_saw() -> None:
    # Versions 2 and 3 (spec.config) lost: readers may have accepted 3, so not 2 again.
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    saved = snapshot(h)
    run(h.reconcile(spec(ETH2)))
    run(h.reconcile(spec(ETH1)))
    run(h.monitor(spec(ETH1)))
    assert h.kube.status["activeVersion"] == 3
    restore(h, saved)
    run(h.monitor(spec(ETH1)))
    assert interface(h) == "eth1"
    assert h.backend.state(NAME).active_version == 4
    assert h.kube.status["activeVersion"] == 4


def test_the_recommit_happens_once() -> None:
    h, saved = committed_after_snapshot()
    restore(h, saved)
    run(h.monitor(spec(ETH1)))
    run(h.monitor(spec(ETH1)))
    run(h.reconcile(spec(ETH1)))
    assert h.reasons().count(RECOMMITTED) == 1
    assert h.backend.state(NAME).active_version == 3


def test_a_rollback_by_annotation_is_not_overwritten() -> None:
    h, _ = committed_after_snapshot()
    run(h.reconcile(spec(ETH1), {_api.ROLLBACK_ANNOTATION: "master"}))
    run(h.monitor(spec(ETH1)))
    assert h.backend.state(NAME).active_version == 3  # a rollback is a new version
    run(h.monitor(spec(ETH1)))
    run(h.reconcile(spec(ETH1), first_pass=True))
    assert interface(h) == "eth0"
    assert synced(h) == ("True", "ActiveDiffersFromSpec")
    assert RECOMMITTED not in h.reasons() and WENT_BACK not in h.reasons()


def test_a_rollback_by_the_plugin_not_seen_yet_is_not_overwritten() -> None:
    # `kubectl defender rollback` (the library, no annotation) between two monitor passes.
    h, _ = committed_after_snapshot()
    h.backend.rollback(NAME, 1, modified_by="plugin:alice", history_limit=10)
    run(h.monitor(spec(ETH1)))
    run(h.reconcile(spec(ETH1)))
    assert interface(h) == "eth0"
    assert h.backend.state(NAME).active_version == 3
    assert RECOMMITTED not in h.reasons()


def test_a_commit_by_rag_lost_in_a_restore_is_not_redone_but_told() -> None:
    h, saved = committed_after_snapshot()
    h.backend.commit(NAME, "sniffer", ETH2, json_schema=None, modified_by="rag", history_limit=10)
    run(h.monitor(spec(ETH1)))
    assert h.kube.status["activeVersion"] == 3
    restore(h, saved)  # version 1 (eth0): both the operator's and rag's commits are gone
    run(h.monitor(spec(ETH1)))
    assert interface(h) == "eth0"
    assert h.backend.state(NAME).active_version == 1
    assert RECOMMITTED not in h.reasons()
    assert h.reasons()[-1] == WENT_BACK
    assert "deliberate difference" in h.events[-1].message
    # Told once: the lower version is published with it.
    assert h.kube.status["activeVersion"] == 1
    run(h.monitor(spec(ETH1)))
    assert h.reasons().count(WENT_BACK) == 1


def test_a_freeze_seen_last_is_not_lifted_by_a_restore() -> None:
    h, saved = committed_after_snapshot()
    h.backend.freeze(NAME, "held by a person")
    run(h.monitor(spec(ETH1)))
    assert h.kube.status["frozen"] is True
    restore(h, saved)
    h.backend.frozen.pop(NAME, None)  # the snapshot had no freeze marker
    run(h.monitor(spec(ETH1)))
    assert interface(h) == "eth0"
    assert RECOMMITTED not in h.reasons()
    assert h.reasons()[-1] == WENT_BACK


def test_deleting_the_newer_versions_only_brings_spec_back() -> None:
    # Someone with etcd write access and no key: the newer history deleted and the older
    # authentic record and ACTIVE put back. The operator writes nothing but spec.config.
    h, saved = committed_after_snapshot()
    h.backend.put_back(NAME, saved)
    del h.backend.components[NAME].history[2]
    run(h.monitor(spec(ETH1)))
    assert interface(h) == "eth1"
    assert h.backend.state(NAME).active_version == 3
    assert h.reasons()[-1] == RECOMMITTED
