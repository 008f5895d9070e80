"""A component purged and registered again under the same name, against the real cluster:
values and records its earlier registration wrote, saved by someone with etcd read access and
put back by someone with etcd write access and no key, are authentic under the same paths.
They carry the earlier registration (signed metadata, AEAD-covered envelope header), so running
readers, readers that know the registration, and the operator's repair refuse them
(docs/security.md, "Replays across a record's lifetime")."""

from __future__ import annotations

import time
from typing import Any

import pytest

from defender_config import (
    Alert,
    ConfigStore,
    DefenderClient,
    RecordReplayError,
    RegistrationReplayError,
    inspect,
)
from defender_config.store import EtcdStore

pytestmark = pytest.mark.etcd

FIRST: dict[str, Any] = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth0"}
SECOND: dict[str, Any] = {"node_id": "sniffer-02", "version": "2.0.0", "interface": "eth1"}


def snaplen(base: dict[str, Any], n: int) -> dict[str, Any]:
    return {**base, "snaplen": 100 + n}


def save(store: EtcdStore, client: DefenderClient, component: str) -> dict[str, bytes]:
    out = {}
    for sv in store.list_prefix(client.layout.component_dir(component)):
        out[sv.key] = sv.value
    return out


def purge_and_register_again(
    configs: ConfigStore, store: EtcdStore, client: DefenderClient
) -> dict[str, bytes]:
    """Registration one up to version 5, saved, purged (as the operator's Purge), registered
    again with another config: version 1 of registration two. Returns the saved values."""
    configs.seed("sniffer", FIRST, "sniffer", by="test")
    for n in range(2, 6):
        configs.commit("sniffer", snaplen(FIRST, n), by="ops")
    saved = save(store, client, "sniffer")
    store.delete_prefix(client.layout.component_dir("sniffer"))
    time.sleep(0.01)  # registrations are stamped from the clock in ms
    configs.seed("sniffer", SECOND, "sniffer", by="test")
    return saved


def test_earlier_registrations_values_put_back_are_refused_by_readers(
    client: DefenderClient, store: EtcdStore, alerts: list[Alert]
) -> None:
    configs = ConfigStore(client)
    saved = purge_and_register_again(configs, store, client)
    lay = client.layout
    running = ConfigStore(client)  # an agent of the new registration, running through it
    active = running.get_active("sniffer")
    assert (active.version, active.config["node_id"]) == (1, "sniffer-02")
    registration = active.metadata.registration if active.metadata else None
    assert registration is not None
    old_registration = inspect(saved[lay.active_config("sniffer")]).registration
    assert old_registration is not None and old_registration < registration
    assert inspect(store.get(lay.master_config("sniffer")).value).registration == registration  # type: ignore[union-attr]

    # MASTER of the earlier registration put back: refused by every reader that verifies.
    master_now = store.get(lay.master_config("sniffer"))
    assert master_now is not None
    store.put(lay.master_config("sniffer"), saved[lay.master_config("sniffer")])
    for reader in (running, ConfigStore(client)):
        with pytest.raises(RegistrationReplayError):
            reader.get_master("sniffer")
    store.put(lay.master_config("sniffer"), master_now.value)

    # Metadata and ACTIVE of version 5 of the earlier registration put back together (a
    # consistent, authentic pair at a version above the current one).
    for path in (lay.metadata("sniffer"), lay.active_config("sniffer")):
        store.put(path, saved[path])
    with pytest.raises(RegistrationReplayError) as refused:
        running.get_active("sniffer")
    assert isinstance(refused.value, RecordReplayError)
    assert refused.value.found == old_registration and refused.value.expected == registration
    knows = ConfigStore(client)  # a reader started afterwards that knows the registration
    knows.hold_registration("sniffer", registration)
    with pytest.raises(RegistrationReplayError):
        knows.get_active("sniffer")
    assert "RegistrationReplayed" in [a.kind for a in alerts]
    # The operator's repair, with the registration its status anchors: the record is rebuilt
    # from the current registration's history, ACTIVE restored; both readers accept it again.
    assert configs.repair_metadata(
        "sniffer",
        component_type="sniffer",
        json_schema=None,
        by="operator",
        registration=registration,
    )
    for reader in (running, knows, ConfigStore(client)):
        back = reader.get_active("sniffer")
        assert (back.version, back.config["node_id"]) == (1, "sniffer-02")


