"""The agent against the real 3-member etcd, as a real process, with a real reloading target.

Delays are measured and recorded (``record_property`` and the test output), never asserted
beyond a generous timeout: this checks behaviour, the benchmarks judge speed.
"""

from __future__ import annotations

import base64
import http.server
import json
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from agent_e2e_support import (
    HEARTBEAT_INTERVAL,
    HEARTBEAT_MISSES,
    KEYRING_POLL,
    Plane,
    write_keyring,
)

from defender_config import (
    ConfigStore,
    DefenderClient,
    Envelope,
    EnvelopeOptions,
    EtcdSettings,
    Keyring,
    KeyringSource,
    KeyState,
    LibrarySettings,
)
from defender_devcluster import EtcdCluster, tool, wait_for
from defender_operator._decisions.restarts import (
    EtcdView,
    HeartbeatPolicy,
    PodView,
    RestartAction,
    RestartBudget,
    RestartDecision,
    decide_restart,
)

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(180)]

SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["threshold"],
    "properties": {"threshold": {"type": "number"}, "mode": {"type": "string"}},
}


def config(n: int) -> dict[str, Any]:
    return {"threshold": n, "mode": f"mode-{n}"}


def seed(plane: Plane, n: int = 1) -> None:
    plane.configs.seed(plane.component, config(n), "custom", by="e2e", json_schema=SCHEMA)


def file_config(plane: Plane) -> dict[str, Any]:
    return json.loads(plane.output_path.read_text())


def target_loads(plane_target: Any, n: int, timeout: float = 20) -> list[dict[str, Any]]:
    """Wait until the target process has loaded config(n); return those load records."""
    return wait_for(
        f"the target to load config {n}",
        lambda: [r for r in plane_target.loaded() if r["config"] == config(n)],
        timeout=timeout,
    )


def test_commit_reaches_file_and_process(plane: Plane, record_property: Any) -> None:
    seed(plane)
    target = plane.start_target()
    agent = plane.start_agent(target)
    hb = plane.wait_heartbeat(agent, lambda h: h["config_version"] == 1, "version 1 delivered")
    wait_for(
        "target loads v1",
        lambda: any(r["config"] == config(1) for r in target.loaded()),
        timeout=20,
    )
    assert hb["key_fingerprint"] == plane.keyring.current().primary_fingerprint
    assert hb["codec"] == "zstd+aes-256-gcm"
    assert hb["node_id"] == "node-e2e"
    assert hb["last_error"] is None
    plane.wait_heartbeat(agent, lambda h: h["status"] == "RUNNING", "status RUNNING")

    delays = []
    for n in (2, 3, 4):
        committed_at = time.time()
        assert plane.configs.commit(plane.component, config(n), by="e2e") == n
        loaded = target_loads(target, n, timeout=30)
        delays.append(loaded[0]["time"] - committed_at)
        assert file_config(plane) == config(n)
        plane.wait_heartbeat(agent, lambda h, n=n: h["config_version"] == n, f"heartbeat v{n}")
    assert oct(plane.output_path.stat().st_mode & 0o777) == "0o640"
    assert target.bad_reads() == []
    record_property("commit_to_process_seconds", json.dumps([round(d, 4) for d in delays]))
    print(f"\ncommit -> target reload delays (s): {[round(d, 4) for d in delays]}")
    assert agent.errors() == []


def test_heartbeat_reports_the_components_own_storage_rule(plane: Plane) -> None:
    # The component's rule says no compression; the agent's store-wide default compresses.
    plane.configs.seed(
        plane.component,
        config(1),
        "custom",
        by="e2e",
        json_schema=SCHEMA,
        options=EnvelopeOptions(compress=False),
    )
    agent = plane.start_agent(plane.start_target())
    hb = plane.wait_heartbeat(agent, lambda h: h["config_version"] == 1, "version 1 delivered")
    plane.wait_heartbeat(agent, lambda h: h["codec"] == "none+aes-256-gcm", "the component's codec")
    assert hb["last_error"] is None
    assert agent.errors() == []


