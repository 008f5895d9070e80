"""Issue #14, what the refusal pauses and what start-up must not do without etcd:

(a) while the keyring is refused, a silent instance's pod is not restarted and a spec.config
    edit is not committed, for well past the heartbeat deadline; the status and an Event say
    why (KeyUnavailable); an import resumes both (the pod is deleted, the edit committed);
(b) started while every etcd member is down, the operator writes no Secret and mints no key (it
    cannot know whether the store is empty); once etcd answers, it takes the right decision:
    restore from the surviving copy over stored data, generate only for an empty store;
(c) the keyring Secret restored mid-rotation: the rotation resumes from the keys' shape and
    finishes (rewrap, then retire); nothing is left under the retired key.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from keyring_loss_support import (
    COMPONENT,
    cli,
    delete_copy,
    delete_source,
    deploy,
    events_with,
    export_file,
    sealed_values,
    snapshot,
    source,
    source_keyring,
    unreadable,
    wait_restored,
)
from operator_e2e_support import (
    FAST_RESTARTS,
    SECRET,
    SNIFFER_LABELS,
    OperatorRun,
    key_material_shown,
    kubectl,
    wait_for,
)

from defender_config import Keyring, KeyState, inspect

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]


def _pod_names(run: OperatorRun) -> set[str]:
    return {p.metadata.name for p in run.pods(SNIFFER_LABELS)}


def _edit(run: OperatorRun, name: str, field: str, by: int) -> None:
    config = dict(run.get(name)["spec"]["config"])
    config[field] = int(config[field]) + by
    run.patch(name, {"spec": {"config": config}})


def test_refused_keyring_pauses_restarts_and_commits_until_it_is_imported(
    operator_run: OperatorRun, kubeconfig_path: Path, tmp_path: Path
) -> None:
    run = operator_run
    keyring = deploy(run)
    run.apply_sample("sniffer", **FAST_RESTARTS)
    run.wait_active_version("sniffer", 1)
    run.deployment("sniffer", SNIFFER_LABELS, replicas=1)
    (pod,) = wait_for("1 pod", lambda: len(_pod_names(run)) == 1 and _pod_names(run))
    heartbeater = run.heartbeat("sniffer", pod)
    run.wait_condition("sniffer", "Heartbeating", status="True")
    export = tmp_path / "export.json"
    done = export_file(run, kubeconfig_path, export, None)
    assert done.code == 0, done.err

    # Every holder of the key gone, the operator restarted: it refuses.
    run.stop()
    delete_source(run)
    delete_copy(run)
    run.start()
    for name in ("sniffer", COMPONENT):
        run.wait_condition(
            name, "KeyUnavailable", status="True", reason="KeyringMissing", timeout=90
        )
    # Now the instance goes silent and someone edits the config.
    heartbeater.stop()
    silent_since = time.monotonic()
    _edit(run, "sniffer", "snaplen", 1)
    # The deadline is 3 s of missed heartbeats (5 s startup grace, 1 s backoff); watch 4x that.
    while time.monotonic() - silent_since < 20:
        assert _pod_names(run) == {pod}, "a pod was restarted while the keyring is refused"
        status = run.get("sniffer")["status"]
        assert int(status.get("restarts") or 0) == 0
        assert status["activeVersion"] == 1, "a commit went through while the keyring is refused"
        time.sleep(0.5)
    refused = run.condition("sniffer", "KeyUnavailable")
    assert refused is not None and (refused["status"], refused["reason"]) == (
        "True",
        "KeyringMissing",
    )
    assert keyring.primary.key_id in refused["message"]
    ready = run.condition("sniffer", "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == ("False", "KeyringMissing")
    run.wait_event("sniffer", "KeyUnavailable")
    assert "PodRestarted" not in run.event_reasons("sniffer")
    assert source(run) is None

    imported = cli(run, kubeconfig_path, "keyring", "import", "-f", str(export))
    assert imported.code == 0, imported.err
    run.wait_condition("sniffer", "KeyUnavailable", status="False", timeout=90)
    # Restarts resume: the silent pod is deleted (its Deployment makes another).
    wait_for("the silent pod deleted", lambda: pod not in _pod_names(run), timeout=60)
    (replacement,) = wait_for("the replacement pod", lambda: _pod_names(run) - {pod}, timeout=60)
    # It comes back well (no kubelet: we play it; the copy may not be back yet).
    run.heartbeat("sniffer", replacement, client=run.client(keyring))
    run.wait_event("sniffer", "PodRestarted")
    # Commits resume: the edit made while refused goes through, under the same key.
    run.wait_active_version("sniffer", 2, timeout=90)
    wait_for("one restart counted", lambda: run.get("sniffer")["status"].get("restarts") == 1)
    assert unreadable(run, keyring) == []


def _stop_etcd(run: OperatorRun) -> list[int]:
    stopped = [0, 1, 2]
    for i in stopped:
        run.etcd.stop_member(i)
    return stopped


def _start_etcd(run: OperatorRun, stopped: list[int]) -> None:
    run.etcd.restart_members(stopped)
    run.etcd.wait_for_leader()


# The operator's etcd calls give up fast, so its waits are many short tries, not one long one.
QUICK_ETCD = {"DEFENDER_ETCD__TIMEOUT_SECONDS": "1", "DEFENDER_ETCD__RETRIES": "1"}


def test_started_without_etcd_over_stored_data_waits_then_restores_the_copy(
    operator_run: OperatorRun,
) -> None:
    run = operator_run
    keyring = deploy(run)
    before = sealed_values(snapshot(run))
    run.stop()
    delete_source(run)  # the copy in the component namespace survives
    stopped = _stop_etcd(run)
    try:
        run.start(**QUICK_ETCD)
        wait_for(
            "the operator reporting that it cannot settle the keyring",
            lambda: "keyring not settled yet" in run.log_path.read_text(),
            timeout=90,
        )
        pending = run.wait_condition(
            COMPONENT, "KeyUnavailable", status="Unknown", reason="Pending", timeout=90
        )
        assert "not yet checked" in pending["message"]
        # Well past several rotation ticks (1 s) and settle attempts: nothing written.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert source(run) is None, "a keyring Secret was written while etcd was down"
            assert run.keyring_copy() == keyring, "the copy was replaced while etcd was down"
            time.sleep(0.5)
    finally:
        _start_etcd(run, stopped)
    # etcd answers: the store holds values sealed with the copy's key, so the copy is restored.
    restored = wait_restored(run, keyring)
    assert restored.metadata.annotations["mldefender.io/restored-from"] == (
        f"copy {run.namespace}/{SECRET}"
    )
    run.wait_condition(COMPONENT, "KeyUnavailable", status="False", timeout=90)
    run.wait_event(COMPONENT, "KeyringRestored")
    alerts = run.client(keyring).store.list_prefix(f"{run.prefix}/alerts/{COMPONENT}/")
    assert "KeyringRestored" in {json.loads(a.value)["kind"] for a in alerts}
    log = run.log_path.read_text()
    assert "generated a NEW shared keyring" not in log.split("keyring not settled yet", 1)[1]
    assert run.keyring_copy() == keyring
    assert unreadable(run, keyring) == []
    after = sealed_values(snapshot(run))
    assert {k: after.get(k) for k in before} == before


def test_first_start_without_etcd_generates_only_once_etcd_shows_an_empty_store(
    operator_run: OperatorRun,
) -> None:
    run = operator_run
    stopped = _stop_etcd(run)
    try:
        run.start(**QUICK_ETCD)
        run.apply_sample(COMPONENT)
        wait_for(
            "the operator reporting that it cannot settle the keyring",
            lambda: "keyring not settled yet" in run.log_path.read_text(),
            timeout=90,
        )
        run.wait_condition(COMPONENT, "KeyUnavailable", status="Unknown", timeout=90)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert source(run) is None, "a key was minted before the store could be read"
            time.sleep(0.5)
        assert "generated a NEW shared keyring" not in run.log_path.read_text()
    finally:
        _start_etcd(run, stopped)
    keyring = run.operator_keyring()
    # The Secret is written before the line that says so: seeing one does not mean the other.
    wait_for(
        "the new keyring logged",
        lambda: "generated a NEW shared keyring" in run.log_path.read_text(),
        timeout=10,
    )
    run.wait_active_version(COMPONENT, 1, timeout=90)
    run.wait_condition(COMPONENT, "KeyUnavailable", status="False", timeout=90)
    assert source_keyring(run) == keyring  # generated once, not replaced
    assert unreadable(run, keyring) == []


def _key_ids(run: OperatorRun) -> dict[str, str]:
    """Stored key → the key id its envelope header names (encrypted values only)."""
    headers = {k: inspect(v).key_id for k, v in sealed_values(snapshot(run)).items()}
    return {k: kid for k, kid in headers.items() if kid is not None}


def _stage(run: OperatorRun) -> str | None:
    found = source(run)
    if found is None:
        return None
    return str((found.metadata.annotations or {}).get("mldefender.io/rotation-stage", "Idle"))


def test_source_restored_mid_rotation_resumes_it_and_nothing_stays_under_the_old_key(
    operator_run: OperatorRun,
) -> None:
    run = operator_run
    timings = {
        "DEFENDER_OPERATOR_ROTATION_DISTRIBUTE_TIMEOUT_SECONDS": "600",
        "DEFENDER_OPERATOR_ROTATION_GRACE_SECONDS": "2",
    }
    keyring = deploy(run)
    run.stop()
    run.start(**timings)
    old_id = keyring.primary.key_id
    # A live instance holding only the old key holds the rotation in Distributing.
    lagging = run.heartbeat(COMPONENT, "fw-old", client=run.client(keyring))
    kubectl("annotate", "secret", SECRET, "-n", run.operator_namespace,
            "mldefender.io/rotate-key=now")  # fmt: skip
    wait_for("Distributing", lambda: _stage(run) == "Distributing", timeout=60)
    distributed = wait_for(
        "the copy holding the new key", lambda: len(run.keyring_copy()) == 2 and run.keyring_copy()
    )
    # An instance with the new key decrypt-only replaces it: promoted, and then held in Promoted
    # because this instance still seals with the old key.
    holding = run.heartbeat(COMPONENT, "fw-new", client=run.client(distributed))
    lagging.stop()
    wait_for("Promoted", lambda: _stage(run) == "Promoted", timeout=60)
    promoted = wait_for(
        "the copy with the new primary",
        lambda: (c := run.keyring_copy()).primary.key_id != old_id and c,
    )
    new_id = promoted.primary.key_id
    assert promoted.get(old_id) is not None
    assert promoted.get(old_id).state is KeyState.DECRYPT_ONLY  # type: ignore[union-attr]
    # Values written after the promotion are under the new key, MASTER still under the old one.
    _edit(run, COMPONENT, "block_ttl_seconds", 3)
    run.wait_active_version(COMPONENT, 3)
    assert {old_id, new_id} <= set(_key_ids(run).values())

    # The operator is down when the source Secret is deleted: restored from the copy, which
    # carries no rotation stage.
    run.stop()
    delete_source(run)
    run.start(**timings)
    restored = wait_restored(run, promoted)
    assert "mldefender.io/restored-from" in restored.metadata.annotations
    wait_for(
        "the rotation resumed",
        lambda: "holds a rotation in progress" in run.log_path.read_text(),
        timeout=60,
    )
    # The holdout goes away; the resumed rotation rewraps, waits out Grace and retires.
    holding.stop()

    def finished() -> Keyring | None:
        found = source(run)
        if (
            found is None
            or (found.metadata.annotations or {}).get("mldefender.io/rotation-stage") != "Idle"
        ):
            return None
        kr = Keyring.from_secret_data(dict(found.data))
        old = kr.get(old_id)
        return kr if old is None or old.state is KeyState.RETIRED else None

    final = wait_for("the rotation finished", finished, timeout=90)
    assert final.primary.key_id == new_id
    used = _key_ids(run)
    assert used and set(used.values()) == {new_id}, f"left under the retired key: {used}"
    assert unreadable(run, final) == []
    assert events_with(run, "KeyringRestored")


def test_a_source_replaced_with_a_strangers_keyring_pauses_rotation_and_is_left_alone(
    operator_run: OperatorRun, kubeconfig_path: Path, tmp_path: Path
) -> None:
    run = operator_run
    keyring = deploy(run)
    export = tmp_path / "export.json"
    assert export_file(run, kubeconfig_path, export, None).code == 0
    before = snapshot(run)
    # Someone replaces the source Secret by hand with another keyring and asks for a rotation.
    found = source(run)
    assert found is not None
    stranger = Keyring.generate()
    found.data = stranger.to_secret_data()
    found.metadata.annotations = {"mldefender.io/rotate-key": "now"}
    run.core.replace_namespaced_secret(SECRET, run.operator_namespace, found)

    refused = run.wait_condition(
        COMPONENT, "KeyUnavailable", status="True", reason="SourceLacksKeys", timeout=90
    )
    assert f"copy {run.namespace}/{SECRET} opens everything" in refused["message"]
    run.wait_event(COMPONENT, "KeyUnavailable")
    deadline = time.monotonic() + 10  # ten rotation ticks
    while time.monotonic() < deadline:
        now = source(run)
        assert now is not None
        assert Keyring.from_secret_data(dict(now.data)) == stranger, "the Secret was overwritten"
        annotations = now.metadata.annotations or {}
        assert annotations.get("mldefender.io/rotate-key") == "now", "the request was acted on"
        assert "mldefender.io/rotation-stage" not in annotations, "a rotation ran"
        assert run.keyring_copy() == keyring, "the copy was replaced with the stranger's keyring"
        time.sleep(0.5)
    after = snapshot(run)
    assert {k: after[k][0] for k in sealed_values(before)} == {
        k: before[k][0] for k in sealed_values(before)
    }
    # The refusal (log, Event, condition, alerts) names ids and fingerprints, never the
    # material of the keyring it held nor of the stranger's.
    assert key_material_shown(run, [keyring, stranger]) == []

    # The person puts the right keyring back: everything resumes, under the same key.
    back = cli(run, kubeconfig_path, "keyring", "import", "-f", str(export), "--replace")
    assert back.code == 0, back.err
    run.wait_condition(COMPONENT, "KeyUnavailable", status="False", timeout=90)
    assert source_keyring(run) == keyring
    _edit(run, COMPONENT, "block_ttl_seconds", 2)
    run.wait_active_version(COMPONENT, 3, timeout=90)
    assert unreadable(run, keyring) == []
