"""When a monitor pass plans the next one (`_monitor._steps` → `next_deadline`): not at the
deadline of a pod whose live instance is on a lease the trusted heartbeat view watches (its
expiry arrives as a delete), but still at the deadline of one the view cannot announce."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

from operator_core_support import NAME, Harness, spec

from defender_operator._runtime import utcnow

SPEC = spec(heartbeat={"intervalSeconds": 10, "missedBeforeRestart": 3})


def _component(*, lease_id: int, trusted: bool) -> Harness:
    """A reconciled component whose one pod's instance beats, with a lease or without; the
    heartbeat view kept by a watch (trusted) or not."""
    h = Harness()
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    asyncio.run(h.reconcile(SPEC, first_pass=True))
    record = h.backend.live[NAME]["sniffer-a-0"]
    h.backend.add_instance(
        NAME, dataclasses.replace(record, lease_id=lease_id, lease_ttl_seconds=30)
    )
    view = h.rt.heartbeats
    if trusted:
        view.watching = True
        view.resync(utcnow(), view.begin_resync(), {NAME: h.backend.instances(NAME)})
    return h


def test_a_live_leased_instance_in_a_trusted_view_plans_no_pass_at_its_deadline() -> None:
    h = _component(lease_id=7, trusted=True)
    due = asyncio.run(h.monitor(SPEC))
    # Nothing else runs on the clock: the next pass is the lease's delete, or the interval.
    assert due is None


def test_an_untrusted_view_or_an_instance_without_a_lease_keeps_the_deadline() -> None:
    for lease_id, trusted in ((7, False), (0, True)):
        h = _component(lease_id=lease_id, trusted=trusted)
        before = utcnow()
        due = asyncio.run(h.monitor(SPEC))
        assert due is not None, (lease_id, trusted)
        # The instance beat just now: it turns stale a threshold (3 x 10 s) later.
        assert before + timedelta(seconds=25) < due <= utcnow() + timedelta(seconds=30)


def test_a_pod_whose_instance_went_gets_its_deadline_again() -> None:
    # The lease's delete came (etcd expired it, or the instance stopped): nothing more will
    # announce this pod, so its deadline (a threshold after it was last seen) is planned.
    h = _component(lease_id=7, trusted=True)
    assert asyncio.run(h.monitor(SPEC)) is None
    h.rt.heartbeats.apply(utcnow(), NAME, "sniffer-a-0", None)
    h.backend.remove_instance(NAME, "sniffer-a-0")
    due = asyncio.run(h.monitor(SPEC))
    assert due is not None
    assert due <= utcnow() + timedelta(seconds=30)


def test_a_stalled_watch_stream_brings_the_deadline_back() -> None:
    # A stream that stalls without an error (a wedged member, a proxy holding it open) would
    # never deliver the lease's delete: once it has answered nothing (no event, no progress
    # answer) past the limit, the view is not trusted and the deadline is planned again.
    h = _component(lease_id=7, trusted=True)
    silent: list[float | None] = [1.0]
    h.rt.heartbeats.listen(lambda: silent[0], 15.0)
    h.rt.heartbeats.judge_stream()  # as the heartbeat loop does, twice a progress interval
    assert asyncio.run(h.monitor(SPEC)) is None
    silent[0] = 16.0
    h.rt.heartbeats.judge_stream()
    before = utcnow()
    due = asyncio.run(h.monitor(SPEC))
    assert due is not None
    assert before + timedelta(seconds=25) < due <= utcnow() + timedelta(seconds=30)
    # It answers again (a progress answer): no pass at the deadline, as before.
    silent[0] = 0.2
    h.rt.heartbeats.judge_stream()
    assert asyncio.run(h.monitor(SPEC)) is None
