"""The heartbeat watch's pure parts: the in-memory view (events vs. resync), the next
deadline to wake for, the stalled-watch liveness rule, the resync/stall settings, and how
etcd member health maps to unreachable vs. no quorum."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
import pytest
from operator_core_support import Harness, until

from defender_config.store import HealthReport, MemberHealth
from defender_operator import _loops, handlers
from defender_operator._backend import EtcdHealth, InstanceRecord
from defender_operator._decisions.liveness import watch_stalled
from defender_operator._decisions.restarts import (
    MAX_HONOURED_LEASE_TTL_SECONDS,
    HeartbeatPolicy,
    PodView,
    announced_pods,
    next_deadline,
)
from defender_operator._errors import OperatorConfigurationError
from defender_operator._etcd_health import etcd_health
from defender_operator._heartbeats import HeartbeatView
from defender_operator._runtime import Runtime, utcnow
from defender_operator._settings import OperatorSettings, load_operator_settings

T0 = datetime(2026, 1, 1, tzinfo=UTC)
S = timedelta(seconds=1)


def rec(instance: str, at: datetime) -> InstanceRecord:
    return InstanceRecord(instance=instance, pod=f"pod-{instance}", time=at, verified=True)


def times(view: HeartbeatView, component: str) -> dict[str, datetime]:
    return {r.instance: r.time for r in view.instances(component)}


# --- the view ---------------------------------------------------------------------------


def test_view_is_not_trusted_until_watching_and_resynced() -> None:
    view = HeartbeatView(T0)
    assert not view.trusted
    view.watching = True
    assert not view.trusted
    view.resync(T0, view.begin_resync(), {})
    assert view.trusted
    view.watch_failed()
    assert not view.trusted
    assert view.resync_requested.is_set()
    view.begin_resync()
    assert not view.resync_requested.is_set()


def test_the_view_is_trusted_only_while_its_watch_stream_answers() -> None:
    view = HeartbeatView(T0)
    view.watching = True
    view.resync(T0, view.begin_resync(), {})
    silent: list[float | None] = [0.0]
    view.listen(lambda: silent[0], 15.0)
    assert view.judge_stream() and view.live and view.trusted and view.silent_for() == 0.0
    silent[0] = 15.0
    view.judge_stream()
    assert view.trusted  # at the limit: an idle stream waiting for its progress answer
    silent[0] = 15.5  # a stream that stalled without an error
    # Judged on the event loop only: a pass reading `trusted` twice gets one answer.
    assert view.trusted
    assert not view.judge_stream() and not view.live and not view.trusted
    silent[0] = 0.1
    assert not view.trusted  # until judged again
    silent[0] = None  # between streams, after an outage
    view.judge_stream()
    assert not view.live and not view.trusted and view.silent_for() is None
    silent[0] = 0.1  # answered again: nothing was lost (the watch resumes where it stopped)
    view.judge_stream()
    assert view.trusted


def test_delete_removes_the_instance_and_wakes_its_component() -> None:
    view = HeartbeatView(T0)
    view.resync(T0, view.begin_resync(), {"sniffer": [rec("a", T0), rec("b", T0)]})
    wake, other = view.attach("sniffer", "ns"), view.attach("firewall", "ns")
    view.apply(T0 + S, "sniffer", "a", None)
    assert set(times(view, "sniffer")) == {"b"}
    assert wake.is_set()
    assert not other.is_set()
    assert view.last_progress == T0 + S


def test_a_put_updates_and_only_a_new_instance_wakes() -> None:
    view = HeartbeatView(T0)
    view.resync(T0, view.begin_resync(), {"sniffer": [rec("a", T0)]})
    wake = view.attach("sniffer", "ns")
    view.apply(T0 + S, "sniffer", "a", rec("a", T0 + S))
    assert times(view, "sniffer") == {"a": T0 + S}
    assert not wake.is_set(), "a routine heartbeat must not cost a monitor pass"
    view.apply(T0 + S, "sniffer", "c", rec("c", T0 + S))
    assert wake.is_set()


def test_events_during_a_resync_win_over_the_older_listing() -> None:
    view = HeartbeatView(T0)
    view.resync(T0, view.begin_resync(), {"sniffer": [rec("a", T0), rec("b", T0)]})
    since = view.begin_resync()
    # While the listing is being read: a expires, b heartbeats, c starts.
    view.apply(T0 + S, "sniffer", "a", None)
    view.apply(T0 + 2 * S, "sniffer", "b", rec("b", T0 + 2 * S))
    view.apply(T0 + 2 * S, "sniffer", "c", rec("c", T0 + 2 * S))
    listing = {"sniffer": [rec("a", T0), rec("b", T0 + S)]}  # read before those events
    view.resync(T0 + 3 * S, since, listing)
    assert times(view, "sniffer") == {"b": T0 + 2 * S, "c": T0 + 2 * S}


def test_a_resync_drops_what_the_watch_missed() -> None:
    view = HeartbeatView(T0)
    view.resync(T0, view.begin_resync(), {"sniffer": [rec("a", T0), rec("b", T0)]})
    # A delete lost across compaction: only the next listing can tell.
    view.resync(T0 + S, view.begin_resync(), {"sniffer": [rec("b", T0 + S)]})
    assert times(view, "sniffer") == {"b": T0 + S}
    assert view.instances("unknown") == []


def test_a_tombstone_older_than_the_listing_does_not_hide_a_new_registration() -> None:
    view = HeartbeatView(T0)
    view.apply(T0, "sniffer", "a", None)
    # The instance re-registered before this listing began: the listing is authoritative.
    view.resync(T0 + S, view.begin_resync(), {"sniffer": [rec("a", T0 + S)]})
    assert times(view, "sniffer") == {"a": T0 + S}


def test_a_resync_wakes_the_components_whose_instances_came_or_went_unseen() -> None:
    # Monitors plan no pass at a live leased instance's deadline while the view is trusted:
    # an expiry during a watch outage is a delete nobody delivered, so the listing wakes them.
    view = HeartbeatView(T0)
    view.resync(T0, view.begin_resync(), {"sniffer": [rec("a", T0)], "firewall": [rec("f", T0)]})
    wakes = {c: view.attach(c, "ns") for c in ("sniffer", "firewall", "rag", "ml-detector")}
    view.watch_failed()
    view.resync(
        T0 + S,
        view.begin_resync(),
        {"firewall": [rec("f", T0 + S)], "rag": [rec("r", T0 + S)]},
    )
    assert {c for c, w in wakes.items() if w.is_set()} == {"sniffer", "rag"}
    # A listing that finds what the view holds (the periodic one) wakes nobody.
    for w in wakes.values():
        w.clear()
    view.resync(
        T0 + 2 * S, view.begin_resync(), {"firewall": [rec("f", T0)], "rag": [rec("r", T0)]}
    )
    assert not any(w.is_set() for w in wakes.values())


# --- next deadline ----------------------------------------------------------------------

POLICY = HeartbeatPolicy(interval_seconds=10, missed_before_restart=3, startup_grace_seconds=60)
OLD = T0 - timedelta(hours=1)


def test_next_deadline_is_the_earliest_future_one() -> None:
    pods = [PodView("p1", OLD), PodView("p2", OLD), PodView("gone", OLD, deleting=True)]
    seen = {"p1": T0 - 5 * S, "p2": T0 - 20 * S, "gone": T0 - 29 * S}
    assert next_deadline(T0, pods, seen, OLD, POLICY) == T0 + 10 * S


def test_next_deadline_ignores_passed_deadlines_and_respects_grace() -> None:
    # p1 is already stale (the decision handles it); p2 is new and in its startup grace.
    pods = [PodView("p1", OLD), PodView("p2", T0 - 10 * S)]
    seen = {"p1": T0 - 40 * S}
    assert next_deadline(T0, pods, seen, OLD, POLICY) == T0 + 50 * S
    assert next_deadline(T0, [PodView("p1", OLD)], seen, OLD, POLICY) is None


def test_next_deadline_leaves_out_pods_whose_end_etcd_announces() -> None:
    pods = [PodView("p1", OLD), PodView("p2", OLD), PodView("new", T0 - 10 * S)]
    seen = {"p1": T0 - 5 * S, "p2": T0 - 20 * S}
    assert next_deadline(T0, pods, seen, OLD, POLICY, announced={"p2"}) == T0 + 25 * S
    assert next_deadline(T0, pods, seen, OLD, POLICY, announced={"p1", "p2"}) == T0 + 50 * S
    # A pod never seen keeps its grace deadline whatever is announced of others.
    assert next_deadline(T0, pods[:2], seen, OLD, POLICY, announced={"p1", "p2"}) is None


def test_only_live_instances_on_an_honoured_lease_announce_their_pod() -> None:
    def leased(pod: str | None, lease: int, ttl: int | None) -> InstanceRecord:
        return InstanceRecord(
            instance=f"i-{pod}-{lease}-{ttl}",
            pod=pod,
            time=T0,
            lease_id=lease,
            lease_ttl_seconds=ttl,
            verified=True,
        )

    live = [
        leased("a", 7, 30),
        leased("b", 0, 30),  # no lease known: nothing etcd would delete
        leased("c", 8, None),  # an older heartbeater: its TTL unknown
        leased("d", 9, MAX_HONOURED_LEASE_TTL_SECONDS + 1),  # a lease not waited out
        leased(None, 10, 30),  # names no pod
        leased("e", 11, MAX_HONOURED_LEASE_TTL_SECONDS),
    ]
    assert announced_pods(live) == {"a", "e"}


def test_next_deadline_after_operator_start_waits_a_full_threshold() -> None:
    pods = [PodView("p1", OLD)]
    assert next_deadline(T0, pods, {}, T0 - 5 * S, POLICY) == T0 + 25 * S


# --- stalled watch ----------------------------------------------------------------------

LIMIT = timedelta(seconds=300)


def stalled(now: datetime, progress: datetime | None, healthy: datetime | None) -> bool:
    return watch_stalled(
        now=now, started=OLD, last_progress=progress, etcd_healthy_since=healthy, threshold=LIMIT
    )


def test_watch_with_recent_progress_is_not_stalled() -> None:
    assert not stalled(T0, T0 - 299 * S, OLD)


def test_watch_without_progress_past_the_limit_is_stalled() -> None:
    assert stalled(T0, T0 - 301 * S, OLD)
    assert stalled(T0, None, OLD)  # never a resync, and the operator started long ago


def test_no_stall_while_etcd_is_unhealthy_or_just_recovered() -> None:
    assert not stalled(T0, T0 - 3600 * S, None)
    assert not stalled(T0, T0 - 3600 * S, T0 - 10 * S)


def test_a_stream_silent_past_the_limit_is_stalled_though_resyncs_succeed() -> None:
    # A resync shows etcd answers reads, not that the watch delivers: with the stream's
    # silence known, it is what counts.
    def silent(seconds: float) -> bool:
        return watch_stalled(
            now=T0,
            started=OLD,
            last_progress=T0 - S,
            etcd_healthy_since=OLD,
            threshold=LIMIT,
            silent=seconds,
        )

    assert silent(301.0)
    assert not silent(299.0)
    # Not known (progress requests off, or between streams): events and resyncs, as before.
    assert not stalled(T0, T0 - S, OLD)


def test_a_fresh_operator_is_not_stalled() -> None:
    assert not watch_stalled(
        now=T0, started=T0 - 10 * S, last_progress=None, etcd_healthy_since=OLD, threshold=LIMIT
    )


# --- settings ---------------------------------------------------------------------------


def test_stall_limit_must_exceed_resync_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFENDER_OPERATOR_HEARTBEAT_RESYNC_SECONDS", "300")
    monkeypatch.setenv("DEFENDER_OPERATOR_LIVENESS_WATCH_STALL_SECONDS", "300")
    with pytest.raises(OperatorConfigurationError, match="must exceed heartbeat_resync_seconds"):
        load_operator_settings()
    monkeypatch.setenv("DEFENDER_OPERATOR_LIVENESS_WATCH_STALL_SECONDS", "301")
    assert OperatorSettings().liveness_watch_stall_seconds == 301


def test_stall_limit_must_exceed_four_progress_intervals(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The library replaces a stream silent four intervals: liveness must not fail first.
    monkeypatch.setenv("DEFENDER_OPERATOR_HEARTBEAT_RESYNC_SECONDS", "10")
    monkeypatch.setenv("DEFENDER_OPERATOR_HEARTBEAT_WATCH_PROGRESS_SECONDS", "20")
    monkeypatch.setenv("DEFENDER_OPERATOR_LIVENESS_WATCH_STALL_SECONDS", "80")
    with pytest.raises(OperatorConfigurationError, match="four times heartbeat_watch_progress"):
        load_operator_settings()
    monkeypatch.setenv("DEFENDER_OPERATOR_LIVENESS_WATCH_STALL_SECONDS", "81")
    assert OperatorSettings().heartbeat_watch_progress_seconds == 20
    monkeypatch.setenv("DEFENDER_OPERATOR_HEARTBEAT_WATCH_PROGRESS_SECONDS", "0")  # off
    assert OperatorSettings().heartbeat_watch_progress_seconds == 0


# --- etcd health ------------------------------------------------------------------------


def member(i: int, healthy: bool, answered: bool) -> MemberHealth:
    return MemberHealth(
        endpoint=f"127.0.0.1:{2379 + i}",
        healthy=healthy,
        member_id=i + 1 if answered else None,
        error=None if healthy else ("etcdserver: request timed out" if answered else "refused"),
    )


def report(*members: MemberHealth) -> HealthReport:
    return HealthReport(
        members=members,
        cluster_size=len(members),
        leader_id=None,
        quorum=any(m.healthy for m in members),
    )


def test_members_answering_without_quorum_read_as_no_quorum() -> None:
    h = etcd_health(
        report(member(0, False, True), member(1, False, False), member(2, False, False))
    )
    assert (h.reachable, h.quorum) == (True, False)
    assert "0/3 healthy" in h.detail


def test_no_member_answering_reads_as_unreachable() -> None:
    h = etcd_health(report(*(member(i, False, False) for i in range(3))))
    assert (h.reachable, h.quorum) == (False, False)
    assert "down: 127.0.0.1:2379, 127.0.0.1:2380, 127.0.0.1:2381" in h.detail


def test_one_healthy_member_means_quorum() -> None:
    h = etcd_health(report(member(0, True, True), member(1, False, False), member(2, False, False)))
    assert (h.reachable, h.quorum) == (True, True)
    assert h.detail == "1/3 healthy, down: 127.0.0.1:2380, 127.0.0.1:2381"


def test_a_waker_lasts_while_a_daemon_of_its_component_runs() -> None:
    view = HeartbeatView(T0)
    assert view.waker("a") is None
    first = view.attach("a", "ns")
    assert isinstance(first, asyncio.Event) and view.waker("a") is first
    # A same-named component re-created at once: its daemon starts before the old one ends.
    second = view.attach("a", "ns")
    view.detach("a", first)
    view.wake("a", "instance-new")
    assert second.is_set(), "the successor's daemon lost its wake when the old one ended"
    view.detach("a", second)
    assert view.waker("a") is None
    view.detach("a", second)  # a second end of the same daemon is no error, and leaves nothing
    assert view.waker("a") is None and view.attach("a", "ns") not in (first, second)


def test_a_same_named_daemon_in_another_namespace_never_clears_the_owners_wake() -> None:
    """A tenant creates a DefenderComponent named like another namespace's (refused,
    `Conflict`, but its monitor daemon runs). A wake by name reaches both daemons; the refused
    one's rounds are quick and each begins by clearing its event. On one shared event that
    cleared the wake the owner's daemon, busy with its pass, had not yet seen: it slept up to a
    monitor interval through the change (a pod gone, a canary failing)."""
    view = HeartbeatView(T0)
    owner = view.attach("firewall", "ns")
    refused = view.attach("firewall", "t-tenant")
    view.wake("firewall", "instance-new")
    assert owner.is_set() and refused.is_set()
    refused.clear()  # the refused daemon's next round
    assert owner.is_set()
    view.wake_all("keyring")
    refused.clear()
    assert owner.is_set()
    view.detach("firewall", refused)
    owner.clear()
    view.wake("firewall", "etcd-change")
    assert owner.is_set()


def test_a_wake_with_a_namespace_reaches_only_the_daemons_of_that_namespace() -> None:
    view = HeartbeatView(T0)
    owner = view.attach("firewall", "ns")
    successor = view.attach("firewall", "ns")  # re-created at once, the old daemon not ended
    refused = view.attach("firewall", "t-tenant")
    view.wake("firewall", "pod", "t-tenant")
    assert refused.is_set() and not owner.is_set() and not successor.is_set()
    refused.clear()
    view.wake("firewall", "pod", "ns")
    assert owner.is_set() and successor.is_set() and not refused.is_set()
    view.wake("firewall", "pod", "elsewhere")  # no daemon there: nothing to wake
    assert not refused.is_set()
    assert view.waker("firewall", "t-tenant") is refused and view.waker("firewall") is owner
    assert view.waker("firewall", "elsewhere") is None


def test_a_wake_with_no_daemon_running_keeps_nothing() -> None:
    # Anyone who can write etcd can put instance keys under invented component names; none of
    # them may grow the operator's memory for good.
    view = HeartbeatView(T0)
    for n in range(100):
        view.apply(T0, f"invented-{n}", "a", rec("a", T0))
        view.apply(T0 + S, f"invented-{n}", "a", None)
    view.wake_all("keyring")
    assert view._wakers == {} and view._entries == {}
    assert all(view.waker(f"invented-{n}") is None for n in range(100))


def test_the_last_instance_gone_leaves_no_entry_for_its_component() -> None:
    view = HeartbeatView(T0)
    view.resync(T0, view.begin_resync(), {"sniffer": [rec("a", T0), rec("b", T0)]})
    view.apply(T0 + S, "sniffer", "a", None)
    assert "sniffer" in view._entries
    view.apply(T0 + S, "sniffer", "b", None)
    assert "sniffer" not in view._entries and view.instances("sniffer") == []
    view.apply(T0 + S, "never-seen", "x", None)  # a delete of what was never seen
    assert "never-seen" not in view._entries


# --- the liveness probe itself ----------------------------------------------------------


def _probe_runtime(monkeypatch: pytest.MonkeyPatch, stall_seconds: str) -> Runtime:
    """A runtime whose etcd is healthy and whose heartbeat watch started an hour ago: what the
    probe says then depends on the watch alone."""
    monkeypatch.setenv("DEFENDER_OPERATOR_HEARTBEAT_RESYNC_SECONDS", "1")
    monkeypatch.setenv("DEFENDER_OPERATOR_HEARTBEAT_WATCH_PROGRESS_SECONDS", "0.4")
    monkeypatch.setenv("DEFENDER_OPERATOR_LIVENESS_WATCH_STALL_SECONDS", stall_seconds)
    # The probe reads only settings, etcd health and the heartbeat view.
    parts: Any = None
    rt = Runtime(OperatorSettings(), parts, parts, parts, parts, "unit")
    an_hour_ago = utcnow() - timedelta(hours=1)
    rt.etcd.record(an_hour_ago, EtcdHealth(reachable=True, quorum=True))
    rt.heartbeats.started = an_hour_ago
    return rt


def _probe(rt: Runtime) -> dict[str, Any]:
    return handlers.etcd_probe(memo=kopf.Memo(runtime=rt))


def test_probe_fails_when_the_watch_stalls_with_etcd_healthy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = _probe_runtime(monkeypatch, "2")
    rt.heartbeats.last_progress = utcnow() - timedelta(seconds=10)
    with pytest.raises(kopf.PermanentError, match="heartbeat watch stalled"):
        _probe(rt)
    rt.heartbeats.last_progress = utcnow()
    assert _probe(rt) == {"reachable": True, "quorum": True}


def test_probe_fails_when_the_watch_stream_is_silent_though_resyncs_succeed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = _probe_runtime(monkeypatch, "2")
    rt.heartbeats.last_progress = utcnow()  # the periodic resync keeps succeeding
    silent: list[float | None] = [3.0]
    rt.heartbeats.listen(lambda: silent[0], 1.5)
    with pytest.raises(kopf.PermanentError, match="its stream answered nothing"):
        _probe(rt)
    silent[0] = 0.3
    assert _probe(rt) == {"reachable": True, "quorum": True}


def test_the_heartbeat_loop_asks_for_progress_and_trusts_the_view_while_answered() -> None:
    h = Harness()
    h.rt.settings = OperatorSettings(heartbeat_watch_progress_seconds=2.0)
    asked: list[tuple[float | None, float | None]] = []
    watch_instances = h.backend.watch_instances

    def recording(*args: Any, **kwargs: Any) -> Any:
        asked.append((kwargs.get("progress_seconds"), kwargs.get("stall_seconds")))
        return watch_instances(*args, **kwargs)

    h.backend.watch_instances = recording  # type: ignore[method-assign]

    async def scenario() -> None:
        view = h.rt.heartbeats
        task = asyncio.create_task(_loops.heartbeat_watch(h.rt))
        try:
            await until("the first resync", lambda: view.trusted)
            # Replaced by the library one interval after the view stops trusting it.
            assert asked == [(2.0, 8.0)]
            (watch,) = h.backend._watches
            watch.silent = 6.5  # over three progress intervals: stalled
            await until("the stall judged", lambda: not view.trusted)
            watch.silent = 1.0
            await until("the answer judged", lambda: view.trusted)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


def test_a_new_watch_is_waited_for_and_an_unvouched_view_judged_again_within_a_moment() -> None:
    # A watch is vouched for once etcd answered a progress request after catching it up: the
    # loop waits a moment for that before its first resync, and a view judged not live is
    # judged again every 0.1 s, not only twice per progress interval (5 s here), so passes
    # do not read etcd for seconds after the watch could be trusted.
    h = Harness()
    h.rt.settings = OperatorSettings(heartbeat_watch_progress_seconds=10.0)
    watch_instances = h.backend.watch_instances

    def unvouched(*args: Any, **kwargs: Any) -> Any:
        watch = watch_instances(*args, **kwargs)
        watch.silent = None  # on a stream not yet proven caught up
        return watch

    h.backend.watch_instances = unvouched  # type: ignore[method-assign]

    async def scenario() -> None:
        view = h.rt.heartbeats
        loop = asyncio.get_running_loop()
        started = loop.time()
        task = asyncio.create_task(_loops.heartbeat_watch(h.rt))
        try:
            await until("the watch", lambda: bool(h.backend._watches))
            (watch,) = h.backend._watches
            await asyncio.sleep(0.3)
            assert not view.synced  # the first resync waits for the watch to be vouched for
            watch.silent = 0.0
            await until("the first resync", lambda: view.synced, timeout=1)
            assert view.trusted
            assert loop.time() - started < 2  # not the whole wait
            # Between streams again (a replacement): judged not live at the next look ...
            watch.silent = None
            await until("judged not live", lambda: not view.trusted, timeout=6)
            await asyncio.sleep(0.3)
            # ... and live again within a moment of the new stream's answer.
            watch.silent = 0.0
            await until("judged live again", lambda: view.trusted, timeout=1)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


def test_the_heartbeat_loop_tells_when_its_stream_goes_silent_and_answers_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness()
    h.rt.settings = OperatorSettings(heartbeat_watch_progress_seconds=0.05)

    def told(text: str) -> bool:
        return any(text in r.getMessage() for r in caplog.records)

    async def scenario() -> None:
        view = h.rt.heartbeats
        task = asyncio.create_task(_loops.heartbeat_watch(h.rt))
        try:
            await until("the first resync", lambda: view.trusted)
            (watch,) = h.backend._watches
            watch.silent = None  # between streams: an outage the watch reports itself
            await asyncio.sleep(0.2)
            assert not told("heartbeat watch stream")
            watch.silent = 7.0
            await until("the stall told", lambda: told("stream silent for 7s"))
            watch.silent = 0.01
            await until("the answer told", lambda: told("stream answers again"))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.INFO, logger="defender_operator"):
        asyncio.run(scenario())
    messages = [
        r.getMessage() for r in caplog.records if "heartbeat watch stream" in r.getMessage()
    ]
    assert len(messages) == 2, messages  # each change once, not every look
