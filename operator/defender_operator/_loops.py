"""The operator-wide background loops (one each per process, started by `handlers.startup`).

They run in every replica, also a paused peering standby: etcd health must be known before a
replica takes over, and rotation steps are safe to race (see `_rotation`).
"""

from __future__ import annotations

import asyncio
import logging

from defender_config import DefenderConfigError
from defender_operator import _rotation
from defender_operator._backend import EtcdHealth
from defender_operator._errors import OperatorError
from defender_operator._metrics import ERRORS
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


async def key_rotation(rt: Runtime) -> None:
    ticks = 0
    while True:
        try:
            if rt.etcd.last.reachable and rt.etcd.last.quorum:
                await _rotation.step(rt)
            if ticks % 6 == 0:
                # Keep copies in sync even if someone edited or deleted one.
                await _rotation.fan_out_everywhere(rt, rt.keyring.current())
        except (DefenderConfigError, OperatorError) as exc:
            ERRORS.labels("rotation").inc()
            log.warning("key rotation step failed, retrying: %s", exc)
        ticks += 1
        await asyncio.sleep(rt.settings.rotation_interval_seconds)
