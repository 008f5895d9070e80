"""What wakes a component's monitor pass before its interval (`Runtime.wake`): an instance that
appears, goes or changes its record, a pod it selects, a change in etcd newer than its last
read, etcd's health, the keyring; and what does not (a put that only moves the time, a pod of
another selector or namespace, the operator's own seed read by the pass after it)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import kopf
import pytest
from operator_core_support import LABELS, LOG, NAME, NAMESPACE, Harness, spec, until
from prometheus_client import REGISTRY

from defender_config import Keyring
from defender_operator import _keyguard, _loops, _reconcile, _rotation, handlers
from defender_operator._backend import EtcdHealth, InstanceRecord
from defender_operator._keys import StoredKeyring
from defender_operator._runtime import Runtime, utcnow


def _harness() -> Harness:
    """A harness whose component's monitor daemon waits (kopf runs one per component), so a
    wake has somewhere to go."""
    h = Harness()
    h.rt.heartbeats.attach(NAME, NAMESPACE)
    return h


def _waker(h: Harness, name: str = NAME) -> asyncio.Event:
    waker = h.rt.heartbeats.waker(name, NAMESPACE)
    assert waker is not None, f"no monitor daemon of {name} waits"
    return waker


def _woken(h: Harness, name: str = NAME) -> bool:
    return _waker(h, name).is_set()


def _wakes(reason: str) -> float:
    return (
        REGISTRY.get_sample_value("defender_operator_monitor_wakes_total", {"reason": reason})
        or 0.0
    )


def _settle(h: Harness, name: str = NAME) -> None:
    _waker(h, name).clear()


def _record(pod: str, **over: object) -> InstanceRecord:
    base = InstanceRecord(
        instance=f"{pod}-0", pod=pod, time=utcnow(), status="RUNNING", verified=True
    )
    return dataclasses.replace(base, **over)  # type: ignore[arg-type]


def _rotate_until(h: Harness, what: str, check: Callable[[], bool]) -> None:
    """Run the key rotation loop until `check()` holds."""

    async def rounds() -> None:
        task = asyncio.create_task(_loops.key_rotation(h.rt))
        try:
            await until(what, check)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(rounds())


def _monitored() -> Harness:
    h = _harness()
    h.inform()
    asyncio.run(h.reconcile(spec()))
    asyncio.run(h.monitor(spec()))
    _settle(h)
    return h


# --- instances --------------------------------------------------------------------------------


def test_an_instance_that_changes_its_record_wakes_and_one_that_only_beats_does_not() -> None:
    view = _harness().rt.heartbeats
    wake = view.waker(NAME)
    assert wake is not None
    view.apply(utcnow(), NAME, "a-0", _record("a"))
    assert wake.is_set()  # a new instance
    wake.clear()
    view.apply(utcnow(), NAME, "a-0", _record("a", time=utcnow() + timedelta(seconds=5)))
    assert not wake.is_set()  # the same record, a later time: an older heartbeater's beat
    # Later records (an agent stamps each it writes; an older one would be a replay).
    later = utcnow() + timedelta(seconds=6)
    view.apply(utcnow(), NAME, "a-0", _record("a", last_error_reason="UnknownKey", time=later))
    assert wake.is_set()  # an error reported
    wake.clear()
    view.apply(
        utcnow(),
        NAME,
        "a-0",
        _record("a", last_error_reason="UnknownKey", status="STOPPED", time=later),
    )
    assert wake.is_set()
    wake.clear()
    view.apply(utcnow(), NAME, "a-0", None)
    assert wake.is_set()  # gone (a lease expired)


def test_wake_all_wakes_every_monitor() -> None:
    rt = Harness().rt
    events = [rt.heartbeats.attach(n, NAMESPACE) for n in ("sniffer", "firewall", "rag")]
    before = _wakes("keyring")
    rt.wake_all("keyring")
    assert all(e.is_set() for e in events)
    assert _wakes("keyring") == before + 3  # one per monitor woken


def test_each_wake_is_counted_by_what_asked_for_it() -> None:
    view = _harness().rt.heartbeats
    before = {r: _wakes(r) for r in ("instance-new", "instance-changed", "instance-gone")}
    view.apply(utcnow(), NAME, "a-0", _record("a"))
    view.apply(utcnow(), NAME, "a-0", _record("a", time=utcnow() + timedelta(seconds=5)))
    view.apply(
        utcnow(), NAME, "a-0", _record("a", status="STOPPED", time=utcnow() + timedelta(seconds=6))
    )
    view.apply(utcnow(), NAME, "a-0", None)
    # The beat that only moved the time asked for nothing, so it is not counted.
    assert {r: _wakes(r) - n for r, n in before.items()} == {
        "instance-new": 1,
        "instance-changed": 1,
        "instance-gone": 1,
    }


# --- changes in etcd --------------------------------------------------------------------------


def test_a_change_in_etcd_after_the_last_read_wakes_the_component() -> None:
    h = _monitored()
    read = h.mem.observed
    assert read is not None
    # The seed and everything before the pass's read: no news.
    h.rt.changes.apply(NAME, read.revision)
    assert not _woken(h)
    # Someone writes the component's keys afterwards (an attacker putting a record back).
    before = _wakes("etcd-change")
    h.backend.touch(NAME)
    assert _woken(h)
    assert _wakes("etcd-change") == before + 1


def test_a_change_to_a_component_no_pass_read_or_an_unknown_name_wakes_nothing() -> None:
    h = _harness()
    h.rt.memory(NAMESPACE, NAME)  # remembered, no pass has read it yet: the coming one reads
    h.rt.changes.apply(NAME, 7)
    assert not _woken(h)
    h.rt.heartbeats.attach("never-seen", NAMESPACE)
    h.rt.changes.apply("never-seen", 8)
    assert not _woken(h, "never-seen")


def test_a_forgotten_component_is_not_woken_by_a_change() -> None:
    h = _monitored()
    h.rt.forget(NAMESPACE, NAME, "uid-1")
    h.rt.changes.apply(NAME, 10**9)
    assert not _woken(h)


def test_forgetting_one_namespace_s_component_keeps_the_same_name_elsewhere_wakeable() -> None:
    h = _monitored()
    other = h.rt.memory("elsewhere", NAME)
    other.observed = h.mem.observed
    h.rt.forget(NAMESPACE, NAME, "uid-1")
    h.rt.changes.apply(NAME, 10**9)
    assert _woken(h)  # the other namespace's component of that name was read, and changed
    _settle(h)
    h.rt.forget("elsewhere", NAME, "uid-1")
    h.rt.changes.apply(NAME, 10**9 + 1)
    assert not _woken(h)
    # Nothing is kept of a name no namespace holds any more (names come and go).
    assert NAME not in h.rt._namespaces_of
    assert NAMESPACE not in h.rt._names_in and "elsewhere" not in h.rt._names_in


def test_the_seed_does_not_wake_the_pass_that_reads_after_it() -> None:
    h = _harness()
    h.inform()
    asyncio.run(h.reconcile(spec()))  # seeds (writes etcd), then its pass reads
    _settle(h)
    asyncio.run(h.monitor(spec()))
    assert not _woken(h)


# --- pods -------------------------------------------------------------------------------------


def test_a_pod_the_component_selects_wakes_it() -> None:
    h = _monitored()
    before = _wakes("pod")
    h.rt.pod_changed(NAMESPACE, {**LABELS, "pod-template-hash": "x"})
    assert _woken(h)
    assert _wakes("pod") == before + 1


def test_a_pod_of_another_selector_or_namespace_wakes_nothing() -> None:
    h = _monitored()
    h.rt.pod_changed(NAMESPACE, {"app": "firewall"})
    h.rt.pod_changed("elsewhere", dict(LABELS))
    h.rt.pod_changed(NAMESPACE, {})
    h.rt.pod_changed(None, dict(LABELS))
    assert not _woken(h)


def test_a_pod_wakes_nothing_before_the_first_pass_knows_the_selector() -> None:
    h = _harness()
    h.rt.memory(NAMESPACE, NAME)
    h.rt.pod_changed(NAMESPACE, dict(LABELS))
    assert not _woken(h)


def test_the_pod_index_handler_wakes_the_component_once_the_pod_is_filed() -> None:
    h = _monitored()
    meta = {"uid": "u-1", "creationTimestamp": "2026-01-01T00:00:00Z", "labels": dict(LABELS)}

    async def event() -> dict[Any, Any]:
        memo = kopf.Memo(runtime=h.rt)
        filed = await handlers.defender_pods(
            namespace=NAMESPACE, name="sniffer-x", meta=meta, status={}, memo=memo
        )
        assert not _woken(h)  # not before kopf files what the handler returned
        await until("woken", lambda: _woken(h))
        return filed

    assert asyncio.run(event())  # and the pod is filed under its labels
    # Before the runtime exists (kopf indexes only after start-up, but no memo is no error).
    asyncio.run(
        handlers.defender_pods(
            namespace=NAMESPACE, name="sniffer-y", meta=meta, status={}, memo=kopf.Memo()
        )
    )


# --- the same name in another namespace -------------------------------------------------------


def _twin(h: Harness, namespace: str = "t-tenant") -> asyncio.Event:
    """A resource named like the component in another namespace, selecting pods by the same
    labels (a tenant's, refused with `Conflict`; or the owner, and this one the refused), and
    the event its monitor daemon waits on."""
    h.rt.memory(namespace, NAME).spec = h.mem.spec
    return h.rt.heartbeats.attach(NAME, namespace)


def test_a_pod_wakes_only_the_monitor_of_its_own_namespace() -> None:
    # A tenant's pod churn must not make another namespace's monitor of the name spin.
    h = _monitored()
    twin = _twin(h)
    h.rt.pod_changed("t-tenant", dict(LABELS))
    assert twin.is_set() and not _woken(h)
    twin.clear()
    h.rt.pod_changed(NAMESPACE, dict(LABELS))
    assert _woken(h) and not twin.is_set()


def test_a_deletion_wakes_only_the_monitor_of_the_deleted_resource_s_namespace() -> None:
    h = _monitored()
    twin = _twin(h)
    h.rt.mark_gone("uid-tenant")  # its finalizer's handler ran: `gone` only ends its daemon
    body = {"metadata": {"uid": "uid-tenant"}}
    assert not asyncio.run(_reconcile.gone(h.rt, body, "t-tenant", NAME, "Keep", LOG))
    assert twin.is_set() and not _woken(h)


def test_news_about_the_names_data_in_etcd_wakes_every_monitor_of_the_name() -> None:
    # The instances and keys under a name are the name's, whichever namespace's resource
    # holds it: each monitor of the name judges them (the refused one, whether it still is).
    h = _monitored()
    twin = _twin(h)
    h.rt.heartbeats.apply(utcnow(), NAME, "a-0", _record("a"))
    assert _woken(h) and twin.is_set()
    _settle(h)
    twin.clear()
    h.backend.touch(NAME)  # a change the change watch reports, after the last pass's read
    assert _woken(h) and twin.is_set()


# --- etcd's health and the keyring ------------------------------------------------------------


def test_a_change_in_etcds_health_wakes_every_monitor_and_the_same_reading_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = _monitored()
    asyncio.run(_loops._etcd_health_round(h.rt))  # healthy, as before
    assert not _woken(h)
    h.backend.unavailable = True
    asyncio.run(_loops._etcd_health_round(h.rt))
    assert _woken(h)
    _settle(h)
    asyncio.run(_loops._etcd_health_round(h.rt))
    assert not _woken(h)
    h.backend.unavailable = False
    full = EtcdHealth(reachable=True, quorum=True, alarms=("NOSPACE",))
    monkeypatch.setattr(h.backend, "health", lambda: full)
    asyncio.run(_loops._etcd_health_round(h.rt))
    assert _woken(h)  # healthy again, and full: both judged by every pass


def test_the_keyring_facts_the_rotation_loop_compares() -> None:
    h = _monitored()
    before = _loops._key_facts(h.rt)
    assert _loops._key_facts(h.rt) == before
    h.rt.keyring.set(Keyring.generate())
    assert _loops._key_facts(h.rt) != before
    h.rt.keyring.set(None)
    assert _loops._key_facts(h.rt)[:3] == (True, "Idle", None)
    changed = _loops._key_facts(h.rt)
    h.rt.secrets.fanned_out.append("elsewhere")  # type: ignore[attr-defined]
    assert _loops._key_facts(h.rt) != changed  # a copy written or found changed


def test_a_key_rotation_round_that_changes_the_keyring_wakes_every_monitor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = _monitored()
    h.rt.keyring_ready = False  # as after a refused keyring: the round settles it again

    async def settle(rt: Runtime) -> StoredKeyring | None:
        rt.keyring_ready = True
        return None  # no rotation step this round

    async def fan_out(rt: Runtime, keyring: Keyring) -> None:
        return None

    monkeypatch.setattr(_keyguard, "settle_source", settle)
    monkeypatch.setattr(_rotation, "fan_out_everywhere", fan_out)

    _rotate_until(h, "the monitors woken", lambda: _woken(h))
    assert h.rt.keyring_ready


def test_a_key_rotation_round_that_changes_nothing_wakes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = _monitored()
    rounds = 0

    async def settle(rt: Runtime) -> StoredKeyring | None:
        nonlocal rounds
        rounds += 1
        return None

    async def fan_out(rt: Runtime, keyring: Keyring) -> None:
        return None

    monkeypatch.setattr(_keyguard, "settle_source", settle)
    monkeypatch.setattr(_rotation, "fan_out_everywhere", fan_out)
    monkeypatch.setattr(h.rt.settings, "rotation_interval_seconds", 0.01)

    _rotate_until(h, "three rounds", lambda: rounds >= 3)
    assert not _woken(h)


def test_a_key_rotation_round_that_writes_a_copy_wakes_every_monitor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = _monitored()

    async def settle(rt: Runtime) -> StoredKeyring | None:
        return None

    async def fan_out(rt: Runtime, keyring: Keyring) -> None:
        rt.secrets.fan_out(keyring, "copied-now")

    monkeypatch.setattr(_keyguard, "settle_source", settle)
    monkeypatch.setattr(_rotation, "fan_out_everywhere", fan_out)

    _rotate_until(h, "the monitors woken", lambda: _woken(h))
