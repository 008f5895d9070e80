"""What a monitor pass reads from etcd (issue 17: the steady-state cost of 1,000 components is
their passes' reads): ACTIVE/MASTER/freeze, the cadence, the rollout and the alerts as one read,
nothing read twice; and when that read fails, a pass judges what it still can."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import pytest
from operator_core_support import Harness, spec

from defender_config import RecordAuthError, StoreUnavailableError
from defender_operator._decisions import conditions as cond
from defender_operator._runtime import utcnow

READS = ("observe", "state", "cadence", "rollout", "alerts", "instances", "last_seen")


def settled() -> Harness:
    h = Harness()
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    asyncio.run(h.reconcile(spec(), first_pass=True))
    assert h.condition(cond.READY)["status"] == cond.TRUE
    h.backend.calls.clear()
    return h


def test_a_pass_reads_the_component_once() -> None:
    h = settled()
    asyncio.run(h.monitor(spec()))
    # The in-memory `observe` names its parts; the library's is one transaction.
    assert [c for c in h.backend.calls if c in READS] == [
        "instances",  # no heartbeat watch in this harness: read directly
        "last_seen",
        "observe",
        "state",
        "cadence",
        "rollout",
        "alerts",
    ]


def test_a_record_that_does_not_verify_fails_the_pass_but_not_the_heartbeat_judgement(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Someone with etcd write access replaced the metadata record: the pass says so with the
    # typed error, and the healthy pod beating meanwhile is never restarted for it.
    h = settled()
    forged = RecordAuthError("/defender/components/sniffer/metadata", "carries no MAC")
    for _ in range(3):
        h.backend.fail("observe", forged)
        h.backend.fail("state", forged)
        h.beat("sniffer-a")
        with caplog.at_level(logging.WARNING), pytest.raises(RecordAuthError):
            asyncio.run(h.monitor(spec()))
    assert h.kube.deleted == []
    assert "component records do not verify" in caplog.text
    # The cadence and the alerts were still read, each on its own.
    assert h.backend.calls.count("cadence") == 3 and h.backend.calls.count("alerts") == 3


def test_etcd_gone_at_the_read_judges_nothing_this_pass(caplog: pytest.LogCaptureFixture) -> None:
    h = settled()
    h.backend.fail("observe", StoreUnavailableError(["127.0.0.1:2379"], "gone"))
    with caplog.at_level(logging.WARNING):
        asyncio.run(h.monitor(spec()))
    assert "cannot read the component" in caplog.text
    assert h.kube.deleted == []
    assert "cadence" not in h.backend.calls and "state" not in h.backend.calls
    # Heartbeats are not judged from a read that failed: nothing turned False.
    assert h.condition(cond.HEARTBEATING)["status"] != cond.FALSE


def test_a_failed_read_after_a_record_that_does_not_verify_judges_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = settled()
    forged = RecordAuthError("/defender/components/sniffer/metadata", "carries no MAC")
    h.backend.fail("observe", forged)
    h.backend.fail("cadence", StoreUnavailableError(["127.0.0.1:2379"], "gone"))
    with caplog.at_level(logging.WARNING):
        asyncio.run(h.monitor(spec()))
    assert "cannot read the component" in caplog.text
    assert h.kube.deleted == [] and "publish_cadence" not in h.backend.calls


def test_a_pass_that_cannot_read_restarts_nothing_before_the_health_check_notices() -> None:
    # etcd lost quorum a moment ago: the last health check still said healthy, and the newest
    # heartbeat known is old (a reused lease sighting can be a TTL old). Restarting now would
    # turn one outage into two (the quorum-loss e2e test saw exactly that).
    h = settled()
    long_ago = utcnow() - timedelta(hours=1)
    h.mem.watch_started = long_ago
    h.mem.last_seen["sniffer-a"] = long_ago
    h.backend.fail("last_seen", StoreUnavailableError(["127.0.0.1:2379"], "no quorum"))
    asyncio.run(h.monitor(spec()))
    assert h.kube.deleted == []
    assert h.condition(cond.HEARTBEATING)["reason"] == "EtcdUnavailable"
    # Once a read works again, a pod that really stopped beating is restarted.
    h.backend.live.clear()
    asyncio.run(h.monitor(spec()))
    assert h.kube.deleted == ["sniffer-a"]
