"""A DefenderComponent deleted and re-created (kubectl delete, then apply): kopf handles each
uid in its own worker, so the new object may be reconciled before the old one's DELETED event
is handled. Either order leaves the new object holding its name, its data, its memory and its
registration."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
from operator_core_support import LOG, NAME, NAMESPACE, Harness, spec

from defender_operator import _monitor, _reconcile
from defender_operator._decisions.ownership import OWNER_RECORD_RESTORED, Claim
from defender_operator._reconcile import gone
from defender_operator._runtime import utcnow

ETH0 = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth0"}
ETH1 = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth1"}


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def _recreate(h: Harness) -> None:
    """The new object: another uid, a status of its own (empty until reconciled)."""
    h.uid = "uid-2"
    h.kube.status = {}


def _new_object_holds_its_name(h: Harness, active: int) -> None:
    assert h.backend.read_claim(NAME)[0] == Claim(NAMESPACE, NAME, "uid-2")
    assert h.backend.state(NAME).active_version == active
    assert not [a for a in h.backend.raised if a.reason == OWNER_RECORD_RESTORED]
    assert h.rt.components[NAMESPACE, NAME].uid == "uid-2"
    h.mem.monitors = 1  # its monitor daemon runs
    assert NAME in h.rt.anchored_registrations().get(NAMESPACE, {})


@pytest.mark.parametrize("retention", ["Keep", "Purge"])
def test_the_old_objects_late_deletion_leaves_its_successor_alone(retention: str) -> None:
    # Purge: its finalizer removed by hand, so the object went without the operator's purge.
    h = Harness()
    run(h.reconcile(spec(ETH0, retention=retention)))
    old = h.body(spec(ETH0, retention=retention), {})
    _recreate(h)
    run(h.reconcile(spec(ETH1)))  # took the name over: a second version on the kept data
    assert h.backend.read_claim(NAME)[0] == Claim(NAMESPACE, NAME, "uid-2")
    h.rt.registrations_removed.clear()

    owned = run(gone(h.rt, old, NAMESPACE, NAME, retention, LOG))

    assert owned is False  # the name's metric series are the successor's now
    assert h.rt.registrations_removed == {}
    _new_object_holds_its_name(h, active=2)
    # Asked the API server whether the record's uid is the successor, alive.
    assert h.kube.lookups == [(NAMESPACE, NAME, "uid-2")]


@pytest.mark.parametrize("retention", ["Keep", "Purge"])
def test_the_old_objects_deletion_handled_first_is_applied_and_the_successor_starts(
    retention: str,
) -> None:
    h = Harness()
    run(h.reconcile(spec(ETH0, retention=retention)))
    old = h.body(spec(ETH0, retention=retention), {})
    assert run(gone(h.rt, old, NAMESPACE, NAME, retention, LOG)) is True
    _recreate(h)
    run(h.reconcile(spec(ETH1)))
    # Keep: the kept data taken over (version 2); Purge: seeded afresh (version 1).
    _new_object_holds_its_name(h, active=2 if retention == "Keep" else 1)


def _monitored() -> tuple[Harness, dict[str, Any]]:
    """The old object (uid-1), reconciled and monitored with one beating pod; its body."""
    h = Harness()
    run(h.reconcile(spec(ETH0)))
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    run(h.monitor(spec(ETH0)))
    return h, h.body(spec(ETH0), {})


def test_the_successor_starts_from_a_fresh_memory_and_the_old_object_ends() -> None:
    """Memory is kept by namespace/name: the successor handled before the old object's DELETED
    event must not inherit its restart history, canary or status, and the old object's
    handlers (a monitor pass still due, a late event) judge and write nothing more."""
    h, old_body = _monitored()
    old_mem = h.mem
    old_mem.restart_times.append(utcnow())
    old_mem.canary_pods["sniffer-a-0"] = "sniffer-a"
    _recreate(h)
    run(h.reconcile(spec(ETH1)))
    mem = h.mem
    assert mem is not old_mem and mem.uid == "uid-2"
    assert mem.restart_times == [] and mem.canary_pods == {}
    assert h.rt.ended("uid-1") and not h.rt.is_gone("uid-1")  # its retention still applies
    # The old object's daemon, due for a pass, finds it ended: no pass, no status written.
    status, patches = dict(h.kube.status), len(h.kube.patches)
    assert run(_monitor._pass(h.rt, old_body, NAMESPACE, NAME, LOG, h.index())) is None
    assert h.kube.status == status and len(h.kube.patches) == patches
    # A late event of the old object reconciles nothing either.
    h.uid = "uid-1"
    before = h.backend.state(NAME)
    run(h.reconcile(spec(ETH0)))
    assert h.backend.state(NAME) == before
    assert h.rt.components[NAMESPACE, NAME] is mem


def test_a_pass_under_way_when_the_successor_arrives_publishes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h, old_body = _monitored()
    patches = len(h.kube.patches)
    observe = _monitor.observe

    async def successor_arrives(p: Any, mem: Any) -> Any:
        # The re-created object's handler runs while this pass waits on etcd.
        assert h.rt.memory_of(NAMESPACE, NAME, "uid-2") is not None
        return await observe(p, mem)

    monkeypatch.setattr(_monitor, "observe", successor_arrives)
    h.mem.last_pass = None
    run(_monitor._pass(h.rt, old_body, NAMESPACE, NAME, LOG, h.index()))
    assert h.rt.ended("uid-1")
    assert len(h.kube.patches) == patches  # the status by that name is the successor's now


@pytest.mark.parametrize("arrives_in", ["claim", "commit"])
def test_a_reconcile_under_way_when_the_successor_arrives_commits_and_publishes_nothing(
    monkeypatch: pytest.MonkeyPatch, arrives_in: str
) -> None:
    # The old object was edited (ETH1) just before `kubectl delete` and a re-create with ETH0:
    # its reconcile must not make ETH1 what the successor's name runs, nor write its status.
    h, _ = _monitored()
    patches, events = len(h.kube.patches), len(h.events)
    step = getattr(_reconcile, arrives_in)

    async def successor_arrives(*args: Any, **kwargs: Any) -> Any:
        assert h.rt.memory_of(NAMESPACE, NAME, "uid-2") is not None
        return await step(*args, **kwargs)

    monkeypatch.setattr(_reconcile, arrives_in, successor_arrives)
    if arrives_in == "commit":
        # Arriving while the commit is under way: what it already wrote stays (one CAS in
        # etcd), but nothing is published for the object that ended.
        run(h.reconcile(spec(ETH1)))
        assert len(h.kube.patches) == patches and len(h.events) == events
        return
    run(h.reconcile(spec(ETH1)))
    assert h.backend.state(NAME).active_version == 1  # ETH1 never committed
    assert len(h.kube.patches) == patches and len(h.events) == events
