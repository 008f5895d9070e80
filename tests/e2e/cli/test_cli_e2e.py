"""`kubectl defender` commands against real etcd: what they print, as tables and as JSON."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cli_e2e_support import Store

from defender_config import ComponentStatus, Rollouts, UnknownKeyError

pytestmark = pytest.mark.etcd

DETECTOR = {"ddos": {"threshold": 0.8}, "ransomware": {"enabled": True}, "interval": 5}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def register(store: Store, component: str, instance: str, node: str = "node-a") -> Any:
    reg = store.registry.register(
        component,
        instance,
        DETECTOR,
        "custom",
        json_schema={"type": "object"},
        pod=f"{component}-{instance}",
        node_id=node,
        software_version="1.0.0",
        interval_seconds=30,
    )
    store.heartbeaters.append(reg.heartbeater)
    reg.heartbeater.set_status(ComponentStatus.RUNNING)
    # The heartbeat carrying RUNNING is written by the heartbeater's thread: wait for it so
    # every test sees one settled state.
    deadline = time.monotonic() + 15
    while not any(
        hb.instance == instance and hb.status is ComponentStatus.RUNNING
        for hb in store.registry.list_instances(component)
    ):
        assert time.monotonic() < deadline, f"{component}/{instance} never reported RUNNING"
        time.sleep(0.05)
    return reg


# ------------------------------------------------------------------------------------- status


def test_status_lists_components_instances_and_alerts(store: Store) -> None:
    register(store, "ml-detector", "detector-01")
    register(store, "ml-detector", "detector-02", node="node-b")
    register(store, "firewall", "fw-01")
    store.client.report(UnknownKeyError("k-old", ["k-new"]), component="firewall")

    result = store.cli("status", "-o", "json")
    assert result.code == 0, result.err
    data = result.json()
    by_name = {c["name"]: c for c in data["components"]}
    assert set(by_name) == {"ml-detector", "firewall"}
    detector = by_name["ml-detector"]
    assert detector["activeVersion"] == 1
    assert [i["instance"] for i in detector["instances"]] == ["detector-01", "detector-02"]
    assert {i["node"] for i in detector["instances"]} == {"node-a", "node-b"}
    assert all(0 <= i["heartbeatAgeSeconds"] < 60 for i in detector["instances"])
    assert detector["instances"][0]["softwareVersion"] == "1.0.0"
    assert by_name["firewall"]["alerts"] == 1 and detector["alerts"] == 0

    table = store.cli("status")
    assert table.code == 0
    lines = table.out.splitlines()
    assert lines[0].split()[:4] == ["COMPONENT", "TYPE", "STATUS", "VERSION"]
    assert any(ln.split()[:2] == ["firewall", "custom"] for ln in lines)
    assert "detector-02" in table.out and "node-b" in table.out
    assert not ANSI.search(table.out), "plain text when not a terminal"


def test_status_colours_on_a_terminal_only(store: Store) -> None:
    register(store, "sniffer", "sniffer-01")
    coloured = store.cli("status", colour=True).out
    assert "\x1b[32mRUNNING\x1b[0m" in coloured
    # Same text without the colour codes. Ages, etcd's DB sizes and revisions may move
    # between the two runs (heartbeats, etcd's own bookkeeping): left out of the comparison.

    def words(text: str) -> list[str]:
        return [w for w in text.split() if not re.fullmatch(r"\d+s|\d+(\.\d+)?[KMG]?iB|\d+", w)]

    assert words(ANSI.sub("", coloured)) == words(store.cli("status").out)


def test_status_of_an_unknown_component_says_what_to_check(store: Store) -> None:
    register(store, "sniffer", "sniffer-01")
    result = store.cli("status", "snifer")
    assert result.code == 2
    assert "'snifer' is not registered" in result.err and "--prefix" in result.err


def _wait_digest(store: Store, component: str, instance: str, digest: str) -> None:
    deadline = time.monotonic() + 15
    while not any(
        hb.instance == instance and hb.config_digest == digest
        for hb in store.registry.list_instances(component)
    ):
        assert time.monotonic() < deadline, f"{instance} never reported {digest[:12]}"
        time.sleep(0.05)


def test_status_shows_a_canary_rollout_and_the_freeze_after_its_abort(store: Store) -> None:
    canary = register(store, "ml-detector", "detector-01")
    register(store, "ml-detector", "detector-02", node="node-b")
    rollouts = Rollouts(store.configs)
    record = rollouts.start("ml-detector", {**DETECTOR, "interval": 10}, ["detector-01"], "alice")
    canary.heartbeater.update(config_version=record.version, config_digest=record.digest)
    _wait_digest(store, "ml-detector", "detector-01", record.digest)

    data = store.cli("status", "-o", "json", keyring=True).json()
    (component,) = data["components"]
    rollout = component["rollout"]
    assert (rollout["phase"], rollout["version"], rollout["baseVersion"]) == ("Progressing", 2, 1)
    assert (rollout["canaries"], rollout["adopted"]) == (["detector-01"], ["detector-01"])
    assert (rollout["by"], rollout["verified"]) == ("alice", True)
    assert component["frozen"] is None

    table = store.cli("status", keyring=True).out
    assert "Progressing v2 1/1" in table
    assert re.search(
        r"ml-detector\s+Progressing\s+1 -> 2\s+1/1\s+detector-01\s+\d+s\s+alice", table
    )
    assert re.search(r"detector-01 .*2 \(canary\)", table)
    assert "behind" not in table
    # Without a keyring the record cannot be checked: shown, but said so.
    assert "Progressing (unverified)" in store.cli("status").out

    # A record someone wrote into etcd without the key is not shown as a rollout.
    path = store.client.layout.rollout("ml-detector")
    forged = json.dumps({**record.model_dump(mode="json"), "canaries": ["detector-02"]})
    store.client.store.put(path, forged.encode())
    forged_view = store.cli("status", "-o", "json", keyring=True).json()
    assert forged_view["components"][0]["rollout"]["phase"] == "Unreadable"
    assert "Unreadable" in store.cli("status", keyring=True).out

    # An abort ends the rollout and freezes commits: status says so, and why.
    store.client.store.put(path, store.client.encode_record(path, record.model_dump(mode="json")))
    rollouts.abort("ml-detector", "canary of version 2 failed (detector-01: heartbeat lost)", "op")
    after = store.cli("status", "-o", "json", keyring=True).json()["components"][0]
    assert after["rollout"] is None
    assert after["frozen"]["reason"].startswith("canary of version 2 failed")
    table = store.cli("status", keyring=True).out
    assert "ml-detector: commits frozen for" in table
    assert "by op: canary of version 2 failed (detector-01: heartbeat lost)" in table


def test_status_of_an_empty_store(store: Store) -> None:
    result = store.cli("status")
    assert result.code == 0
    assert f"No components registered under {store.prefix}/components/" in result.out


def test_status_when_etcd_is_unreachable(store: Store) -> None:
    out = store.cli("status", endpoints=["http://127.0.0.1:1"])
    assert out.code == 2
    assert "etcd is unavailable" in out.err and "--etcd-endpoints" in out.err


# ------------------------------------------------------------------------------------- diff


def test_diff_shows_what_active_changed(store: Store) -> None:
    register(store, "ml-detector", "detector-01")
    same = store.cli("diff", "ml-detector", keyring=True)
    assert same.code == 0 and "equals MASTER" in same.out
    changed = {**DETECTOR, "interval": 10}
    store.configs.commit("ml-detector", changed, by="rag")
    result = store.cli("diff", "ml-detector", keyring=True)
    assert result.code == 1, result.err
    assert '-  "interval": 5' in result.out and '+  "interval": 10' in result.out
    assert "active_config (version 2)" in result.out
    data = store.cli("diff", "ml-detector", "-o", "json", keyring=True).json()
    assert data["identical"] is False and data["activeVersion"] == 2
    coloured = store.cli("diff", "ml-detector", keyring=True, colour=True).out
    assert '\x1b[32m+  "interval": 10,\x1b[0m' in coloured


def test_diff_needs_a_keyring(store: Store) -> None:
    register(store, "ml-detector", "detector-01")
    result = store.cli("diff", "ml-detector")
    assert result.code == 2 and "--keyring PATH" in result.err


def test_diff_with_the_wrong_key_names_the_reason(store: Store, tmp_path: Any) -> None:
    from defender_config import Keyring

    register(store, "ml-detector", "detector-01")
    wrong = tmp_path / "wrong.json"
    wrong.write_bytes(Keyring.generate().to_json())
    result = store.cli("diff", "ml-detector", "--keyring", str(wrong))
    assert result.code == 2
    assert "UnknownKey" in result.err and "troubleshooting.md#unknownkey" in result.err
    # A look with the wrong key must not raise alerts in the store.
    assert store.cli("alerts", "-o", "json").json() == []


# ------------------------------------------------------------------------------------- history


def test_history_lists_versions_and_shows_one(store: Store) -> None:
    register(store, "rag", "rag-01")
    store.configs.commit("rag", {**DETECTOR, "interval": 7}, by="rag")
    plain = store.cli("history", "rag", "-o", "json")
    assert plain.code == 0, plain.err
    data = plain.json()
    assert [v["version"] for v in data["versions"]] == [1, 2]
    assert data["activeVersion"] == 2 and data["versions"][1]["active"] is True
    assert data["versions"][0]["keyId"] == store.keyring.primary.key_id
    assert data["versions"][1]["modifiedBy"] == "rag"  # who wrote each kept version
    assert "digest" not in data["versions"][0], "no keyring, no decryption"
    with_keys = store.cli("history", "rag", "-o", "json", keyring=True).json()
    assert all(len(v["digest"]) == 64 for v in with_keys["versions"])
    shown = store.cli("history", "rag", "--show", "1", keyring=True)
    assert json.loads(shown.out) == DETECTOR
    missing = store.cli("history", "rag", "--show", "9", keyring=True)
    assert missing.code == 2 and "keeps no version 9 (kept: 1, 2)" in missing.err
    table = store.cli("history", "rag").out
    assert "ACTIVE is version 2" in table and "active" in table.splitlines()[2]


def test_history_never_vouches_for_an_author_forged_in_etcd(store: Store) -> None:
    """docs/security.md, "Who changed a config": `kubectl defender history` names who changed
    a config. Someone with etcd write access edits the metadata record's `modified_by` and
    `authors` (its MAC left as it was): with a keyring the record is refused, never shown;
    without one it is shown as stored and the output says it was not verified."""
    register(store, "rag", "rag-01")
    store.configs.commit("rag", {**DETECTOR, "interval": 7}, by="alice")
    path = store.client.layout.metadata("rag")
    stored = store.client.store.get(path)
    assert stored is not None
    doc = json.loads(stored.value)
    assert doc["modified_by"] == "alice" and doc["authors"]["2"] == "alice"
    doc["modified_by"] = doc["authors"]["2"] = "mallory"
    store.client.store.put(path, json.dumps(doc).encode())

    checked = store.cli("history", "rag", keyring=True)
    assert checked.code != 0
    assert "RecordUnauthenticated" in checked.err or "MAC" in checked.err, checked.err
    assert "mallory" not in checked.out + checked.err
    checked_json = store.cli("history", "rag", "-o", "json", keyring=True)
    assert checked_json.code != 0 and "mallory" not in checked_json.out
    status = store.cli("status", "-o", "json", keyring=True)
    assert "mallory" not in status.out, status.out

    unchecked = store.cli("history", "rag", "-o", "json")
    assert unchecked.code == 0, unchecked.err
    assert unchecked.json()["verified"] is False
    table = store.cli("history", "rag").out
    assert "mallory" in table and "not verified" in table
    # The authentic record, read with the keyring, says so.
    store.client.store.put(path, stored.value)
    verified = store.cli("history", "rag", "-o", "json", keyring=True).json()
    assert verified["verified"] is True and verified["modifiedBy"] == "alice"
    assert "not verified" not in store.cli("history", "rag", keyring=True).out


def test_history_of_an_unknown_component(store: Store) -> None:
    result = store.cli("history", "nothing")
    assert result.code == 2 and "has no metadata" in result.err


# ------------------------------------------------------------------------------------- rollback


def test_rollback_direct_restores_master(store: Store) -> None:
    register(store, "firewall", "fw-01")
    store.configs.commit("firewall", {**DETECTOR, "interval": 99}, by="rag")
    result = store.cli("rollback", "firewall", "--direct", keyring=True)
    assert result.code == 0, result.err
    assert "ACTIVE is now version 3" in result.out
    assert store.configs.get_active("firewall").config == DETECTOR
    assert store.configs.get_metadata("firewall").modified_by.startswith("kubectl-defender")


def test_rollback_to_a_version_and_bad_targets(store: Store) -> None:
    register(store, "firewall", "fw-01")
    store.configs.commit("firewall", {**DETECTOR, "interval": 2}, by="rag")
    store.configs.commit("firewall", {**DETECTOR, "interval": 3}, by="rag")
    ok = store.cli("rollback", "firewall", "--to", "2", "--direct", "-o", "json", keyring=True)
    assert ok.json()["activeVersion"] == 4
    assert store.configs.get_active("firewall").config["interval"] == 2
    with pytest.raises(SystemExit):
        store.cli("rollback", "firewall", "--to", "yesterday", "--direct", keyring=True)
    needs = store.cli("rollback", "firewall", "--direct")
    assert needs.code == 2 and "rollback --direct decrypts" in needs.err


# ------------------------------------------------------------------------------------- alerts


def test_alerts_newest_first_filtered_and_limited(store: Store) -> None:
    register(store, "sniffer", "sniffer-01")
    store.client.report(UnknownKeyError("k1", ["k2"]), component="sniffer")
    store.client.alerter.event("RollbackDone", "firewall", "rolled back to master")
    all_alerts = store.cli("alerts", "-o", "json").json()
    assert [a["kind"] for a in all_alerts] == ["RollbackDone", "UnknownKey"]
    assert store.cli("alerts", "sniffer", "-o", "json").json()[0]["component"] == "sniffer"
    assert len(store.cli("alerts", "--limit", "1", "-o", "json").json()) == 1
    table = store.cli("alerts").out
    assert table.splitlines()[0].split() == ["AGE", "COMPONENT", "KIND", "INSTANCE", "DETAIL"]
    assert "sealed with key 'k1'" in table
    assert store.cli("alerts", "--since", "1s").code == 0


def test_alerts_reject_a_bad_duration(store: Store) -> None:
    with pytest.raises(SystemExit):
        store.cli("alerts", "--since", "yesterday")


# ------------------------------------------------------------------------------------- dump


def test_dump_keeps_sealed_values_sealed_without_decrypt(store: Store) -> None:
    register(store, "ml-detector", "detector-01")
    entries = store.cli("dump", "-o", "json").json()
    by_key = {e["key"]: e for e in entries}
    master = by_key[f"{store.prefix}/components/ml-detector/master_config"]
    assert master["sealed"] is True and master["value"] is None
    assert master["header"]["key_id"] == store.keyring.primary.key_id
    meta = by_key[f"{store.prefix}/components/ml-detector/metadata"]
    assert meta["sealed"] is False and meta["value"]["version"] == 1
    table = store.cli("dump").out
    assert "<sealed key=" in table and "ransomware" not in table


def test_dump_decrypts_only_when_asked_with_a_keyring(store: Store) -> None:
    register(store, "ml-detector", "detector-01")
    refused = store.cli("dump", "--decrypt")
    assert refused.code == 2 and "dump --decrypt decrypts configs" in refused.err
    opened = store.cli("dump", "components/ml-detector", "--decrypt", "-o", "json", keyring=True)
    assert opened.code == 0, opened.err
    by_key = {e["key"]: e for e in opened.json()}
    master = by_key[f"{store.prefix}/components/ml-detector/master_config"]
    assert master["value"] == DETECTOR
    assert all(
        e["key"].startswith(f"{store.prefix}/components/ml-detector/") for e in opened.json()
    )


def test_no_key_material_in_any_output(store: Store) -> None:
    register(store, "ml-detector", "detector-01")
    secret = store.keyring.primary.material
    forms = {secret.hex(), base64.b64encode(secret).decode()}
    for args in (["status"], ["dump", "--decrypt"], ["history", "ml-detector"], ["alerts"]):
        for output in ("table", "json"):
            result = store.cli(*args, "-o", output, keyring=True)
            assert not any(f in result.out + result.err for f in forms), args


# ------------------------------------------------------------------------------------- plugin


def test_console_script_runs_as_a_kubectl_plugin(store: Store) -> None:
    register(store, "sniffer", "sniffer-01")
    exe = Path(sys.executable).with_name("kubectl-defender")
    assert exe.is_file(), "pip install -e . installs the kubectl-defender script"
    proc = subprocess.run(
        [str(exe), "status", *store.flags()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "sniffer" in proc.stdout and "\x1b[" not in proc.stdout
