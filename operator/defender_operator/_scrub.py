"""The scrub step of a monitor pass: at most once per `scrub_interval_seconds`, open every
sealed value of the component, restore ACTIVE from its verified history entry when that is
what broke, and say so (condition `Corrupt`, an Event and an alert per new failure, metrics).

Judgement is `_decisions.scrub`; the reads and the restore are the library's. Runs whether or
not an instance is running: a tampered value nobody reads is still found.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from defender_config import DefenderConfigError, ScrubReport
from defender_operator._decisions import conditions as cond
from defender_operator._decisions import scrub as decide
from defender_operator._errors import OperatorError
from defender_operator._metrics import ERRORS, SCRUB_FAILURES, SCRUB_REPAIRS, SCRUB_VALUES
from defender_operator._reconcile import publish_status
from defender_operator._runtime import Runtime, utcnow

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]


def findings(report: ScrubReport) -> list[decide.Finding]:
    return [decide.Finding(c.path, c.kind, c.ok, c.version, c.reason) for c in report.checks]


async def scrub_step(
    rt: Runtime,
    *,
    body: Any,
    namespace: str,
    name: str,
    generation: int,
    status: Mapping[str, Any],
    logger: Logger,
) -> bool:
    """Scrub `name` if due; publishes the status when the Corrupt condition changed (so it is
    shown even when the rest of the pass fails on the broken value). True when ACTIVE was
    restored (what the pass read of it before is out of date)."""
    mem = rt.memory(namespace, name)
    now = utcnow()
    if not decide.scrub_due(mem.scrubbed_at, now, rt.settings.scrub_interval_seconds):
        return False
    mem.scrubbed_at = now
    try:
        report = await asyncio.to_thread(rt.backend.scrub, name)
    except (DefenderConfigError, OperatorError) as exc:
        ERRORS.labels("scrub").inc()
        logger.warning("scrub could not read the component: %s", exc)
        return False
    if report is None:
        return False  # not registered yet: nothing sealed to check
    SCRUB_VALUES.labels(name).inc(report.sealed_checked)
    plan = decide.plan_scrub(findings(report), mem.scrub_announced)
    for failure in plan.failures:
        SCRUB_FAILURES.labels(name, failure.kind).inc()
    for failure in plan.new_failures:
        message = f"{decide.describe(failure)} fails verification"
        kopf.event(body, type="Warning", reason="ValueCorrupt", message=message)
        logger.error("scrub: %s", message)
        await rt.write(name, rt.backend.alert, "ValueCorrupt", name, message)
    if plan.unrepairable and plan.new_failures:
        message = f"ACTIVE of {name!r} not restored: {plan.unrepairable}"
        kopf.event(body, type="Warning", reason="RepairRefused", message=message)
        await rt.write(name, rt.backend.alert, "RepairRefused", name, message)
    restored = plan.restore_from is not None and await _restore(
        rt, body, name, plan.restore_from, logger
    )
    # Once ACTIVE is whole again, a later failure of it is new and announced again.
    mem.scrub_announced = decide.failure_keys(
        f for f in plan.failures if not (restored and f.kind == "active")
    )
    was, mem.corrupt = mem.corrupt, plan.condition
    if was != mem.corrupt and cond.TRUE in (_status(was), _status(mem.corrupt)):
        # A value turned corrupt or whole again: shown now. A first "verified" is not news
        # and goes out with the rest of the pass (no status write of its own).
        await publish_status(rt, namespace, name, generation, status, {})
    return restored


def _status(c: cond.Cond | None) -> str | None:
    return c.status if c is not None else None


async def _restore(
    rt: Runtime,
    body: Any,
    name: str,
    version: int,
    logger: Logger,
) -> bool:
    try:
        await rt.write(
            name, rt.backend.restore_active, name, version, modified_by=f"operator:{rt.identity}"
        )
    except (DefenderConfigError, OperatorError) as exc:
        SCRUB_REPAIRS.labels(name, "refused").inc()
        message = f"ACTIVE of {name!r} not restored from history version {version}: {exc}"
        logger.error("scrub: %s", message)
        kopf.event(body, type="Warning", reason="RepairRefused", message=message)
        await rt.write(name, rt.backend.alert, "RepairRefused", name, message)
        return False
    SCRUB_REPAIRS.labels(name, "restored").inc()
    message = f"ACTIVE of {name!r} restored from its verified history version {version}"
    logger.warning("scrub: %s", message)
    kopf.event(body, type="Normal", reason="ActiveRestored", message=message)
    return True