def test_bad_values_keep_last_good_file_and_alert(plane: Plane) -> None:
    seed(plane)
    target = plane.start_target()
    agent = plane.start_agent(target)
    plane.wait_heartbeat(agent, lambda h: h["config_version"] == 1, "version 1 delivered")
    target_loads(target, 1)
    good = plane.output_path.read_bytes()
    path = plane.client.layout.active_config(plane.component)
    loads_before = len(target.loaded())

    # 1. A corrupted value: one ciphertext byte flipped in the stored envelope.
    sealed = bytearray(plane.client.store.get(path).value)  # type: ignore[union-attr]
    sealed[-5] ^= 0x40
    plane.client.store.put(path, bytes(sealed))
    hb = plane.wait_heartbeat(
        agent,
        lambda h: (h["last_error"] or {}).get("reason") == "AuthenticationFailed",
        "AuthenticationFailed in the heartbeat",
    )
    assert "failed authentication" in hb["last_error"]["detail"]
    assert hb["config_version"] == 1
    alerts = wait_for(
        "an AuthenticationFailed alert",
        lambda: [a for a in plane.alerts() if a["kind"] == "AuthenticationFailed"],
        timeout=20,
    )
    assert alerts[0]["instance"] == agent.instance
    assert alerts[0]["path"] == path
    assert plane.output_path.read_bytes() == good

    # 2. A value sealed with a key the component does not hold.
    stranger = Envelope(Keyring.generate())
    plane.client.store.put(path, stranger.seal(json.dumps(config(9)).encode(), path))
    hb = plane.wait_heartbeat(
        agent,
        lambda h: (h["last_error"] or {}).get("reason") == "UnknownKey",
        "UnknownKey in the heartbeat",
    )
    wait_for(
        "an UnknownKey alert",
        lambda: [a for a in plane.alerts() if a["kind"] == "UnknownKey"],
        timeout=20,
    )
    assert plane.output_path.read_bytes() == good
    assert len(target.loaded()) == loads_before  # the process was never told to reload garbage
    assert agent.proc.poll() is None  # and the agent did not crash

    # 3. A corrected config goes through and clears the error.
    plane.configs.commit(plane.component, config(5), by="e2e")
    plane.wait_heartbeat(
        agent, lambda h: h["config_version"] == 2 and h["last_error"] is None, "recovered"
    )
    wait_for(
        "target loads fix",
        lambda: any(r["config"] == config(5) for r in target.loaded()),
        timeout=20,
    )
    assert file_config(plane) == config(5)
    assert target.bad_reads() == []


def test_sigkill_lets_the_lease_expire_and_the_operator_restarts(plane: Plane) -> None:
    seed(plane)
    agent = plane.start_agent(None)
    hb = plane.wait_heartbeat(agent, lambda h: h["config_version"] == 1, "first heartbeat")
    assert hb["lease_ttl_seconds"] == HEARTBEAT_INTERVAL * HEARTBEAT_MISSES
    policy = HeartbeatPolicy(
        interval_seconds=int(HEARTBEAT_INTERVAL),
        missed_before_restart=HEARTBEAT_MISSES,
        startup_grace_seconds=5,
    )
    budget = RestartBudget(
        enabled=True,
        max_restarts=3,
        window_seconds=600,
        backoff_base_seconds=10,
        backoff_max_seconds=60,
    )
    pod = PodView(name=agent.instance, created=datetime.now(UTC) - timedelta(minutes=5))
    etcd_ok = EtcdView(
        reachable=True, quorum=True, healthy_since=datetime.now(UTC) - timedelta(hours=1)
    )
    watch_started = datetime.now(UTC) - timedelta(minutes=5)

    deletes: list[Any] = []

    def decide(last_seen: datetime) -> RestartDecision:
        """What the operator decides now, given the heartbeat time it last saw."""
        return decide_restart(
            now=datetime.now(UTC),
            pods=[pod],
            last_seen={agent.instance: last_seen},
            watch_started=watch_started,
            etcd=etcd_ok,
            policy=policy,
            budget=budget,
            restart_times=[],
        )

    handle = plane.registry.watch_instances(
        lambda ev: deletes.append(ev) if ev.kind == "delete" else None, component=plane.component
    )

    def seen_now() -> datetime | None:
        # A beat is a lease keep-alive: when the instance last beat is read from its lease.
        for hb_now in plane.registry.list_instances(plane.component):
            if hb_now.instance == agent.instance:
                return plane.registry.last_seen(hb_now)
        return None

    try:
        first = seen_now()
        assert first is not None
        last_seen = first
        alive = decide(last_seen)
        assert alive.action is RestartAction.NONE

        killed_at = time.monotonic()
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait()
        # Keep reading the heartbeat until it vanishes: the last time seen is what the operator had.
        seen: list[datetime] = []

        def gone() -> bool:
            at = seen_now()
            if at is not None:
                seen.append(at)
            return at is None and any(e.instance == agent.instance for e in deletes)

        wait_for("the instance key to be deleted by lease expiry", gone, timeout=30)
        expired_after = time.monotonic() - killed_at
        print(
            f"\nlease expired {expired_after:.2f}s after SIGKILL (TTL {hb['lease_ttl_seconds']}s)"
        )
        assert expired_after >= 1.0  # removed by etcd's lease expiry, not by a clean shutdown
        last_seen = seen[-1] if seen else last_seen
        decision = decide(last_seen)
        assert decision.action is RestartAction.RESTART
        assert decision.pod == agent.instance
    finally:
        handle.cancel()


