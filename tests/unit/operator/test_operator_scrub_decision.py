"""The scrub decision: ACTIVE is restored only from the verified history entry of the version
the authenticated metadata names; MASTER, history and metadata are only reported; failures are
announced once; the Corrupt condition and Ready say what is broken; the rate limit."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from defender_operator._decisions import conditions as c
from defender_operator._decisions.scrub import (
    Finding,
    failure_keys,
    plan_scrub,
    scrub_due,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
D = "/p/components/sniffer/"


def clean(version: int = 3) -> list[Finding]:
    return [
        Finding(D + "metadata", "metadata", True, version),
        Finding(D + "master_config", "master", True),
        Finding(D + "active_config", "active", True, version),
        *(Finding(D + f"history/{v:010d}", "history", True, v) for v in range(1, version + 1)),
    ]


def broken(
    findings: list[Finding], kind: str, reason: str, version: int | None = None
) -> list[Finding]:
    return [
        dataclasses.replace(f, ok=False, reason=reason)
        if f.kind == kind and (version is None or f.version == version)
        else f
        for f in findings
    ]


NOTHING: frozenset[tuple[str, str]] = frozenset()


def test_clean_scrub_is_verified_and_restores_nothing() -> None:
    plan = plan_scrub(clean(), NOTHING)
    assert plan.restore_from is None and plan.failures == () and plan.new_failures == ()
    assert (plan.condition.type, plan.condition.status, plan.condition.reason) == (
        c.CORRUPT,
        c.FALSE,
        "Verified",
    )


def test_broken_active_is_restored_from_the_verified_entry_of_its_version() -> None:
    plan = plan_scrub(broken(clean(), "active", "AuthenticationFailed"), NOTHING)
    assert plan.restore_from == 3 and plan.unrepairable == ""
    assert (plan.condition.status, plan.condition.reason) == (c.TRUE, "ActiveCorrupt")
    assert "active_config: AuthenticationFailed" in plan.condition.message
    assert "restored from history version 3" in plan.condition.message
    assert [f.kind for f in plan.new_failures] == ["active"]


def test_no_restore_when_the_entry_of_that_version_does_not_verify() -> None:
    findings = broken(
        broken(clean(), "active", "DigestMismatch"), "history", "AuthenticationFailed", 3
    )
    plan = plan_scrub(findings, NOTHING)
    # Version 2 verifies, but it is not the version the metadata vouches for: never used.
    assert plan.restore_from is None
    assert "history version 3 does not verify (AuthenticationFailed)" in plan.unrepairable
    assert plan.condition.reason == "ActiveCorrupt"
    assert "not restored" in plan.condition.message


def test_no_restore_when_the_entry_is_not_kept() -> None:
    findings = [
        f
        for f in broken(clean(), "active", "AuthenticationFailed")
        if f.version != 3 or f.kind != "history"
    ]
    plan = plan_scrub(findings, NOTHING)
    assert plan.restore_from is None and "not kept" in plan.unrepairable


@pytest.mark.parametrize("meta_reason", ["RecordUnauthenticated", "Missing"])
def test_no_restore_when_the_metadata_does_not_verify(meta_reason: str) -> None:
    findings = broken(broken(clean(), "active", "AuthenticationFailed"), "metadata", meta_reason)
    plan = plan_scrub(findings, NOTHING)
    assert plan.restore_from is None and "metadata record does not verify" in plan.unrepairable


def test_no_restore_when_active_names_no_version() -> None:
    findings = [
        dataclasses.replace(f, version=None) if f.kind == "active" else f
        for f in broken(clean(), "active", "AuthenticationFailed")
    ]
    assert plan_scrub(findings, NOTHING).restore_from is None


def test_master_is_reported_never_restored() -> None:
    plan = plan_scrub(broken(clean(), "master", "AuthenticationFailed"), NOTHING)
    assert plan.restore_from is None and plan.unrepairable == ""
    assert (plan.condition.status, plan.condition.reason) == (c.TRUE, "MasterCorrupt")
    assert "never rewritten" in plan.condition.message


def test_history_is_reported_never_restored() -> None:
    plan = plan_scrub(broken(clean(), "history", "UnknownKey", 1), NOTHING)
    assert plan.restore_from is None
    assert plan.condition.reason == "HistoryCorrupt"
    assert "history/0000000001: UnknownKey" in plan.condition.message


def test_active_named_first_when_several_break() -> None:
    findings = broken(
        broken(clean(), "master", "AuthenticationFailed"), "active", "AuthenticationFailed"
    )
    plan = plan_scrub(findings, NOTHING)
    assert plan.condition.reason == "ActiveCorrupt" and plan.restore_from == 3
    assert len(plan.failures) == 2


def test_failures_are_announced_once() -> None:
    findings = broken(clean(), "master", "AuthenticationFailed")
    first = plan_scrub(findings, NOTHING)
    assert len(first.new_failures) == 1
    again = plan_scrub(findings, failure_keys(first.failures))
    assert again.new_failures == () and again.condition == first.condition
    # A different reason for the same key is news.
    other = plan_scrub(broken(clean(), "master", "UnknownKey"), failure_keys(first.failures))
    assert len(other.new_failures) == 1


def test_scrub_rate_limit() -> None:
    assert scrub_due(None, T0, 60)
    assert not scrub_due(T0, T0 + timedelta(seconds=59), 60)
    assert scrub_due(T0, T0 + timedelta(seconds=60), 60)
    assert not scrub_due(None, T0, 0)  # disabled


def _ready(corrupt: c.Cond | None) -> c.Cond:
    obs = c.Observation(
        config=c.ConfigState.SYNCED,
        heartbeat=c.Cond(c.HEARTBEATING, c.TRUE, "Heartbeating"),
        key=c.Cond(c.KEY_CURRENT, c.TRUE, "KeyCurrent"),
        misconfig=c.Cond(c.MISCONFIGURED, c.FALSE, "NoErrorsReported"),
        corrupt=corrupt,
    )
    conds = {x.type: x for x in c.compute(obs)}
    if corrupt is None:
        assert c.CORRUPT not in conds
    else:
        assert conds[c.CORRUPT] == corrupt
    return conds[c.READY]


def test_corrupt_condition_blocks_ready_only_while_true() -> None:
    assert _ready(None).status == c.TRUE
    assert _ready(plan_scrub(clean(), NOTHING).condition).status == c.TRUE
    bad = plan_scrub(broken(clean(), "master", "AuthenticationFailed"), NOTHING).condition
    ready = _ready(bad)
    assert (ready.status, ready.reason) == (c.FALSE, "MasterCorrupt")
    assert ready.message.startswith("Corrupt: ")
