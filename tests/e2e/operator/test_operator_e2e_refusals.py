"""Refusals that retrying cannot fix reach the resource: condition ConfigSynced False with the
library's reason, a Warning Event with the library's message, and no retry loop (issue 16,
point 8). One test per class; an invalid spec.config is covered by
test_operator_e2e_configs.test_edit_commits_version_2_invalid_is_refused_and_rollback
(ConfigInvalid). Against the real control plane and defender etcd."""

from __future__ import annotations

import secrets
import time
from typing import Any

import pytest
from operator_e2e_support import OperatorRun, custom_component, wait_for

from defender_config import ConfigStore, Keyring, contract, validate_config

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]


def _custom(name: str, config: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return custom_component(name, config, **spec)


def _create(run: OperatorRun, doc: dict[str, Any]) -> None:
    run.custom.create_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, run.namespace, contract.PLURAL, doc
    )


def _refused(run: OperatorRun, name: str, reason: str) -> dict[str, Any]:
    """ConfigSynced False with `reason`, the same reason on Ready, and a Warning Event that
    carries the condition's message; returns the condition."""
    synced = run.wait_condition(name, "ConfigSynced", status="False", reason=reason)
    ready = run.condition(name, "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == ("False", reason)
    event = wait_for(
        f"{reason} Warning event",
        lambda: next((e for e in run.events(name) if e.reason == reason), None),
    )
    assert event.type == "Warning"
    assert event.message == synced["message"]
    return synced


def _attempts(run: OperatorRun, name: str, reason: str) -> int:
    return sum(e.count or 1 for e in run.events(name) if e.reason == reason)


def _not_retried(run: OperatorRun, name: str, reason: str) -> None:
    # A retried handler would post the Event again within seconds (kopf's default retry).
    before = _attempts(run, name, reason)
    time.sleep(5)
    assert _attempts(run, name, reason) == before
    retried = [
        line
        for line in run.log_tail(400).splitlines()
        if "failed temporarily" in line and name in line
    ]
    assert retried == []


def test_a_config_over_the_etcd_request_limit_is_refused_with_its_reason(
    operator_run: OperatorRun,
) -> None:
    run = operator_run
    # A small request limit stands in for etcd's 1.5 MiB, so the resource stays small for the
    # API server: three uncompressed copies of 30 kB (MASTER, ACTIVE, history) exceed 64 KiB.
    run.start(DEFENDER_ENVELOPE__REQUEST_LIMIT_BYTES="65536")
    blob = secrets.token_hex(15_000)
    storage = {"compression": {"enabled": False}}
    _create(run, _custom("bulky", {"blob": blob}, storage=storage))
    synced = _refused(run, "bulky", "ValueTooLarge")
    assert "over the etcd request limit" in synced["message"]
    assert "split the config, enable compression, or raise the limit" in synced["message"]
    assert run.configs().get_metadata("bulky") is None
    _not_retried(run, "bulky", "ValueTooLarge")
    # A person acts: a config that fits is seeded.
    run.patch("bulky", {"spec": {"config": {"blob": "small"}}})
    run.wait_active_version("bulky", 1)
    run.wait_condition("bulky", "ConfigSynced", status="True")


def test_data_sealed_with_a_key_the_operator_lacks_is_refused_not_retried(
    operator_run: OperatorRun,
) -> None:
    run = operator_run
    # The operator starts on an empty store: it mints the keyring and records its key id.
    run.start()
    run.operator_keyring()
    probe = run.client(run.operator_keyring())
    wait_for(
        "the key record",
        lambda: probe.store.get(probe.layout.keyring_record) is not None,
    )
    # Then someone with another keyring seeds a component (a restore from another cluster).
    # Data under a never-recorded key id is that component's refusal, not a lost keyring.
    config = validate_config("custom", {"mode": "x"}, {"type": "object"})
    foreign = run.client(Keyring.generate())
    ConfigStore(foreign).seed(
        "stray", config, "custom", by="elsewhere", json_schema={"type": "object"}
    )
    _create(run, _custom("stray", {"mode": "x"}))
    # The first thing read is its metadata, signed under the foreign key: refused there, with
    # the record named, and not retried (nothing this operator holds can open or rebuild it).
    synced = _refused(run, "stray", "RecordUnauthenticated")
    assert "components/stray/metadata" in synced["message"]
    assert "cannot be rebuilt" in synced["message"]
    _not_retried(run, "stray", "RecordUnauthenticated")


def test_metadata_lost_with_its_history_is_refused_not_retried(operator_run: OperatorRun) -> None:
    run = operator_run
    run.start()
    # The operator's own keyring, so MASTER opens; then the metadata record goes missing, and
    # with it the history it could be rebuilt from (a record with history left is rebuilt:
    # test_integrity_attacks covers that repair).
    client = run.client(run.operator_keyring())
    config = validate_config("custom", {"mode": "x"}, {"type": "object"})
    ConfigStore(client).seed("torn", config, "custom", by="e2e", json_schema={"type": "object"})
    client.store.delete(client.layout.metadata("torn"))
    client.store.delete_prefix(client.layout.history_dir("torn"))
    _create(run, _custom("torn", {"mode": "x"}))
    # Nothing left to rebuild the record from: refused for a person to re-register it.
    synced = _refused(run, "torn", "RecordUnauthenticated")
    assert "components/torn/metadata" in synced["message"]
    assert "cannot be rebuilt" in synced["message"] and "re-register" in synced["message"]
    _not_retried(run, "torn", "RecordUnauthenticated")
