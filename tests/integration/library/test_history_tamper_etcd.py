"""Someone with etcd write access and no key edits a component's history keys, against the real
cluster: deleting the newest entries does not roll ACTIVE back through the operator's repair,
and a junk entry neither picks the next version nor prunes real history (docs/security.md)."""

from __future__ import annotations

from typing import Any

import pytest

from defender_config import (
    Alert,
    ConfigStore,
    ConflictError,
    DefenderClient,
    EnvelopeOptions,
    RecordReplayError,
)
from defender_config.contract import HIGHEST_VERSION as MAX_VERSION
from defender_config.store import EtcdStore

pytestmark = pytest.mark.etcd

SNIFFER: dict[str, Any] = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth0"}
RAG: dict[str, Any] = {"node_id": "rag-01", "version": "1.0.0"}


def snaplen(n: int) -> dict[str, Any]:
    return {**SNIFFER, "snaplen": 100 + n}


@pytest.fixture
def configs(client: DefenderClient) -> ConfigStore:
    cs = ConfigStore(client)
    cs.seed("sniffer", SNIFFER, "sniffer", by="test")
    return cs


def repair(configs: ConfigStore, component: str = "sniffer", **kw: Any) -> bool:
    return configs.repair_metadata(
        component, component_type=component, json_schema=None, by="operator", **kw
    )


def raw(store: EtcdStore, path: str) -> tuple[bytes, int]:
    stored = store.get(path)
    assert stored is not None, path
    return stored.value, stored.mod_revision


def kept_versions(store: EtcdStore, client: DefenderClient, component: str) -> list[str]:
    listed = store.list_prefix(client.layout.history_dir(component))
    return [sv.key.rsplit("/", 1)[1] for sv in listed]


def test_deleting_the_newest_history_entries_does_not_roll_active_back(
    configs: ConfigStore, client: DefenderClient, store: EtcdStore, alerts: list[Alert]
) -> None:
    for n in range(2, 8):
        configs.commit("sniffer", snaplen(n), by="ops")
    running = ConfigStore(client)  # an agent that has applied version 7
    assert running.get_active("sniffer").version == 7
    lay = client.layout
    before = [raw(store, p) for p in (lay.metadata("sniffer"), lay.active_config("sniffer"))]
    assert store.delete(lay.history("sniffer", 7))
    # The operator's pass, as it calls it (with the record it read in one transaction) and as
    # the monitor does: the verified record is newer than every entry, no replay. Kept.
    gets = store.txn([], configs.overview_reads("sniffer")).gets
    meta_sv, master_sv = (found[0] if found else None for found in gets[:2])
    assert not repair(configs, stored=(meta_sv, master_sv))
    assert not repair(configs)
    after = [raw(store, p) for p in (lay.metadata("sniffer"), lay.active_config("sniffer"))]
    assert after == before
    assert [a.kind for a in alerts] == ["HistoryMissing", "HistoryMissing"]
    assert "version 7" in alerts[0].detail and "newest kept: version 6" in alerts[0].detail
    fresh = ConfigStore(client).get_active("sniffer")  # a pod started now
    assert (fresh.version, fresh.config["snaplen"]) == (7, 107)
    # The next commit is version 8, above what every reader accepted.
    assert configs.commit("sniffer", snaplen(99), by="ops") == 8
    active = running.get_active("sniffer")
    assert (active.version, active.config["snaplen"]) == (8, 199)
    assert not repair(configs)
    assert [a.kind for a in alerts] == ["HistoryMissing", "HistoryMissing"]  # whole again


def test_an_older_active_beside_a_record_whose_history_was_deleted_is_refused_not_restored(
    configs: ConfigStore, client: DefenderClient, store: EtcdStore, alerts: list[Alert]
) -> None:
    lay = client.layout
    configs.commit("sniffer", snaplen(2), by="ops")
    v2_active = raw(store, lay.active_config("sniffer"))[0]
    configs.commit("sniffer", snaplen(3), by="ops")
    meta_before = raw(store, lay.metadata("sniffer"))
    assert store.delete(lay.history("sniffer", 3))
    store.put(lay.active_config("sniffer"), v2_active)
    # Version 3's config is nowhere left: the repair refuses rather than write version 2 again.
    with pytest.raises(RecordReplayError, match="history entry is gone"):
        repair(configs)
    assert raw(store, lay.metadata("sniffer")) == meta_before
    assert raw(store, lay.active_config("sniffer"))[0] == v2_active
    assert "RecordReplayed" in [a.kind for a in alerts]
    with pytest.raises(RecordReplayError):
        ConfigStore(client).get_active("sniffer")
    # A commit writes the next version: every reader takes it.
    assert configs.commit("sniffer", snaplen(4), by="ops") == 4
    assert ConfigStore(client).get_active("sniffer").version == 4


