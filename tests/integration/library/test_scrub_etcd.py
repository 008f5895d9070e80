"""Scrub and ACTIVE restore against the real 3-member etcd: an attacker (or a bad disk) with
write access flips one byte of a sealed value; the scrub names the key and reason, restores
ACTIVE only from a history entry that verifies, never rewrites MASTER, and says nothing of the
config's contents."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from defender_config import (
    Alert,
    ConfigStore,
    DefenderClient,
    Keyring,
    LibrarySettings,
    RepairRefusedError,
    ScrubReport,
    restore_active,
    scrub_component,
)
from defender_config.store import EtcdStore

pytestmark = pytest.mark.etcd

SNIFFER: dict[str, Any] = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth0"}


@pytest.fixture
def configs(client: DefenderClient) -> ConfigStore:
    cs = ConfigStore(client)
    cs.seed("sniffer", SNIFFER, "sniffer", by="test")
    cs.commit("sniffer", {**SNIFFER, "snaplen": 128}, by="test")
    return cs


def flip(store: EtcdStore, path: str, at: int = -5) -> bytes:
    """Flip one byte of the raw value at `path` (what `etcdctl put` can do); returns it as it
    was."""
    sv = store.get(path)
    assert sv is not None, path
    raw = bytearray(sv.value)
    raw[at] ^= 0x01
    store.put(path, bytes(raw))
    return sv.value


def run(configs: ConfigStore) -> ScrubReport:
    report = scrub_component(configs, "sniffer")
    assert report is not None
    return report


def failing(report: ScrubReport) -> dict[str, str]:
    return {c.path: c.reason for c in report.failures}


def test_clean_component_verifies_every_sealed_value(configs: ConfigStore) -> None:
    report = run(configs)
    assert report.failures == ()
    # MASTER, ACTIVE, history 1 and 2.
    assert report.sealed_checked == 4
    assert scrub_component(configs, "never-registered") is None


def test_flipped_active_is_found_and_restored_from_history(
    configs: ConfigStore, store: EtcdStore, alerts: list[Alert]
) -> None:
    lay = configs.layout
    flip(store, lay.active_config("sniffer"))
    report = run(configs)
    assert failing(report) == {lay.active_config("sniffer"): "AuthenticationFailed"}
    active = next(c for c in report.checks if c.kind == "active")
    assert active.version == 2
    # The scrub itself alerts nothing: its caller announces findings once.
    assert alerts == []
    restore_active(configs, "sniffer", 2, by="test")
    assert run(configs).failures == ()
    got = configs.get_active("sniffer")
    assert got.version == 2 and got.config["snaplen"] == 128
    assert [a.kind for a in alerts] == ["ActiveRestored"]
    assert "128" not in alerts[0].detail and "eth0" not in alerts[0].detail


def test_an_older_active_put_back_is_a_digest_mismatch_and_restored(
    configs: ConfigStore, store: EtcdStore
) -> None:
    """ACTIVE of version 2, sealed for ACTIVE's own path (so it opens), put back by someone
    who saved it: authentic bytes, wrong version."""
    lay = configs.layout
    current = store.get(lay.active_config("sniffer"))
    assert current is not None
    # Commit 3, then put version 2's sealed ACTIVE back: it opens but its digest is not v3's.
    configs.commit("sniffer", {**SNIFFER, "snaplen": 256}, by="test")
    store.put(lay.active_config("sniffer"), current.value)
    report = run(configs)
    assert failing(report) == {lay.active_config("sniffer"): "DigestMismatch"}
    restore_active(configs, "sniffer", 3, by="test")
    assert configs.get_active("sniffer").config["snaplen"] == 256


def test_no_restore_from_a_tampered_history_entry(configs: ConfigStore, store: EtcdStore) -> None:
    lay = configs.layout
    flip(store, lay.active_config("sniffer"))
    flip(store, lay.history("sniffer", 2))
    report = run(configs)
    assert set(failing(report)) == {lay.active_config("sniffer"), lay.history("sniffer", 2)}
    broken = store.get(lay.active_config("sniffer"))
    with pytest.raises(RepairRefusedError, match="does not open") as refused:
        restore_active(configs, "sniffer", 2, by="test")
    assert refused.value.reason == "RepairRefused"
    # Nothing written: ACTIVE is the same broken value.
    after = store.get(lay.active_config("sniffer"))
    assert broken is not None and after is not None and after.mod_revision == broken.mod_revision
    # Another kept version opens, but it is not the version the metadata names: refused too.
    with pytest.raises(RepairRefusedError, match="names version 2, not 1"):
        restore_active(configs, "sniffer", 1, by="test")


def test_no_restore_when_the_metadata_does_not_verify(
    configs: ConfigStore, store: EtcdStore
) -> None:
    lay = configs.layout
    flip(store, lay.active_config("sniffer"))
    meta = store.get(lay.metadata("sniffer"))
    assert meta is not None
    doc = json.loads(meta.value)
    doc["version"] = 3  # edited by hand: the MAC no longer matches
    store.put(lay.metadata("sniffer"), json.dumps(doc).encode())
    report = run(configs)
    assert lay.metadata("sniffer") in failing(report)
    with pytest.raises(RepairRefusedError, match="does not verify"):
        restore_active(configs, "sniffer", 2, by="test")
    store.delete(lay.metadata("sniffer"))
    with pytest.raises(RepairRefusedError, match="missing"):
        restore_active(configs, "sniffer", 2, by="test")
    assert failing(run(configs))[lay.metadata("sniffer")] == "Missing"


def test_tampered_master_is_reported_and_left_alone(configs: ConfigStore, store: EtcdStore) -> None:
    lay = configs.layout
    flip(store, lay.master_config("sniffer"))
    before = store.get(lay.master_config("sniffer"))
    report = run(configs)
    assert failing(report) == {lay.master_config("sniffer"): "AuthenticationFailed"}
    # ACTIVE is fine: nothing to restore, and restoring it anyway leaves MASTER as it is.
    restore_active(configs, "sniffer", 2, by="test")
    after = store.get(lay.master_config("sniffer"))
    assert before is not None and after is not None and after.mod_revision == before.mod_revision


def test_a_value_under_a_key_the_scrubber_lacks_is_reported_by_key_id(
    settings: LibrarySettings, configs: ConfigStore
) -> None:
    with DefenderClient(
        settings, Keyring.generate(), registry=CollectorRegistry(), alert_sinks=[]
    ) as stranger:
        report = scrub_component(ConfigStore(stranger), "sniffer")
    assert report is not None
    reasons = {c.kind: c.reason for c in report.failures}
    assert reasons["master"] == "UnknownKey" and reasons["active"] == "UnknownKey"
    assert reasons["metadata"] == "RecordUnauthenticated"
