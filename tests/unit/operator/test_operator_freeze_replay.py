"""A saved freeze marker put back after an unfreeze: the unfreeze anchors the lifted marker's
sequence in status, a marker at or below it is removed by the next monitor pass or reconcile
(alerted, FreezeReplayed), and a freeze written later always goes above it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from operator_core_support import NAME, Harness, spec

from defender_operator._decisions import conditions as cond
from defender_operator._decisions.breaker import freeze_replayed, lifted_freeze
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