def test_sigterm_marks_stopped_and_revokes_the_lease(plane: Plane) -> None:
    seed(plane)
    agent = plane.start_agent(None, "--heartbeat-interval-seconds", "10")
    plane.wait_heartbeat(agent, lambda h: h["status"] == "RUNNING", "RUNNING")
    stopped_at = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=20) == 0
    # The lease TTL is 30 s here: the key is gone at once only because the agent revoked it.
    assert plane.heartbeat(agent.instance) is None
    assert time.monotonic() - stopped_at < 30
    status = plane.registry.get_status(plane.component)
    assert status is not None and status.status == "STOPPED"
    assert status.instance == agent.instance


def test_key_rotation_without_a_failed_read(plane: Plane) -> None:
    seed(plane)
    target = plane.start_target()
    agent = plane.start_agent(target)
    plane.wait_heartbeat(agent, lambda h: h["config_version"] == 1, "version 1 delivered")
    old = plane.keyring.current()
    old_id = old.primary.key_id
    version = 1

    def commit_and_check(n: int) -> None:
        nonlocal version
        version = plane.configs.commit(plane.component, config(n), by="e2e-rotation")
        plane.wait_heartbeat(agent, lambda h: h["config_version"] == version, f"v{version}")
        wait_for(
            f"target {n}",
            lambda: any(r["config"] == config(n) for r in target.loaded()),
            timeout=20,
        )

    def stage(keyring: Keyring) -> None:
        write_keyring(plane.keyring_dir, keyring)
        plane.keyring.refresh()
        assert plane.keyring.current() == keyring

    # Stage 1: the new key arrives decrypt-only; nothing is sealed with it yet.
    staged = old.with_new_decrypt_only()
    new_id = staged.key_ids[-1]
    new_fp = staged.fingerprint(new_id)
    stage(staged)
    plane.wait_heartbeat(
        agent, lambda h: new_fp in h["key_fingerprints"], "agent holds the new key"
    )
    commit_and_check(2)

    # Stage 2: promote. Writers now seal with the new key; the old one still opens old values.
    promoted = staged.promote(new_id)
    stage(promoted)
    plane.wait_heartbeat(
        agent, lambda h: h["key_fingerprint"] == new_fp, "agent sees the new primary"
    )
    commit_and_check(3)

    # Stage 3: re-seal everything with the new key, then retire the old one.
    report = plane.configs.rewrap_all(plane.prefix + "/")
    assert report.failed == 0, report.errors
    assert report.rewrapped >= 1
    retired = promoted.retire(old_id)
    assert retired.get(old_id).state is KeyState.RETIRED  # type: ignore[union-attr]
    stage(retired)
    time.sleep(5 * 0.2)  # several keyring polls of the agent with the retired key in place
    commit_and_check(4)

    hb = plane.heartbeat(agent.instance)
    assert hb is not None and hb["last_error"] is None
    assert plane.alerts() == []
    assert target.bad_reads() == []
    assert [r["config"]["threshold"] for r in target.loaded()][-4:] == [1, 2, 3, 4]
    assert agent.errors() == []
    log_text = agent.log_path.read_text()
    for key in retired:
        assert base64.b64encode(key.material).decode() not in log_text
        assert key.material.hex() not in log_text
    # docs/security.md, "In memory only": what the agent writes to the shared volume is the
    # decoded config, one file, and nothing of the keys it went through.
    assert [p.name for p in plane.shared_dir.iterdir()] == [plane.output_path.name]
    written = plane.output_path.read_bytes()
    assert json.loads(written) == config(4)
    for key in retired:
        for form in (key.material, key.material.hex().encode(), base64.b64encode(key.material)):
            assert form not in written


