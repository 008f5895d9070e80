"""An attacker with write access to the defender etcd and no key, against the real 3-member etcd:
every attempt to change what a component runs through the plaintext records ends in a typed
refusal, an alert, and the last good config kept, for the library reader and for the agent.
docs/security.md's threat-model table names these tests row by row.

The attacker below uses a bare EtcdStore: raw puts and transactions, no keyring, exactly what
`etcdctl` with write access can do.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from reliability_support import etcd_settings, make_client, new_keyring, write_keyring_file

from defender_agent import AgentSettings
from defender_agent._agent import Agent
from defender_agent._settings import library_settings
from defender_config import (
    ActiveConfig,
    Alert,
    CodecMismatchError,
    ConfigStore,
    ConfigValidationError,
    DefenderClient,
    DefenderConfigError,
    EnvelopeOptions,
    Keyring,
    Layout,
    NotAnEnvelopeError,
    RecordAuthError,
    RecordReplayError,
    Rollouts,
    canonical_json,
    config_digest,
    validate_config,
)
from defender_config._envelope import is_encrypted, is_envelope
from defender_config.store import DeleteOp, EtcdStore, GetOp, PutOp
from defender_devcluster import EtcdCluster, wait_for

pytestmark = pytest.mark.etcd

GOOD: dict[str, Any] = {
    "node_id": "fw-01",
    "version": "1.0.0",
    "default_policy": "deny",
    "rules": [
        {"id": f"r{i}", "action": "allow", "proto": "tcp", "ports": [2000 + i]} for i in range(20)
    ],
}
BETTER: dict[str, Any] = {**GOOD, "rules": GOOD["rules"][:10]}
#: What the attacker wants the firewall to enforce: allow everything, no rules.
EVIL: dict[str, Any] = {
    "node_id": "fw-01",
    "version": "1.0.0",
    "default_policy": "allow",
    "rules": [],
}
PLAIN_POLICY = {"compress": False, "encrypt": False, "level": 3, "threshold_bytes": 256}


@dataclass
class Scene:
    cluster: EtcdCluster
    prefix: str
    keyring: Keyring
    client: DefenderClient
    configs: ConfigStore
    attacker: EtcdStore
    alerts: list[Alert]

    @property
    def layout(self) -> Layout:
        return self.client.layout

    def raw(self, path: str) -> bytes:
        stored = self.attacker.get(path)
        assert stored is not None, path
        return stored.value

    def metadata_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.raw(self.layout.metadata("firewall")))
        return doc

    def forge(self, **puts: bytes | dict[str, Any]) -> None:
        """Write raw records in ONE transaction (the attacker can: write access is enough).
        Keys are leaf names of the firewall component (`metadata`, `active_config`)."""
        ops = []
        for leaf, value in puts.items():
            path = self.layout.component_dir("firewall") + leaf
            data = value if isinstance(value, bytes) else json.dumps(value).encode()
            ops.append(PutOp(path, data))
        assert self.attacker.txn([], ops, []).succeeded

    def downgrade(self, evil: dict[str, Any], *, keep_mac: bool = True) -> None:
        """The measured attack: metadata says "stored in plaintext" with the digest of the
        attacker's config (no secret needed), ACTIVE holds that config as plain JSON."""
        doc = self.metadata_doc()
        doc.update(storage=PLAIN_POLICY, digest=config_digest(evil), version=doc["version"] + 1)
        if not keep_mac:
            doc.pop("auth", None)
        self.forge(metadata=doc, active_config=canonical_json(evil))

    def kinds(self) -> list[str]:
        return [a.kind for a in self.alerts]


@pytest.fixture
def scene(healthy_etcd: EtcdCluster, etcd_prefix: str, alerts: list[Alert]) -> Iterator[Scene]:
    keyring = new_keyring()
    client = make_client(healthy_etcd, etcd_prefix, keyring, alerts, history_limit=5)
    configs = ConfigStore(client)
    configs.seed("firewall", GOOD, "firewall", by="operator")
    attacker = EtcdStore(etcd_settings(healthy_etcd), registry=CollectorRegistry())
    try:
        yield Scene(healthy_etcd, etcd_prefix, keyring, client, configs, attacker, alerts)
    finally:
        attacker.close()
        client.close()


