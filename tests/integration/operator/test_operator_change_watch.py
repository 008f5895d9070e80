"""The component change watch (`_loops.change_watch` feeding `ChangeView`) on the real 3-member
etcd, through `LibraryBackend`: another client's writes (and deletes) of the keys a monitor
view reads mark exactly that component changed, other keys do not; an outage the watch reports
and a compaction it resumes past make the view untrusted until a resync after them; a member
frozen under the watch makes it untrusted until the library replaced the stalled stream; and a
monitor pass's read (`_monitor.observe`) is skipped until another client writes, a forged
record included."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from defender_config import Cadence, Keyring, LibrarySettings, RecordAuthError
from defender_devcluster import EtcdCluster, etcd_client_settings, tool
from defender_operator import _loops, _monitor
from defender_operator._backend import EtcdHealth
from defender_operator._changes import ChangeView
from defender_operator._decisions.ownership import Claim
from defender_operator._keys import MutableKeyringSource
from defender_operator._library_backend import LibraryBackend
from defender_operator._metrics import CHANGE_RESYNCS, MONITOR_READS
from defender_operator._runtime import Runtime, utcnow
from defender_operator._settings import OperatorSettings

pytestmark = pytest.mark.etcd

BY = "operator:change-watch"
FW = {"node_id": "fw-01", "version": "1.0.0", "default_policy": "deny", "rules": []}
FIREWALL_SPEC = {
    "componentType": "firewall",
    "config": FW,
    "selector": {"matchLabels": {"app": "fw"}},
}
LOG = logging.getLogger("test.operator.change_watch")


@pytest.fixture
def keyring() -> MutableKeyringSource:
    return MutableKeyringSource(Keyring.generate())


def backend(cluster: EtcdCluster, prefix: str, keyring: MutableKeyringSource, who: str) -> Any:
    settings = LibrarySettings(
        etcd={**etcd_client_settings(cluster.endpoints), "backoff_max_seconds": 0.5},
        prefix=prefix.rstrip("/"),
    )
    return LibraryBackend(settings, keyring, who)


@pytest.fixture
def operator_and_other(
    defender_etcd: EtcdCluster, etcd_prefix: str, keyring: MutableKeyringSource
) -> Iterator[tuple[LibraryBackend, LibraryBackend]]:
    """The operator's backend, and another client's (an agent, rag, a person) on the same
    prefix and keys."""
    ours = backend(defender_etcd, etcd_prefix, keyring, "operator")
    other = backend(defender_etcd, etcd_prefix, keyring, "other")
    try:
        yield ours, other
    finally:
        other.close()
        ours.close()


@pytest.fixture
def members_restored(defender_etcd: EtcdCluster) -> Iterator[EtcdCluster]:
    yield defender_etcd
    defender_etcd.restart_members()  # every member a test stopped, at once (quorum)
    defender_etcd.wait_for_leader()


async def until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def watching(ours: LibraryBackend, scenario: Callable[[Runtime], Any], **settings: Any) -> None:
    """Run `scenario(rt)` beside the operator's change-watch loop, once it is trusted."""

    async def run() -> None:
        ours_settings = OperatorSettings(etcd_health_interval_seconds=0.2, **settings)
        rt = Runtime(ours_settings, ours, None, None, MutableKeyringSource(None), "op")  # type: ignore[arg-type]
        task = asyncio.create_task(_loops.change_watch(rt))
        try:
            await until("the first resync", lambda: rt.changes.trusted)
            await scenario(rt)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert not rt.changes.watching

    asyncio.run(run())