def test_seed_config_registers_master_once(plane: Plane) -> None:
    seed_file = plane.tmp / "seed.json"
    seed_file.write_text(json.dumps(config(7)))
    schema_file = plane.tmp / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    args = ("--seed-config-path", str(seed_file), "--schema-path", str(schema_file))
    first = plane.start_agent(None, *args)
    plane.wait_heartbeat(first, lambda h: h["config_version"] == 1, "first agent registered")
    assert plane.configs.get_master(plane.component) == config(7)
    # Registration reports ACTIVE v1 in the heartbeat before the watch has written the file.
    wait_for(
        "the seed config in the shared file",
        lambda: plane.output_path.exists() and file_config(plane) == config(7),
        timeout=20,
    )
    # A second instance with another default config adopts MASTER instead of overwriting it.
    seed_file.write_text(json.dumps(config(8)))
    second = plane.start_agent(None, *args)
    plane.wait_heartbeat(second, lambda h: h["config_version"] == 1, "second agent registered")
    assert plane.configs.get_master(plane.component) == config(7)
    drift = wait_for(
        "a drift alert",
        lambda: [a for a in plane.alerts() if a["kind"] == "ConfigDrift"],
        timeout=20,
    )
    assert drift[0]["instance"] == second.instance
    assert {i.instance for i in plane.registry.list_instances(plane.component)} == {
        first.instance,
        second.instance,
    }


def test_agent_side_schema_rejects_and_keeps_last_good(plane: Plane) -> None:
    # The stored schema accepts any mode; this agent's component only understands "fast".
    seed(plane)
    strict = dict(SCHEMA, properties={**SCHEMA["properties"], "mode": {"enum": ["mode-1"]}})
    schema_file = plane.tmp / "strict.json"
    schema_file.write_text(json.dumps(strict))
    agent = plane.start_agent(None, "--schema-path", str(schema_file))
    plane.wait_heartbeat(agent, lambda h: h["config_version"] == 1, "v1 delivered")
    plane.configs.commit(plane.component, config(2), by="e2e")
    hb = plane.wait_heartbeat(
        agent,
        lambda h: (h["last_error"] or {}).get("reason") == "ConfigInvalid",
        "ConfigInvalid in the heartbeat",
    )
    assert "mode" in hb["last_error"]["detail"]
    assert hb["config_version"] == 1
    assert file_config(plane) == config(1)
    alerts = wait_for(
        "an alert", lambda: [a for a in plane.alerts() if a["kind"] == "ConfigInvalid"], timeout=20
    )
    assert alerts[0]["instance"] == agent.instance


def test_broken_keyring_secret_keeps_the_last_good_keyring(plane: Plane) -> None:
    seed(plane)
    agent = plane.start_agent(None)
    plane.wait_heartbeat(agent, lambda h: h["config_version"] == 1, "v1 delivered")
    good = plane.keyring.current()
    (plane.keyring_dir / ".tmp").write_text('{"version": 1, "keys": []}')
    (plane.keyring_dir / ".tmp").replace(plane.keyring_dir / "keyring.json")
    hb = plane.wait_heartbeat(
        agent,
        lambda h: (h["last_error"] or {}).get("reason") == "KeyringInvalid",
        "KeyringInvalid in the heartbeat",
    )
    assert hb["key_fingerprint"] == good.primary_fingerprint
    wait_for(
        "alert", lambda: [a for a in plane.alerts() if a["kind"] == "KeyringInvalid"], timeout=20
    )
    # Still serving with the last good keyring: a commit sealed with it is delivered.
    plane.configs.commit(plane.component, config(2), by="e2e")
    plane.wait_heartbeat(agent, lambda h: h["config_version"] == 2, "v2 with the old keyring")
    assert file_config(plane) == config(2)
    write_keyring(plane.keyring_dir, good)  # the Secret is repaired
    plane.configs.commit(plane.component, config(3), by="e2e")
    plane.wait_heartbeat(
        agent, lambda h: h["config_version"] == 3 and h["last_error"] is None, "recovered"
    )


def test_keyring_secret_back_unchanged_clears_keyring_invalid(plane: Plane) -> None:
    # The Secret is deleted and re-created (or a bad edit undone) with the keys in use: nothing
    # changed for the agent, and the KeyringInvalid it reported must clear without a new config.
    seed(plane)
    agent = plane.start_agent(None)
    plane.wait_heartbeat(agent, lambda h: h["config_version"] == 1, "v1 delivered")
    mounted = plane.keyring_dir / "keyring.json"
    content = mounted.read_bytes()
    mounted.unlink()
    plane.wait_heartbeat(
        agent,
        lambda h: (h["last_error"] or {}).get("reason") == "KeyringInvalid",
        "KeyringInvalid in the heartbeat",
    )
    (plane.keyring_dir / ".tmp").write_bytes(content)
    (plane.keyring_dir / ".tmp").replace(mounted)
    hb = plane.wait_heartbeat(agent, lambda h: h["last_error"] is None, "KeyringInvalid cleared")
    assert hb["config_version"] == 1
    assert file_config(plane) == config(1)


