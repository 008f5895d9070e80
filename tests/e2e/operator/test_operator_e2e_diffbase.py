"""kopf's diff base across operator versions, with the real kopf and API server: a status left
by an operator before the digest (the JSON in status.lastHandledConfiguration, or a value that
does not parse) is read at start-up, replaced by status.lastHandledDigest and removed, and a
spec edited while no operator ran is still reconciled."""

from __future__ import annotations

import json
from typing import Any

import kopf
import pytest
from operator_e2e_support import OperatorRun, wait_for

from defender_config import contract
from defender_operator._diffbase import FIELD, LEGACY_FIELD, PublishedDiffBase

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]


def _set_status(run: OperatorRun, name: str, status: dict[str, Any]) -> None:
    run.custom.patch_namespaced_custom_object_status(
        contract.API_GROUP,
        contract.API_VERSION,
        run.namespace,
        contract.PLURAL,
        name,
        {"status": status},
    )


def _migrated(run: OperatorRun, name: str) -> bool:
    status = run.get(name).get("status") or {}
    expected = PublishedDiffBase().encoded(kopf.Body(run.get(name)))
    return status.get(FIELD) == expected and LEGACY_FIELD not in status


def test_an_earlier_operators_diff_base_is_read_then_replaced(operator_run: OperatorRun) -> None:
    run = operator_run
    run.start()
    run.apply_sample("sniffer")
    run.apply_sample("firewall")
    for name in ("sniffer", "firewall"):
        run.wait_active_version(name, 1)
        wait_for(f"{name}'s digest", lambda n=name: _migrated(run, n))  # type: ignore[misc]
    run.stop()

    # What an operator before the digest left: the essence's JSON (kopf's own encoding) and no
    # digest; for the firewall, a value that does not parse.
    sniffer = run.get("sniffer")
    essence = PublishedDiffBase().build(body=kopf.Body(sniffer))
    _set_status(
        run,
        "sniffer",
        {FIELD: None, LEGACY_FIELD: json.dumps(essence, separators=(",", ":"))},
    )
    _set_status(run, "firewall", {FIELD: None, LEGACY_FIELD: "{not json"})
    # And while no operator runs, someone edits the sniffer's config.
    config = dict(sniffer["spec"]["config"])
    config["snaplen"] = int(config.get("snaplen", 256)) + 1
    run.patch("sniffer", {"spec": {"config": config}})

    run.start()
    run.wait_active_version("sniffer", 2)
    for name in ("sniffer", "firewall"):
        wait_for(f"{name} migrated", lambda n=name: _migrated(run, n))  # type: ignore[misc]
    run.wait_active_version("firewall", 1)
    assert "JSONDecodeError" not in run.log_tail(400), run.log_tail()
