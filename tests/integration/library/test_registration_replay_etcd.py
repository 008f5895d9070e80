"""A component purged and registered again under the same name, against the real cluster:
values and records its earlier registration wrote, saved by someone with etcd read access and
put back by someone with etcd write access and no key, are authentic under the same paths.
They carry the earlier registration (signed metadata, AEAD-covered envelope header), so running
readers, readers that know the registration, and the operator's repair refuse them
(docs/security.md, "Replays across a record's lifetime")."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from defender_config import (
    REGISTRATIONS_FILE,
    Alert,
    ConfigStore,
    DefenderClient,
    EnvelopeOptions,
    Keyring,
    RecordReplayError,
    RegistrationReplayError,
    RepairRefusedError,
    Rollouts,
    StoragePolicy,
    inspect,
    read_registrations,
    render_registrations,
    restore_active,
    scrub_component,
)
from defender_config.store import EtcdStore

pytestmark = pytest.mark.etcd

FIRST: dict[str, Any] = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth0"}
SECOND: dict[str, Any] = {"node_id": "sniffer-02", "version": "2.0.0", "interface": "eth1"}
THIRD: dict[str, Any] = {"node_id": "sniffer-03", "version": "3.0.0", "interface": "eth2"}


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


def operator_repair(configs: ConfigStore, registration: int | None, **more: Any) -> bool:
    """The operator's repair of sniffer's record, with the registration its status anchors
    (None: the caller knows none)."""
    return configs.repair_metadata(
        "sniffer",
        component_type="sniffer",
        json_schema=None,
        by="operator",
        registration=registration,
        **more,
    )


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
    assert operator_repair(configs, registration)
    for reader in (running, knows, ConfigStore(client)):
        back = reader.get_active("sniffer")
        assert (back.version, back.config["node_id"]) == (1, "sniffer-02")


def test_a_reader_started_after_the_replay_refuses_it_when_given_the_registrations_file(
    client: DefenderClient, store: EtcdStore, keyring: Keyring, tmp_path: Path
) -> None:
    """The residual of a reader started after a metadata record and ACTIVE of an earlier
    registration were put back together, closed by the operator's `registrations.json` in the
    keyring Secret; still open for a reader not given the file."""
    configs = ConfigStore(client)
    saved = purge_and_register_again(configs, store, client)
    lay = client.layout
    current = configs.held_registration("sniffer")  # R2, as the operator anchors it
    old = inspect(saved[lay.active_config("sniffer")]).registration  # R1
    assert current is not None and old is not None and old < current
    # The keyring Secret as mounted: keyring.json and the operator's registrations.json.
    mount = tmp_path / "keyring"
    mount.mkdir()
    (mount / "keyring.json").write_bytes(keyring.to_json())
    (mount / REGISTRATIONS_FILE).write_bytes(render_registrations({"sniffer": current}))

    # Registration one's metadata and ACTIVE (version 5), saved before the purge, put back
    # with the raw client (etcd write access, no key).
    for path in (lay.metadata("sniffer"), lay.active_config("sniffer")):
        store.put(path, saved[path])

    told = ConfigStore(client)  # a reader started afterwards, given the file
    published = read_registrations(mount / "keyring.json")
    assert published == {"sniffer": current}
    told.hold_registrations(published)
    with pytest.raises(RegistrationReplayError) as refused:
        told.get_active("sniffer")
    assert (refused.value.found, refused.value.expected) == (old, current)
    assert told.held_registration("sniffer") == current

    # The residual that remains: a reader started afterwards and not told accepts the pair.
    not_told = ConfigStore(client)
    accepted = not_told.get_active("sniffer")
    assert (accepted.version, accepted.config["snaplen"]) == (5, 105)
    assert accepted.config["node_id"] == "sniffer-01"
    assert not_told.held_registration("sniffer") == old
    # Given the file afterwards, it holds the current registration and refuses the pair too.
    not_told.hold_registrations(published)
    with pytest.raises(RegistrationReplayError):
        not_told.get_active("sniffer")


def test_a_reader_whose_settings_mount_the_secret_is_told_without_a_call(
    client: DefenderClient, store: EtcdStore, keyring: Keyring, tmp_path: Path
) -> None:
    """A library reader built from settings with `keyring_path` (a Python component with the
    keyring Secret mounted) follows `registrations.json` itself: every metadata check holds the
    published registration first. A stale file never lowers what it holds; a broken one holds
    nothing and is reported as `last_error`, and the reader still reads."""
    configs = ConfigStore(client)
    saved = purge_and_register_again(configs, store, client)
    lay = client.layout
    current = configs.held_registration("sniffer")
    old = inspect(saved[lay.active_config("sniffer")]).registration
    assert current is not None and old is not None and old < current
    mount = tmp_path / "keyring"
    mount.mkdir()
    (mount / "keyring.json").write_bytes(keyring.to_json())
    file = mount / REGISTRATIONS_FILE
    settings = client.settings.model_copy(update={"keyring_path": mount})

    def mounted() -> ConfigStore:
        c = DefenderClient(settings, registry=CollectorRegistry(), alert_sinks=[])
        opened.append(c)
        return ConfigStore(c)

    opened: list[DefenderClient] = []
    try:
        # A stale file (registration one) while etcd holds two: two is read and held.
        file.write_bytes(render_registrations({"sniffer": old}))
        stale = mounted()
        assert stale.get_active("sniffer").metadata.registration == current  # type: ignore[union-attr]
        assert stale.held_registration("sniffer") == current
        # A broken file: nothing held from it, the error kept, reads go on.
        file.write_bytes(b"{not json")
        broken = mounted()
        assert broken.registrations is not None and broken.registrations.last_error is not None
        assert broken.get_active("sniffer").metadata.registration == current  # type: ignore[union-attr]

        file.write_bytes(render_registrations({"sniffer": current}))
        for path in (lay.metadata("sniffer"), lay.active_config("sniffer")):
            store.put(path, saved[path])  # registration one's pair put back
        told = mounted()  # started afterwards
        with pytest.raises(RegistrationReplayError) as refused:
            told.get_active("sniffer")
        assert (refused.value.found, refused.value.expected) == (old, current)
        # The same reader without the file (no mount): takes the pair, the residual left.
        assert ConfigStore(client).get_active("sniffer").version == 5
    finally:
        for c in opened:
            c.close()


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
    assert not operator_repair(configs, registration)
    assert store.get(lay.history("sniffer", 5)) is None
    assert store.get(lay.history("sniffer", 4)) is None
    assert "RegistrationReplayRemoved" in [a.kind for a in alerts]
    store.put(lay.history("sniffer", 5), saved[lay.history("sniffer", 5)])
    assert not operator_repair(configs, None)
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


def make_legacy(store: EtcdStore, client: DefenderClient, component: str) -> None:
    """Rewrite `component` as a library from before registrations wrote it: a record without
    one, every sealed value without one."""
    configs = ConfigStore(client)
    lay = client.layout
    meta = configs.get_metadata(component)
    assert meta is not None
    legacy = meta.model_dump(mode="json", exclude={"registration"})
    store.put(lay.metadata(component), client.encode_record(lay.metadata(component), legacy))
    for sv in store.list_prefix(lay.component_dir(component)):
        if sv.key == lay.metadata(component) or not (
            sv.key in (lay.master_config(component), lay.active_config(component))
            or "/history/" in sv.key
        ):
            continue
        store.put(sv.key, client.seal(sv.key, client.open(sv.key, sv.value)))


def sealed_values(client: DefenderClient, store: EtcdStore, component: str) -> dict[str, bytes]:
    """MASTER, ACTIVE and the kept history of `component`."""
    lay = client.layout
    return {
        sv.key: sv.value
        for sv in store.list_prefix(lay.component_dir(component))
        if sv.key in (lay.master_config(component), lay.active_config(component))
        or "/history/" in sv.key
    }


def test_scrub_reports_values_of_an_earlier_registration_even_when_they_hold_the_same_config(
    client: DefenderClient, store: EtcdStore, alerts: list[Alert]
) -> None:
    """Registered again with the very config the earlier registration had: its ACTIVE and
    history entry put back hold the digest the record names, so only the registration in their
    (authenticated) header tells them apart. The scrub reports them; restore_active never takes
    one as its source, and writes ACTIVE for the current registration."""
    configs = ConfigStore(client)
    lay = client.layout
    configs.seed("sniffer", FIRST, "sniffer", by="test")
    saved = save(store, client, "sniffer")
    store.delete_prefix(lay.component_dir("sniffer"))
    time.sleep(0.01)
    configs.seed("sniffer", FIRST, "sniffer", by="test")  # the same config, registration two
    meta = configs.get_metadata("sniffer")
    assert meta is not None and meta.registration is not None
    current = save(store, client, "sniffer")
    old = inspect(saved[lay.active_config("sniffer")]).registration
    assert old is not None and old != meta.registration

    report = scrub_component(configs, "sniffer")
    assert report is not None and report.failures == ()

    # The earlier registration's history/1 (and an entry above it) put back.
    store.put(lay.history("sniffer", 1), saved[lay.history("sniffer", 1)])
    store.put(lay.history("sniffer", 7), saved[lay.history("sniffer", 1)])  # moved: no AEAD
    report = scrub_component(configs, "sniffer")
    assert report is not None
    failed = {c.path: c for c in report.failures}
    assert set(failed) == {lay.history("sniffer", 1), lay.history("sniffer", 7)}
    assert failed[lay.history("sniffer", 1)].reason == "RegistrationReplayed"
    assert failed[lay.history("sniffer", 1)].version == 1
    assert str(old) in failed[lay.history("sniffer", 1)].detail
    assert failed[lay.history("sniffer", 7)].reason == "AuthenticationFailed"
    # Nothing alerted by the scrub itself: its findings are the caller's to announce.
    assert "RegistrationReplayed" not in [a.kind for a in alerts]
    with pytest.raises(RepairRefusedError, match="RegistrationReplayed"):
        restore_active(configs, "sniffer", 1, by="test")
    assert store.get(lay.active_config("sniffer")).value == current[lay.active_config("sniffer")]  # type: ignore[union-attr]
    store.delete(lay.history("sniffer", 7))

    # ACTIVE of the earlier registration put back: the same config, so no DigestMismatch.
    store.put(lay.history("sniffer", 1), current[lay.history("sniffer", 1)])
    store.put(lay.active_config("sniffer"), saved[lay.active_config("sniffer")])
    report = scrub_component(configs, "sniffer")
    assert report is not None
    assert [(c.path, c.reason) for c in report.failures] == [
        (lay.active_config("sniffer"), "RegistrationReplayed")
    ]
    with pytest.raises(RegistrationReplayError):
        ConfigStore(client).get_active("sniffer")
    # Restored from the current registration's entry: sealed for the current registration.
    restore_active(configs, "sniffer", 1, by="test")
    restored = store.get(lay.active_config("sniffer"))
    assert restored is not None
    assert inspect(restored.value).registration == meta.registration
    report = scrub_component(configs, "sniffer")
    assert report is not None and report.failures == ()
    assert ConfigStore(client).get_active("sniffer").config["node_id"] == "sniffer-01"


def test_set_storage_stamps_a_registration_on_data_from_before_registrations(
    client: DefenderClient, store: EtcdStore, alerts: list[Alert]
) -> None:
    configs = ConfigStore(client)
    lay = client.layout
    configs.seed("sniffer", FIRST, "sniffer", by="test")
    configs.commit("sniffer", snaplen(FIRST, 2), by="ops")
    make_legacy(store, client, "sniffer")
    legacy = save(store, client, "sniffer")
    for blob in sealed_values(client, store, "sniffer").values():
        assert inspect(blob).registration is None
    running = ConfigStore(client)  # a reader of the legacy data, running through the change
    assert running.get_active("sniffer").version == 2
    assert running.held_registration("sniffer") is None

    chacha = EnvelopeOptions(cipher="chacha20-poly1305")
    assert configs.set_storage("sniffer", chacha, by="ops")
    meta = configs.get_metadata("sniffer")
    assert meta is not None and meta.version == 2  # no new version
    assert meta.registration is not None
    assert meta.storage == StoragePolicy.from_options(chacha)
    values = sealed_values(client, store, "sniffer")
    assert set(values) == {
        lay.master_config("sniffer"),
        lay.active_config("sniffer"),
        lay.history("sniffer", 1),
        lay.history("sniffer", 2),
    }
    for path, blob in values.items():
        header = inspect(blob)
        assert (header.registration, header.cipher) == (
            meta.registration,
            "chacha20-poly1305",
        ), path
    # Every reader reads it: the running one (now holding the stamped registration) and a
    # new one; history and MASTER too.
    for reader in (running, ConfigStore(client)):
        active = reader.get_active("sniffer")
        assert (active.version, active.config["snaplen"]) == (2, 102)
        assert [e.version for e in reader.history("sniffer")] == [1, 2]
        assert reader.get_master("sniffer")["node_id"] == "sniffer-01"
    assert running.held_registration("sniffer") == meta.registration
    # Another policy change keeps the registration.
    assert configs.set_storage("sniffer", EnvelopeOptions(compress=False), by="ops")
    again = configs.get_metadata("sniffer")
    assert again is not None and again.registration == meta.registration
    for blob in sealed_values(client, store, "sniffer").values():
        assert inspect(blob).registration == meta.registration
    assert "RegistrationReplayed" not in [a.kind for a in alerts]
    # The unstamped record and ACTIVE put back: refused by the reader that saw the stamp.
    for path in (lay.metadata("sniffer"), lay.active_config("sniffer")):
        store.put(path, legacy[path])
    with pytest.raises(RegistrationReplayError):
        running.get_active("sniffer")


def test_a_master_of_an_earlier_registration_is_written_again_from_version_one(
    client: DefenderClient, store: EtcdStore, alerts: list[Alert]
) -> None:
    configs = ConfigStore(client)
    saved = purge_and_register_again(configs, store, client)
    lay = client.layout
    registration = configs.held_registration("sniffer")  # the seeding reader holds its own
    assert registration is not None
    assert configs.get_metadata("sniffer").registration == registration  # type: ignore[union-attr]
    master = lay.master_config("sniffer")
    store.put(master, saved[master])  # MASTER alone: the record still verifies (KEEP)
    with pytest.raises(RegistrationReplayError):
        ConfigStore(client).get_master("sniffer")
    replays: list[str] = []
    assert operator_repair(configs, registration, replays=replays)
    assert replays == [master]
    assert inspect(store.get(master).value).registration == registration  # type: ignore[union-attr]
    assert ConfigStore(client).get_master("sniffer")["node_id"] == "sniffer-02"
    assert {"RegistrationReplayed", "MasterRestored"} <= {a.kind for a in alerts}
    # Nothing to do the second time.
    assert not operator_repair(configs, registration)
    # Without the anchor nothing is rewritten (the caller does not know the registration).
    store.put(master, saved[master])
    assert not operator_repair(configs, None)
    assert inspect(store.get(master).value).registration != registration  # type: ignore[union-attr]
    # Version 1 pruned (history limit 3): no source, MASTER is left and still refused.
    for n in range(2, 5):
        configs.commit("sniffer", snaplen(SECOND, n), by="ops")
    assert store.get(lay.history("sniffer", 1)) is None
    assert not operator_repair(configs, registration)
    with pytest.raises(RegistrationReplayError):
        ConfigStore(client).get_master("sniffer")


def test_earlier_registrations_history_put_back_below_the_repair_source_is_removed(
    client: DefenderClient, store: EtcdStore, alerts: list[Alert]
) -> None:
    configs = ConfigStore(client)
    saved = purge_and_register_again(configs, store, client)
    for n in range(2, 5):
        configs.commit("sniffer", snaplen(SECOND, n), by="ops")
    lay = client.layout
    registration = configs.get_active("sniffer").metadata.registration  # type: ignore[union-attr]
    # Registration one's version 3 put back over registration two's, and ACTIVE broken: the
    # repair rebuilds from version 4, the newest, and looks below it too.
    store.put(lay.history("sniffer", 3), saved[lay.history("sniffer", 3)])
    store.put(lay.active_config("sniffer"), b"junk")
    assert operator_repair(configs, registration)
    assert store.get(lay.history("sniffer", 3)) is None
    removed = [a for a in alerts if a.kind == "RegistrationReplayRemoved"]
    assert removed and lay.history("sniffer", 3) in removed[-1].detail
    for v in (2, 4):
        assert store.get(lay.history("sniffer", v)) is not None
    active = ConfigStore(client).get_active("sniffer")
    assert (active.version, active.config["snaplen"]) == (4, 104)


def test_an_earlier_registrations_rollout_put_back_with_its_metadata_never_runs(
    client: DefenderClient, store: EtcdStore
) -> None:
    """A reader that holds the current registration reads ACTIVE through its checked metadata;
    the candidate of a saved rollout is opened as a value of that registration too, not of
    whatever metadata record etcd holds a moment later (the audit's replay: registration one's
    metadata, rollout record and candidate put back together, at the same base version)."""
    writer = ConfigStore(client)
    lay = client.layout
    writer.seed("sniffer", FIRST, "sniffer", by="test")
    for n in range(2, 4):
        writer.commit("sniffer", snaplen(FIRST, n), by="ops")
    Rollouts(writer).start("sniffer", snaplen(FIRST, 99), ["sniffer-0"], by="ops")
    paths = (lay.metadata("sniffer"), lay.rollout("sniffer"), lay.candidate("sniffer"))
    saved = {p: store.get(p) for p in paths}
    store.delete_prefix(client.layout.component_dir("sniffer"))
    store.delete_prefix(lay.rollout("sniffer"))
    store.delete_prefix(lay.candidate("sniffer"))
    writer.forget_registration("sniffer")
    time.sleep(0.01)  # registrations are stamped from the clock in ms
    writer.seed("sniffer", SECOND, "sniffer", by="test")
    for n in range(2, 4):
        writer.commit("sniffer", snaplen(SECOND, n), by="ops")
    current = writer.held_registration("sniffer")
    assert current is not None

    reader = ConfigStore(client)
    reader.hold_registration("sniffer", current)
    before = Rollouts(reader).effective("sniffer", "sniffer-0")
    assert (before.version, before.config["node_id"], before.config["snaplen"]) == (
        3,
        "sniffer-02",
        103,
    )
    for path, value in saved.items():
        assert value is not None
        store.put(path, value.value)
    runs = Rollouts(reader).effective("sniffer", "sniffer-0")
    assert (runs.version, runs.config) == (3, before.config)  # not snaplen 199 of registration one
    assert reader.held_registration("sniffer") == current


def test_a_snapshot_from_before_a_purge_restored_is_refused_by_readers_until_seeded_above(
    client: DefenderClient, store: EtcdStore, alerts: list[Alert]
) -> None:
    """A snapshot taken before a purge and re-creation, restored: etcd holds the earlier
    registration again, readers and the operator hold the newer one. Versions are forgotten on
    a cluster change (`ConfigStore._follow_cluster`), registrations are not: every reader that
    held the newer registration, or is told it by `registrations.json`, refuses the restored
    data, and the operator's repair with its anchor (`status.registration`) refuses to rebuild
    from it. The operator then re-seeds the name above both (`_reconcile.reseed_after_restore`:
    purge, then a seed with `registration_above`), which those readers take by themselves
    (docs/operations.md, "Restore").

    The restore is played on the same etcd: the component's keys replaced by the ones saved
    before the purge (the snapshot), and a cluster id the store had not seen noted as a
    restored cluster's response headers would make it note one."""
    configs = ConfigStore(client)
    saved = purge_and_register_again(configs, store, client)
    lay = client.layout
    running = ConfigStore(client)  # an agent of the newer registration, running through it
    assert running.get_active("sniffer").version == 1
    current = running.held_registration("sniffer")
    old = inspect(saved[lay.active_config("sniffer")]).registration
    assert current is not None and old is not None and old < current

    store.delete_prefix(lay.component_dir("sniffer"))
    for path, value in saved.items():
        store.put(path, value)
    changes = store.cluster_changes
    store.observe_cluster(0x5EED_0F_A_5AFE)  # the restored cluster's new id
    assert store.cluster_changes == changes + 1

    # The running reader forgot version 1 of the newer registration, not the registration.
    with pytest.raises(RegistrationReplayError) as refused:
        running.get_active("sniffer")
    assert (refused.value.found, refused.value.expected) == (old, current)
    assert running.held_registration("sniffer") == current
    # A reader told the registration the operator publishes (`registrations.json`), too.
    told = ConfigStore(client)
    told.hold_registrations({"sniffer": current})
    with pytest.raises(RegistrationReplayError):
        told.get_active("sniffer")
    # One told nothing takes the restored data: version 5 of the earlier registration.
    fresh = ConfigStore(client)
    assert fresh.get_active("sniffer").version == 5

    # The operator's repair, with the registration its status anchors: the restored history
    # is removed as another registration's, and nothing is left to rebuild the record from.
    assert store.list_prefix(lay.history_dir("sniffer"))
    with pytest.raises(RegistrationReplayError):
        operator_repair(configs, current)
    assert store.list_prefix(lay.history_dir("sniffer")) == []
    assert "RegistrationReplayRemoved" in [a.kind for a in alerts]
    # Refused again on the next pass; etcd keeps only the earlier registration's MASTER,
    # metadata and ACTIVE.
    with pytest.raises(RegistrationReplayError):
        operator_repair(configs, current)
    assert inspect(store.get(lay.active_config("sniffer")).value).registration == old  # type: ignore[union-attr]

    # The operator's re-seed: the name purged, seeded again above both registrations.
    store.delete_prefix(lay.component_dir("sniffer"))
    seeded = configs.seed("sniffer", THIRD, "sniffer", by="operator", registration_above=current)
    third = seeded.metadata.registration
    assert seeded.created and third is not None and third > current > old
    assert inspect(store.get(lay.active_config("sniffer")).value).registration == third  # type: ignore[union-attr]
    # Taken by the readers that refused the older one: version 1 of the new registration.
    for reader in (running, told):
        active = reader.get_active("sniffer")
        assert (active.version, active.config["node_id"]) == (1, THIRD["node_id"])
        assert reader.held_registration("sniffer") == third