GOOD_N = validate_config("firewall", GOOD)
BETTER_N = validate_config("firewall", BETTER)


# --- read access only -------------------------------------------------------------------------


def test_etcd_read_access_sees_bookkeeping_but_no_config(scene: Scene) -> None:
    """Row "etcd read": every key under the prefix, raw. Records are readable (that is their
    point); no config field appears anywhere; the record MACs are not the key."""
    scene.configs.commit("firewall", BETTER, by="operator")
    scene.configs.freeze("firewall", "look", by="oncall")
    values = scene.attacker.list_prefix(scene.prefix)
    assert len(values) >= 6
    blob = b"\n".join(sv.value for sv in values)
    # A port as the config's JSON writes it: a bare "2001" turns up in key ids made from the
    # clock (k20261206020013-...) and in sequence numbers.
    for secret_field in (b"default_policy", b'"r0"', b"[2001]", b"fw-01"):
        assert secret_field not in blob
    meta = scene.metadata_doc()
    assert meta["version"] == 2 and meta["type"] == "firewall"
    material = scene.keyring.primary.material
    assert material not in blob and material.hex().encode() not in blob


# --- the library reader -----------------------------------------------------------------------


def test_downgrade_attack_is_refused_by_the_library_reader(scene: Scene) -> None:
    """Row "etcd write": plaintext ACTIVE + downgraded metadata -> refused, alerted, kept."""
    seen: list[ActiveConfig] = []
    errors: list[DefenderConfigError] = []
    handle = scene.configs.watch_active("firewall", seen.append, on_error=errors.append)
    try:
        wait_for("initial ACTIVE", lambda: bool(seen), timeout=15)
        scene.downgrade(EVIL)
        wait_for("the watch refuses the forged value", lambda: bool(errors), timeout=15)
    finally:
        handle.cancel()
    # The reader requires encryption by its own settings: the plaintext value is refused.
    assert isinstance(errors[0], NotAnEnvelopeError)
    assert [a.config for a in seen] == [GOOD_N]  # the attacker's config was never delivered
    with pytest.raises(NotAnEnvelopeError):
        scene.configs.get_active("firewall")
    with pytest.raises(RecordAuthError, match="does not match"):
        scene.configs.get_metadata("firewall")
    assert {"NotAnEnvelope", "RecordUnauthenticated"} <= set(scene.kinds())
    assert all(a.component == "firewall" for a in scene.alerts)


def test_downgrade_is_refused_even_where_the_reader_allows_plaintext(scene: Scene) -> None:
    """A reader whose own settings accept firewall unencrypted still needs an authentic
    metadata record whose digest is the value's: the forged record decides nothing."""
    lenient = ConfigStore(scene.client, plaintext_components={"firewall"})
    assert lenient.get_active("firewall").config == GOOD_N
    scene.downgrade(EVIL)
    with pytest.raises(RecordAuthError):
        lenient.get_active("firewall")
    scene.downgrade(EVIL, keep_mac=False)
    with pytest.raises(RecordAuthError, match="carries no MAC"):
        lenient.get_active("firewall")
    assert scene.kinds().count("RecordUnauthenticated") == 2


def test_compression_only_downgrade_is_refused(scene: Scene) -> None:
    """Metadata edited to `compress: false` (encryption kept), alone and put back in the same
    transaction as the current (authentic) ACTIVE bytes."""
    doc = scene.metadata_doc()
    doc["storage"] = {**PLAIN_POLICY, "encrypt": True}
    scene.forge(metadata=doc)
    # ACTIVE is still read with the record written with it: unchanged, version 1.
    active = scene.configs.get_active("firewall")
    assert (active.config, active.version) == (GOOD_N, 1)
    # Writers refuse to build on the forged record.
    with pytest.raises(RecordAuthError):
        scene.configs.commit("firewall", BETTER, by="operator")
    scene.forge(metadata=doc, active_config=scene.raw(scene.layout.active_config("firewall")))
    with pytest.raises(RecordAuthError):
        scene.configs.get_active("firewall")
    assert set(scene.kinds()) == {"RecordUnauthenticated"}


