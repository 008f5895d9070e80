"""The operator-wide background loops (one each per process, started by `handlers.startup`).

They run in every replica, also a paused peering standby: etcd health must be known before a
replica takes over, and rotation steps are safe to race (see `_rotation`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from defender_config import DefenderConfigError
from defender_operator import _keyguard, _rotation
from defender_operator._backend import Cancellable, EtcdHealth, InstanceRecord, Watching
from defender_operator._decisions.etcd import NOSPACE_ADVICE, nospace_change
from defender_operator._errors import OperatorError
from defender_operator._metrics import CHANGE_RESYNCS, ERRORS, HEARTBEAT_RESYNCS
from defender_operator._runtime import Runtime, utcnow

log = logging.getLogger("defender_operator")


async def etcd_health(rt: Runtime) -> None:
    while True:
        try:
            health = await asyncio.to_thread(rt.backend.health)
        except DefenderConfigError as exc:
            health = EtcdHealth(reachable=False, quorum=False, detail=str(exc))
        was_ok = rt.etcd.last.reachable and rt.etcd.last.quorum
        alarms_before = rt.etcd.last.alarms
        rt.etcd.record(utcnow(), health)
        await _tell_nospace(rt, alarms_before, health)
        now_ok = health.reachable and health.quorum
        if was_ok != now_ok:
            log.log(
                logging.INFO if now_ok else logging.WARNING,
                "defender etcd %s: %s",
                "healthy" if now_ok else "UNHEALTHY",
                health.detail,
            )
        await asyncio.sleep(rt.settings.etcd_health_interval_seconds)


async def _tell_nospace(rt: Runtime, before: tuple[str, ...], health: EtcdHealth) -> None:
    """An Event on every DefenderComponent and an alert per component when NOSPACE starts and
    when it ends. The alert written while NOSPACE lasts is refused by etcd (it only reaches the
    logs); the one at the end reaches `<prefix>/alerts/`, so rag learns of the outage."""
    change = nospace_change(before, health.alarms)
    if change is None:
        return
    try:
        if change == "raised":
            log.error("defender etcd NOSPACE alarm: writes refused; %s", NOSPACE_ADVICE)
            await _keyguard._tell(
                rt,
                "Warning",
                "EtcdNoSpace",
                f"defender etcd raised NOSPACE: every write is refused; {NOSPACE_ADVICE}",
                alert=True,
            )
        else:
            log.info("defender etcd NOSPACE alarm cleared: writes accepted again")
            await _keyguard._tell(
                rt,
                "Normal",
                "EtcdSpaceRecovered",
                "defender etcd NOSPACE alarm cleared: writes are accepted again (commits and"
                " heartbeats that failed meanwhile are retried by their writers)",
                alert=True,
            )
    except (DefenderConfigError, OperatorError) as exc:
        ERRORS.labels("etcd_alarm_event").inc()
        log.warning("could not post the NOSPACE event: %s", exc)


async def heartbeat_watch(rt: Runtime) -> None:
    """One watch on every instance key feeding `rt.heartbeats`, plus a full re-read every
    heartbeat_resync_seconds (sooner after the watch reported an outage)."""
    loop = asyncio.get_running_loop()
    view = rt.heartbeats

    def on_event(component: str, instance: str, record: InstanceRecord | None) -> None:
        loop.call_soon_threadsafe(view.apply, utcnow(), component, instance, record)

    def on_error(exc: Exception) -> None:
        log.warning("heartbeat watch interrupted, it reconnects by itself: %s", exc)
        loop.call_soon_threadsafe(view.watch_failed)

    handle: Cancellable | None = None
    try:
        while True:
            wait = rt.settings.heartbeat_resync_seconds
            try:
                if handle is None:
                    handle = await asyncio.to_thread(rt.backend.watch_instances, on_event, on_error)
                    view.watching = True
                since = view.begin_resync()
                listing = await asyncio.to_thread(rt.backend.all_instances)
                view.resync(utcnow(), since, listing)
                HEARTBEAT_RESYNCS.inc()
            except (DefenderConfigError, OperatorError) as exc:
                ERRORS.labels("heartbeat_resync").inc()
                log.warning("heartbeat watch/resync failed, retrying: %s", exc)
                wait = min(wait, rt.settings.etcd_health_interval_seconds)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(view.resync_requested.wait(), timeout=wait)
    finally:
        view.watching = False
        if handle is not None:
            await asyncio.to_thread(handle.cancel)


# While the change watch is (re)connecting: how often to look whether it is up. No etcd call.
_CONNECT_POLL_SECONDS = 0.5


async def change_watch(rt: Runtime) -> None:
    """One watch on every key a monitor pass reads, feeding `rt.changes`; a resync (etcd's
    current revision, once the watch is connected) at start and after every reported outage
    or compaction. No periodic resync: the watch misses nothing it does not report, and the
    monitor's own bound (monitor_full_read_seconds) caps the age of a reused view."""
    loop = asyncio.get_running_loop()
    view = rt.changes

    def on_change(component: str, revision: int, replayed: bool) -> None:
        loop.call_soon_threadsafe(view.apply, component, revision, replayed)

    def on_error(exc: Exception) -> None:
        log.warning("component change watch interrupted, it reconnects by itself: %s", exc)
        loop.call_soon_threadsafe(view.watch_failed)

    handle: Watching | None = None
    try:
        while True:
            # Nothing to do until the watch reports trouble.
            wait: float = rt.settings.heartbeat_resync_seconds
            try:
                if handle is None:
                    handle = await asyncio.to_thread(rt.backend.watch_changes, on_change, on_error)
                    view.watching = True
                if not view.synced:
                    if handle.connected:
                        since = view.begin_resync()
                        revision = await asyncio.to_thread(rt.backend.revision)
                        # The watch delivers every change after `revision` (it resumes where it
                        # stopped; a gap makes it replay, which asks for another resync).
                        if view.resync(since, revision):
                            CHANGE_RESYNCS.inc()
                    else:
                        # Events after an outage come once it is up again: trust it from then.
                        # (Still unsynced, so the next round tries again: no request is lost.)
                        view.resync_requested.clear()
                        wait = _CONNECT_POLL_SECONDS
            except (DefenderConfigError, OperatorError) as exc:
                ERRORS.labels("change_resync").inc()
                log.warning("component change watch/resync failed, retrying: %s", exc)
                wait = min(wait, rt.settings.etcd_health_interval_seconds)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(view.resync_requested.wait(), timeout=wait)
    finally:
        view.watching = False
        if handle is not None:
            await asyncio.to_thread(handle.cancel)


async def key_rotation(rt: Runtime) -> None:
    ticks = 0
    while True:
        try:
            # The keyring is checked first: a deleted or replaced source Secret is judged
            # (restored, or refused) before a rotation step could act on it.
            etcd_ok = rt.etcd.last.reachable and rt.etcd.last.quorum
            if etcd_ok and await _keyguard.settle(rt):
                await _rotation.step(rt)
            if ticks % 6 == 0 and rt.keyring_ready:
                # Keep copies in sync even if someone edited or deleted one.
                await _rotation.fan_out_everywhere(rt, rt.keyring.current())
        except (DefenderConfigError, OperatorError) as exc:
            ERRORS.labels("rotation").inc()
            log.warning("key rotation step failed, retrying: %s", exc)
        ticks += 1
        await asyncio.sleep(rt.settings.rotation_interval_seconds)
