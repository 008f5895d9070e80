"""Error paths of the library against the real cluster: a full outage and recovery, hand-edited
or foreign values, undecryptable values in rewrap and dump, expired alert leases."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from defender_config import (
    ActiveConfig,
    Alert,
    CallableSink,
    ComponentStatus,
    ConfigStore,
    ConfigValidationError,
    ConflictError,
    DefenderClient,
    EtcdAlertSink,
    Keyring,
    LibrarySettings,
    NotFoundError,
    RecordAuthError,
    RecordReplayError,
    Registry,
    StoreError,
    StoreUnavailableError,
    UnexpectedEnvelopeError,
    decode_alerts,
)
from defender_config._key_usage import UNREADABLE_RECORD, read_key_record
from defender_devcluster import EtcdCluster, tool, wait_for

pytestmark = pytest.mark.etcd

SNIFFER: dict[str, Any] = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth0"}


def test_full_outage_and_recovery(
    members_restored: EtcdCluster,
    restart_members: Callable[[], None],
    settings: LibrarySettings,
    keyring: Keyring,
) -> None:
    cluster = members_restored
    quick = settings.model_copy(
        update={
            "etcd": settings.etcd.model_copy(
                update={"retries": 1, "timeout_seconds": 1.0, "backoff_base_seconds": 0.02}
            )
        }
    )
    alerts: list[Alert] = []
    client = DefenderClient(quick, keyring, registry=CollectorRegistry(), alert_sinks=[])
    client.alerter.add_sink(EtcdAlertSink(client.store, client.layout, ttl_seconds=600))
    client.alerter.add_sink(CallableSink(alerts.append))
    configs = ConfigStore(client)
    registry = Registry(client, configs)
    try:
        reg = registry.register(
            "sniffer", "s-0", SNIFFER, "sniffer", interval_seconds=0.5, allowed_misses=4
        )
        reg.heartbeater.set_status(ComponentStatus.RUNNING)
        other = registry.register(
            "sniffer", "s-1", SNIFFER, "sniffer", interval_seconds=0.5, allowed_misses=4
        )
        seen: list[ActiveConfig] = []
        outages: list[StoreError] = []
        handle = configs.watch_active(
            "sniffer",
            seen.append,
            on_error=lambda e: outages.append(e),  # type: ignore[arg-type]
        )
        assert len(seen) == 1

        for i in range(cluster.members):
            cluster.stop_member(i)
        # Reads are served stale from the last-known-good cache ...
        active = configs.get_active("sniffer")
        assert active.stale and active.version == 1 and active.config["interface"] == "eth0"
        # ... writes are refused, and an alert that cannot be stored does not raise.
        with pytest.raises(StoreUnavailableError):
            configs.commit("sniffer", {**SNIFFER, "snaplen": 100}, by="ops")
        client.alerter.event("Probe", "sniffer", "during the outage")
        assert client.alerter.failed == 1 and [a.kind for a in alerts] == ["Probe"]
        wait_for("failed heartbeats", lambda: reg.heartbeater.failures >= 2)
        other.heartbeater.stop()  # cannot reach etcd: logs, does not raise; the lease expires
        wait_for("the watch reporting the outage", lambda: len(outages) >= 1)
        assert all(isinstance(e, StoreUnavailableError) for e in outages)
        time.sleep(2.5)  # longer than the heartbeat TTL (2 s): the lease expires meanwhile

        restart_members()
        # The client's channels come back on their own (reconnect backoff <= 1 s).
        wait_for("the client reaching etcd again", client.store.has_quorum, timeout=20)
        assert configs.commit("sniffer", {**SNIFFER, "snaplen": 100}, by="ops") == 2
        wait_for("the watch delivering after recovery", lambda: len(seen) == 2)
        assert seen[-1].version == 2 and seen[-1].config["snaplen"] == 100
        wait_for(
            "the heartbeat back",
            lambda: [h.instance for h in registry.list_instances("sniffer")] == ["s-0"],
        )
        [hb] = registry.list_instances("sniffer")
        assert hb.status is ComponentStatus.RUNNING
        handle.cancel()
        reg.heartbeater.stop()
        assert registry.list_instances("sniffer") == []
    finally:
        client.close()


def test_unregistered_component(client: DefenderClient) -> None:
    configs = ConfigStore(client)
    with pytest.raises(NotFoundError, match="not registered"):
        configs.commit("ghost", SNIFFER, by="ops")
    with pytest.raises(NotFoundError, match="not registered"):
        configs.rollback("ghost", "master", by="ops")
    with pytest.raises(NotFoundError):
        configs.get_active("ghost")
    with pytest.raises(NotFoundError):
        configs.get_master("ghost")
    assert configs.get_metadata("ghost") is None


def test_hand_edited_values(client: DefenderClient) -> None:
    configs = ConfigStore(client)
    configs.seed("sniffer", SNIFFER, "sniffer", by="t")
    lay = client.layout
    client.store.put(lay.metadata("sniffer"), b'{"version": "two"}')
    with pytest.raises(RecordAuthError, match="carries no MAC"):
        configs.commit("sniffer", {**SNIFFER, "snaplen": 100}, by="ops")
    # Signed (a key holder's bug) but not a valid record: a typed store error.
    client.put_record(lay.metadata("sniffer"), {"version": "two"})
    with pytest.raises(StoreError, match="edited by hand"):
        configs.commit("sniffer", {**SNIFFER, "snaplen": 100}, by="ops")
    # Sealed correctly but not a JSON object: a typed validation error, not a crash.
    client.put_sealed(lay.active_config("sniffer"), b"[1, 2]")
    with pytest.raises(ConfigValidationError, match="not a JSON object"):
        configs.get_active("sniffer")
    client.put_sealed(lay.active_config("sniffer"), b"\xff not json")
    with pytest.raises(ConfigValidationError, match="not JSON"):
        configs.get_active("sniffer")


def test_sealed_value_where_plaintext_belongs_is_alerted(
    client: DefenderClient, alerts: list[Alert]
) -> None:
    registry = Registry(client)
    path = client.layout.status("sniffer")
    client.put_sealed(path, b'{"status": "RUNNING"}')
    with pytest.raises(UnexpectedEnvelopeError):
        registry.get_status("sniffer")
    assert [(a.kind, a.component, a.path) for a in alerts] == [
        ("UnexpectedEnvelope", "sniffer", path)
    ]


def test_unreadable_heartbeats_are_skipped(client: DefenderClient) -> None:
    registry = Registry(client)
    client.store.put(client.layout.instance("rag", "broken"), b"{not json")
    client.store.put(client.layout.instance("rag", "partial"), b'{"component": "rag"}')
    assert registry.list_instances("rag") == []
    [summary] = registry.list_components()
    assert summary.name == "rag" and summary.instances == ()


def test_records_nested_too_deeply_to_parse_are_refused_like_malformed_ones(
    client: DefenderClient, alerts: list[Alert]
) -> None:
    """`[` * 100000 put by anyone with etcd write access: each reader refuses it with the error
    it gives any malformed record (json alone would raise RecursionError, past every handler)."""
    deep = b"[" * 100_000
    configs = ConfigStore(client)
    registry = Registry(client, configs)
    configs.seed("sniffer", SNIFFER, "sniffer", by="t")
    lay = client.layout
    for key in (
        lay.metadata("sniffer"),
        lay.status("sniffer"),
        lay.instance("sniffer", "deep"),
        lay.keyring_record,
        lay.component_alerts_dir("sniffer") + "deep",
    ):
        client.store.put(key, deep)
    with pytest.raises(RecordAuthError, match="not JSON"):
        configs.get_metadata("sniffer")
    assert ("RecordUnauthenticated", lay.metadata("sniffer")) in [(a.kind, a.path) for a in alerts]
    with pytest.raises(StoreError, match="nested too deeply"):
        registry.get_status("sniffer")
    assert registry.list_instances("sniffer") == []
    assert [c.name for c in registry.list_components()] == ["sniffer"]
    assert read_key_record(client.store, lay) == UNREADABLE_RECORD
    [stored] = client.store.list_prefix(lay.component_alerts_dir("sniffer") + "deep")
    assert decode_alerts(client, [stored], datetime.now(UTC) - timedelta(days=1)) == ()
    [entry] = [e for e in client.dump() if e.key == lay.status("sniffer")]
    assert entry.value == deep.decode() and entry.error is None


def test_seed_with_master_but_no_metadata_asks_for_repair(client: DefenderClient) -> None:
    configs = ConfigStore(client)
    configs.seed("sniffer", SNIFFER, "sniffer", by="t")
    client.store.delete(client.layout.metadata("sniffer"))
    with pytest.raises(ConflictError, match="repair"):
        configs.seed("sniffer", SNIFFER, "sniffer", by="t2")


def test_rewrap_counts_undecryptable_and_retries_conflicts(
    client: DefenderClient, settings: LibrarySettings, alerts: list[Alert]
) -> None:
    configs = ConfigStore(client)
    configs.seed("sniffer", SNIFFER, "sniffer", by="t")
    # A value sealed with a key nobody holds.
    with DefenderClient(
        settings, Keyring.generate(), registry=CollectorRegistry(), alert_sinks=[]
    ) as stranger:
        stranger.put_sealed(client.layout.active_config("firewall"), b"{}")
    rotated = client.envelope.keyring().with_new_decrypt_only()  # type: ignore[union-attr]
    new_id = next(k for k in rotated.key_ids if k not in client.envelope.keyring().key_ids)  # type: ignore[union-attr]
    with DefenderClient(
        settings, rotated.promote(new_id), registry=CollectorRegistry(), alert_sinks=[]
    ) as c2:
        got: list[Alert] = []
        c2.alerter.add_sink(CallableSink(got.append))
        cs2 = ConfigStore(c2)
        # A snapshot taken before a commit: its CAS loses, the value is re-read and rewrapped.
        stale = c2.store.list_prefix(c2.layout.component_dir("sniffer"))
        configs.commit("sniffer", {**SNIFFER, "snaplen": 100}, by="ops")
        report = cs2.rewrap_values(stale)
        assert report.rewrapped >= 1 and report.failed == 0
        # A value with the magic but a header from a future format version.
        c2.store.put(c2.layout.active_config("rag"), b"\x89DFC\x09" + bytes(20))
        report = cs2.rewrap_all()
        assert report.failed == 2 and report.errors == [
            f"{c2.layout.active_config('firewall')}: UnknownKey",
            f"{c2.layout.active_config('rag')}: UnsupportedFormat",
        ]
        assert [a.kind for a in got] == ["UnknownKey", "UnsupportedFormat"]
        assert cs2.get_active("sniffer").config["snaplen"] == 100


def test_dump_reports_undecryptable_values_without_raising(
    client: DefenderClient, settings: LibrarySettings
) -> None:
    with DefenderClient(
        settings, Keyring.generate(), registry=CollectorRegistry(), alert_sinks=[]
    ) as stranger:
        stranger.put_sealed(client.layout.active_config("rag"), b"{}")
    [entry] = [e for e in client.dump(decrypt=True) if e.sealed]
    assert entry.value is None and entry.error is not None and entry.error.startswith("UnknownKey")
    assert entry.header is not None and entry.header["encrypted"]


def test_alert_sink_regrants_a_lost_lease(client: DefenderClient) -> None:
    sink = EtcdAlertSink(client.store, client.layout, ttl_seconds=600)
    sink.emit(Alert(kind="First", component="rag", detail="one"))
    client.store.revoke_lease(sink._lease_id)  # gone early, e.g. revoked by an operator
    sink.emit(Alert(kind="Second", component="rag", detail="two"))
    stored = client.store.list_prefix(client.layout.component_alerts_dir("rag"))
    assert len(stored) == 1 and b'"Second"' in stored[0].value  # the first went with its lease
    assert (
        stored[0].lease_id not in (0, sink._lease_id)
        or client.store.lease_ttl(stored[0].lease_id) > 0
    )


def test_historical_read_of_a_compacted_revision(
    client: DefenderClient, defender_etcd: EtcdCluster
) -> None:
    configs = ConfigStore(client)
    configs.seed("sniffer", SNIFFER, "sniffer", by="t")
    old = client.store.get(client.layout.active_config("sniffer"))
    assert old is not None
    configs.commit("sniffer", {**SNIFFER, "snaplen": 100}, by="ops")
    rev = client.store.current_revision()
    subprocess.run(
        [str(tool("etcdctl")), f"--endpoints={defender_etcd.endpoints[0]}", "compaction", str(rev)],
        check=True,
        capture_output=True,
    )
    with pytest.raises(StoreError, match="compacted"):
        client.store.get(client.layout.metadata("sniffer"), revision=old.mod_revision)
    # Reading at a compacted revision falls back to the current metadata: it still matches the
    # current ACTIVE, and the version is known.
    active = configs.get_active("sniffer")
    assert active.version == 2
    current = client.store.get(client.layout.active_config("sniffer"))
    assert current is not None
    again = configs._active_from(
        "sniffer", current.value, old.mod_revision, stale=False, final=True
    )
    assert again is not None and again.version == 2
    # The old ACTIVE value against the (fallback) current record is a mismatch: not accepted.
    with pytest.raises(RecordReplayError):
        configs._active_from("sniffer", old.value, old.mod_revision, stale=False, final=True)