def test_type_swap_to_a_looser_schema_is_refused(scene: Scene) -> None:
    """`type: custom` without a schema would let anything through validation."""
    doc = scene.metadata_doc()
    doc.update(type="custom", json_schema=None)
    scene.forge(metadata=doc, active_config=scene.raw(scene.layout.active_config("firewall")))
    with pytest.raises(RecordAuthError):
        scene.configs.get_active("firewall")
    # A commit that only the looser type would accept is not validated against it.
    bad = {**GOOD, "default_policy": "maybe"}
    with pytest.raises(RecordAuthError):
        scene.configs.commit("firewall", bad, by="operator")
    # After the operator's repair (type from its spec), the firewall model applies again.
    assert scene.configs.repair_metadata(
        "firewall", component_type="firewall", json_schema=None, by="operator"
    )
    with pytest.raises(ConfigValidationError):
        scene.configs.commit("firewall", bad, by="operator")
    meta = scene.configs.get_metadata("firewall")
    assert meta is not None and meta.type == "firewall" and meta.version == 1


def test_forged_freeze_is_ignored(scene: Scene) -> None:
    freeze = scene.layout.freeze("firewall")
    record = {"reason": "attacker", "since": "2026-01-01T00:00:00+00:00"}
    scene.attacker.put(freeze, json.dumps(record).encode())
    assert scene.configs.frozen("firewall") is None
    assert scene.configs.overview("firewall").frozen is None
    assert scene.configs.commit("firewall", BETTER, by="operator") == 2
    assert "RecordUnauthenticated" in scene.kinds()
    # A real freeze, copied (with its MAC) to another component's key, does not verify there.
    scene.configs.seed(
        "sniffer", {"node_id": "s", "version": "1.0.0", "interface": "eth0"}, "sniffer", by="o"
    )
    scene.configs.freeze("firewall", "real", by="oncall")
    scene.attacker.put(scene.layout.freeze("sniffer"), scene.raw(freeze))
    assert scene.configs.frozen("sniffer") is None
    assert scene.configs.frozen("firewall") is not None  # the real one still freezes
    scene.alerts.clear()
    # A marker forged over the real one (MAC kept, reason edited) does not verify either; the
    # commit is not blocked by it (deleting a freeze is possible with write access anyway).
    doc = json.loads(scene.raw(freeze))
    doc["reason"] = "edited"
    scene.attacker.put(freeze, json.dumps(doc).encode())
    assert scene.configs.frozen("firewall") is None
    assert scene.kinds() == ["RecordUnauthenticated"]


def test_replayed_metadata_is_refused(scene: Scene) -> None:
    meta_path = scene.layout.metadata("firewall")
    active_path = scene.layout.active_config("firewall")
    v1_meta, v1_active = scene.raw(meta_path), scene.raw(active_path)
    first = scene.configs.get_active("firewall")
    assert first.version == 1
    first_revision = first.mod_revision
    scene.configs.commit("firewall", BETTER, by="operator")
    v2_active = scene.raw(active_path)
    assert scene.configs.get_active("firewall").version == 2
    # An old read handled late (a watch event for v1 after v2 was accepted) is no replay: etcd
    # gave it an older revision. It is flagged outdated (watches skip it), not alerted.
    old_event = scene.configs._active_from(
        "firewall", v1_active, first_revision, stale=False, final=True
    )
    assert old_event is not None and old_event.outdated and old_event.version == 1
    assert scene.kinds() == []
    # (a) an authentic sealed ACTIVE put back alone: the record of its revision is v2's.
    scene.attacker.put(active_path, v1_active)
    with pytest.raises(RecordReplayError, match="not the config of the metadata"):
        scene.configs.get_active("firewall")
    # (b) the authentic v1 record put back beside the current ACTIVE: not its record.
    scene.forge(metadata=v1_meta, active_config=v2_active)
    with pytest.raises(RecordReplayError, match="not the config of the metadata"):
        scene.configs.get_active("firewall")
    # (c) the authentic v1 pair (record + sealed value) put back together: this reader has
    # accepted version 2 already, so version 1 is a replay.
    scene.forge(metadata=v1_meta, active_config=v1_active)
    with pytest.raises(RecordReplayError, match="older than version 2"):
        scene.configs.get_active("firewall")
    assert scene.kinds().count("RecordReplayed") == 3
    # The operator's pass sees a record older than the newest kept history entry (whose
    # version is bound to its path) and puts version 2 back.
    assert scene.configs.repair_metadata(
        "firewall", component_type="firewall", json_schema=None, by="operator"
    )
    better = validate_config("firewall", BETTER)
    assert ConfigStore(scene.client).get_active("firewall").config == better
    active = scene.configs.get_active("firewall")
    assert (active.version, active.config) == (2, better)
    # Writers never reuse a version number: the next commit passes every reader's mark.
    scene.forge(metadata=v1_meta, active_config=v1_active)
    fewer = {**GOOD, "rules": GOOD["rules"][:5]}
    assert scene.configs.commit("firewall", fewer, by="operator") == 3
    assert scene.configs.get_active("firewall").version == 3


