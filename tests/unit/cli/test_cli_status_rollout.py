"""`kubectl defender status` shows a canary rollout and a freeze: rendering of the data that
`collect_status` returns (`-o json`), without a store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from cli_status_support import instance, render_sniffer

from defender_cli._commands import rollout_view

NOW = datetime(2026, 12, 2, 4, 0, tzinfo=UTC)
OLD, NEW = "a" * 64, "b" * 64


def _instance(name: str, version: int, digest: str) -> dict[str, Any]:
    return instance(name, version, digest, NOW)


def _record(**changes: Any) -> dict[str, Any]:
    record = {
        "version": 2,
        "base_version": 1,
        "digest": NEW,
        "canaries": ["sniffer-a"],
        "since": (NOW - timedelta(seconds=42)).isoformat(),
        "by": "system:serviceaccount:ci:deployer",
    }
    record.update(changes)
    return record


def _status(rollout: dict[str, Any] | None, frozen: dict[str, Any] | None = None) -> str:
    instances = [_instance("sniffer-a", 2, NEW), _instance("sniffer-b", 1, OLD)]
    return render_sniffer(instances, rollout, frozen)


def _cells(text: str, first: str) -> list[list[str]]:
    return [ln.split() for ln in text.splitlines() if ln.split()[:1] == [first]]


def test_a_rollout_in_progress_counts_the_canaries_that_report_the_candidate() -> None:
    instances = [_instance("sniffer-a", 2, NEW), _instance("sniffer-b", 1, OLD)]
    view = rollout_view(
        _record(canaries=["sniffer-a", "sniffer-c"]),
        verified=True,
        active_version=1,
        instances=instances,
        now=NOW,
    )
    assert view["phase"] == "Progressing"
    assert view["adopted"] == ["sniffer-a"], "sniffer-c has no heartbeat: not adopted"
    assert (view["version"], view["baseVersion"], view["ageSeconds"]) == (2, 1, 42.0)


def test_a_rollout_not_built_on_active_is_stale() -> None:
    view = rollout_view(_record(), verified=True, active_version=3, instances=[], now=NOW)
    assert view["phase"] == "Stale"
    assert view["adopted"] == []


def test_status_shows_the_rollout_its_canaries_and_the_canary_instance() -> None:
    view = rollout_view(
        _record(),
        verified=True,
        active_version=1,
        instances=[_instance("sniffer-a", 2, NEW)],
        now=NOW,
    )
    text = _status(view)
    header, component = _cells(text, "COMPONENT")[0], _cells(text, "sniffer")[0]
    assert header[-1] == "ROLLOUT"
    assert component[-3:] == ["Progressing", "v2", "1/1"]
    rollout_header = _cells(text, "COMPONENT")[1]
    assert rollout_header == [
        "COMPONENT",
        "ROLLOUT",
        "VERSION",
        "ADOPTED",
        "CANARIES",
        "SINCE",
        "BY",
    ]
    assert _cells(text, "sniffer")[1] == [
        "sniffer",
        "Progressing",
        "1",
        "->",
        "2",
        "1/1",
        "sniffer-a",
        "42s",
        "system:serviceaccount:ci:deployer",
    ]
    instances = {row[1]: row for row in _cells(text, "sniffer")[2:]}
    assert "(canary)" in instances["sniffer-a"], "a canary on the candidate is not behind"
    assert "(behind)" not in instances["sniffer-a"]
    assert instances["sniffer-b"][4] == "1"


def test_status_marks_a_rollout_read_without_a_keyring_as_unverified() -> None:
    view = rollout_view(_record(), verified=False, active_version=1, instances=[], now=NOW)
    assert "Progressing (unverified)" in _status(view)


def test_status_shows_an_unreadable_rollout_record() -> None:
    text = _status({"phase": "Unreadable", "error": "RecordAuthError: MAC does not verify"})
    assert _cells(text, "sniffer")[0][-1] == "Unreadable"
    assert "MAC does not verify" in text


def test_status_without_a_rollout_and_a_frozen_component() -> None:
    frozen = {
        "reason": "canary of version 2 failed (sniffer-a: heartbeat lost)",
        "since": (NOW - timedelta(minutes=5)).isoformat(),
        "ageSeconds": 300.0,
        "by": "operator:host",
    }
    text = _status(None, frozen)
    assert _cells(text, "sniffer")[0][-1] == "-"
    assert "ADOPTED" not in text
    assert (
        "sniffer: commits frozen for 5m by operator:host: canary of version 2 failed"
        " (sniffer-a: heartbeat lost)" in text
    )
    instances = {row[1]: row for row in _cells(text, "sniffer")[1:] if len(row) > 4}
    assert "(behind)" in instances["sniffer-a"], "without a rollout version 2 is not ACTIVE's"


def test_an_instance_on_actives_config_under_an_older_number_is_not_behind() -> None:
    # Seen on `make up` after `kubectl defender abort`: ACTIVE version 3 is version 2's config
    # written again, which the instance already ran and was not handed again, so its heartbeat
    # says 2. It showed "2 (behind)" for good.
    instances = [
        _instance("sniffer-a", 2, OLD),  # ACTIVE's config, the older number
        _instance("sniffer-b", 2, NEW),  # another config: behind
        _instance("sniffer-c", 3, OLD),
    ]
    text = render_sniffer(instances, None, active_version=3, active_digest=OLD)
    rows = {row[1]: row for row in _cells(text, "sniffer")[1:]}
    assert rows["sniffer-a"][4] == "2" and "(behind)" not in rows["sniffer-a"]
    assert rows["sniffer-b"][4:6] == ["2", "(behind)"]
    assert rows["sniffer-c"][4] == "3" and "(behind)" not in rows["sniffer-c"]


def test_status_marks_an_instance_whose_record_does_not_verify() -> None:
    # Read with a keyring: the operator ignores such a record, the table says so.
    forged = {**_instance("sniffer-x", 2, NEW), "verified": False, "unverified": "no MAC"}
    signed = {**_instance("sniffer-a", 2, NEW), "verified": True, "unverified": None}
    unknown = {**_instance("sniffer-b", 1, OLD), "verified": None, "unverified": None}
    text = render_sniffer([forged, signed, unknown], None)
    rows = {row[1]: row for row in _cells(text, "sniffer")[1:]}
    assert rows["sniffer-x"][2] == "(unverified)"
    assert "(unverified)" not in rows["sniffer-a"] and "(unverified)" not in rows["sniffer-b"]