def test_a_junk_history_key_neither_picks_the_version_nor_prunes_real_history(
    configs: ConfigStore, client: DefenderClient, store: EtcdStore, alerts: list[Alert]
) -> None:
    lay = client.layout
    for n in range(2, 5):
        configs.commit("sniffer", snaplen(n), by="ops")
    running = ConfigStore(client)
    assert running.get_active("sniffer").version == 4
    store.put(lay.history_dir("sniffer") + "9999999998", b"junk")
    assert configs.commit("sniffer", snaplen(5), by="ops") == 5
    # History limit 3: only version 2 was pruned, the junk key is left where it was.
    assert kept_versions(store, client, "sniffer") == [
        "0000000003",
        "0000000004",
        "0000000005",
        "9999999998",
    ]
    store.put(lay.history("sniffer", MAX_VERSION), b"junk")
    # Commits, rollbacks to master and to a kept version (the breaker's and a canary abort's
    # way back) all go on from the authenticated record.
    assert configs.commit("sniffer", snaplen(6), by="ops") == 6
    assert configs.rollback("sniffer", "master", by="breaker") == 7
    assert configs.rollback("sniffer", 5, by="ops") == 8
    active = running.get_active("sniffer")
    assert (active.version, active.config["snaplen"]) == (8, 105)
    assert not repair(configs)
    assert kept_versions(store, client, "sniffer") == [
        "0000000006",
        "0000000007",
        "0000000008",
        "9999999998",
        "9999999999",
    ]
    assert "NotAnEnvelope" in [a.kind for a in alerts]


def test_a_plaintext_junk_entry_of_a_plaintext_component_names_no_version(
    client: DefenderClient, store: EtcdStore
) -> None:
    # A plaintext component's history is not authenticated: a JSON object at any history key
    # opens, so its name must not count.
    configs = ConfigStore(client, plaintext_components={"rag"})
    plain = EnvelopeOptions(compress=False, encrypt=False)
    configs.seed("rag", RAG, "rag", by="operator", options=plain)
    store.put(client.layout.history_dir("rag") + "9999999998", b'{"node_id": "x"}')
    assert configs.commit("rag", {**RAG, "version": "1.0.1"}, by="ops", options=plain) == 2
    assert not repair(configs, "rag")
    assert kept_versions(store, client, "rag") == ["0000000001", "0000000002", "9999999998"]
    assert configs.get_active("rag").version == 2


def test_versions_used_up_are_a_typed_refusal(
    configs: ConfigStore, client: DefenderClient, store: EtcdStore
) -> None:
    # Only a key holder can write such a record now (ten billion commits, or by hand).
    meta = configs.get_metadata("sniffer")
    assert meta is not None
    path = client.layout.metadata("sniffer")
    last = meta.model_copy(update={"version": MAX_VERSION}).model_dump(mode="json")
    store.put(path, client.encode_record(path, last))
    with pytest.raises(ConflictError, match="used up") as caught:
        configs.commit("sniffer", snaplen(2), by="ops")
    assert not caught.value.retryable
    assert kept_versions(store, client, "sniffer") == ["0000000001"]


def test_a_junk_history_entry_hides_no_other_version(
    configs: ConfigStore, client: DefenderClient, store: EtcdStore, alerts: list[Alert]
) -> None:
    """`kubectl defender history` and a rollback's "kept" list read through `history()`. (A
    storage change refuses to go on past such an entry instead: it could launder it, see
    test_policy_change_refuses_to_launder_a_forged_value.)"""
    configs.commit("sniffer", snaplen(2), by="ops")
    configs.commit("sniffer", snaplen(3), by="ops")
    store.put(client.layout.history("sniffer", 1), b"junk")  # over the real version 1
    assert [(e.version, e.config["snaplen"]) for e in configs.history("sniffer")] == [
        (2, 102),
        (3, 103),
    ]
    assert [a.kind for a in alerts] == ["NotAnEnvelope"]
