"""A saved freeze marker put back after an unfreeze: the unfreeze anchors the lifted marker's
sequence in status, a marker at or below it is removed by the next monitor pass or reconcile
(alerted, FreezeReplayed), and a freeze written later always goes above it. A freeze lifted
outside the operator (a key holder's ConfigStore.unfreeze, or a raw delete) is anchored the same
way by the first pass or reconcile that sees the marker it had published gone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from operator_core_support import NAME, Harness, spec

from defender_operator._decisions import conditions as cond
from defender_operator._decisions.breaker import (
    freeze_lifted_elsewhere,
    freeze_replayed,
    lifted_freeze,
    observed_freeze,
)
from defender_operator._reconcile import UNFREEZE_ANNOTATION

ETH0 = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth0"}
ETH1 = {**ETH0, "interface": "eth1"}
ETH2 = {**ETH0, "interface": "eth2"}


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sequence", "lifted", "replayed"),
    [
        (None, 5, False),  # no marker
        (5, None, False),  # nothing lifted since status had the field: kept
        (5, 5, True),  # the lifted marker itself, put back
        (4, 5, True),  # an older one
        (0, 5, True),  # one from before sequences: every later freeze has one
        (0, 0, True),  # the lifted marker had none either
        (6, 5, False),  # a freeze written after the lift
    ],
)
def test_freeze_replayed(sequence: int | None, lifted: int | None, replayed: bool) -> None:
    assert freeze_replayed(sequence, lifted) is replayed


@pytest.mark.parametrize(
    ("status", "lifted"),
    [
        ({"freezeLiftedSequence": 7}, 7),
        ({"freezeLiftedSequence": 0}, 0),
        ({}, None),
        ({"freezeLiftedSequence": -1}, None),
        ({"freezeLiftedSequence": True}, None),
        ({"freezeLiftedSequence": "7"}, None),
    ],
)
def test_lifted_freeze_reads_status(status: dict[str, Any], lifted: int | None) -> None:
    assert lifted_freeze(status) == lifted


def frozen_then_lifted() -> tuple[Harness, int]:
    """Version 1, frozen (as by the breaker), then unfrozen by command; the lifted sequence."""
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    h.backend.freeze(NAME, "blast radius exceeded")
    saved = h.backend.freeze_sequences[NAME]
    run(h.reconcile(spec(ETH0), {UNFREEZE_ANNOTATION: "now"}))
    assert not h.backend.state(NAME).frozen
    assert h.kube.status["freezeLiftedSequence"] == saved
    return h, saved


def put_back(h: Harness, sequence: int) -> None:
    """The attacker's raw put of the saved authentic marker."""
    h.backend.frozen[NAME] = "blast radius exceeded"
    h.backend.freeze_sequences[NAME] = sequence


def test_the_monitor_removes_a_freeze_marker_put_back_after_an_unfreeze() -> None:
    h, saved = frozen_then_lifted()
    put_back(h, saved)
    asyncio.run(h.monitor(spec(ETH0)))
    assert not h.backend.state(NAME).frozen
    assert h.kube.status["frozen"] is False
    assert "FreezeReplayed" in h.reasons()
    assert any(a.reason == "RecordReplayed" for a in h.backend.raised)
    assert h.condition(cond.CONFIG_SYNCED)["reason"] != "Frozen"


def test_a_reconcile_commits_through_a_freeze_marker_put_back() -> None:
    h, saved = frozen_then_lifted()
    put_back(h, saved)
    run(h.reconcile(spec(ETH1)))
    assert h.reasons()[-2:] == ["FreezeReplayed", "Committed"]
    assert h.backend.state(NAME).active_version == 2


def test_a_real_freeze_after_the_unfreeze_is_kept() -> None:
    h, saved = frozen_then_lifted()
    # Another replica's clock far behind: the anchor still puts the new freeze above it.
    h.kube.status["freezeLiftedSequence"] = saved + 10**12
    h.backend.freeze(NAME, "again", after=saved + 10**12)
    assert h.backend.freeze_sequences[NAME] == saved + 10**12 + 1
    run(h.reconcile(spec(ETH2)))
    assert h.reasons()[-1] == "CommitFrozen"
    asyncio.run(h.monitor(spec(ETH2)))
    assert h.backend.state(NAME).frozen
    assert "FreezeReplayed" not in h.reasons()


def test_without_an_anchor_a_marker_is_kept() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    h.backend.freeze(NAME, "from before the upgrade")
    asyncio.run(h.monitor(spec(ETH0)))
    assert h.backend.state(NAME).frozen and "FreezeReplayed" not in h.reasons()


def test_an_unfreeze_without_a_marker_anchors_nothing_and_never_lowers_the_anchor() -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    run(h.reconcile(spec(ETH0), {UNFREEZE_ANNOTATION: "now"}))
    assert "freezeLiftedSequence" not in h.kube.status
    h, saved = frozen_then_lifted()
    put_back(h, saved - 5)  # an older saved marker, lifted by a person before the pass
    run(h.reconcile(spec(ETH0), {UNFREEZE_ANNOTATION: "now"}))
    assert h.kube.status["freezeLiftedSequence"] == saved