def test_another_clients_writes_and_deletes_mark_that_component_changed(
    operator_and_other: tuple[LibraryBackend, LibraryBackend],
) -> None:
    ours, other = operator_and_other

    async def scenario(rt: Runtime) -> None:
        view = rt.changes

        def changed(component: str = "firewall") -> int:
            return view.facts(component).changed_at

        async def after(what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
            """Another client's write; waits until the view saw `firewall` change after it."""
            before = changed()
            await asyncio.to_thread(call, *args, **kwargs)
            await until(what, lambda: changed() > before)

        async def settle() -> None:
            # Events arrive in revision order: once a later write to another component is
            # seen, every event before it was handled.
            before = changed("marker")
            await asyncio.to_thread(other.publish_cadence, "marker", cadence)
            await until("the marker", lambda: changed("marker") > before)

        cadence = Cadence(interval_seconds=5, allowed_misses=2, by=BY)
        await after(
            "the seed", other.seed, "firewall", "firewall", FW, json_schema=None, modified_by=BY
        )
        since = utcnow() - timedelta(minutes=1)
        seen = await asyncio.to_thread(ours.observe, "firewall", since)
        assert seen.revision >= changed()
        # A put of a key the view reads: the cadence record.
        await after("the cadence put", other.publish_cadence, "firewall", cadence)
        assert changed() > seen.revision
        # A delete is a change too: the freeze record removed (its alert settled first).
        await after("the freeze", other.freeze, "firewall", "held")
        await settle()
        await after("the freeze deleted", other.unfreeze, "firewall")
        # An alert about the component (under its alerts prefix).
        await after("the alert", other.alert, "Misconfigured", "firewall", "from an instance")
        # Keys no view reads are no change: a heartbeat, the owner record, the status.
        store, layout = other.client.store, other.layout
        before = changed()
        await asyncio.to_thread(store.put, layout.instance("firewall", "fw-0"), b"{}")
        await asyncio.to_thread(
            other.write_claim, "firewall", Claim("ns", "firewall", "uid"), revision=0
        )
        await asyncio.to_thread(store.put, layout.status("firewall"), b"{}")
        await settle()
        assert changed() == before
        assert view.trusted
        # A forged metadata record: marked changed, and the read that follows refuses it.
        await after("the forged record", store.put, layout.metadata("firewall"), b'{"v": 7}')
        with pytest.raises(RecordAuthError):
            await asyncio.to_thread(ours.observe, "firewall", since)

    watching(ours, scenario)


def test_an_outage_the_watch_reports_is_untrusted_until_a_resync_after_it(
    operator_and_other: tuple[LibraryBackend, LibraryBackend], members_restored: EtcdCluster
) -> None:
    ours, other = operator_and_other
    cluster = members_restored

    async def scenario(rt: Runtime) -> None:
        view = rt.changes
        before = view.synced_at
        resyncs = CHANGE_RESYNCS._value.get()
        await asyncio.to_thread(lambda: [cluster.stop_member(i) for i in range(cluster.members)])
        # Reported (not only judged silent: a stream between members is that, too, and a
        # restart quicker than the watch's retries would leave nothing to report).
        await until("the outage reported", lambda: not view.synced and not view.trusted)
        await asyncio.to_thread(cluster.restart_members)
        await until("trusted again", lambda: view.trusted, timeout=60)
        assert CHANGE_RESYNCS._value.get() > resyncs and view.synced_at >= before
        # And it delivers changes again.
        await asyncio.to_thread(
            other.publish_cadence, "rag", Cadence(interval_seconds=5, allowed_misses=2, by=BY)
        )
        await until("a change after the outage", lambda: view.facts("rag").changed_at > 0)

    watching(ours, scenario)


def test_a_member_frozen_under_the_watch_untrusts_the_view_until_its_stream_is_replaced(
    operator_and_other: tuple[LibraryBackend, LibraryBackend], members_restored: EtcdCluster
) -> None:
    # A stream that stalls (SIGSTOP: the connection stays open, nothing answers) reports no
    # error: its silence past three progress intervals untrusts the view, and the library
    # replaces the stream one interval later on another member, where the view is trusted
    # again though the member stays frozen, with no resync (the watch resumed where it
    # stopped). Every judgement is recorded: an untrusted spell between two polls counts.
    ours, other = operator_and_other
    cluster = members_restored
    progress = 0.5

    async def scenario(rt: Runtime) -> None:
        view = rt.changes
        silent: Any = view._silent
        handle = silent.__self__  # the change watch's WatchHandle
        await until("the watch on a stream", lambda: handle._watcher is not None)
        stalled = handle._watcher
        frozen = cluster.member_at(stalled.endpoint)
        resyncs = CHANGE_RESYNCS._value.get()
        judged: list[tuple[bool, Any]] = []
        judge = view.judge_stream

        def recorded() -> bool:
            live = judge()
            judged.append((live, handle._watcher))
            return live

        view.judge_stream = recorded  # type: ignore[method-assign]
        with cluster.frozen(frozen):
            # Well before gRPC's keep-alive pings (5-15 s after the stop) end the stream,
            # and on the stalled stream, before its replacement.
            await until("untrusted", lambda: (False, stalled) in judged, timeout=4)

            def replaced() -> bool:
                return view.trusted and handle._watcher not in (None, stalled)

            await until("trusted on a new stream", replaced, timeout=20)
            assert cluster.member_at(handle._watcher.endpoint) != frozen
            assert CHANGE_RESYNCS._value.get() == resyncs
            await asyncio.to_thread(
                other.publish_cadence, "rag", Cadence(interval_seconds=5, allowed_misses=2, by=BY)
            )
            await until("a change on the new stream", lambda: view.facts("rag").changed_at > 0)

    watching(ours, scenario, heartbeat_watch_progress_seconds=progress)


def test_a_watch_resumed_past_a_compaction_is_untrusted_until_a_resync(
    operator_and_other: tuple[LibraryBackend, LibraryBackend], defender_etcd: EtcdCluster
) -> None:
    ours, other = operator_and_other
    cadence = Cadence(interval_seconds=5, allowed_misses=2, by=BY)
    other.publish_cadence("sniffer", cadence)
    old = ours.revision()
    other.freeze("sniffer", "held")
    other.unfreeze("sniffer")  # a delete in the gap: no replay can show it
    now = ours.revision()
    subprocess.run(
        [str(tool("etcdctl")), f"--endpoints={defender_etcd.endpoints[0]}", "compaction", str(now)],
        check=True,
        capture_output=True,
    )
    view = ChangeView()
    view.watching = True
    assert view.resync(view.begin_resync(), old)
    got: list[tuple[str, int, bool]] = []
    arrived = threading.Event()

    def on_change(component: str, revision: int, replayed: bool) -> None:
        got.append((component, revision, replayed))
        arrived.set()

    handle = ours.watch_changes(on_change, lambda exc: None, start_revision=old)
    try:
        assert arrived.wait(30), "no replay after the compaction"
        assert all(replayed for _, _, replayed in got)
        for component, revision, replayed in list(got):
            view.apply(component, revision, replayed)
        assert not view.trusted
        assert view.resync(view.begin_resync(), ours.revision())
        assert view.trusted and view.synced_at >= now
    finally:
        handle.cancel()


def test_monitor_reads_on_the_real_etcd_are_skipped_until_another_client_writes(
    operator_and_other: tuple[LibraryBackend, LibraryBackend],
) -> None:
    ours, other = operator_and_other
    other.seed("firewall", "firewall", FW, json_schema=None, modified_by=BY)

    async def scenario(rt: Runtime) -> None:
        rt.etcd.record(utcnow() - timedelta(hours=1), EtcdHealth(True, True))
        mem = rt.memory("ns", "firewall")
        body = {"metadata": {"name": "firewall", "generation": 1}, "spec": FIREWALL_SPEC}

        async def observe() -> _monitor.Observed:
            p = _monitor._visit(rt, body, "ns", "firewall", LOG, {})
            before = MONITOR_READS.labels("skipped", "Unchanged")._value.get()
            seen = await _monitor.observe(p, mem)
            nonlocal skipped
            skipped = MONITOR_READS.labels("skipped", "Unchanged")._value.get() > before
            return seen

        skipped = False
        first = await observe()
        assert not skipped and first.state is not None and first.state.active_version == 1
        again = await observe()
        assert skipped and again.state == first.state
        # Another client publishes a cadence: the next pass reads it.
        changed = rt.changes.facts("firewall").changed_at
        cadence = Cadence(interval_seconds=7, allowed_misses=2, by=BY)
        await asyncio.to_thread(other.publish_cadence, "firewall", cadence)
        await until("the cadence", lambda: rt.changes.facts("firewall").changed_at > changed)
        seen = await observe()
        assert not skipped and cadence.same_rhythm(seen.cadence)
        await observe()
        assert skipped
        # Someone with etcd access writes an unsigned cadence: read, and not obeyed.
        store, layout = other.client.store, other.layout
        changed = rt.changes.facts("firewall").changed_at
        forged = b'{"interval_seconds": 3600, "allowed_misses": 100}'
        await asyncio.to_thread(store.put, layout.cadence("firewall"), forged)
        await until("the forgery", lambda: rt.changes.facts("firewall").changed_at > changed)
        seen = await observe()
        assert not skipped and seen.cadence is None
        # A forged metadata record: read, refused (no spec declared to re-sign it from), and
        # no view is kept, so every pass reads until it is repaired.
        changed = rt.changes.facts("firewall").changed_at
        await asyncio.to_thread(store.put, layout.metadata("firewall"), b'{"version": 7}')
        await until("the forged record", lambda: rt.changes.facts("firewall").changed_at > changed)
        for _ in range(2):
            seen = await observe()
            assert not skipped and seen.etcd_ok and seen.state is None
            assert mem.observation is None

    watching(ours, scenario)
