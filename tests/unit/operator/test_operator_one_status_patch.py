"""A reconcile and the first monitor pass publish in ONE status patch (issue 17: API writes per
component on the create path), and the reconcile still publishes alone when no pass can judge
yet. In-memory Backend, recording stand-in for the status subresource."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta
from typing import Any

import kopf
import pytest
from operator_core_support import Harness, spec

from defender_config import ScrubReport, ValueCheck
from defender_operator._backend import InstanceRecord
from defender_operator._decisions import conditions as cond
from defender_operator._runtime import utcnow


def ready(h: Harness) -> dict[str, Any]:
    return h.condition(cond.READY)


def test_instances_beating_at_create_are_ready_in_the_reconciles_one_patch() -> None:
    h = Harness()
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    asyncio.run(h.reconcile(spec(), first_pass=True))
    assert len(h.kube.patches) == 1, h.kube.patches
    [patch] = h.kube.patches
    # The reconcile's fields and the pass's judgement together.
    assert patch["observedGeneration"] == 1 and patch["specConfigDigest"]
    assert patch["activeVersion"] == 1
    assert patch["instances"] == {"alive": 1, "expected": 1}
    assert ready(h)["status"] == cond.TRUE
    # The monitor's next pass finds nothing new to write.
    asyncio.run(h.monitor(spec()))
    assert len(h.kube.patches) == 1


def test_without_the_first_pass_it_takes_two_patches() -> None:
    # What the combined patch saves: the reconcile's, then the pass's.
    h = Harness()
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    asyncio.run(h.reconcile(spec()))
    asyncio.run(h.monitor(spec()))
    assert len(h.kube.patches) == 2
    assert ready(h)["status"] == cond.TRUE


def test_before_etcd_health_is_measured_the_reconcile_publishes_alone() -> None:
    # A pass would report an outage that is only "not measured yet": none runs, and the
    # reconcile's own fields still reach the status.
    h = Harness()
    h.rt.etcd.measured = False
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    asyncio.run(h.reconcile(spec(), first_pass=True))
    [patch] = h.kube.patches
    assert patch["observedGeneration"] == 1 and "instances" not in patch
    assert ready(h)["status"] != cond.TRUE


def test_a_failing_pass_leaves_the_reconciles_fields_published(caplog: Any) -> None:
    h = Harness()
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")

    def broken(*_: Any, **__: Any) -> Any:
        raise ValueError("cadence record unreadable")

    h.backend.cadence = broken  # type: ignore[method-assign]
    h.backend.last_seen = broken  # type: ignore[method-assign]
    asyncio.run(h.reconcile(spec(), first_pass=True))
    assert any(p.get("observedGeneration") == 1 for p in h.kube.patches)
    assert "monitor pass after reconcile failed" in caplog.text


def test_a_first_clean_scrub_goes_out_with_the_pass_and_corruption_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The scrub's first "verified" is no reason for a status write of its own; a corrupt
    # value is published at once (even if the rest of the pass then fails).
    h = Harness()
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    h.backend.scrub = lambda component: ScrubReport(component, (), 1)  # type: ignore[method-assign]
    asyncio.run(h.reconcile(spec(), first_pass=True))
    assert len(h.kube.patches) == 1
    # Seeded by this very reconcile, values read back in its transaction: the first scrub
    # waits one interval.
    assert cond.CORRUPT not in {c["type"] for c in h.kube.status["conditions"]}
    h.mem.scrubbed_at = None  # the interval passed
    asyncio.run(h.monitor(spec()))
    assert len(h.kube.patches) == 2  # the pass's own patch, none for the scrub
    assert h.condition(cond.CORRUPT)["status"] == cond.FALSE
    h.mem.scrubbed_at = None
    posted: list[str] = []
    monkeypatch.setattr(kopf, "event", lambda *a, **k: posted.append(k["reason"]))
    bad = ValueCheck("/p/active", "active", ok=False, version=1, reason="DigestMismatch")
    h.backend.scrub = lambda component: ScrubReport(component, (bad,), 2)  # type: ignore[method-assign]
    h.backend.restore_active = lambda *a, **k: None  # type: ignore[method-assign]

    def later_step_fails(name: str, **_: Any) -> Any:
        raise ValueError("breaker step cannot read the state")

    real_observe = h.backend.observe

    def observe_then_break(component: str, since: Any) -> Any:
        # The pass's first read works; the state read after the scrub's restore fails.
        seen = real_observe(component, since)
        h.backend.state = later_step_fails  # type: ignore[method-assign]
        return seen

    h.backend.observe = observe_then_break  # type: ignore[method-assign]
    with contextlib.suppress(ValueError):
        asyncio.run(h.monitor(spec()))
    assert h.condition(cond.CORRUPT)["status"] == cond.TRUE
    assert "ValueCorrupt" in posted


def _beat_at(h: Harness, pod: str, when: datetime) -> None:
    h.backend.add_instance(
        "sniffer",
        InstanceRecord(
            instance=f"{pod}-0",
            pod=pod,
            time=when,
            status="RUNNING",
            key_fingerprint=h.rt.keyring.current().primary_fingerprint,
            verified=True,
        ),
    )


def _ready_on_one_pod(h: Harness) -> str:
    """One beating pod, the component created: Ready in one patch. The heartbeat time shown."""
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    asyncio.run(h.reconcile(spec(), first_pass=True))
    return str(h.kube.status["lastHeartbeatTime"])


def test_a_newer_heartbeat_alone_writes_nothing_until_the_refresh() -> None:
    # Heartbeats live in leases; copying each into status would be a write per component
    # per pass (issue 17).
    h = Harness()
    shown = _ready_on_one_pod(h)
    _beat_at(h, "sniffer-a", utcnow() + timedelta(seconds=20))
    asyncio.run(h.monitor(spec()))
    assert len(h.kube.patches) == 1
    refresh = h.rt.settings.status_heartbeat_refresh_seconds
    _beat_at(h, "sniffer-a", utcnow() + timedelta(seconds=refresh + 1))
    asyncio.run(h.monitor(spec()))
    assert len(h.kube.patches) == 2
    assert h.kube.status["lastHeartbeatTime"] > shown


def test_a_status_write_for_another_reason_carries_the_newest_heartbeat() -> None:
    h = Harness()
    shown = _ready_on_one_pod(h)
    later = utcnow() + timedelta(seconds=20)
    # A second pod comes up: instances change, so status is written anyway.
    h.add_pod("sniffer-b")
    _beat_at(h, "sniffer-a", later)
    _beat_at(h, "sniffer-b", later)
    asyncio.run(h.monitor(spec()))
    assert len(h.kube.patches) == 2
    patch = h.kube.patches[-1]
    assert patch["instances"] == {"alive": 2, "expected": 2}
    assert patch["lastHeartbeatTime"] == cond.rfc3339(later) != shown
