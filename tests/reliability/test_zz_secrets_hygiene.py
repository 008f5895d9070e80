"""Secrets hygiene: no key material, in any encoding, anywhere the suites left traces.

Collected last in this folder (the name) so it also searches what the other reliability suites
of the same session produced: every log record (root logger at DEBUG, structured extras
included), texts they registered (API server refusals), the logs of the etcd members, and every
raw etcd key and value under every prefix they wrote. Run alone, it still checks its own
workload, which goes through every path that handles keys: sealing, a keyring file reload and a
broken reload, rotation, wrong-key and tampered reads (alerts to logs and etcd), heartbeats with
fingerprints, reprs and error messages.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from reliability_support import (
    HYGIENE,
    encodings,
    etcd_settings,
    make_client,
    new_keyring,
    search,
    write_keyring_file,
)

from defender_config import (
    Alert,
    ConfigStore,
    EnvelopeError,
    EtcdAlertSink,
    Heartbeater,
    KeyringError,
    KeyringSource,
    StaticKeyringSource,
)
from defender_config.store import EtcdStore
from defender_devcluster import EtcdCluster

pytestmark = pytest.mark.etcd

FIREWALL = {"node_id": "fw-01", "version": "1.0.0", "default_policy": "deny", "rules": []}


def workload(cluster: EtcdCluster, prefix: str, tmp_path: Path, alerts: list[Alert]) -> list[str]:
    """Exercise every key-handling path; returns the texts it produced outside the logs."""
    texts: list[str] = []
    file = tmp_path / "keyring.json"
    keyring = new_keyring()
    write_keyring_file(file, keyring)
    source = KeyringSource(file, poll_seconds=0.01)
    client = make_client(cluster, prefix, source, alerts, instance="hygiene-0")
    client.alerter.add_sink(EtcdAlertSink(client.store, client.layout, ttl_seconds=600))
    try:
        configs = ConfigStore(client)
        configs.seed("firewall", FIREWALL, "firewall", by="hygiene")
        beat = Heartbeater(client, "firewall", "hygiene-0", interval_seconds=1).start()
        # Rotation: a new decrypt-only key, promoted, everything rewrapped.
        staged = keyring.with_new_decrypt_only()
        write_keyring_file(file, staged)
        source.refresh()
        promoted = staged.promote(staged.keys[-1].key_id)
        write_keyring_file(file, promoted)
        source.refresh()
        beat.refresh_key_fields()
        configs.commit("firewall", {**FIREWALL, "default_policy": "allow"}, by="hygiene")
        configs.rewrap_all()
        # A broken Secret update: logged, the last good keyring is kept.
        file.write_text('{"version": 1, "keys": [{"id": "x", "material": "%%%"}]}')
        source.refresh()
        assert source.last_error is not None
        texts.append(str(source.last_error))
        # A component holding the wrong key, and a tampered value: both alerted.
        stranger = make_client(cluster, prefix, StaticKeyringSource(new_keyring()), alerts)
        try:
            with pytest.raises(EnvelopeError) as wrong:
                ConfigStore(stranger).get_active("firewall")
            texts += [str(wrong.value), repr(wrong.value)]
        finally:
            stranger.close()
        path = client.layout.active_config("firewall")
        stored = client.store.get(path)
        assert stored is not None
        client.store.put(path, stored.value[:-1] + bytes([stored.value[-1] ^ 1]))
        with pytest.raises(EnvelopeError) as tampered:
            configs.get_active("firewall")
        texts += [str(tampered.value), repr(tampered.value)]
        with pytest.raises(KeyringError) as bad_ring:
            promoted.retire(promoted.primary.key_id)
        texts.append(str(bad_ring.value))
        texts += [repr(x) for x in (keyring, promoted, *promoted, source, client, client.envelope)]
        texts += [str(x) for x in (*promoted, beat.record.model_dump_json())]
        beat.stop()
    finally:
        client.close()
    return texts


def test_no_key_material_anywhere(
    healthy_etcd: EtcdCluster, etcd_prefix: str, tmp_path: Path, alerts: list[Alert]
) -> None:
    texts = workload(healthy_etcd, etcd_prefix, tmp_path, alerts)
    assert {a.kind for a in alerts} >= {"UnknownKey", "AuthenticationFailed"}
    keys = list(HYGIENE.keys)
    assert len(keys) >= 3

    # The search is live: the Secret form of a keyring holds its material (base64), and every
    # encoding is found inside other text.
    control = new_keyring()
    assert "key #0 as base64" in search(control.to_json(), [control.primary.material])
    for name, needle in encodings(keys[0]).items():
        assert search(b"prefix " + needle + b" suffix", keys[:1]), name

    # The ledger is live: a debug record with structured extras from any logger lands in it.
    sentinel = f"hygiene-sentinel-{len(HYGIENE.log_lines)}"
    logging.getLogger("defender_config.anything").debug("%s", "x", extra={"probe": sentinel})
    assert any(sentinel in line for line in HYGIENE.log_lines)

    findings: list[str] = []
    log_text = "\n".join(HYGIENE.log_lines).encode()
    assert len(HYGIENE.log_lines) > 5, "the ledger saw too few log lines to mean anything"
    findings += [f"log: {h}" for h in search(log_text, keys)]
    findings += [f"text {i}: {h}" for i, t in enumerate(texts) for h in search(t.encode(), keys)]
    for label, data in HYGIENE.texts.items():
        findings += [f"{label}: {h}" for h in search(data, keys)]
    for log_file in sorted(HYGIENE.log_files):
        if log_file.exists():
            findings += [f"{log_file.name}: {h}" for h in search(log_file.read_bytes(), keys)]

    scanned = 0
    with EtcdStore(etcd_settings(healthy_etcd), registry=CollectorRegistry()) as store:
        for prefix in sorted(HYGIENE.prefixes):
            for sv in store.list_prefix(prefix):
                scanned += 1
                for h in search(sv.key.encode() + b"\0" + sv.value, keys):
                    findings.append(f"etcd {sv.key}: {h}")
    assert scanned > 5, "no etcd values were searched"
    assert findings == [], findings[:10]
