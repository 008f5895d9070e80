"""Which heartbeat records a real pod backs (`_decisions.backing`), and what the monitor does
with the others: the breaker does not count them, they are not alive, and they are reported
(a gauge, the Heartbeating message, an Event once) instead of acted on."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from operator_core_support import NAME, Harness, changed_after_beats, plant, spec
from prometheus_client import REGISTRY

from defender_operator._decisions import conditions as cond
from defender_operator._decisions.backing import backing, unbacked_to_report
from defender_operator._kube import Pod

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ETH0 = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth0"}
ETH1 = {**ETH0, "interface": "eth1"}
PODS = ("sniffer-a", "sniffer-b", "sniffer-c")


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


# --- the decision ------------------------------------------------------------------------------


def test_records_are_sorted_by_the_pod_they_name() -> None:
    got = backing(
        [("a-0", "a"), ("b-0", "b"), ("ghost", None), ("other-0", "other")],
        {"a": False, "b": True},
    )
    assert got.serving == {"a-0"}
    assert got.leaving == {"b-0"}
    assert got.unbacked == {"ghost", "other-0"}


def test_no_selected_pod_backs_nothing() -> None:
    assert backing([("a-0", "a")], {}).unbacked == {"a-0"}


def test_an_unbacked_record_is_reported_once_after_its_patience() -> None:
    patience = {"ghost": timedelta(seconds=30)}
    since = {"ghost": T0}
    reported, new = unbacked_to_report(since, patience, frozenset(), T0 + timedelta(seconds=30))
    assert (reported, new) == (frozenset(), ())  # a real pod's record may still be going
    reported, new = unbacked_to_report(since, patience, frozenset(), T0 + timedelta(seconds=31))
    assert (reported, new) == ({"ghost"}, ("ghost",))
    reported, new = unbacked_to_report(since, patience, reported, T0 + timedelta(seconds=90))
    assert (reported, new) == ({"ghost"}, ())  # once
    # Gone, then back: reported again.
    reported, new = unbacked_to_report({}, {}, reported, T0 + timedelta(seconds=91))
    assert reported == frozenset()


# --- through the monitor -----------------------------------------------------------------------


def forge(h: Harness, instance: str, pod: str | None, error: str | None = None) -> None:
    """An instance record written with etcd write access alone: no pod of ours, no lease."""
    plant(h, instance, pod, error)


def changed() -> Harness:
    """Three beating pods on version 1, then version 2 committed (the breaker's window open)."""
    return changed_after_beats(PODS, ETH0, ETH1)


def test_forged_records_naming_no_pod_do_not_trip_the_breaker() -> None:
    h = changed()
    for ghost in ("ghost-1", "ghost-2"):
        forge(h, ghost, None, error="AuthenticationFailed")
    forge(h, "elsewhere-0", "elsewhere", error="AuthenticationFailed")
    run(h.monitor(spec(ETH1)))
    state = h.backend.state(NAME)
    assert (state.active_version, state.frozen) == (2, False)
    assert "BlastRadiusExceeded" not in h.reasons()
    assert h.mem.unhealthy_since == {}


def test_errors_from_a_pod_being_deleted_do_not_trip_the_breaker() -> None:
    h = changed()
    for pod in ("sniffer-a", "sniffer-b"):
        old = h.pods[pod]
        h.pods[pod] = Pod(old.name, old.uid, old.created, deleting=True)
        h.beat(pod, error="AuthenticationFailed")
    run(h.monitor(spec(ETH1)))
    assert h.backend.state(NAME).frozen is False
    assert "BlastRadiusExceeded" not in h.reasons()


def test_the_same_errors_from_selected_pods_still_trip_it() -> None:
    h = changed()
    for pod in ("sniffer-a", "sniffer-b"):
        h.beat(pod, error="AuthenticationFailed")
    run(h.monitor(spec(ETH1)))
    state = h.backend.state(NAME)
    assert state.frozen is True
    assert state.active_version == 3  # version 1's config again
    assert "BlastRadiusExceeded" in h.reasons()


def test_unbacked_records_are_not_alive_and_are_reported() -> None:
    h = changed()
    forge(h, "ghost-1", None)
    forge(h, "ghost-2", "elsewhere")
    run(h.monitor(spec(ETH1)))
    assert h.kube.status["instances"] == {"alive": 3, "expected": 3}
    assert h.kube.status["instanceSummary"] == "3/3"
    message = h.condition(cond.HEARTBEATING)["message"]
    assert "2 heartbeat record(s) name no selected pod (ignored)" in message
    assert (
        REGISTRY.get_sample_value("defender_operator_instances_unbacked", {"component": NAME})
        == 2.0
    )
    # Not yet an Event: a real pod's record outlives its pod by up to its lease.
    assert "UnbackedInstances" not in h.reasons()
    for name in ("ghost-1", "ghost-2"):
        h.mem.unbacked_since[name] -= timedelta(hours=1)
    run(h.monitor(spec(ETH1)))
    assert h.reasons().count("UnbackedInstances") == 1
    event = next(e for e in h.events if e.reason == "UnbackedInstances")
    assert "ghost-1; ghost-2" in event.message
    run(h.monitor(spec(ETH1)))
    assert h.reasons().count("UnbackedInstances") == 1  # once per record
    # Gone: the gauge and the message say so.
    h.backend.remove_instance(NAME, "ghost-1")
    h.backend.remove_instance(NAME, "ghost-2")
    run(h.monitor(spec(ETH1)))
    assert "ignored" not in h.condition(cond.HEARTBEATING)["message"]
    assert (
        REGISTRY.get_sample_value("defender_operator_instances_unbacked", {"component": NAME})
        == 0.0
    )
    assert h.mem.unbacked_since == {} and h.mem.unbacked_reported == frozenset()