def test_a_record_from_a_plaintext_past_put_back_never_gets_a_write_in_the_clear(
    scene: Scene,
) -> None:
    """The component was stored unencrypted once (spec.storage), then encrypted again; its
    authentic record from then, saved with etcd read access and put back with write access,
    says "unencrypted". A commit, a rollout and a rewrap built on it would follow it and write
    the next config in the clear: they refuse it, or keep the encryption, instead."""
    component, lay = "firewall", scene.layout
    scene.configs.allow_plaintext(component)
    assert scene.configs.set_storage(component, EnvelopeOptions(**PLAIN_POLICY), by="ops")
    plaintext_era = scene.raw(lay.metadata(component))
    assert scene.configs.set_storage(component, EnvelopeOptions(), by="ops")
    scene.configs.allow_plaintext(component, False)
    scene.configs.commit(component, BETTER, by="operator")
    scene.attacker.put(lay.metadata(component), plaintext_era)

    writer = ConfigStore(scene.client)  # a key holder that saw nothing before (rag, say)
    fewer = {**GOOD, "rules": GOOD["rules"][:3]}
    with pytest.raises(RecordReplayError, match="says unencrypted but ACTIVE is encrypted"):
        writer.commit(component, fewer, by="rag")
    with pytest.raises(RecordReplayError, match="says unencrypted but ACTIVE is encrypted"):
        Rollouts(writer).start(component, fewer, ["fw-0"], by="ops")
    assert scene.kinds().count("RecordReplayed") == 2
    report = writer.rewrap_all()
    assert report.failed == 0
    values = scene.attacker.list_prefix(lay.component_dir(component))
    sealed = [sv for sv in values if is_envelope(sv.value)]
    assert sealed and all(is_encrypted(sv.value) for sv in sealed), [sv.key for sv in sealed]
    assert scene.attacker.get(lay.candidate(component)) is None
    blob = b"\n".join(sv.value for sv in values)
    assert b"default_policy" not in blob and b"fw-01" not in blob


def test_deleted_mac_is_refused(scene: Scene) -> None:
    doc = scene.metadata_doc()
    del doc["auth"]
    scene.forge(metadata=doc, active_config=scene.raw(scene.layout.active_config("firewall")))
    with pytest.raises(RecordAuthError, match="carries no MAC"):
        scene.configs.get_active("firewall")
    with pytest.raises(RecordAuthError, match="carries no MAC"):
        scene.configs.overview("firewall")
    # The record deleted in the same transaction as ACTIVE is put back.
    active_path = scene.layout.active_config("firewall")
    ops: list[PutOp | DeleteOp | GetOp] = [
        DeleteOp(scene.layout.metadata("firewall")),
        PutOp(active_path, scene.raw(active_path)),
    ]
    assert scene.attacker.txn([], ops, []).succeeded
    with pytest.raises(RecordAuthError, match="missing"):
        scene.configs.get_active("firewall")
    assert set(scene.kinds()) == {"RecordUnauthenticated"}


# --- the operator's repair pass (migration of records written before they were signed) -------


