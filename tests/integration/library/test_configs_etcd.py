"""ConfigStore against the real cluster: seed, commit (CAS), history, freeze, rollback, watch,
wrong keys and alerts, key rotation with rewrap_all."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from defender_config import (
    ActiveConfig,
    Alert,
    AuthenticationFailedError,
    Cadence,
    ChangeKind,
    ComponentOverview,
    ConfigFrozenError,
    ConfigStore,
    ConfigValidationError,
    ConflictError,
    DefenderClient,
    DefenderConfigError,
    InvalidRollbackTargetError,
    Keyring,
    LibrarySettings,
    MasterMissingError,
    NotFoundError,
    RecordAuthError,
    Rollouts,
    StoreError,
    UnknownKeyError,
    VersionNotKeptError,
    cadence_put,
    inspect,
    read_cadence,
    view_component,
    view_from,
    view_reads,
    viewed_component,
    write_cadence,
)
from defender_config.store import Compare, GetOp, PutOp, StoredValue
from defender_devcluster import wait_for

pytestmark = pytest.mark.etcd

SNIFFER: dict[str, Any] = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth0"}


@pytest.fixture
def configs(client: DefenderClient) -> ConfigStore:
    cs = ConfigStore(client)
    cs.seed("sniffer", SNIFFER, "sniffer", by="test")
    return cs


def snaplen(n: int) -> dict[str, Any]:
    return {**SNIFFER, "snaplen": n}


def stored_alerts(client: DefenderClient, component: str) -> list[dict[str, Any]]:
    prefix = client.layout.component_alerts_dir(component)
    return [json.loads(v.value) for v in client.store.list_prefix(prefix)]


def test_seed_writes_master_active_metadata_history(
    configs: ConfigStore, client: DefenderClient
) -> None:
    meta = configs.get_metadata("sniffer")
    assert meta is not None and meta.version == 1 and meta.type == "sniffer"
    assert configs.get_master("sniffer")["interface"] == "eth0"
    active = configs.get_active("sniffer")
    assert active.version == 1 and active.config == configs.get_master("sniffer")
    assert [e.version for e in configs.history("sniffer")] == [1]
    # Sealed values are envelopes bound to their key path; metadata stays readable JSON.
    raw = client.store.get(client.layout.master_config("sniffer"))
    assert raw is not None and inspect(raw.value).encrypted
    meta_raw = client.store.get(client.layout.metadata("sniffer"))
    assert meta_raw is not None and json.loads(meta_raw.value)["version"] == 1
    again = configs.seed("sniffer", snaplen(64), "sniffer", by="late")
    assert not again.created and not again.matches_master
    assert configs.get_master("sniffer")["snaplen"] == 256  # never overwritten


def test_a_seed_answers_with_what_it_wrote_or_found_as_an_overview_would_read_it(
    configs: ConfigStore,
) -> None:
    # Its one transaction says what etcd holds: the caller does not read it again.
    configs.freeze("fresh", "frozen before it was created", by="oncall")
    created = configs.seed("fresh", SNIFFER, "sniffer", by="test")
    assert created.created and created.overview == configs.overview("fresh")
    assert created.overview.frozen is not None
    assert created.overview.frozen.reason == "frozen before it was created"
    configs.commit("sniffer", snaplen(100), by="ops")
    found = configs.seed("sniffer", snaplen(64), "sniffer", by="late")
    assert not found.created and found.overview == configs.overview("sniffer")
    assert found.overview.metadata is not None and found.overview.metadata.version == 2
    assert found.overview.master == configs.get_master("sniffer")  # MASTER, not ACTIVE


def component_keys(client: DefenderClient, component: str) -> dict[str, tuple[bytes, int]]:
    found = client.store.list_prefix(client.layout.component_dir(component))
    return {sv.key: (sv.value, sv.mod_revision) for sv in found}


@pytest.mark.parametrize("also_gone", [(), ("metadata",), ("metadata", "active")])
def test_a_seed_with_master_alone_gone_refuses_writes_nothing_and_alerts(
    configs: ConfigStore, client: DefenderClient, alerts: list[Alert], also_gone: tuple[str, ...]
) -> None:
    # After a breaker rollback and freeze, someone with etcd write access (no keyring)
    # deletes MASTER (and maybe more): a seed with the config the breaker rejected must not
    # make the component new again, as MASTER and as a version 1 over what is there.
    bad = snaplen(99)
    configs.commit("sniffer", bad, by="ops")
    configs.rollback("sniffer", 1, "breaker")
    configs.freeze("sniffer", "breaker tripped", by="breaker")
    lay = client.layout
    client.store.delete(lay.master_config("sniffer"))
    keys = {"metadata": lay.metadata("sniffer"), "active": lay.active_config("sniffer")}
    for what in also_gone:
        client.store.delete(keys[what])
    before = component_keys(client, "sniffer")
    with pytest.raises(MasterMissingError) as info:
        configs.seed("sniffer", bad, "sniffer", by="operator")
    assert component_keys(client, "sniffer") == before  # nothing written, nothing lost
    assert info.value.reason == "MasterMissing" and not isinstance(info.value, StoreError)
    assert "history/1" in info.value.found and "Purge" in str(info.value)
    assert [a.kind for a in alerts if a.component == "sniffer"][-1] == "MasterMissing"
    if "active" not in also_gone:
        assert configs.get_active("sniffer").version == 3  # what components run, kept


def test_a_seed_writes_the_callers_puts_with_it_only_when_its_compares_hold_too(
    configs: ConfigStore, client: DefenderClient
) -> None:
    mark = client.layout.owner("fresh")
    also = ([Compare.absent(mark)], [PutOp(mark, b"claimed")])
    assert configs.seed("fresh", SNIFFER, "sniffer", by="test", also=also).created
    stored = client.store.get(mark)
    assert stored is not None and stored.value == b"claimed"
    # MASTER exists: nothing written, as always, the caller's puts neither.
    again = ([Compare.absent(client.layout.owner("sniffer"))], [PutOp(mark, b"again")])
    assert not configs.seed("sniffer", SNIFFER, "sniffer", by="late", also=again).created
    stored = client.store.get(mark)
    assert stored is not None and stored.value == b"claimed"
    # The caller's compare fails while MASTER is absent: nothing written, a retryable conflict.
    with pytest.raises(ConflictError) as info:
        configs.seed("other", SNIFFER, "sniffer", by="test", also=also)
    assert info.value.retryable
    assert configs.overview("other") == ComponentOverview(None, None, None)


def test_a_seed_reads_what_the_caller_asks_after_its_writes_in_the_same_transaction(
    configs: ConfigStore, client: DefenderClient
) -> None:
    # The view a watcher reads of a new component comes back from its seed: the cadence put
    # with it, an alert raised before it, at the seed's own revision.
    lay = client.layout
    client.alerter.event("Misconfigured", "fresh", "raised before the seed")
    cadence = Cadence(interval_seconds=5, allowed_misses=2, by="test")
    since = datetime.now(UTC) - timedelta(minutes=1)
    seeded = configs.seed(
        "fresh",
        SNIFFER,
        "sniffer",
        by="test",
        also=([], [cadence_put(client, "fresh", cadence)]),
        reads=view_reads(lay, "fresh"),
    )
    assert seeded.created and seeded.overview is not None
    view = view_from(
        configs, "fresh", seeded.overview, seeded.read, revision=seeded.revision, since=since
    )
    read = view_component(configs, "fresh", alerts_since=since)
    assert view.overview.metadata == read.overview.metadata
    assert view.overview.master == read.overview.master
    assert view.cadence == read.cadence == read_cadence(client, "fresh")
    assert cadence.same_rhythm(view.cadence)
    assert [a.detail for a in view.alerts] == [a.detail for a in read.alerts]
    assert "raised before the seed" in [a.detail for a in view.alerts]
    assert view.rollout is None and view.revision == read.revision
    stored = client.store.get(lay.master_config("fresh"))
    assert stored is not None and stored.mod_revision == seeded.revision
    # Not created: the caller's reads are not made (what etcd holds is in the overview).
    again = configs.seed("fresh", SNIFFER, "sniffer", by="late", reads=view_reads(lay, "fresh"))
    assert not again.created and again.read == ()


def test_repair_and_schema_take_the_record_the_caller_read_and_are_guarded_by_it(
    configs: ConfigStore, client: DefenderClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    meta_key = client.layout.metadata("sniffer")
    gets = client.store.txn([], configs.overview_reads("sniffer")).gets
    meta_sv, master_sv = (found[0] if found else None for found in gets[:2])
    read: list[str] = []
    get = client.store.get
    monkeypatch.setattr(
        client.store, "get", lambda path, **kw: read.append(path) or get(path, **kw)
    )
    schema = {"type": "object", "properties": {"snaplen": {"type": "integer"}}}
    assert not configs.repair_metadata(
        "sniffer", component_type="sniffer", json_schema=None, by="op", stored=(meta_sv, master_sv)
    )
    assert not configs.set_schema("sniffer", None, "op", metadata=meta_sv)  # already recorded
    assert meta_key not in read  # neither read the record again
    assert meta_sv is not None
    assert configs.schema_growth("sniffer", None, metadata=meta_sv) == 0  # already recorded
    growth = configs.schema_growth("sniffer", schema, metadata=meta_sv)
    assert growth > len(json.dumps(schema)) // 2 and meta_key not in read  # nothing read
    assert configs.set_schema("sniffer", schema, "op", metadata=meta_sv)
    written = client.store.get(meta_key)
    assert written is not None and len(written.value) == len(meta_sv.value) + growth
    # A record read before a write is no base for another: the schema is refused, not lost.
    assert meta_sv is not None
    with pytest.raises(ConflictError):
        configs.set_schema("sniffer", {"type": "object"}, "op", metadata=meta_sv)
    meta = configs.get_metadata("sniffer")
    assert meta is not None and meta.json_schema == schema


def test_schema_growth_of_a_record_that_does_not_verify_is_the_schema_beside_the_one_it_holds(
    configs: ConfigStore, client: DefenderClient
) -> None:
    # What a re-sign (`repair_metadata`) would write: the record rebuilt with the schema.
    meta_key = client.layout.metadata("sniffer")
    schema = {"type": "object", "properties": {"snaplen": {"type": "integer"}}}
    size = len(client.encode_json(schema))
    signed = client.store.get(meta_key)
    assert signed is not None
    record = json.loads(signed.value)

    def stored_as(blob: bytes) -> StoredValue:
        client.store.put(meta_key, blob)
        found = client.store.get(meta_key)
        assert found is not None
        return found

    forged = stored_as(json.dumps({**record, "note": "forged"}).encode())  # its MAC fails
    assert configs.schema_growth("sniffer", schema, metadata=forged) == size - len(b"null")
    holding = stored_as(json.dumps({**record, "json_schema": schema}).encode())
    assert configs.schema_growth("sniffer", schema, metadata=holding) == 0
    assert configs.schema_growth("sniffer", None, metadata=holding) == len(b"null") - size
    junk = stored_as(b"not a record")  # holds no schema
    assert configs.schema_growth("sniffer", schema, metadata=junk) == size - len(b"null")
    # Absent (re-created by the repair): the schema is what it adds.
    assert configs.schema_growth("sniffer", schema, metadata=None) == size
    assert configs.schema_growth("sniffer", None, metadata=None) == 0


def test_commit_versions_and_history_pruning(configs: ConfigStore) -> None:
    versions = [configs.commit("sniffer", snaplen(100 + i), by="ops") for i in range(5)]
    assert versions == [2, 3, 4, 5, 6]
    assert configs.history_limit == 3
    assert [e.version for e in configs.history("sniffer")] == [4, 5, 6]
    assert [e.config["snaplen"] for e in configs.history("sniffer")] == [102, 103, 104]
    meta = configs.get_metadata("sniffer")
    assert meta is not None and meta.version == 6 and meta.modified_by == "ops"
    # An identical config is not a new version.
    assert configs.commit("sniffer", snaplen(104), by="ops") == 6


def test_metadata_names_the_author_of_each_kept_version_only(configs: ConfigStore) -> None:
    for i, who in enumerate(["alice", "bob", "carol", "dave"]):
        configs.commit("sniffer", snaplen(100 + i), by=who)
    meta = configs.get_metadata("sniffer")
    # history_limit 3 keeps versions 3-5; the seed's author (version 1) and alice's are gone.
    assert meta is not None and meta.authors == {"3": "bob", "4": "carol", "5": "dave"}


def test_commit_with_stale_expected_version_conflicts(configs: ConfigStore) -> None:
    configs.commit("sniffer", snaplen(100), by="a", expected_version=1)
    with pytest.raises(ConflictError) as info:
        configs.commit("sniffer", snaplen(200), by="b", expected_version=1)
    assert info.value.expected == 1 and info.value.found == 2
    assert configs.get_active("sniffer").config["snaplen"] == 100


def test_concurrent_commits_one_wins_per_version(client: DefenderClient) -> None:
    cs = ConfigStore(client, history_limit=20)
    cs.seed("sniffer", SNIFFER, "sniffer", by="test")
    results: list[int | str] = []
    gate = threading.Barrier(6)

    def commit(n: int) -> None:
        gate.wait()
        try:
            results.append(cs.commit("sniffer", snaplen(1000 + n), by=f"w{n}"))
        except ConflictError:
            results.append("conflict")

    threads = [threading.Thread(target=commit, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    won = sorted(r for r in results if isinstance(r, int))
    assert len(results) == 6 and won == list(range(2, 2 + len(won)))
    meta = cs.get_metadata("sniffer")
    assert meta is not None and meta.version == 1 + len(won)
    assert [e.version for e in cs.history("sniffer")] == list(range(1, 2 + len(won)))


def test_freeze_refuses_commits(configs: ConfigStore, client: DefenderClient) -> None:
    configs.freeze("sniffer", "bad rollout", by="oncall")
    with pytest.raises(ConfigFrozenError) as info:
        configs.commit("sniffer", snaplen(100), by="ops")
    assert "bad rollout" in str(info.value)
    assert configs.get_active("sniffer").version == 1
    # Rollback is the way back and stays allowed while frozen.
    assert configs.rollback("sniffer", "master", by="oncall") == 2
    assert configs.unfreeze("sniffer")
    assert configs.commit("sniffer", snaplen(100), by="ops") == 3
    # A marker written by hand with etcdctl carries no MAC: anyone with etcd write access could
    # write it, so it does not freeze (tests/reliability/test_integrity_attacks.py: forged
    # freezes are alerted).
    client.store.put(client.layout.freeze("sniffer"), b"yes")
    assert configs.frozen("sniffer") is None
    assert configs.commit("sniffer", snaplen(101), by="ops") == 4


def test_a_freeze_marker_carries_a_sequence_above_the_lifted_one(
    configs: ConfigStore, client: DefenderClient
) -> None:
    configs.freeze("sniffer", "first", by="oncall")
    first = configs.frozen("sniffer")
    assert first is not None and first.sequence > 0
    # Above the marker in place, and above what the caller anchored, whatever the clock says.
    configs.freeze("sniffer", "second", by="oncall")
    second = configs.frozen("sniffer")
    assert second is not None and second.sequence > first.sequence
    assert configs.unfreeze("sniffer")
    far = second.sequence + 10**12
    configs.freeze("sniffer", "third", by="oncall", after=far)
    third = configs.frozen("sniffer")
    assert third is not None and third.sequence == far + 1
    # Signed, like the rest of the marker: raising it without the key fails the MAC.
    path = client.layout.freeze("sniffer")
    raw = client.store.get(path)
    assert raw is not None
    edited = json.loads(raw.value) | {"sequence": far + 99}
    client.store.put(path, json.dumps(edited).encode())
    assert configs.frozen("sniffer") is None
    # A marker from before sequences existed reads as sequence 0 and still freezes.
    client.put_record(path, {"reason": "old", "since": "2026-01-01T00:00:00Z", "by": None})
    old = configs.frozen("sniffer")
    assert old is not None and old.sequence == 0


def test_freeze_set_between_read_and_write_is_honoured(
    configs: ConfigStore, client: DefenderClient
) -> None:
    # The freeze check is part of the write transaction, not only a read before it.
    meta = configs._metadata("sniffer")
    assert meta is not None
    client.put_record(
        client.layout.freeze("sniffer"), {"reason": "race", "since": "2026-01-01T00:00:00Z"}
    )
    with pytest.raises(ConfigFrozenError):
        configs._write_version(
            "sniffer",
            snaplen(5),
            "ops",
            meta[0],
            meta[1],
            note=None,
            change=ChangeKind.COMMIT,
            schema=None,
            validated_with=None,
            freeze_revision=0,
        )


def test_rollback_to_master_and_to_version(configs: ConfigStore) -> None:
    configs.commit("sniffer", snaplen(100), by="ops")  # v2
    configs.commit("sniffer", snaplen(200), by="ops")  # v3
    assert configs.rollback("sniffer", 2, by="ops") == 4
    assert configs.get_active("sniffer").config["snaplen"] == 100
    assert configs.rollback("sniffer", "master", by="ops") == 5
    active = configs.get_active("sniffer")
    assert active.version == 5 and active.config == configs.get_master("sniffer")
    meta = configs.get_metadata("sniffer")
    assert meta is not None and meta.note == "rollback to master"
    with pytest.raises(VersionNotKeptError, match="not kept") as pruned:
        configs.rollback("sniffer", 1, by="ops")  # pruned (limit 3 keeps 3..5)
    assert (pruned.value.version, pruned.value.kept) == (1, [3, 4, 5])
    assert isinstance(pruned.value, NotFoundError)
    # Numbers no history key can name: the typed refusal the annotation's parser gives.
    for impossible in (0, -2, 10**10, 10**5000):
        with pytest.raises(InvalidRollbackTargetError):
            configs.rollback("sniffer", impossible, by="ops")
    assert configs.get_active("sniffer").version == 5


def kept(configs: ConfigStore) -> list[int]:
    return [e.version for e in configs.history("sniffer")]


def test_a_rollback_keeps_the_history_limit_it_is_given_below_and_above_the_stores(
    configs: ConfigStore,
) -> None:
    for n in (100, 101, 102, 103):
        configs.commit("sniffer", snaplen(n), by="ops", history_limit=5)
    assert configs.rollback("sniffer", 2, by="ops", history_limit=5) == 6
    assert kept(configs) == [2, 3, 4, 5, 6]  # the store's 3 would keep [4, 5, 6]
    assert configs.rollback("sniffer", "master", by="ops", history_limit=1) == 7
    assert kept(configs) == [7]


def test_a_rollback_with_a_history_limit_below_1_is_refused_before_anything_is_read(
    configs: ConfigStore,
) -> None:
    with pytest.raises(ValueError, match="history_limit must be at least 1, not 0"):
        configs.rollback("sniffer", "master", by="ops", history_limit=0)
    # Not NotFoundError: the limit is refused before the component is looked for.
    with pytest.raises(ValueError, match="history_limit must be at least 1, not -1"):
        configs.rollback("absent", "master", by="ops", history_limit=-1)
    assert configs.get_active("sniffer").version == 1
    assert kept(configs) == [1]


def test_invalid_commit_keeps_active_and_alerts(
    configs: ConfigStore, client: DefenderClient, alerts: list[Alert]
) -> None:
    configs.commit("sniffer", snaplen(100), by="ops")
    with pytest.raises(ConfigValidationError):
        configs.commit("sniffer", {**SNIFFER, "snaplen": 5}, by="ops")
    assert configs.get_active("sniffer").config["snaplen"] == 100
    assert [a.kind for a in alerts] == ["ConfigInvalid"]
    assert [a["kind"] for a in stored_alerts(client, "sniffer")] == ["ConfigInvalid"]


def test_invalid_commit_reverts_to_master_by_policy(
    client: DefenderClient, alerts: list[Alert]
) -> None:
    cs = ConfigStore(client, on_invalid="revert_to_master")
    cs.seed("sniffer", SNIFFER, "sniffer", by="test")
    cs.commit("sniffer", snaplen(100), by="ops")
    with pytest.raises(ConfigValidationError):
        cs.commit("sniffer", {**SNIFFER, "capture_mode": "carrier-pigeon"}, by="ops")
    active = cs.get_active("sniffer")
    assert active.version == 3 and active.config == cs.get_master("sniffer")
    assert [a.kind for a in alerts] == ["ConfigInvalid", "ConfigRolledBack"]


def test_the_policys_revert_keeps_the_history_limit_the_commit_was_given(
    client: DefenderClient,
) -> None:
    cs = ConfigStore(client, on_invalid="revert_to_master")
    cs.seed("sniffer", SNIFFER, "sniffer", by="test")
    for n in (100, 101, 102):
        cs.commit("sniffer", snaplen(n), by="ops", history_limit=5)
    with pytest.raises(ConfigValidationError):
        cs.commit("sniffer", {**SNIFFER, "capture_mode": "carrier-pigeon"}, "ops", history_limit=5)
    assert cs.get_active("sniffer").version == 5
    assert kept(cs) == [1, 2, 3, 4, 5]  # the store's 3 would keep [3, 4, 5]


def test_watch_active_delivers_decoded_changes(configs: ConfigStore) -> None:
    seen: list[ActiveConfig] = []
    handle = configs.watch_active("sniffer", seen.append)
    configs.commit("sniffer", snaplen(100), by="ops")
    configs.commit("sniffer", snaplen(200), by="ops")
    configs.rollback("sniffer", "master", by="ops")
    wait_for("initial + 3 changes", lambda: len(seen) == 4, timeout=15)
    handle.cancel()
    assert [(a.version, a.config["snaplen"]) for a in seen] == [
        (1, 256),
        (2, 100),
        (3, 200),
        (4, 256),
    ]


def test_wrong_key_is_typed_error_and_alert_record(
    configs: ConfigStore, settings: LibrarySettings, alerts: list[Alert]
) -> None:
    errors: list[DefenderConfigError] = []
    intruder_alerts: list[Alert] = []
    from defender_config import CallableSink, EtcdAlertSink

    with DefenderClient(
        settings, Keyring.generate(), registry=CollectorRegistry(), alert_sinks=[]
    ) as wrong:
        wrong.alerter.add_sink(CallableSink(intruder_alerts.append))
        wrong.alerter.add_sink(EtcdAlertSink(wrong.store, wrong.layout, ttl_seconds=600))
        other = ConfigStore(wrong)
        with pytest.raises(UnknownKeyError) as info:
            other.get_active("sniffer")
        assert info.value.path == wrong.layout.active_config("sniffer")
        # A watch with the wrong key hands the error over and keeps running.
        handle = other.watch_active("sniffer", lambda a: None, on_error=errors.append)
        configs.commit("sniffer", snaplen(100), by="ops")
        wait_for("initial + 1 decode error", lambda: len(errors) == 2, timeout=15)
        handle.cancel()
        assert all(isinstance(e, UnknownKeyError) for e in errors)
        records = stored_alerts(wrong, "sniffer")
    assert [a.kind for a in intruder_alerts] == ["UnknownKey"] * 3
    assert [r["kind"] for r in records] == ["UnknownKey"] * 3
    assert all(r["path"].endswith("/components/sniffer/active_config") for r in records)
    assert alerts == []  # the right-key client saw nothing wrong


def test_wrong_key_on_master_and_history_names_the_key_not_the_record(
    configs: ConfigStore, settings: LibrarySettings, alerts: list[Alert]
) -> None:
    # MASTER and history are read with the metadata record (its registration binds them), whose
    # MAC a reader with the wrong key cannot verify either: it must still be told about its
    # key (UnknownKey), as for ACTIVE, not sent after a record that is fine.
    configs.commit("sniffer", snaplen(100), by="ops")
    intruder_alerts: list[Alert] = []
    from defender_config import CallableSink

    with DefenderClient(
        settings, Keyring.generate(), registry=CollectorRegistry(), alert_sinks=[]
    ) as wrong:
        wrong.alerter.add_sink(CallableSink(intruder_alerts.append))
        other = ConfigStore(wrong)
        with pytest.raises(UnknownKeyError) as info:
            other.get_master("sniffer")
        assert info.value.path == wrong.layout.master_config("sniffer")
        with pytest.raises(UnknownKeyError) as info:
            other.history("sniffer")
        assert info.value.path == wrong.layout.history("sniffer", 2)
    assert [a.kind for a in intruder_alerts] == ["UnknownKey"] * 2
    # With the right key, a record that does not verify is still what is reported.
    meta_path = configs.client.layout.metadata("sniffer")
    stored = configs.client.store.get(meta_path)
    assert stored is not None
    forged = json.loads(stored.value)
    forged["version"] = 9  # the MAC kept: it no longer verifies
    configs.client.store.put(meta_path, json.dumps(forged).encode())
    with pytest.raises(RecordAuthError):
        ConfigStore(configs.client).get_master("sniffer")
    assert "RecordUnauthenticated" in [a.kind for a in alerts]


def test_rewrap_all_after_rotation(
    configs: ConfigStore, settings: LibrarySettings, keyring: Keyring
) -> None:
    for i in range(3):
        configs.commit("sniffer", snaplen(100 + i), by="ops")
    staged = keyring.with_new_decrypt_only()
    new_id = next(k for k in staged.key_ids if k != keyring.primary.key_id)
    rotated = staged.promote(new_id)
    with DefenderClient(settings, rotated, registry=CollectorRegistry(), alert_sinks=[]) as c2:
        cs2 = ConfigStore(c2)
        report = cs2.rewrap_all()
        # master, active, 3 history entries (limit 3), and the metadata record's MAC
        assert (report.sealed, report.rewrapped, report.failed) == (6, 6, 0)
        for sv in c2.store.list_prefix(c2.layout.component_dir("sniffer")):
            if sv.key.endswith(("metadata", "status")):
                continue
            assert inspect(sv.value).key_id == new_id, sv.key
        assert cs2.rewrap_all().rewrapped == 0
        assert cs2.get_active("sniffer").config["snaplen"] == 102
    # The old key alone no longer opens anything: the old primary's holders need the new key.
    with pytest.raises(UnknownKeyError):
        configs.get_active("sniffer")


def test_dump_decrypts_only_when_asked(configs: ConfigStore, client: DefenderClient) -> None:
    sealed = {e.key: e for e in client.dump() if e.sealed}
    master = sealed[client.layout.master_config("sniffer")]
    assert master.value is None and master.header is not None
    assert master.header["key_id"] == client.envelope.keyring().primary.key_id  # type: ignore[union-attr]
    opened = {e.key: e for e in client.dump(decrypt=True)}
    assert opened[client.layout.master_config("sniffer")].value["interface"] == "eth0"
    assert opened[client.layout.metadata("sniffer")].value["version"] == 1


def test_config_too_large_for_one_transaction_is_refused_before_sending(
    client: DefenderClient,
) -> None:
    import base64
    import os

    from defender_config import ValueTooLargeError

    schema = {"type": "object"}
    # ~560 KB sealed (base64 of random bytes compresses to about 3/4): one copy fits etcd's
    # 1.5 MiB limit, the three copies of a registration do not.
    big = {"blob": base64.b64encode(os.urandom(560_000)).decode()}
    cs = ConfigStore(client)
    with pytest.raises(ValueTooLargeError, match="one config version") as info:
        cs.seed("bulky", big, "custom", by="t", json_schema=schema)
    assert info.value.size > info.value.limit
    assert cs.get_metadata("bulky") is None  # nothing was written
    # A small registration, then a commit of two big copies (ACTIVE + history) still fits.
    cs.seed("bulky", {"blob": "x"}, "custom", by="t", json_schema=schema)
    assert cs.commit("bulky", big, by="ops") == 2
    assert cs.get_active("bulky").config == big


def _schema_of_depth(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = (
        {"type": "object"} if depth % 2 else {"type": "object", "properties": {}}
    )
    for _ in range((depth - 1) // 2):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_a_schema_is_stored_only_as_deep_as_its_metadata_record_reads_back(
    client: DefenderClient,
) -> None:
    """The metadata record holds the schema one level down; readers refuse a record nested
    deeper than they parse, so a schema that would make it so is refused before any write
    (it was stored, and then every read of the component failed: RecordUnauthenticated)."""
    from defender_config._json_parse import MAX_JSON_DEPTH

    cs = ConfigStore(client)
    cs.seed("deepest", {"x": 1}, "custom", by="t", json_schema=_schema_of_depth(MAX_JSON_DEPTH - 1))
    assert cs.get_active("deepest").config == {"x": 1}
    with pytest.raises(ConfigValidationError, match="metadata record"):
        cs.seed("deeper", {"x": 1}, "custom", by="t", json_schema=_schema_of_depth(MAX_JSON_DEPTH))
    assert cs.get_metadata("deeper") is None  # nothing was written


def test_watch_active_survives_undecodable_values_and_failing_handlers(
    configs: ConfigStore, client: DefenderClient, alerts: list[Alert]
) -> None:
    seen: list[ActiveConfig] = []
    errors: list[DefenderConfigError] = []

    def on_error(exc: DefenderConfigError) -> None:
        errors.append(exc)
        raise RuntimeError("handler bug")  # must not kill the watch thread

    handle = configs.watch_active("sniffer", seen.append, on_error=on_error)
    meta = configs.get_metadata("sniffer")
    assert meta is not None
    # Sealed for the component's registration: without it the value is refused before it is
    # decoded (RegistrationReplayed, tests/integration/library/test_registration_replay_etcd.py).
    client.put_sealed(
        client.layout.active_config("sniffer"), b"not json at all", registration=meta.registration
    )
    wait_for("the decode error", lambda: len(errors) == 1, timeout=15)
    assert isinstance(errors[0], ConfigValidationError)
    assert [a.kind for a in alerts] == ["ConfigInvalid"]
    configs.commit("sniffer", snaplen(100), by="ops")
    wait_for("the next good value", lambda: len(seen) == 2, timeout=15)
    handle.cancel()
    assert seen[-1].config["snaplen"] == 100


def test_overview_reads_metadata_master_and_freeze_at_once(
    configs: ConfigStore, client: DefenderClient
) -> None:
    seen = configs.overview("sniffer")
    assert seen.metadata == configs.get_metadata("sniffer")
    assert seen.master == configs.get_master("sniffer")
    assert seen.frozen is None
    configs.commit("sniffer", snaplen(100), by="ops")
    configs.freeze("sniffer", "bad rollout", by="oncall")
    seen = configs.overview("sniffer")
    assert seen.metadata is not None and seen.metadata.version == 2
    assert seen.master is not None and seen.master["snaplen"] == 256  # MASTER, not ACTIVE
    assert seen.frozen is not None and seen.frozen.reason == "bad rollout"
    absent = configs.overview("never-seeded")
    assert (absent.metadata, absent.master, absent.frozen) == (None, None, None)


def test_overview_tolerating_master_reports_a_tampered_master_and_reads_the_rest(
    configs: ConfigStore, client: DefenderClient
) -> None:
    path = client.layout.master_config("sniffer")
    stored = client.store.get(path)
    assert stored is not None
    raw = bytearray(stored.value)
    raw[-3] ^= 0x01
    client.store.put(path, bytes(raw))
    configs.freeze("sniffer", "held", by="oncall")
    # By default a MASTER that does not open is the caller's error, as get_master's.
    with pytest.raises(AuthenticationFailedError):
        configs.overview("sniffer")
    before = len(stored_alerts(client, "sniffer"))
    seen = configs.overview("sniffer", tolerate_master=True)
    assert seen.master is None
    assert isinstance(seen.master_error, AuthenticationFailedError)
    assert seen.metadata == configs.get_metadata("sniffer")
    assert seen.frozen is not None and seen.frozen.reason == "held"
    # Tolerated is not hidden: the failed read is alerted like any other.
    assert len(stored_alerts(client, "sniffer")) > before


def test_a_component_view_is_overview_cadence_rollout_and_alerts_in_one_transaction(
    configs: ConfigStore, client: DefenderClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_cadence(client, "sniffer", Cadence(interval_seconds=5, allowed_misses=2, by="op"))
    since = datetime.now(UTC) - timedelta(seconds=5)
    client.alerter.event("Misconfigured", "sniffer", "two report UnknownKey", instance="op")
    configs.freeze("sniffer", "held", by="oncall")
    calls: list[str] = []
    store = client.store
    real_txn = store.txn

    reads: list[GetOp] = []

    def counted_txn(*a: Any, **k: Any) -> Any:
        calls.append("txn")
        reads.extend(a[1])
        return real_txn(*a, **k)

    def refused(*a: Any, **k: Any) -> Any:
        raise AssertionError("view_component must not read outside its transaction")

    monkeypatch.setattr(store, "txn", counted_txn)
    monkeypatch.setattr(store, "get", refused)
    monkeypatch.setattr(store, "list_prefix", refused)
    snap = view_component(configs, "sniffer", alerts_since=since)
    assert calls == ["txn"]
    monkeypatch.undo()
    # The view says at which revision it read, and every key it read is one a watcher of views
    # assigns to this component (a prefix: any key under it).
    assert 0 < snap.revision <= store.current_revision()
    assert reads and all(
        viewed_component(client.layout, op.key + ("x" if op.prefix else "")) == "sniffer"
        for op in reads
    )
    assert snap.overview == configs.overview("sniffer", tolerate_master=True)
    assert snap.rollout is None
    assert snap.cadence is not None and snap.cadence.interval_seconds == 5
    assert snap.cadence == read_cadence(client, "sniffer")
    # The freeze raised one too.
    assert sorted((a.kind, a.detail) for a in snap.alerts) == [
        ("ConfigFrozen", "commits refused: held"),
        ("Misconfigured", "two report UnknownKey"),
    ]
    later = datetime.now(UTC) + timedelta(minutes=1)
    assert view_component(configs, "sniffer", alerts_since=later).alerts == ()
    configs.unfreeze("sniffer")
    assert view_component(configs, "sniffer", alerts_since=since).revision > snap.revision
    started = Rollouts(configs).start("sniffer", snaplen(100), ["s-0"], "ops")
    seen = view_component(configs, "sniffer", alerts_since=later).rollout
    assert seen == started == Rollouts(configs).record("sniffer")


def test_a_component_view_under_attack_skips_what_does_not_verify_and_refuses_forged_metadata(
    configs: ConfigStore, client: DefenderClient
) -> None:
    since = datetime.now(UTC) - timedelta(seconds=5)
    client.alerter.event("Misconfigured", "sniffer", "real one", instance="op")
    alerts_dir = client.layout.component_alerts_dir("sniffer")
    # A garbled alert does not hide the real one; an unsigned cadence is not followed.
    client.store.put(alerts_dir + "0000-garbage", b"\x00 not json")
    client.store.put(
        client.layout.cadence("sniffer"), b'{"interval_seconds": 3600, "allowed_misses": 100}'
    )
    client.store.put(client.layout.rollout("sniffer"), b'{"version": 9, "canaries": ["x"]}')
    snap = view_component(configs, "sniffer", alerts_since=since)
    assert [a.detail for a in snap.alerts] == ["real one"]
    assert snap.cadence is None
    assert snap.rollout is None  # unsigned: never obeyed
    # A tampered MASTER is reported, not raised (what a monitor pass needs goes on).
    path = client.layout.master_config("sniffer")
    stored = client.store.get(path)
    assert stored is not None
    client.store.put(path, stored.value[:-3] + bytes([stored.value[-3] ^ 1]) + stored.value[-2:])
    snap = view_component(configs, "sniffer", alerts_since=since)
    assert snap.overview.master is None and snap.overview.master_error is not None
    assert snap.overview.metadata is not None and snap.overview.metadata.version == 1
    # A hand-edited metadata record is refused as by overview.
    client.store.put(client.layout.metadata("sniffer"), b'{"version": 7}')
    with pytest.raises(RecordAuthError, match="carries no MAC"):
        view_component(configs, "sniffer", alerts_since=since)


def test_overview_refuses_a_hand_edited_metadata_record(
    configs: ConfigStore, client: DefenderClient
) -> None:
    path = client.layout.metadata("sniffer")
    client.store.put(path, b'{"version": "many"}')
    with pytest.raises(RecordAuthError, match="carries no MAC"):
        configs.overview("sniffer")
    # Signed with the key but not a metadata record: typed too.
    client.put_record(path, {"version": "many"})
    with pytest.raises(StoreError, match="not a valid record"):
        configs.overview("sniffer")