# --- a freeze lifted outside the operator ------------------------------------------------------


@pytest.mark.parametrize(
    ("observed", "sequence", "lifted", "anchor"),
    [
        (None, None, None, None),  # nothing seen, nothing there
        (None, 7, None, None),  # a marker the operator has not published yet: nothing known
        (7, 7, None, None),  # the marker it saw is still there
        (7, None, None, 7),  # gone: lifted outside the operator
        (7, None, 3, 7),  # gone, above the last anchor
        (7, None, 7, None),  # gone, the operator's own unfreeze anchored it already
        (7, None, 9, None),  # an anchor is never lowered
        (7, 9, None, 7),  # a new freeze written over it (above the one in place)
        (7, 4, None, 7),  # an older saved marker put over it: removed once 7 is anchored
        (0, None, None, 0),  # a marker from before sequences, lifted
    ],
)
def test_freeze_lifted_elsewhere(
    observed: int | None, sequence: int | None, lifted: int | None, anchor: int | None
) -> None:
    assert freeze_lifted_elsewhere(observed, sequence, lifted) == anchor


@pytest.mark.parametrize(
    ("status", "observed"),
    [
        ({"freezeSequence": 7}, 7),
        ({"freezeSequence": 0}, 0),
        ({"freezeSequence": None}, None),
        ({}, None),
        ({"freezeSequence": -1}, None),
        ({"freezeSequence": False}, None),
        ({"freezeSequence": "7"}, None),
    ],
)
def test_observed_freeze_reads_status(status: dict[str, Any], observed: int | None) -> None:
    assert observed_freeze(status) == observed


def frozen_and_seen() -> tuple[Harness, int]:
    """Version 1, frozen (as by the breaker), and a monitor pass that published the marker."""
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    h.backend.freeze(NAME, "blast radius exceeded")
    saved = h.backend.freeze_sequences[NAME]
    asyncio.run(h.monitor(spec(ETH0)))
    assert h.kube.status["frozen"] is True
    assert h.kube.status["freezeSequence"] == saved
    return h, saved


def test_a_freeze_lifted_by_a_key_holder_is_anchored_and_its_marker_put_back_removed() -> None:
    h, saved = frozen_and_seen()
    h.backend.unfreeze(NAME)  # ConfigStore.unfreeze by a plugin: no annotation, no operator
    asyncio.run(h.monitor(spec(ETH0)))
    assert h.kube.status["freezeLiftedSequence"] == saved
    assert h.kube.status["frozen"] is False and h.kube.status["freezeSequence"] is None
    assert "FreezeReplayed" not in h.reasons()
    put_back(h, saved)
    asyncio.run(h.monitor(spec(ETH0)))
    assert not h.backend.state(NAME).frozen
    assert "FreezeReplayed" in h.reasons()
    assert any(a.reason == "RecordReplayed" for a in h.backend.raised)


def test_an_older_marker_put_over_the_one_seen_is_removed_in_the_same_pass() -> None:
    h, saved = frozen_and_seen()
    put_back(h, saved - 5)  # never deleted: overwritten with an older saved marker
    asyncio.run(h.monitor(spec(ETH0)))
    assert h.kube.status["freezeLiftedSequence"] == saved
    assert not h.backend.state(NAME).frozen
    assert "FreezeReplayed" in h.reasons()


def test_a_new_freeze_after_a_lift_elsewhere_is_kept() -> None:
    h, saved = frozen_and_seen()
    h.backend.unfreeze(NAME)
    asyncio.run(h.monitor(spec(ETH0)))
    h.backend.freeze(NAME, "again", after=saved)  # a key holder freezes again
    asyncio.run(h.monitor(spec(ETH0)))
    assert h.backend.state(NAME).frozen
    assert h.kube.status["freezeSequence"] == h.backend.freeze_sequences[NAME] > saved
    assert h.kube.status["freezeLiftedSequence"] == saved
    assert "FreezeReplayed" not in h.reasons()


def test_a_reconcile_anchors_a_lift_elsewhere_and_commits_through_the_marker_put_back() -> None:
    h, saved = frozen_and_seen()
    h.backend.unfreeze(NAME)
    run(h.reconcile(spec(ETH1)))  # the commit that was waiting for the lift
    assert h.kube.status["freezeLiftedSequence"] == saved
    assert h.backend.state(NAME).active_version == 2
    put_back(h, saved)
    run(h.reconcile(spec(ETH2)))
    assert h.reasons()[-2:] == ["FreezeReplayed", "Committed"]
    assert h.backend.state(NAME).active_version == 3


def test_a_marker_never_published_is_not_anchored_when_lifted_elsewhere() -> None:
    # Frozen and lifted between two passes: the operator never saw it, so a copy put back
    # holds commits until a person unfreezes (docs/security.md, residuals).
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    h.backend.freeze(NAME, "brief")
    saved = h.backend.freeze_sequences[NAME]
    h.backend.unfreeze(NAME)
    asyncio.run(h.monitor(spec(ETH0)))
    assert "freezeLiftedSequence" not in h.kube.status
    put_back(h, saved)
    asyncio.run(h.monitor(spec(ETH0)))
    assert h.backend.state(NAME).frozen
