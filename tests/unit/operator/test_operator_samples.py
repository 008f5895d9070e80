"""The samples the e2e tests apply are valid for the CRD models and the library's config models."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from defender_config import contract, validate_config
from defender_operator import _api

SAMPLES = Path(__file__).resolve().parents[3] / "manifests" / "samples"
NAMES = ["sniffer", "ml-detector", "firewall", "rag"]


@pytest.mark.parametrize("name", NAMES)
def test_sample_is_valid(name: str) -> None:
    doc = yaml.safe_load((SAMPLES / f"{name}.yaml").read_text())
    assert doc["apiVersion"] == f"{contract.API_GROUP}/{contract.API_VERSION}"
    assert doc["kind"] == _api.KIND
    spec = _api.parse_spec(doc["spec"])
    assert spec.component_type.value == name
    validate_config(spec.component_type.value, spec.config, spec.custom_schema)


def test_every_sample_is_covered() -> None:
    assert sorted(p.stem for p in SAMPLES.glob("*.yaml")) == sorted(NAMES)