def test_unsigned_records_from_before_are_resigned_by_the_operator_pass(scene: Scene) -> None:
    """Records written before this change have no `auth`: readers refuse them until the
    operator's next pass re-signs them from what is authenticated (the newest history entry,
    whose version is in its AEAD-bound path) and the spec's type and schema."""
    meta_path = scene.layout.metadata("firewall")
    scene.configs.commit("firewall", BETTER, by="operator")
    legacy = scene.metadata_doc()
    del legacy["auth"]
    scene.attacker.put(meta_path, json.dumps(legacy, sort_keys=True).encode())
    with pytest.raises(RecordAuthError):
        scene.configs.get_metadata("firewall")
    assert scene.configs.repair_metadata(
        "firewall", component_type="firewall", json_schema=None, by="operator"
    )
    assert not scene.configs.repair_metadata(
        "firewall", component_type="firewall", json_schema=None, by="operator"
    )
    fresh = ConfigStore(scene.client)
    active = fresh.get_active("firewall")
    assert (active.version, active.config) == (2, validate_config("firewall", BETTER))
    assert "MetadataResigned" in scene.kinds()


def test_operator_pass_restores_the_last_good_config_after_the_attack(scene: Scene) -> None:
    scene.configs.commit("firewall", BETTER, by="operator")
    scene.downgrade(EVIL)
    assert scene.configs.repair_metadata(
        "firewall", component_type="firewall", json_schema=None, by="operator"
    )
    active = ConfigStore(scene.client).get_active("firewall")
    assert (active.version, active.config) == (2, validate_config("firewall", BETTER))
    header = scene.raw(scene.layout.active_config("firewall"))
    assert header[:4] == b"\x89DFC"  # sealed again
    meta = scene.configs.get_metadata("firewall")
    assert meta is not None and meta.storage is None  # the forged downgrade was not carried


def test_plaintext_component_is_resigned_only_against_the_spec_digest(scene: Scene) -> None:
    plain = EnvelopeOptions(compress=False, encrypt=False)
    configs = ConfigStore(scene.client, plaintext_components={"rag"})
    rag = {"node_id": "rag-01", "version": "1.0.0"}
    configs.seed("rag", rag, "rag", by="operator", options=plain)
    path = scene.layout.metadata("rag")
    doc = json.loads(scene.raw(path))
    del doc["auth"]
    scene.attacker.put(path, json.dumps(doc).encode())
    # Nothing of a plaintext component is authenticated but the record: the operator's spec
    # digest is needed to re-sign it.
    with pytest.raises(RecordAuthError, match="stored unencrypted"):
        configs.repair_metadata("rag", component_type="rag", json_schema=None, by="operator")
    spec_digest = config_digest(validate_config("rag", rag))
    assert configs.repair_metadata(
        "rag", component_type="rag", json_schema=None, by="operator", trusted_digest=spec_digest
    )
    assert configs.get_active("rag").version == 1


# --- rotation covers the MAC'd records ----------------------------------------------------------


def test_rotation_resigns_control_records(scene: Scene) -> None:
    scene.configs.freeze("firewall", "during rotation", by="oncall")
    staged = scene.keyring.with_new_decrypt_only()
    new_id = next(k for k in staged.key_ids if k != scene.keyring.primary.key_id)
    old_id = scene.keyring.primary.key_id
    rotated = staged.promote(new_id)
    with make_client(scene.cluster, scene.prefix, rotated) as c2:
        report = ConfigStore(c2).rewrap_all()
        assert report.failed == 0
        for leaf in ("metadata",):
            kid = json.loads(scene.raw(scene.layout.component_dir("firewall") + leaf))["auth"][
                "kid"
            ]
            assert kid == new_id
        assert json.loads(scene.raw(scene.layout.freeze("firewall")))["auth"]["kid"] == new_id
    # The old key retired: records still verify (they were re-signed), configs still open.
    retired = rotated.retire(old_id)
    with make_client(scene.cluster, scene.prefix, retired) as c3:
        cs = ConfigStore(c3)
        assert cs.get_active("firewall").config == GOOD_N
        assert cs.frozen("firewall") is not None


# --- the agent --------------------------------------------------------------------------------


