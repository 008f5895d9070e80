"""ConfigStore against the real cluster: what made each version (`change`), which schema
validated it (`schema_digest`), schema edits governing the next commit, and metadata records
written before these fields existed."""

from __future__ import annotations

from typing import Any

import pytest

from defender_config import (
    Alert,
    ChangeKind,
    ConfigStore,
    ConfigValidationError,
    DefenderClient,
    config_digest,
)

pytestmark = pytest.mark.etcd

FIREWALL: dict[str, Any] = {"node_id": "fw-01", "version": "1.0.0", "default_policy": "deny"}


def _schema(maximum: int) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["ports"],
        "additionalProperties": False,
        "properties": {
            "ports": {"type": "array", "items": {"type": "integer", "maximum": maximum}}
        },
    }


def _change(cs: ConfigStore, component: str) -> tuple[int, ChangeKind]:
    meta = cs.get_metadata(component)
    assert meta is not None
    return meta.version, meta.change


def test_every_version_says_what_made_it(client: DefenderClient) -> None:
    cs = ConfigStore(client, on_invalid="RevertToMaster")
    cs.seed("firewall", FIREWALL, "firewall", by="test")
    assert _change(cs, "firewall") == (1, ChangeKind.REGISTER)
    cs.commit("firewall", {**FIREWALL, "dry_run": True}, by="ops")
    assert _change(cs, "firewall") == (2, ChangeKind.COMMIT)
    cs.rollback("firewall", "master", by="ops")
    assert _change(cs, "firewall") == (3, ChangeKind.ROLLBACK)
    cs.rollback("firewall", 2, by="operator", change=ChangeKind.BREAKER_REVERT)
    assert _change(cs, "firewall") == (4, ChangeKind.BREAKER_REVERT)
    with pytest.raises(ConfigValidationError):
        cs.commit("firewall", {**FIREWALL, "default_policy": "maybe"}, by="ops")
    assert _change(cs, "firewall") == (5, ChangeKind.INVALID_REVERT)
    assert cs.get_active("firewall").config == cs.get_master("firewall")


def test_a_record_from_before_the_change_field_still_reads(client: DefenderClient) -> None:
    cs = ConfigStore(client)
    cs.seed("firewall", FIREWALL, "firewall", by="test")
    cs.commit("firewall", {**FIREWALL, "dry_run": True}, by="ops")
    cs.rollback("firewall", "master", by="ops")
    # Rewrite the (signed) record as an older library wrote it: no change, no schema digest.
    key = client.layout.metadata("firewall")
    record = client.decode_record(key, client.store.get(key).value)  # type: ignore[union-attr]
    old = {k: v for k, v in record.items() if k not in ("change", "schema_digest")}
    assert old["note"] == "rollback to master"
    client.store.put(key, client.encode_record(key, old))
    meta = ConfigStore(client).get_metadata("firewall")
    assert meta is not None and meta.change is ChangeKind.ROLLBACK and meta.change.reverts
    assert ConfigStore(client).get_active("firewall").version == 3
    # The next write carries the field.
    cs.commit("firewall", FIREWALL | {"dry_run": False, "description": "again"}, by="ops")
    assert _change(cs, "firewall") == (4, ChangeKind.COMMIT)


def test_a_commit_is_validated_with_the_schema_it_brings_and_records_it(
    client: DefenderClient,
) -> None:
    cs = ConfigStore(client)
    low, high = _schema(1024), _schema(65535)
    cs.seed("honeypot", {"ports": [22]}, "custom", by="test", json_schema=low)
    meta = cs.get_metadata("honeypot")
    assert meta is not None and meta.schema_digest == config_digest(low)
    # Without a schema the recorded one applies.
    with pytest.raises(ConfigValidationError, match="2222"):
        cs.commit("honeypot", {"ports": [2222]}, by="ops")
    # With the edited schema the same config is valid, and the schema is recorded.
    assert cs.commit("honeypot", {"ports": [2222]}, by="ops", json_schema=high) == 2
    meta = cs.get_metadata("honeypot")
    assert meta is not None
    assert (meta.json_schema, meta.schema_digest) == (high, config_digest(high))
    assert cs.commit("honeypot", {"ports": [3333]}, by="rag") == 3
    with pytest.raises(ConfigValidationError, match="70000"):
        cs.commit("honeypot", {"ports": [70000]}, by="rag")
    # A rollback validates its target again with the recorded schema: ACTIVE is always valid
    # under the schema recorded with it (agents check it against that one).
    cs.rollback("honeypot", "master", by="ops")
    meta = cs.get_metadata("honeypot")
    assert meta is not None and meta.schema_digest == config_digest(high)
    assert meta.json_schema == high and meta.change is ChangeKind.ROLLBACK


def test_a_rollback_the_recorded_schema_refuses_is_refused(
    client: DefenderClient, alerts: list[Alert]
) -> None:
    cs = ConfigStore(client)
    cs.seed("honeypot", {"ports": [2222]}, "custom", by="test", json_schema=_schema(65535))
    cs.commit("honeypot", {"ports": [22]}, by="ops", json_schema=_schema(1024))
    with pytest.raises(ConfigValidationError, match="2222"):
        cs.rollback("honeypot", "master", by="ops")
    assert cs.get_active("honeypot").version == 2
    assert [a.kind for a in alerts] == ["ConfigInvalid"]


def test_a_schema_alone_is_recorded_without_a_new_version(client: DefenderClient) -> None:
    cs = ConfigStore(client)
    low, high = _schema(1024), _schema(65535)
    cs.seed("honeypot", {"ports": [22]}, "custom", by="test", json_schema=low)
    assert cs.set_schema("honeypot", low, by="ops") is False
    assert cs.set_schema("honeypot", high, by="ops") is True
    meta = cs.get_metadata("honeypot")
    assert meta is not None and meta.version == 1 and meta.json_schema == high
    assert meta.schema_digest == config_digest(low)  # what validated version 1
    assert cs.get_active("honeypot").version == 1
    assert cs.commit("honeypot", {"ports": [2222]}, by="rag") == 2
    # Unchanged config with a new schema through commit: recorded, no version.
    mid = _schema(4096)
    assert cs.commit("honeypot", {"ports": [2222]}, by="ops", json_schema=mid) == 2
    meta = cs.get_metadata("honeypot")
    assert meta is not None and meta.json_schema == mid and meta.version == 2
    assert cs.set_schema("not-registered", high, by="ops") is False
    # A schema ACTIVE does not pass is refused, and nothing is recorded.
    with pytest.raises(ConfigValidationError, match="2222"):
        cs.set_schema("honeypot", low, by="ops")
    meta = cs.get_metadata("honeypot")
    assert meta is not None and meta.json_schema == mid