def test_a_config_the_volume_could_not_take_is_written_once_it_can(plane: Plane) -> None:
    # The shared volume is missing when ACTIVE arrives (not mounted yet, or full, or read-only):
    # the agent reports WriteFailed and writes the config as soon as it can, with no new commit.
    seed(plane)
    late = plane.tmp / "late-volume" / "demo.json"
    agent = plane.start_agent(None, "--output-path", str(late))
    plane.wait_heartbeat(
        agent,
        lambda h: (h["last_error"] or {}).get("reason") == "WriteFailed",
        "WriteFailed in the heartbeat",
    )
    late.parent.mkdir()
    plane.wait_heartbeat(
        agent,
        lambda h: h["config_version"] == 1 and h["last_error"] is None,
        "v1 written once the volume is there",
    )
    assert json.loads(late.read_text()) == config(1)


def test_a_hand_edited_file_is_put_back_and_the_component_reloaded(plane: Plane) -> None:
    # Someone edits the delivered file in the pod: the heartbeat says version 1 while the
    # component would run the edit. The agent writes version 1 back and reloads the component.
    seed(plane)
    target = plane.start_target()
    agent = plane.start_agent(target)
    plane.wait_heartbeat(agent, lambda h: h["config_version"] == 1, "version 1 delivered")
    target_loads(target, 1)
    delivered = plane.output_path.read_bytes()
    plane.output_path.write_text(json.dumps(config(99)))
    wait_for("the file put back", lambda: plane.output_path.read_bytes() == delivered, timeout=10)
    wait_for("the target reloads v1 again", lambda: len(target_loads(target, 1)) >= 2, timeout=20)
    assert not [r for r in target.loaded() if r["config"] == config(99)]
    wait_for(
        "a FileDrifted alert",
        lambda: [a for a in plane.alerts() if a["kind"] == "FileDrifted"],
        timeout=10,
    )
    warned = [e for e in agent.log_lines() if e.get("reason") == "FileDrifted"]
    assert warned and all(e["level"] == "WARNING" for e in warned)
    # Reported for a drift window (5 minutes) after the last put-back, not cleared at the
    # next intact check: a file rewritten every other second cost two record puts each time.
    plane.wait_heartbeat(
        agent,
        lambda h: (h["last_error"] or {}).get("reason") == "FileDrifted",
        "FileDrifted in the heartbeat",
    )
    time.sleep(3)  # a few intact checks
    later = plane.heartbeat(agent.instance)
    assert later is not None and (later["last_error"] or {}).get("reason") == "FileDrifted"
    # The next config delivered clears it.
    plane.configs.commit(plane.component, config(2), by="e2e")
    plane.wait_heartbeat(
        agent,
        lambda h: h["config_version"] == 2 and h["last_error"] is None,
        "FileDrifted cleared by the next config",
    )
    assert agent.errors() == []


def test_a_subdirectory_swapped_for_a_link_is_never_written_through(plane: Plane) -> None:
    # The component's container replaces a subdirectory of the output path with a link to
    # somewhere the agent may write: the next config is WriteFailed, nothing lands where the
    # link points, the agent runs on, and writes the config once the directory is back.
    seed(plane)
    sub, elsewhere = plane.tmp / "vol" / "sub", plane.tmp / "elsewhere"
    sub.mkdir(parents=True)
    elsewhere.mkdir()
    agent = plane.start_agent(None, "--output-path", str(sub / "demo.json"))
    plane.wait_heartbeat(agent, lambda h: h["config_version"] == 1, "version 1 delivered")
    sub.rename(sub.parent / "old")
    sub.symlink_to(elsewhere)
    plane.configs.commit(plane.component, config(2), by="e2e")
    hb = plane.wait_heartbeat(
        agent,
        lambda h: (h["last_error"] or {}).get("reason") == "WriteFailed",
        "WriteFailed in the heartbeat",
    )
    assert "symbolic link" in hb["last_error"]["detail"]
    assert hb["config_version"] == 1
    time.sleep(2)  # a few retries of the write
    assert list(elsewhere.iterdir()) == []
    sub.unlink()
    (sub.parent / "old").rename(sub)
    plane.wait_heartbeat(
        agent,
        lambda h: h["config_version"] == 2 and h["last_error"] is None,
        "version 2 written once the directory is back",
    )
    assert json.loads((sub / "demo.json").read_text()) == config(2)
    assert list(elsewhere.iterdir()) == []


