"""The operator's scrub against the real control plane and defender etcd, with no instance
running (issue 12's measured case: a flipped byte of sniffer's sealed ACTIVE went unnoticed).
An attacker with etcd write access and no key flips one byte:

- of ACTIVE → Corrupt=True + ValueCorrupt Event and alert → ACTIVE restored from the verified
  history entry of its version (ActiveRestored) → Corrupt=False;
- of ACTIVE and that history entry → no restore, Corrupt stays True, RepairRefused reported;
- of MASTER → reported, never rewritten.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from operator_e2e_support import OperatorRun, free_port, metric, wait_for
from prometheus_client import CollectorRegistry

from defender_config import Layout
from defender_config.store import EtcdStore, PutOp, StoredValue

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]

NAME = "sniffer"
# Long enough for a poll to see Corrupt=True before the next scrub clears it; short enough
# for the test.
SCRUB_EVERY = "4"


@pytest.fixture
def attacker(operator_run: OperatorRun) -> Iterator[EtcdStore]:
    """Raw etcd access, no keyring: what `etcdctl` with write access can do."""
    store = EtcdStore(operator_run.library_settings().etcd, registry=CollectorRegistry())
    yield store
    store.close()


def flip(store: EtcdStore, *paths: str) -> StoredValue:
    """Flip one byte of each value at `paths`, in one transaction (so no scrub sees one flipped
    and not the other); returns the first as stored after."""
    puts = []
    for path in paths:
        sv = store.get(path)
        assert sv is not None, path
        raw = bytearray(sv.value)
        raw[-7] ^= 0x01
        puts.append(PutOp(path, bytes(raw)))
    assert store.txn([], puts, []).succeeded
    after = store.get(paths[0])
    assert after is not None
    return after


def seeded(run: OperatorRun, **env: str) -> Layout:
    run.start(DEFENDER_OPERATOR_SCRUB_INTERVAL_SECONDS=SCRUB_EVERY, **env)
    run.apply_sample(NAME)
    run.wait_active_version(NAME, 1)
    # A clean scrub first: every value verifies.
    run.wait_condition(NAME, "Corrupt", status="False", reason="Verified")
    return Layout(run.prefix)


def alerts(store: EtcdStore, layout: Layout) -> list[dict[str, Any]]:
    return [json.loads(sv.value) for sv in store.list_prefix(layout.component_alerts_dir(NAME))]


def event_messages(run: OperatorRun, reason: str) -> list[str]:
    return [e.message for e in run.events(NAME) if e.reason == reason]


def no_contents(texts: list[str]) -> None:
    """Findings name keys and reasons: no config field reaches an Event or alert."""
    for text in texts:
        for leaked in ("eth0", "ml-detector:5571", "capture_mode", "tcp or udp"):
            assert leaked not in text


def test_flipped_active_is_restored_from_history_with_no_instance_running(
    operator_run: OperatorRun, attacker: EtcdStore
) -> None:
    run = operator_run
    lay = seeded(run)
    master_before = attacker.get(lay.master_config(NAME))
    assert master_before is not None
    flip(attacker, lay.active_config(NAME))

    corrupt = run.wait_condition(NAME, "Corrupt", status="True", reason="ActiveCorrupt")
    assert lay.active_config(NAME) in corrupt["message"]
    assert "AuthenticationFailed" in corrupt["message"]
    ready = run.condition(NAME, "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == ("False", "ActiveCorrupt")
    run.wait_event(NAME, "ValueCorrupt")
    run.wait_event(NAME, "ActiveRestored")
    # Restored: ACTIVE opens again with the version and config it had; MASTER untouched.
    run.wait_condition(NAME, "Corrupt", status="False", reason="Verified")
    active = run.configs().get_active(NAME)
    assert active.version == 1
    assert active.config == run.configs().get_master(NAME)
    master_after = attacker.get(lay.master_config(NAME))
    assert master_after is not None and master_after.mod_revision == master_before.mod_revision
    kinds = [a["kind"] for a in alerts(attacker, lay)]
    assert "ValueCorrupt" in kinds and "ActiveRestored" in kinds
    corrupt_alert = next(a for a in alerts(attacker, lay) if a["kind"] == "ValueCorrupt")
    assert lay.active_config(NAME) in corrupt_alert["detail"]
    no_contents(
        [corrupt["message"], *event_messages(run, "ValueCorrupt")]
        + [a["detail"] for a in alerts(attacker, lay)]
    )
    # Ready again once the scrub verified everything (no instance: Heartbeating decides).
    ready = run.condition(NAME, "Ready")
    assert ready is not None and ready["reason"] != "ActiveCorrupt"


def test_no_restore_when_the_history_entry_is_tampered_too(
    operator_run: OperatorRun, attacker: EtcdStore
) -> None:
    run = operator_run
    lay = seeded(run)
    broken = flip(attacker, lay.active_config(NAME), lay.history(NAME, 1))

    corrupt = run.wait_condition(NAME, "Corrupt", status="True", reason="ActiveCorrupt")
    assert "not restored" in corrupt["message"]
    assert "history version 1 does not verify" in corrupt["message"]
    run.wait_event(NAME, "RepairRefused")
    wait_for(
        "the RepairRefused alert",
        lambda: "RepairRefused" in [a["kind"] for a in alerts(attacker, lay)],
    )
    # Several scrubs later nothing was written from the unverified entry, and it is still
    # reported (the condition holds; the Event is not repeated per scrub).
    wait_more_scrubs(run)
    still = attacker.get(lay.active_config(NAME))
    assert still is not None and still.mod_revision == broken.mod_revision
    corrupt = run.wait_condition(NAME, "Corrupt", status="True", reason="ActiveCorrupt")
    assert len(event_messages(run, "ValueCorrupt")) >= 1
    assert sum(_count(e) for e in run.events(NAME) if e.reason == "RepairRefused") == 1


def test_tampered_master_is_reported_never_rewritten_and_stays_raised(
    operator_run: OperatorRun, attacker: EtcdStore
) -> None:
    """MASTER is never rewritten, so the report must not fade while it stays broken: every
    scrub counts it again, the condition holds without flapping, and the monitor's own reads of
    MASTER keep alerting (the first report is not the last)."""
    run = operator_run
    port = free_port()
    lay = seeded(run, DEFENDER_OPERATOR_METRICS_PORT=str(port))
    failures = f'defender_operator_scrub_failures_total{{component="{NAME}",kind="master"}}'
    assert metric(port, failures) == 0.0
    broken = flip(attacker, lay.master_config(NAME))

    corrupt = run.wait_condition(NAME, "Corrupt", status="True", reason="MasterCorrupt")
    assert lay.master_config(NAME) in corrupt["message"]
    assert "never rewritten" in corrupt["message"]
    run.wait_event(NAME, "ValueCorrupt")
    assert "ActiveRestored" not in run.event_reasons(NAME)
    first_count = metric(port, failures)
    first_alerts = master_alerts(attacker, lay)
    assert first_count >= 1.0
    assert "ValueCorrupt" in [a["kind"] for a in first_alerts]

    # Later passes: the scrub finds it again each time and the alerts go on.
    wait_for(
        "two more scrubs counting the broken MASTER",
        lambda: metric(port, failures) >= first_count + 2,
        timeout=60,
    )
    wait_for(
        "MASTER alerted again after the first report",
        lambda: len(master_alerts(attacker, lay)) > len(first_alerts),
        timeout=60,
    )
    later = run.condition(NAME, "Corrupt")
    assert later is not None
    assert (later["status"], later["reason"]) == ("True", "MasterCorrupt")
    assert later["lastTransitionTime"] == corrupt["lastTransitionTime"], "it never cleared"
    ready = run.condition(NAME, "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == ("False", "MasterCorrupt")
    still = attacker.get(lay.master_config(NAME))
    assert still is not None and still.mod_revision == broken.mod_revision
    # ACTIVE was never broken and still opens.
    assert run.configs().get_active(NAME).version == 1
    no_contents([a["detail"] for a in master_alerts(attacker, lay)])
    # The rest of each pass still runs while MASTER stays broken (it needs no MASTER): a freeze
    # recorded now reaches the status, published by the steps after the breaker's read.
    assert run.get(NAME)["status"].get("frozen") is False
    run.configs().freeze(NAME, "held by hand during the test", by="test")
    wait_for(
        "the freeze shown although MASTER does not open",
        lambda: run.get(NAME)["status"].get("frozen") is True,
        timeout=60,
    )
    assert run.get(NAME)["status"].get("masterDigest"), "the last MASTER digest shown stays"


def master_alerts(store: EtcdStore, layout: Layout) -> list[dict[str, Any]]:
    """Alerts about NAME's MASTER key (the scrub's ValueCorrupt, the readers' decode errors)."""
    path = layout.master_config(NAME)
    return [
        a for a in alerts(store, layout) if a.get("path") == path or path in a.get("detail", "")
    ]


def _count(event: Any) -> int:
    return int(event.count or 1)


def wait_more_scrubs(run: OperatorRun, scrubs: int = 2) -> None:
    """Wait until `scrubs` more scrubs have run since Corrupt turned True (a bounded wait on
    the clock: the scrub runs every SCRUB_EVERY seconds from the 1 s monitor pass)."""
    corrupt = run.condition(NAME, "Corrupt")
    assert corrupt is not None and corrupt["status"] == "True"
    since = datetime.fromisoformat(corrupt["lastTransitionTime"].replace("Z", "+00:00"))
    due = since + timedelta(seconds=(scrubs + 1) * float(SCRUB_EVERY))
    wait_for(f"{scrubs} more scrubs", lambda: datetime.now(UTC) >= due, timeout=60)