@dataclass
class RunningAgent:
    agent: Agent
    thread: threading.Thread
    output: Path

    def content(self) -> dict[str, Any] | None:
        if not self.output.exists():
            return None
        data: dict[str, Any] = json.loads(self.output.read_bytes())
        return data

    def wait_refused(self, reason: str) -> None:
        """Until the agent reports `reason` as its last error (heartbeat `last_error`)."""

        def reported() -> bool:
            error = self.agent.applier.last_error
            return error is not None and error.reason == reason

        wait_for(f"the agent to refuse with {reason}", reported, timeout=30)


@pytest.fixture
def agent(scene: Scene, tmp_path: Path) -> Iterator[RunningAgent]:
    keyring_file = tmp_path / "keyring" / "keyring.json"
    keyring_file.parent.mkdir()
    write_keyring_file(keyring_file, scene.keyring)
    settings = AgentSettings(
        component="firewall",
        instance="fw-pod-1",
        output_path=tmp_path / "shared" / "firewall.json",
        reload_method="none",
        etcd_endpoints=scene.cluster.endpoints,
        prefix=scene.prefix.rstrip("/"),
        keyring_path=keyring_file.parent,
        heartbeat_interval_seconds=1.0,
    )
    (tmp_path / "shared").mkdir()
    running = Agent(settings, library_settings(settings))
    thread = threading.Thread(target=running.run, name="agent-under-attack", daemon=True)
    thread.start()
    ra = RunningAgent(running, thread, settings.output_path)
    try:
        yield ra
    finally:
        running.stop()
        thread.join(timeout=30)


def _agent_alerts(scene: Scene) -> list[dict[str, Any]]:
    prefix = scene.layout.component_alerts_dir("firewall")
    return [json.loads(sv.value) for sv in scene.attacker.list_prefix(prefix)]


def test_downgrade_attack_is_refused_by_the_agent(scene: Scene, agent: RunningAgent) -> None:
    """The measured attack against a running defender-agent: its file keeps the last good
    config, its heartbeat carries the typed error, and an alert is stored for rag."""
    wait_for("the agent writes the good config", lambda: agent.content() == GOOD_N, timeout=30)
    scene.downgrade(EVIL)
    agent.wait_refused("NotAnEnvelope")
    assert agent.content() == GOOD_N
    assert any(
        a["kind"] == "NotAnEnvelope" and a.get("instance") == "fw-pod-1"
        for a in _agent_alerts(scene)
    )
    # Same attack with an encrypted-looking but unencrypted envelope (the old "unencrypted
    # value" path): CodecMismatch, still nothing written.
    doc = scene.metadata_doc()
    unencrypted = scene.client.seal(
        scene.layout.active_config("firewall"),
        canonical_json(EVIL),
        EnvelopeOptions(encrypt=False),
    )
    scene.forge(metadata=doc, active_config=unencrypted)
    agent.wait_refused("CodecMismatch")
    assert agent.content() == GOOD_N
    # The operator's pass repairs; the next real commit reaches the file.
    scene.configs.repair_metadata("firewall", component_type="firewall", json_schema=None, by="op")
    scene.configs.commit("firewall", BETTER, by="operator")
    wait_for("the next real commit is applied", lambda: agent.content() == BETTER_N, timeout=30)


def test_forged_metadata_and_replay_do_not_reach_the_agent_file(
    scene: Scene, agent: RunningAgent
) -> None:
    wait_for("the agent writes the good config", lambda: agent.content() == GOOD_N, timeout=30)
    active_path = scene.layout.active_config("firewall")
    old_meta = scene.raw(scene.layout.metadata("firewall"))
    old_active = scene.raw(active_path)
    scene.configs.commit("firewall", BETTER, by="operator")
    wait_for("version 2 applied", lambda: agent.content() == BETTER_N, timeout=30)
    applier = agent.agent.applier
    # Type swapped to custom (no schema) beside the current ACTIVE bytes.
    doc = scene.metadata_doc()
    doc.update(type="custom", json_schema=None)
    scene.forge(metadata=doc, active_config=scene.raw(active_path))
    agent.wait_refused("RecordUnauthenticated")
    # The authentic version-1 pair replayed: older than what the agent accepted.
    scene.forge(metadata=old_meta, active_config=old_active)
    agent.wait_refused("RecordReplayed")
    assert agent.content() == BETTER_N
    assert applier.config_version == 2
    kinds = {a["kind"] for a in _agent_alerts(scene) if a.get("instance") == "fw-pod-1"}
    assert {"RecordUnauthenticated", "RecordReplayed"} <= kinds


