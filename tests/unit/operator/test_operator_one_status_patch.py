"""A reconcile and the first monitor pass publish in ONE status patch (issue 17: API writes per
component on the create path), and the reconcile still publishes alone when no pass can judge
yet. In-memory Backend, recording stand-in for the status subresource."""

from __future__ import annotations

import asyncio
from typing import Any

from operator_core_support import Harness, spec

from defender_operator._decisions import conditions as cond


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
