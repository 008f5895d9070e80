"""Heartbeat records whose MAC does not verify (written without the keyring: by someone with
etcd write access alone, put back from another lease, or by an agent older than signing) steer
nothing, even when they name a real pod: not the breaker, not the alive count, not the restart
decision, not the key rotation, not the canary pick. They are reported (a gauge, the
Heartbeating message, an Event once). The heartbeat view also keeps an older authentic record
from replacing a newer one."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta

from operator_core_support import NAME, Harness, changed_after_beats, plant, spec
from prometheus_client import REGISTRY

from defender_operator._backend import InstanceRecord
from defender_operator._decisions import conditions as cond
from defender_operator._decisions.backing import authentic, unverified_to_report
from defender_operator._decisions.rotation import instance_keys
from defender_operator._heartbeats import HeartbeatView
from defender_operator._runtime import utcnow

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ETH0 = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth0"}
ETH1 = {**ETH0, "interface": "eth1"}
PODS = ("sniffer-a", "sniffer-b", "sniffer-c")
WHY = "the MAC does not match the record and its etcd path"


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def record(
    instance: str, *, verified: bool = True, at: datetime = T0, **fields: object
) -> InstanceRecord:
    return InstanceRecord(
        instance=instance,
        pod=instance,
        time=at,
        status="RUNNING",
        verified=verified,
        unverified=None if verified else WHY,
        **fields,  # type: ignore[arg-type]
    )


# --- the decisions ------------------------------------------------------------------------------


def test_only_verified_records_are_authentic() -> None:
    good, bad = authentic([record("a"), record("b", verified=False), record("c")])
    assert [r.instance for r in good] == ["a", "c"]
    assert [r.instance for r in bad] == ["b"]


def test_a_record_built_without_a_verdict_is_not_trusted() -> None:
    # A reader that forgets to check must not make a record steer anything by omission.
    bare = InstanceRecord(instance="a", pod="a", time=T0, status="RUNNING")
    assert not bare.verified
    assert authentic([bare]) == ([], [bare])


def test_a_record_without_a_reason_is_reported_as_not_verified() -> None:
    h = changed()
    h.backend.add_instance(NAME, InstanceRecord("bare-x", "sniffer-a", utcnow(), "RUNNING"))
    run(h.monitor(spec(ETH1)))
    event = next(e for e in h.events if e.reason == "UnverifiedInstances")
    assert "bare-x (not verified)" in event.message and "None" not in event.message


def test_an_unverified_record_is_reported_once_while_it_lasts() -> None:
    reported, new = unverified_to_report(["x", "y"], frozenset())
    assert (reported, new) == ({"x", "y"}, ("x", "y"))
    reported, new = unverified_to_report(["x", "y"], reported)
    assert new == ()
    reported, new = unverified_to_report(["y"], reported)
    assert (reported, new) == ({"y"}, ())
    reported, new = unverified_to_report(["x", "y"], reported)
    assert new == ("x",)  # back again: reported again


def test_the_rotation_counts_only_signed_records() -> None:
    # A forged record holding only the old key would keep Distributing waiting until its
    # timeout.
    held, primaries = instance_keys(
        {
            "sniffer": [
                record("a", key_fingerprint="new", key_fingerprints=frozenset({"old", "new"})),
                record("forged", verified=False, key_fingerprint="old"),
            ]
        }
    )
    assert held == {"sniffer/a": {"old", "new"}}
    assert primaries == {"sniffer/a": "new"}


# --- the heartbeat view -------------------------------------------------------------------------


def test_the_view_keeps_a_newer_authentic_record_over_a_replayed_older_one() -> None:
    view = HeartbeatView(T0)
    failing = record("a", writer="w1", seq=1, last_error_reason="ConfigRejected")
    healthy = record("a", at=T0 + timedelta(seconds=10), writer="w1", seq=2)
    view.apply(T0, "sniffer", "a", healthy)
    view.apply(T0, "sniffer", "a", failing)  # put back by someone with etcd write access
    assert view.instances("sniffer") == [healthy]
    # The periodic full list reads what etcd holds (the replay): the newer one stays.
    view.resync(T0, view.begin_resync(), {"sniffer": [failing]})
    assert view.instances("sniffer") == [healthy]
    later = record("a", at=T0 + timedelta(seconds=20), writer="w1", seq=3, last_error_reason="X")
    view.apply(T0, "sniffer", "a", later)  # the agent's own, newer
    assert view.instances("sniffer") == [later]
    # After the key went away (stopped, lease expired) nothing older is remembered.
    view.apply(T0, "sniffer", "a", None)
    view.apply(T0, "sniffer", "a", failing)
    assert view.instances("sniffer") == [failing]


def test_the_writers_count_decides_not_the_clock() -> None:
    # The agent's node clock stepped back between two writes, also across its own leases (a
    # cadence change moves the key to a new one): its newer record still wins; one it wrote
    # earlier put back does not, whatever its time.
    view = HeartbeatView(T0)
    first = record("a", at=T0 + timedelta(seconds=10), lease_id=7, writer="w1", seq=1)
    second = record("a", at=T0, lease_id=8, writer="w1", seq=2, last_error_reason="X")
    view.apply(T0, "sniffer", "a", first)
    view.apply(T0, "sniffer", "a", second)
    assert view.instances("sniffer") == [second]
    view.apply(T0, "sniffer", "a", dataclasses.replace(first, time=T0 + timedelta(hours=1)))
    assert view.instances("sniffer") == [second]
    # Another writer (a restarted agent counts from 1 again, its clock behind): taken.
    restarted = record("a", at=T0 - timedelta(hours=1), lease_id=9, writer="w2", seq=1)
    view.apply(T0, "sniffer", "a", restarted)
    assert view.instances("sniffer") == [restarted]


def test_the_view_holds_an_unverified_record_as_etcd_does() -> None:
    # The pass leaves it out (and reports it); the view only mirrors etcd.
    view = HeartbeatView(T0)
    view.apply(T0, "sniffer", "a", record("a", at=T0 + timedelta(seconds=10)))
    forged = record("a", verified=False, at=T0)
    view.apply(T0, "sniffer", "a", forged)
    assert view.instances("sniffer") == [forged]


def test_a_new_keyring_makes_the_view_read_every_record_again() -> None:
    view = HeartbeatView(T0)
    view.watching = True
    view.resync(T0, view.begin_resync(), {})
    assert view.trusted
    view.reverify()
    assert not view.trusted and view.resync_requested.is_set()


# --- through the monitor ------------------------------------------------------------------------


def forge(h: Harness, instance: str, pod: str, error: str | None = None) -> None:
    """A record naming a real pod, written without the keyring."""
    plant(h, instance, pod, error, unverified=WHY)


def changed() -> Harness:
    """Three beating pods on version 1, then version 2 committed (the breaker's window open)."""
    return changed_after_beats(PODS, ETH0, ETH1)


def test_forged_records_naming_real_pods_do_not_trip_the_breaker() -> None:
    h = changed()
    for pod in ("sniffer-a", "sniffer-b"):
        forge(h, f"{pod}-x", pod, error="AuthenticationFailed")
    run(h.monitor(spec(ETH1)))
    state = h.backend.state(NAME)
    assert (state.active_version, state.frozen) == (2, False)
    assert "BlastRadiusExceeded" not in h.reasons()
    assert h.mem.unhealthy_since == {}


def test_the_same_records_verified_trip_it() -> None:
    # The guard above is the MAC, not the instance names.
    h = changed()
    for pod in ("sniffer-a", "sniffer-b"):
        forge(h, f"{pod}-x", pod, error="AuthenticationFailed")
        got = h.backend.live[NAME][f"{pod}-x"]
        h.backend.add_instance(NAME, dataclasses.replace(got, verified=True, unverified=None))
    run(h.monitor(spec(ETH1)))
    assert h.backend.state(NAME).frozen is True
    assert "BlastRadiusExceeded" in h.reasons()


def test_a_forged_record_does_not_keep_a_dead_pod_alive() -> None:
    h = changed()
    run(h.monitor(spec(ETH1)))
    # sniffer-c's instance dies (its lease expires); a forged record naming it takes its place.
    h.backend.remove_instance(NAME, "sniffer-c-0")
    forge(h, "sniffer-c-0", "sniffer-c")
    h.mem.last_seen["sniffer-c"] = utcnow() - timedelta(hours=1)
    run(h.monitor(spec(ETH1)))
    assert h.kube.status["instances"] == {"alive": 2, "expected": 3}
    assert "PodRestarted" in h.reasons()
    assert h.kube.deleted == ["sniffer-c"]


def test_unverified_records_are_reported() -> None:
    h = changed()
    forge(h, "sniffer-a-x", "sniffer-a")
    forge(h, "sniffer-b-x", "sniffer-b")
    run(h.monitor(spec(ETH1)))
    assert h.kube.status["instances"] == {"alive": 3, "expected": 3}
    message = h.condition(cond.HEARTBEATING)["message"]
    assert "2 heartbeat record(s) fail authentication (ignored)" in message
    gauge = {"component": NAME}
    assert REGISTRY.get_sample_value("defender_operator_instances_unverified", gauge) == 2.0
    assert h.reasons().count("UnverifiedInstances") == 1
    event = next(e for e in h.events if e.reason == "UnverifiedInstances")
    assert f"sniffer-a-x ({WHY}); sniffer-b-x ({WHY})" in event.message
    run(h.monitor(spec(ETH1)))
    assert h.reasons().count("UnverifiedInstances") == 1  # once per record
    h.backend.remove_instance(NAME, "sniffer-a-x")
    h.backend.remove_instance(NAME, "sniffer-b-x")
    run(h.monitor(spec(ETH1)))
    assert "authentication" not in h.condition(cond.HEARTBEATING)["message"]
    assert REGISTRY.get_sample_value("defender_operator_instances_unverified", gauge) == 0.0
    assert h.mem.unverified_reported == frozenset()


def test_an_event_names_a_few_of_many_unverified_records() -> None:
    h = changed()
    for i in range(12):
        forge(h, f"junk-{i:02d}", "sniffer-a")
    run(h.monitor(spec(ETH1)))
    event = next(e for e in h.events if e.reason == "UnverifiedInstances")
    assert event.message.startswith("12 heartbeat record(s) fail authentication: junk-00")
    assert "junk-04" in event.message and "junk-05" not in event.message
    assert "and 7 more" in event.message


def test_invented_names_and_reasons_are_cut_in_what_is_reported() -> None:
    # Anyone with etcd write access picks instance names and, in an auth block, key ids of
    # any length: the Event and the log line stay short.
    h = changed()
    long_name = "n" * 500
    plant(h, long_name, "sniffer-a", unverified="it names key '" + "k" * 5000 + "'")
    for i in range(7):
        plant(h, f"ghost-{i}", None)
        h.mem.unbacked_since[f"ghost-{i}"] = utcnow() - timedelta(hours=1)
    run(h.monitor(spec(ETH1)))
    unverified = next(e for e in h.events if e.reason == "UnverifiedInstances")
    assert len(unverified.message) < 600 and "n" * 200 not in unverified.message
    run(h.monitor(spec(ETH1)))
    unbacked = next(e for e in h.events if e.reason == "UnbackedInstances")
    assert "ghost-0; ghost-1; ghost-2; ghost-3; ghost-4 and 2 more" in unbacked.message


def test_records_read_before_the_keyring_are_read_again_not_judged() -> None:
    # The view read them while the operator held no keyring (unchecked); a pass once the
    # keyring is held reads the instances itself instead of restarting pods it thinks silent.
    h = changed()
    h.inform()
    view = h.rt.heartbeats
    view.watching = True
    unchecked = [
        dataclasses.replace(r, verified=False, checked=False, unverified="no keyring")
        for r in h.backend.instances(NAME)
    ]
    view.resync(utcnow(), view.begin_resync(), {NAME: unchecked})
    assert view.trusted
    h.mem.last_seen.clear()
    run(h.monitor(spec(ETH1)))
    assert h.kube.status["instances"] == {"alive": 3, "expected": 3}
    assert "UnverifiedInstances" not in h.reasons() and h.kube.deleted == []
