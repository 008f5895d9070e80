"""The DefenderComponent models and the CRD rendered from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from defender_operator import _api, crdgen

REPO = Path(__file__).resolve().parents[3]
CRD_FILE = REPO / "crds" / "defendercomponents.yaml"


def _spec(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "componentType": "sniffer",
        "config": {"interface": "eth0"},
        "selector": {"matchLabels": {"app": "sniffer"}},
    }
    spec.update(over)
    return spec


def test_committed_crd_is_not_stale() -> None:
    assert CRD_FILE.read_text() == crdgen.render(), (
        "crds/defendercomponents.yaml is stale: run `python -m defender_operator.crdgen`"
    )


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "crd.yaml"
    stale.write_text("# old\n")
    assert crdgen.main(["--check", "--output", str(stale)]) == 1
    crdgen.main(["--output", str(stale)])
    assert crdgen.main(["--check", "--output", str(stale)]) == 0


def _walk_properties(node: dict[str, Any], where: str) -> list[str]:
    missing = []
    for name, prop in node.get("properties", {}).items():
        if where == "" and name == "metadata":
            continue  # the API server forbids anything but `type` on metadata
        if "description" not in prop:
            missing.append(f"{where}.{name}")
        missing += _walk_properties(prop, f"{where}.{name}")
        if prop.get("type") == "array":
            missing += _walk_properties(prop["items"], f"{where}.{name}[]")
    return missing


def test_every_field_has_a_description_and_no_refs() -> None:
    doc = yaml.safe_load(CRD_FILE.read_text())
    schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _walk_properties(schema, "") == []
    text = CRD_FILE.read_text()
    assert "$ref" not in text
    assert "anyOf" not in text
    assert "title:" not in text


def test_crd_names_and_subresources() -> None:
    doc = yaml.safe_load(CRD_FILE.read_text())
    names = doc["spec"]["names"]
    assert names["plural"] == "defendercomponents"
    assert "defender" in names["categories"]
    assert "dc" not in names["shortNames"]
    version = doc["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Type", "Ready", "Active", "Instances", "Heartbeat", "Restarts", "Age"} <= columns


def test_plain_printer_columns_point_at_fields_the_schema_has() -> None:
    """A column whose jsonPath names no field prints an empty cell forever, silently."""
    doc = yaml.safe_load(CRD_FILE.read_text())
    version = doc["spec"]["versions"][0]
    wide = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert wide["Rollout"] == ".status.rollout.phase"
    assert wide["Canary"] == ".status.rollout.version"
    for name, path in wide.items():
        if "[" in path or path.startswith(".metadata."):
            continue
        node = version["schema"]["openAPIV3Schema"]
        for part in path.strip(".").split("."):
            assert part in node.get("properties", {}), f"column {name}: {path} has no {part}"
            node = node["properties"][part]


def test_the_heartbeat_column_and_field_say_how_far_behind_they_may_be() -> None:
    """status.lastHeartbeatTime is refreshed lazily (status writes per component are what scale
    with the fleet): the column's and the field's descriptions (`kubectl explain`) say so, with
    the refresh the operator really uses, and point at what judges liveness."""
    from defender_operator._settings import OperatorSettings

    refresh = int(OperatorSettings.model_fields["status_heartbeat_refresh_seconds"].default)
    version = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]
    [column] = [c for c in version["additionalPrinterColumns"] if c["name"] == "Heartbeat"]
    assert refresh == 60 and "once a minute" in column["description"]
    assert "READY and INSTANCES judge liveness" in column["description"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    field = " ".join(status["lastHeartbeatTime"]["description"].split())
    assert f"STATUS_HEARTBEAT_REFRESH_SECONDS ({refresh} s)" in field
    assert "Heartbeating condition" in field


def test_spec_defaults_match_the_brief() -> None:
    spec = _api.parse_spec(_spec())
    assert spec.heartbeat.interval_seconds == 30
    assert spec.heartbeat.missed_before_restart == 3
    assert spec.retention is _api.RetentionPolicy.KEEP
    assert spec.storage.compression.enabled and spec.storage.encryption.enabled


def test_custom_needs_a_schema_and_only_custom_may_have_one() -> None:
    with pytest.raises(ValidationError, match="custom needs customSchema"):
        _api.parse_spec(_spec(componentType="custom"))
    with pytest.raises(ValidationError, match="only allowed with componentType custom"):
        _api.parse_spec(_spec(customSchema={"type": "object"}))
    ok = _api.parse_spec(_spec(componentType="custom", customSchema={"type": "object"}))
    assert ok.custom_schema == {"type": "object"}


def test_unknown_spec_fields_and_bad_ranges_are_refused() -> None:
    with pytest.raises(ValidationError):
        _api.parse_spec(_spec(surprise=1))
    with pytest.raises(ValidationError):
        _api.parse_spec(_spec(heartbeat={"intervalSeconds": 0}))
    with pytest.raises(ValidationError):
        _api.parse_spec(_spec(selector={"matchLabels": {}}))
    with pytest.raises(ValidationError):
        _api.parse_spec(_spec(componentType="toaster"))


def test_a_single_missed_heartbeat_is_refused_and_the_crd_says_why() -> None:
    """With one, the lease (interval x misses) expires whenever a renewal is a moment late."""
    with pytest.raises(ValidationError, match="greater than or equal to 2"):
        _api.parse_spec(_spec(heartbeat={"missedBeforeRestart": 1}))
    assert _api.parse_spec(_spec(heartbeat={"missedBeforeRestart": 2}))
    doc = yaml.safe_load(CRD_FILE.read_text())
    spec = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    misses = spec["properties"]["heartbeat"]["properties"]["missedBeforeRestart"]
    assert misses["minimum"] == 2
    assert "healthy pod" in misses["description"]


def test_an_object_stored_with_one_miss_runs_as_two_and_says_so() -> None:
    stored = _spec(heartbeat={"intervalSeconds": 5, "missedBeforeRestart": 1})
    parsed, notes = _api.parse_stored_spec(stored)
    assert parsed.heartbeat.missed_before_restart == 2
    assert parsed.heartbeat.interval_seconds == 5
    assert len(notes) == 1 and "run as 2" in notes[0]
    assert stored["heartbeat"]["missedBeforeRestart"] == 1  # the body kopf holds, untouched
    assert _api.parse_stored_spec(_spec(heartbeat={"missedBeforeRestart": 3}))[1] == []
    assert _api.parse_stored_spec(_spec())[1] == []
    # Not a stored 1: refused as before.
    for value in (True, 0):
        with pytest.raises(ValidationError):
            _api.parse_stored_spec(_spec(heartbeat={"missedBeforeRestart": value}))