def test_rejected_seed_still_heartbeats_with_the_error(plane: Plane) -> None:
    seed_file = plane.tmp / "seed.json"
    seed_file.write_text(json.dumps(config(1)))
    # A custom component without a schema cannot be registered: the library refuses the seed.
    agent = plane.start_agent(None, "--seed-config-path", str(seed_file))
    hb = plane.wait_heartbeat(
        agent,
        lambda h: (h["last_error"] or {}).get("reason") == "ConfigInvalid",
        "ConfigInvalid in the heartbeat",
    )
    assert hb["status"] == "STARTING"
    assert "schema" in hb["last_error"]["detail"]
    assert not plane.output_path.exists()
    assert plane.configs.get_metadata(plane.component) is None


def test_wrong_etcd_password_exits_4(tmp_path: Path, plane: Plane) -> None:
    # A separate one-member etcd with auth on: the shared cluster stays open for other tests.
    secured = EtcdCluster(tmp_path / "auth-etcd", members=1, name="auth", die_with_parent=True)
    secured.start()
    try:
        etcdctl = [str(tool("etcdctl")), "--endpoints", secured.endpoints[0]]
        for args in (["user", "add", "root:s3cret-pw"], ["auth", "enable"]):
            subprocess.run([*etcdctl, *args], check=True, capture_output=True, timeout=30)
        base = ("--etcd-endpoints", secured.endpoints[0], "--etcd-user", "root")
        wrong = plane.start_agent(None, *base, "--etcd-password", "not-the-password")
        assert wrong.proc.wait(timeout=60) == 4
        errors = wrong.errors()
        assert errors[-1]["reason"] == "StoreAuth"
        assert "not-the-password" not in wrong.log_path.read_text()
        # The same agent with the right password works, so the refusal above was the password.
        right = plane.start_agent(None, *base, "--etcd-password", "s3cret-pw")
        key = f"{plane.prefix}/components/{plane.component}/instances/{right.instance}"

        def registered() -> bool:
            assert right.proc.poll() is None, right.log_path.read_text()[-2000:]
            out = subprocess.run(
                [*etcdctl, "--user", "root:s3cret-pw", "get", key, "--print-value-only"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            return bool(out.stdout.strip())

        wait_for("the agent to register with the right password", registered, timeout=30)
    finally:
        for agent in plane.agents:
            if agent.proc.poll() is None:
                agent.proc.send_signal(signal.SIGTERM)
                agent.proc.wait(timeout=20)
        secured.stop()


def test_a_password_changed_under_a_running_agent_is_store_auth_until_it_is_back(
    tmp_path: Path, plane: Plane
) -> None:
    # A separate one-member etcd with auth on. The agent logs in as `agent`; the test's client
    # as `root`, whose password does not change. The agent's password is changed while it runs
    # (etcd drops the user's tokens), a config is committed meanwhile, then the password is put
    # back: the agent must run on, report StoreAuth (never either password) and keep the last
    # good file, then deliver the config and clear the error with no restart.
    secured = EtcdCluster(tmp_path / "auth-etcd", members=1, name="auth", die_with_parent=True)
    secured.start()
    endpoint = secured.endpoints[0]
    etcdctl = [str(tool("etcdctl")), "--endpoints", endpoint]

    def ctl(*args: str, stdin: str | None = None, user: str | None = "root:root-pw") -> None:
        login = ["--user", user] if user else []
        subprocess.run(
            [*etcdctl, *login, *args], input=stdin, text=True, check=True, capture_output=True,
            timeout=30,
        )  # fmt: skip

    source: KeyringSource | None = None
    admin: DefenderClient | None = None
    try:
        for args in (
            ["user", "add", "root:root-pw", "--interactive=false"],
            ["user", "add", "agent:first-pw", "--interactive=false"],
            ["user", "grant-role", "agent", "root"],
            ["auth", "enable"],
        ):
            ctl(*args, user=None)
        source = KeyringSource(plane.keyring_dir, poll_seconds=KEYRING_POLL)
        settings = LibrarySettings(
            etcd=EtcdSettings(endpoints=[endpoint], user="root", password="root-pw"),
            prefix=plane.prefix,
            keyring_path=plane.keyring_dir,
        )
        admin = DefenderClient(settings, source, instance="e2e-admin")
        configs = ConfigStore(admin)
        configs.seed(plane.component, config(1), "custom", by="e2e", json_schema=SCHEMA)
        agent = plane.start_agent(
            None,
            *("--etcd-endpoints", endpoint, "--etcd-user", "agent"),
            *("--etcd-password", "first-pw"),
        )
        key = admin.layout.instance(plane.component, agent.instance)

        def record(pred: Any) -> Any:
            assert agent.proc.poll() is None, agent.log_path.read_text()[-3000:]
            got = admin.get_json(key)
            return got[0] if got is not None and pred(got[0]) else None

        wait_for("version 1 delivered", lambda: record(lambda h: h["config_version"] == 1), 30)
        assert file_config(plane) == config(1)

        ctl("user", "passwd", "agent", "--interactive=false", stdin="second-pw\n")
        configs.commit(plane.component, config(2), by="e2e")

        def refused() -> list[dict[str, Any]]:
            assert agent.proc.poll() is None, agent.log_path.read_text()[-3000:]
            return [e for e in agent.errors() if e.get("reason") == "StoreAuth"]

        wait_for("StoreAuth in the agent's log", refused, timeout=60)
        assert file_config(plane) == config(1)  # the last good file stays

        ctl("user", "passwd", "agent", "--interactive=false", stdin="first-pw\n")
        hb = wait_for(
            "version 2 delivered and StoreAuth cleared",
            lambda: record(lambda h: h["config_version"] == 2 and h["last_error"] is None),
            timeout=60,
        )
        assert hb["status"] in ("STARTING", "RUNNING")
        assert file_config(plane) == config(2)
        assert agent.proc.poll() is None
        logged = agent.log_path.read_text()
        assert "first-pw" not in logged and "second-pw" not in logged
    finally:
        for started in plane.agents:
            if started.proc.poll() is None:
                started.proc.send_signal(signal.SIGTERM)
                started.proc.wait(timeout=20)
        if admin is not None:
            admin.close()
        if source is not None:
            source.stop()
        secured.stop()


def test_etcd_member_loss_and_quorum_loss(plane: Plane) -> None:
    seed(plane)
    target = plane.start_target()
    agent = plane.start_agent(target)
    plane.wait_heartbeat(agent, lambda h: h["status"] == "RUNNING", "RUNNING")
    etcd = plane.etcd
    try:
        # One member down: quorum holds, the agent's client fails over.
        etcd.kill_member(0)
        etcd.wait_for_leader()  # the test's own commit is not what is under test here
        plane.configs.commit(plane.component, config(2), by="e2e")
        target_loads(target, 2, timeout=60)
        # Two members down: no quorum. Nothing can be read or written; the agent must keep the
        # file and keep running, and come back by itself.
        etcd.kill_member(1)
        time.sleep(HEARTBEAT_INTERVAL * HEARTBEAT_MISSES + 1)  # long enough for the lease to lapse
        assert agent.proc.poll() is None
        assert file_config(plane) == config(2)
    finally:
        etcd.restart_members([0, 1])
        etcd.wait_for_leader()
    plane.wait_heartbeat(agent, lambda h: h["config_version"] == 2, "heartbeat back", timeout=60)
    plane.configs.commit(plane.component, config(3), by="e2e")
    target_loads(target, 3, timeout=60)
    assert target.bad_reads() == []


def test_store_unavailable_clears_once_etcd_is_back_without_a_config_change(
    plane: Plane,
) -> None:
    # Every member down: the agent's watch cannot be re-created and it reports StoreUnavailable.
    # Once etcd is back, the watch resumes from the next revision and hands nothing new to the
    # agent; the error must still leave the instance record, with no commit to carry it away.
    seed(plane)
    agent = plane.start_agent(None)
    plane.wait_heartbeat(agent, lambda h: h["status"] == "RUNNING", "RUNNING")
    etcd = plane.etcd

    def reported_unavailable() -> list[dict[str, Any]]:
        return [
            e
            for e in agent.log_lines()
            if e.get("level") == "ERROR" and e.get("reason") == "StoreUnavailable"
        ]

    try:
        for i in range(len(etcd.endpoints)):
            etcd.kill_member(i)
        wait_for("the agent to report StoreUnavailable", reported_unavailable, timeout=90)
        assert agent.proc.poll() is None
    finally:
        # Nothing answers before this: a clear logged earlier would be one no answer proved.
        back_at = datetime.now(UTC)
        etcd.restart_members()
        etcd.wait_for_leader()

    # The agent clears the error once etcd answers it again (a beat, or a read of the config
    # etcd itself answered). The record carries the error only if the heartbeater put it
    # before that (etcd back, the clear not yet made): either way its last one must not.
    def cleared() -> list[dict[str, Any]]:
        return [e for e in agent.log_lines() if "StoreUnavailable cleared" in e.get("message", "")]

    first = wait_for("the agent to clear StoreUnavailable", cleared, timeout=30)[0]
    assert datetime.fromisoformat(first["time"]) >= back_at, first
    hb = plane.wait_heartbeat(
        agent, lambda h: h["last_error"] is None, "last_error cleared on the restarted cluster"
    )
    assert hb["config_version"] == 1  # no config change carried it away
    assert file_config(plane) == config(1)


def test_http_reload_reads_the_new_file(plane: Plane) -> None:
    seen: list[dict[str, Any]] = []
    output = plane.output_path

    class Reload(http.server.BaseHTTPRequestHandler):
        # The component's reload endpoint: it reads the file when called, as a real one would.
        def do_POST(self) -> None:
            seen.append(json.loads(output.read_text()))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Reload)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/-/reload"
        seed(plane)
        agent = plane.start_agent(None, "--reload-method", "http", "--reload-url", url)
        wait_for("the reload call for v1", lambda: config(1) in seen, timeout=20)
        plane.configs.commit(plane.component, config(2), by="e2e")
        wait_for("the reload call for v2", lambda: config(2) in seen, timeout=20)
        hb = plane.wait_heartbeat(agent, lambda h: h["config_version"] == 2, "v2")
        assert hb["last_error"] is None
    finally:
        server.shutdown()
        server.server_close()


def test_agent_started_before_the_component_is_seeded(plane: Plane) -> None:
    target = plane.start_target()
    agent = plane.start_agent(target)
    hb = plane.wait_heartbeat(agent, lambda h: True, "a heartbeat before any config exists")
    assert hb["status"] == "STARTING"
    assert hb["config_version"] is None
    assert not plane.output_path.exists()
    seed(plane, 6)  # the operator seeds from the DefenderComponent later
    plane.wait_heartbeat(
        agent, lambda h: h["status"] == "RUNNING" and h["config_version"] == 1, "RUNNING v1"
    )
    target_loads(target, 6)


def test_value_sealed_with_a_key_not_yet_mounted_opens_once_the_secret_catches_up(
    plane: Plane,
) -> None:
    seed(plane)
    target = plane.start_target()
    agent = plane.start_agent(target)
    plane.wait_heartbeat(agent, lambda h: h["config_version"] == 1, "v1 delivered")
    target_loads(target, 1)
    # A writer that already has the next keyring (promoted new key) commits before this pod's
    # Secret is updated: the agent cannot open the value yet.
    ahead = plane.keyring.current().with_new_decrypt_only()
    ahead = ahead.promote(ahead.key_ids[-1])
    writer = DefenderClient(plane.client.settings, ahead, instance="writer-ahead")
    try:
        ConfigStore(writer).commit(plane.component, config(2), by="writer-ahead")
    finally:
        writer.close()
    plane.wait_heartbeat(
        agent,
        lambda h: (h["last_error"] or {}).get("reason") == "UnknownKey",
        "UnknownKey while the Secret lags",
    )
    assert file_config(plane) == config(1)
    # The kubelet updates the Secret: the agent re-reads ACTIVE without waiting for a new commit.
    write_keyring(plane.keyring_dir, ahead)
    plane.wait_heartbeat(
        agent,
        lambda h: h["config_version"] == 2 and h["last_error"] is None,
        "v2 delivered after the keyring update",
    )
    target_loads(target, 2)


def test_a_config_over_the_agents_budget_is_refused_unparsed_and_the_next_one_taken(
    plane: Plane,
) -> None:
    # A key holder commits a config larger than this agent may parse (here --max-config-bytes;
    # in a pod its memory limit): refused with a clear reason instead of an OOM kill loop.
    seed(plane)
    target = plane.start_target()
    agent = plane.start_agent(target, "--max-config-bytes", "2000")
    plane.wait_heartbeat(agent, lambda h: h["config_version"] == 1, "v1 delivered")
    target_loads(target, 1)
    good = plane.output_path.read_bytes()

    big = {"threshold": 2, "mode": "x" * 5000}
    assert plane.configs.commit(plane.component, big, by="e2e") == 2
    hb = plane.wait_heartbeat(
        agent,
        lambda h: (h["last_error"] or {}).get("reason") == "ConfigTooLarge",
        "ConfigTooLarge in the heartbeat",
    )
    assert "--max-config-bytes" in hb["last_error"]["detail"]
    assert hb["config_version"] == 1
    alerts = wait_for(
        "a ConfigTooLarge alert",
        lambda: [a for a in plane.alerts() if a["kind"] == "ConfigTooLarge"],
        timeout=20,
    )
    assert alerts[0]["instance"] == agent.instance
    assert plane.output_path.read_bytes() == good

    assert plane.configs.commit(plane.component, config(3), by="e2e") == 3
    plane.wait_heartbeat(
        agent, lambda h: h["config_version"] == 3 and h["last_error"] is None, "v3 delivered"
    )
    target_loads(target, 3)
    assert len([a for a in plane.alerts() if a["kind"] == "ConfigTooLarge"]) == 1
    assert agent.proc.poll() is None
    assert target.bad_reads() == []
