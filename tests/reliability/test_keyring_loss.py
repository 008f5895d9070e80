"""Losing the keyring Secret, with the operator crashing (SIGKILL) around it (issue #14).

One deployment lives through the accidents in order:

1. the operator is killed, the source keyring Secret deleted, the operator started: the Secret is
   restored from the copy in the component namespace; every stored value still opens;
2. killed again, the source and every copy deleted, started, killed while it refuses and
   started once more (a crash loop): no Secret is ever written, no stored value changes, every
   component shows KeyUnavailable, liveness stays up;
3. the keyring export taken at the start is imported with the plugin: the running operator
   picks it up, the copy returns, every value opens, commits resume.

The operator's log, Events and status go to the hygiene ledger (test_zz_secrets_hygiene.py):
none may hold the key, also on these new paths (restore, refusal, export warnings).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from keyring_loss_support import (
    COMPONENT,
    cli,
    copy_exists,
    delete_copy,
    delete_source,
    deploy,
    export_file,
    liveness_ok,
    sealed_values,
    snapshot,
    source,
    source_keyring,
    unreadable,
    wait_restored,
)
from operator_e2e_support import OperatorRun, wait_for
from reliability_support import HYGIENE

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]


def crash(run: OperatorRun) -> None:
    (proc,) = run.procs
    proc.kill()  # SIGKILL: no cleanup, no status write
    proc.wait(timeout=30)
    run.procs.remove(proc)


def test_keyring_lost_with_operator_crashes_is_restored_refused_and_imported(
    operator: OperatorRun, kubeconfig_path: Path, tmp_path: Path
) -> None:
    run = operator
    keyring = HYGIENE.register(deploy(run))
    export = tmp_path / "export.json"
    done = export_file(run, kubeconfig_path, export, None)
    assert done.code == 0, done.err
    HYGIENE.add_text("keyring export output", done.out + done.err)

    # 1. Source deleted while the operator is dead: restored from the copy.
    crash(run)
    delete_source(run)
    run.start()
    wait_restored(run, keyring)
    assert run.keyring_copy() == keyring
    assert unreadable(run, keyring) == []

    # 2. Source and copy deleted, crash loop while refusing.
    crash(run)
    delete_source(run)
    delete_copy(run)
    before = snapshot(run)
    run.start()
    run.wait_condition(COMPONENT, "KeyUnavailable", status="True", reason="KeyringMissing")
    crash(run)
    run.start()
    wait_for(
        "the restarted operator's refusal",
        lambda: run.log_path.read_text().count("keyring refused, no Secret written") >= 2,
        timeout=90,
    )
    wait_for("liveness up", lambda: liveness_ok(run), timeout=60)
    assert source(run) is None
    assert not copy_exists(run)
    after = snapshot(run)
    assert sealed_values(after) == sealed_values(before)
    assert all(after[k][0] == before[k][0] for k in sealed_values(before))

    # 3. The export brings everything back without a restart.
    (proc,) = run.procs
    imported = cli(run, kubeconfig_path, "keyring", "import", "-f", str(export))
    assert imported.code == 0, imported.err
    HYGIENE.add_text("keyring import output", imported.out + imported.err)
    assert source_keyring(run) == keyring
    run.wait_condition(COMPONENT, "KeyUnavailable", status="False", timeout=90)
    wait_for("the copy back", lambda: run.keyring_copy() == keyring, timeout=60)
    assert unreadable(run, keyring) == []
    config = dict(run.get(COMPONENT)["spec"]["config"])
    config["block_ttl_seconds"] = int(config["block_ttl_seconds"]) + 11
    run.patch(COMPONENT, {"spec": {"config": config}})
    run.wait_active_version(COMPONENT, 3, timeout=90)
    assert unreadable(run, keyring) == []
    assert run.procs == [proc] and proc.poll() is None