def test_reader_without_plaintext_setting_refuses_a_plaintext_component(scene: Scene) -> None:
    """The deliberately plaintext component works only for readers whose settings list it."""
    plain = EnvelopeOptions(compress=False, encrypt=False)
    writer = ConfigStore(scene.client, plaintext_components={"rag"})
    writer.seed("rag", {"node_id": "rag-01", "version": "1.0.0"}, "rag", by="op", options=plain)
    with pytest.raises(NotAnEnvelopeError):
        ConfigStore(scene.client).get_active("rag")
    assert writer.get_active("rag").version == 1
    with pytest.raises(CodecMismatchError):
        # compressed but unencrypted envelope of an encrypted component
        scene.attacker.put(
            scene.layout.master_config("firewall"),
            scene.client.seal(
                scene.layout.master_config("firewall"),
                canonical_json(EVIL),
                EnvelopeOptions(encrypt=False, threshold_bytes=0),
            ),
        )
        scene.configs.get_master("firewall")


# --- the operator's backend -------------------------------------------------------------------


def test_operator_backend_resigns_on_its_next_pass(scene: Scene) -> None:
    """Row "etcd write", operator side: the operator never builds on a forged record; once a
    reconcile declared the spec, its next pass (a monitor's `state`) re-signs the record from
    the authenticated history; a plaintext spec is what lets it read that component."""
    from defender_operator._api import StorageSpec
    from defender_operator._keys import MutableKeyringSource
    from defender_operator._library_backend import LibraryBackend
    from defender_operator._reconcile import storage_policy

    backend = LibraryBackend(
        scene.client.settings, MutableKeyringSource(scene.keyring), identity="reliability"
    )
    try:
        doc = scene.metadata_doc()
        doc["type"] = "custom"  # looser validation, MAC kept: does not verify
        scene.forge(metadata=doc)
        with pytest.raises(RecordAuthError):
            backend.state("firewall")  # nothing declared yet: refused, not obeyed
        encrypted = storage_policy(StorageSpec())
        assert backend.declare(
            "firewall",
            "firewall",
            json_schema=None,
            storage=encrypted,
            digest=config_digest(GOOD_N),
            modified_by="operator:reliability",
        ).resigned
        scene.forge(metadata={**doc, "type": "rag"})
        state = backend.state("firewall")  # the monitor's pass re-signs
        assert state.active_version == 1 and state.active_digest == config_digest(GOOD_N)
        meta = scene.configs.get_metadata("firewall")
        assert meta is not None and meta.type == "firewall"
        # A sealed value (here: ACTIVE's own) put where the record belongs is no record
        # either: re-signed the same way, not an error at every pass.
        scene.forge(metadata=scene.raw(scene.layout.active_config("firewall")))
        state = backend.state("firewall")
        assert state.active_version == 1 and state.active_digest == config_digest(GOOD_N)
        meta = scene.configs.get_metadata("firewall")
        assert meta is not None and meta.type == "firewall"
        # A component stored unencrypted: readable by the operator only once its spec says so.
        plain = EnvelopeOptions(compress=False, encrypt=False)
        rag = {"node_id": "rag-01", "version": "1.0.0"}
        ConfigStore(scene.client, plaintext_components={"rag"}).seed(
            "rag", rag, "rag", by="op", options=plain
        )
        with pytest.raises(NotAnEnvelopeError):
            backend.state("rag")
        backend.declare_storage(
            "rag",
            storage_policy(
                StorageSpec.model_validate(
                    {"compression": {"enabled": False}, "encryption": {"enabled": False}}
                )
            ),
        )
        assert backend.state("rag").active_version == 1
    finally:
        backend.close()
