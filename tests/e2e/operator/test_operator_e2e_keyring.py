"""Issue #14 end to end: the keyring Secret deleted while the operator is down.

(a) a copy survives: the operator restores the source from it, zero unreadable values;
(b) every copy is gone too: the operator refuses (no Secret written, no value rewritten,
    KeyUnavailable + Event, liveness up, commits paused), and a keyring imported with the plugin
    is picked up without a restart;
(c) export → delete everything → import → every value opens.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from keyring_loss_support import (
    COMPONENT,
    cli,
    copy_exists,
    delete_copy,
    delete_source,
    deploy,
    events_with,
    export_file,
    listed_keys,
    liveness_ok,
    sealed_values,
    snapshot,
    source,
    source_keyring,
    unreadable,
    wait_restored,
)
from operator_e2e_support import SECRET, OperatorRun, wait_for

from defender_config import Keyring, contract, write_keyring_backup

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]


def _source_events(run: OperatorRun) -> dict[str, str]:
    found = run.core.list_namespaced_event(
        run.operator_namespace, field_selector=f"involvedObject.name={SECRET}"
    )
    return {e.reason: e.message or "" for e in found.items}


def test_deleted_source_with_operator_down_is_restored_from_a_copy(
    operator_run: OperatorRun,
) -> None:
    run = operator_run
    keyring = deploy(run)
    # First install: generated, logged at WARNING with its fingerprint, and nobody exported it.
    assert "generated a NEW shared keyring" in run.log_path.read_text()
    assert keyring.primary_fingerprint in run.log_path.read_text()
    warned = wait_for("NoKeyringExport Event", lambda: _source_events(run).get("NoKeyringExport"))
    assert "keyring export" in warned
    before = sealed_values(snapshot(run))

    run.stop()
    delete_source(run)
    run.start()

    restored = wait_restored(run, keyring)
    assert restored.metadata.annotations[contract.RESTORED_ANNOTATION] == (
        f"copy {run.namespace}/{SECRET}"
    )
    assert run.keyring_copy() == keyring  # the copy was not overwritten
    assert unreadable(run, keyring) == []
    after = sealed_values(snapshot(run))
    assert {k: after.get(k) for k in before} == before  # nothing rewritten
    message = wait_for("KeyringRestored Event", lambda: events_with(run, "KeyringRestored"))[0]
    assert f"copy {run.namespace}/{SECRET}" in message
    log = run.log_path.read_text()
    assert "WARNING" in log and "restored from copy" in log
    # And the deployment carries on under the same key.
    config = dict(run.get(COMPONENT)["spec"]["config"])
    config["block_ttl_seconds"] = int(config["block_ttl_seconds"]) + 7
    run.patch(COMPONENT, {"spec": {"config": config}})
    run.wait_active_version(COMPONENT, 3)
    assert unreadable(run, keyring) == []
    run.wait_condition(COMPONENT, "KeyUnavailable", status="False")
    # Deleted while the operator runs: put back from its memory, loudly.
    delete_source(run)
    back = wait_restored(run, keyring)
    assert back.metadata.annotations[contract.RESTORED_ANNOTATION] == "the operator's memory"


def test_every_copy_gone_refuses_then_an_import_recovers_without_restart(
    operator_run: OperatorRun, kubeconfig_path: Path, tmp_path: Path
) -> None:
    run = operator_run
    keyring = deploy(run)
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("a long and private passphrase\n")
    export = tmp_path / "keyring-export.json"
    done = export_file(run, kubeconfig_path, export, passphrase)
    assert done.code == 0, done.err
    assert [k["fingerprint"] for k in listed_keys(done)] == [k.fingerprint for k in keyring.keys]
    assert stat.S_IMODE(os.stat(export).st_mode) == 0o600
    text = export.read_text()
    assert base64.b64encode(keyring.primary.material).decode() not in text
    found = source(run)
    assert found is not None
    assert contract.EXPORTED_ANNOTATION in found.metadata.annotations
    # What the export holds, so the operator can tell when a rotation adds a key it lacks.
    assert found.metadata.annotations[contract.EXPORTED_KEYS_ANNOTATION] == ",".join(
        sorted(k.key_id for k in keyring.keys)
    )
    again = export_file(run, kubeconfig_path, export, passphrase)
    assert again.code == 2 and "--force" in again.err  # never overwritten silently

    before = snapshot(run)
    run.stop()
    delete_source(run)
    delete_copy(run)
    # spec.config changes while the operator is down: it must not be committed under a new key.
    config = dict(run.get(COMPONENT)["spec"]["config"])
    config["block_ttl_seconds"] = int(config["block_ttl_seconds"]) + 5
    run.patch(COMPONENT, {"spec": {"config": config}})
    gone = export_file(run, kubeconfig_path, tmp_path / "late.json", None)
    assert gone.code == 2 and "does not exist" in gone.err and "keyringmissing" in gone.err
    proc = run.start()

    refused = run.wait_condition(
        COMPONENT, "KeyUnavailable", status="True", reason="KeyringMissing", timeout=90
    )
    assert keyring.primary.key_id in refused["message"]
    assert keyring.primary_fingerprint in refused["message"]
    ready = run.condition(COMPONENT, "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == ("False", "KeyringMissing")
    event = wait_for("KeyUnavailable Event", lambda: events_with(run, "KeyUnavailable"))[0]
    assert keyring.primary.key_id in event and keyring.primary_fingerprint in event
    wait_for("liveness up", lambda: liveness_ok(run), timeout=60)
    # The reconcile is retried and paused again (twice), and nothing is written meanwhile.
    wait_for(
        "two paused reconciles",
        lambda: run.log_path.read_text().count("paused, keyring unavailable") >= 2,
        timeout=60,
    )
    assert source(run) is None
    assert not copy_exists(run)
    after = snapshot(run)
    assert sealed_values(after) == sealed_values(before)
    assert {k: after[k][0] for k in sealed_values(before)} == {
        k: before[k][0] for k in sealed_values(before)
    }  # not even rewritten with the same bytes
    assert run.get(COMPONENT)["status"]["activeVersion"] == 2
    wait_for("liveness up", lambda: liveness_ok(run), timeout=60)

    # Wrong passphrase and a stranger's keyring are refused with typed errors; nothing written.
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    bad = cli(run, kubeconfig_path, "keyring", "import", "-f", str(export),
              "--passphrase-file", str(wrong))  # fmt: skip
    assert bad.code == 2 and "WrongPassphraseError" in bad.err, bad.err
    stranger = tmp_path / "stranger.json"
    stranger.write_bytes(write_keyring_backup(Keyring.generate()))
    lacking = cli(run, kubeconfig_path, "keyring", "import", "-f", str(stranger))
    assert lacking.code == 2 and "KeyringLacksKeysError" in lacking.err, lacking.err
    assert keyring.primary.key_id in lacking.err and keyring.primary_fingerprint in lacking.err
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(export.read_text().replace('"version": 1', '"version": 7', 1))
    damaged = cli(run, kubeconfig_path, "keyring", "import", "-f", str(corrupt),
                  "--passphrase-file", str(passphrase))  # fmt: skip
    assert damaged.code == 2 and "KeyringBackupError" in damaged.err, damaged.err
    assert source(run) is None

    imported = cli(run, kubeconfig_path, "keyring", "import", "-f", str(export),
                   "--passphrase-file", str(passphrase))  # fmt: skip
    assert imported.code == 0, imported.err
    assert source_keyring(run) == keyring

    # Picked up by the running operator: no restart.
    run.wait_condition(COMPONENT, "KeyUnavailable", status="False", timeout=90)
    run.wait_active_version(COMPONENT, 3, timeout=90)  # the paused commit goes through
    wait_for("the copy back", lambda: run.keyring_copy() == keyring, timeout=60)
    assert unreadable(run, keyring) == []
    assert proc.poll() is None and run.procs == [proc]
    wait_for("KeyringAvailable Event", lambda: events_with(run, "KeyringAvailable"))
    # The import carried the export time over: no more "never exported" warning next start.
    found = source(run)
    assert found is not None
    assert contract.EXPORTED_ANNOTATION in found.metadata.annotations
    # An existing Secret is replaced only on request, and only by a keyring that opens the data.
    twice = cli(run, kubeconfig_path, "keyring", "import", "-f", str(export),
                "--passphrase-file", str(passphrase))  # fmt: skip
    assert twice.code == 2 and "--replace" in twice.err
    lacking = cli(run, kubeconfig_path, "keyring", "import", "-f", str(stranger), "--replace")
    assert lacking.code == 2 and "KeyringLacksKeysError" in lacking.err
    assert source_keyring(run) == keyring
