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
from defender_operator._backend import Cancellable, EtcdHealth, InstanceRecord
from defender_operator._errors import OperatorError
from defender_operator._metrics import ERRORS, HEARTBEAT_RESYNCS
from defender_operator._runtime import Runtime, utcnow

log = logging.getLogger("defender_operator")


async def etcd_health(rt: Runtime) -> None:
    while True:
        try:
            health = await asyncio.to_thread(rt.backend.health)
        except DefenderConfigError as exc:
            health = EtcdHealth(reachable=False, quorum=False, detail=str(exc))
        was_ok = rt.etcd.last.reachable and rt.etcd.last.quorum
        rt.etcd.record(utcnow(), health)
        now_ok = health.reachable and health.quorum
        if was_ok != now_ok:
            log.log(
                logging.INFO if now_ok else logging.WARNING,
                "defender etcd %s: %s",
                "healthy" if now_ok else "UNHEALTHY",
                health.detail,
            )
        await asyncio.sleep(rt.settings.etcd_health_interval_seconds)


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