def test_earlier_registrations_history_put_back_above_is_never_a_repair_source(
    client: DefenderClient, store: EtcdStore, alerts: list[Alert]
) -> None:
    configs = ConfigStore(client)
    saved = purge_and_register_again(configs, store, client)
    lay = client.layout
    running = ConfigStore(client)
    registration = running.get_active("sniffer").metadata.registration  # type: ignore[union-attr]
    for v in (4, 5):
        store.put(lay.history("sniffer", v), saved[lay.history("sniffer", v)])
    # The operator's pass (anchored, and as a reader that only has the record): kept, and the
    # entries put back are removed (alerted), not taken as newer history.
    assert not configs.repair_metadata(
        "sniffer",
        component_type="sniffer",
        json_schema=None,
        by="operator",
        registration=registration,
    )
    assert store.get(lay.history("sniffer", 5)) is None
    assert store.get(lay.history("sniffer", 4)) is None
    assert "RegistrationReplayRemoved" in [a.kind for a in alerts]
    store.put(lay.history("sniffer", 5), saved[lay.history("sniffer", 5)])
    assert not configs.repair_metadata(
        "sniffer", component_type="sniffer", json_schema=None, by="operator"
    )
    for reader in (running, ConfigStore(client)):
        active = reader.get_active("sniffer")
        assert (active.version, active.config["node_id"]) == (1, "sniffer-02")
    # Nor does it steer the next version or a rollback.
    assert configs.commit("sniffer", snaplen(SECOND, 2), by="ops") == 2
    with pytest.raises(RegistrationReplayError):
        store.put(lay.history("sniffer", 4), saved[lay.history("sniffer", 4)])
        configs.rollback("sniffer", 4, by="ops")
    assert running.get_active("sniffer").config["snaplen"] == 102


def test_data_from_before_registrations_stays_readable_and_the_next_commit_stamps_it(
    client: DefenderClient, store: EtcdStore, alerts: list[Alert]
) -> None:
    configs = ConfigStore(client)
    configs.seed("sniffer", FIRST, "sniffer", by="test")
    lay = client.layout
    # Rewrite it as a library without registrations wrote it.
    meta = configs.get_metadata("sniffer")
    assert meta is not None
    legacy = meta.model_dump(mode="json", exclude={"registration"})
    store.put(lay.metadata("sniffer"), client.encode_record(lay.metadata("sniffer"), legacy))
    for path in (
        lay.master_config("sniffer"),
        lay.active_config("sniffer"),
        lay.history("sniffer", 1),
    ):
        plain = client.open(path, store.get(path).value)  # type: ignore[union-attr]
        store.put(path, client.seal(path, plain))
    saved = save(store, client, "sniffer")
    running = ConfigStore(client)
    assert running.get_active("sniffer").config["node_id"] == "sniffer-01"
    assert running.get_master("sniffer")["node_id"] == "sniffer-01"
    assert [e.version for e in running.history("sniffer")] == [1]
    # The next commit stamps a registration on the record and every kept value.
    assert configs.commit("sniffer", snaplen(FIRST, 2), by="ops") == 2
    stamped = configs.get_metadata("sniffer")
    assert stamped is not None and stamped.registration is not None
    for sv in store.list_prefix(lay.component_dir("sniffer")):
        if (
            sv.key in (lay.master_config("sniffer"), lay.active_config("sniffer"))
            or "/history/" in sv.key
        ):
            assert inspect(sv.value).registration == stamped.registration, sv.key
    assert running.get_active("sniffer").version == 2
    # The unstamped record and ACTIVE put back: refused by the reader that saw the stamp.
    for path in (lay.metadata("sniffer"), lay.active_config("sniffer")):
        store.put(path, saved[path])
    with pytest.raises(RegistrationReplayError):
        running.get_active("sniffer")
    assert not alerts or all(a.kind != "AuthenticationFailed" for a in alerts)
