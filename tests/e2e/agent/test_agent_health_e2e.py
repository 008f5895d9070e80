"""The agent as a real process against the real etcd: it follows the published heartbeat cadence
without a restart (and its own setting when the record is garbled), and it stops renewing while
the component beside it is stopped, saying why in last_error, its status endpoint and an alert.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from agent_e2e_support import HEARTBEAT_INTERVAL, HEARTBEAT_MISSES, Plane

from defender_config import Cadence, write_cadence
from defender_config._store_types import WatchEvent
from defender_devcluster import wait_for

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(180)]

LOCAL = (HEARTBEAT_INTERVAL, int(HEARTBEAT_INTERVAL * HEARTBEAT_MISSES))


def _seed(plane: Plane) -> None:
    schema = {"type": "object", "properties": {"threshold": {"type": "number"}}}
    plane.configs.seed(plane.component, {"threshold": 1}, "custom", by="e2e", json_schema=schema)


def _cadence(hb: dict[str, Any]) -> tuple[float, int]:
    return hb["interval_seconds"], hb["lease_ttl_seconds"]


def test_agent_follows_the_published_cadence_live(plane: Plane, record_property: Any) -> None:
    _seed(plane)
    agent = plane.start_agent(None)
    plane.wait_heartbeat(agent, lambda h: _cadence(h) == LOCAL, "the local cadence first")
    published = time.monotonic()
    write_cadence(plane.client, plane.component, Cadence(interval_seconds=2, allowed_misses=2))
    plane.wait_heartbeat(agent, lambda h: _cadence(h) == (2, 4), "the published cadence")
    took = time.monotonic() - published
    print(f"\nagent on the published cadence {took:.2f}s after it was written (old interval 1s)")
    record_property("cadence_adopted_seconds", round(took, 2))
    # Beats now 2 s apart. A beat is a keep-alive of the instance's 4 s lease (the record is
    # not rewritten): each renewal shows as the lease's remaining TTL going up again.
    stored = plane.client.store.get(plane.client.layout.instance(plane.component, agent.instance))
    assert stored is not None and stored.lease_id
    renewals, last = 0, plane.client.store.lease_ttl(stored.lease_id)
    deadline = time.monotonic() + 7
    while time.monotonic() < deadline:
        left = plane.client.store.lease_ttl(stored.lease_id)
        assert left > 0, "the lease lapsed"
        renewals += left > last
        last = left
        time.sleep(0.1)
    assert 3 <= renewals <= 5, renewals  # about 7 s / 2 s, not 7 s / 1 s
    # A garbled record: the agent's own setting again, a warning, no crash.
    plane.client.store.put(plane.client.layout.cadence(plane.component), b"{not json")
    plane.wait_heartbeat(agent, lambda h: _cadence(h) == LOCAL, "back to the local cadence")
    assert agent.proc.poll() is None
    assert any("unreadable heartbeat cadence" in e.get("message", "") for e in agent.log_lines())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_stopped_component_stops_the_heartbeat(plane: Plane, record_property: Any) -> None:
    _seed(plane)
    target = plane.start_target()
    port = _free_port()
    agent = plane.start_agent(
        target,
        "--health-check",
        "process",  # the process to check defaults to the reload target
        "--health-start-grace-seconds",
        "0",
        "--status-port",
        str(port),
        "--status-address",
        "127.0.0.1",
    )
    plane.wait_heartbeat(agent, lambda h: h["status"] == "RUNNING", "RUNNING")
    code, body = wait_for("status", lambda: _status(port))
    assert code == 200 and body["healthy"] and body["cadence"]["source"] == "local"
    assert body["health_check"] == f"process {target.name!r}"

    stopped = time.monotonic()
    os.kill(target.proc.pid, signal.SIGSTOP)
    try:
        hb = plane.wait_heartbeat(
            agent,
            lambda h: (h.get("last_error") or {}).get("reason") == "ComponentUnhealthy",
            "the reason in the heartbeat",
        )
        assert "is stopped (state T)" in hb["last_error"]["detail"]
        code, body = _status(port)
        assert code == 503 and body["renewing"] is False
        assert body["last_error"]["reason"] == "ComponentUnhealthy"
        wait_for(
            "the lease to expire",
            lambda: plane.heartbeat(agent.instance) is None,
            timeout=30,
            every=0.1,
        )
        expired = time.monotonic() - stopped
        print(f"\ninstance key gone {expired:.2f}s after SIGSTOP (lease {LOCAL[1]}s)")
        record_property("sigstop_to_expiry_seconds", round(expired, 2))
        assert any(a["kind"] == "ComponentUnhealthy" for a in plane.alerts())
        assert agent.proc.poll() is None
    finally:
        os.kill(target.proc.pid, signal.SIGCONT)
    # Well again: the key comes back, without the reason.
    plane.wait_heartbeat(agent, lambda h: h.get("last_error") is None, "the key back, no error")
    assert wait_for("status 200", lambda: _status(port)[0] == 200)


def test_the_agent_writes_its_record_again_over_a_replay_or_a_delete(plane: Plane) -> None:
    """Someone with etcd write access puts the agent's own earlier record back (its lease, its
    bytes: it verifies) or deletes the key: the agent writes its newest record again at once,
    warns, and counts it in /status, so no reader is left with the old word."""
    _seed(plane)
    port = _free_port()
    puts: list[WatchEvent] = []
    watch = plane.client.store.watch_prefix(
        plane.client.layout.instances_dir(plane.component),
        lambda e: puts.append(e) if e.kind == "put" else None,
    )
    try:
        agent = plane.start_agent(None, "--status-port", str(port), "--status-address", "127.0.0.1")
        key = plane.client.layout.instance(plane.component, agent.instance)
        newer = plane.wait_heartbeat(agent, lambda h: h["status"] == "RUNNING", "RUNNING")
        wait_for("the first put seen", lambda: bool(puts))
    finally:
        watch.cancel()
    older = puts[0]
    assert json.loads(older.value)["seq"] == 1 and newer["seq"] > 1
    at = plane.client.store.put(key, older.value, lease=older.lease_id)

    def answered(revision: int) -> tuple[int, dict[str, Any]] | None:
        stored = plane.client.store.get(key)
        if stored is None or stored.mod_revision <= revision:
            return None
        return stored.mod_revision, json.loads(stored.value)

    at, again = wait_for("the record written again", lambda: answered(at), timeout=10)
    assert again["status"] == "RUNNING" and again["seq"] > newer["seq"]
    plane.client.store.delete(key)
    _, back = wait_for("the key back", lambda: answered(at), timeout=10)
    assert back["seq"] > again["seq"]
    code, body = wait_for("status", lambda: _status(port))
    assert code == 200 and body["overwritten"] == 2
    assert any("by someone else" in e.get("message", "") for e in agent.log_lines())
    assert agent.proc.poll() is None


def test_store_unavailable_clears_while_the_component_fails_its_health_check(
    plane: Plane,
) -> None:
    """No beat is sent while the component is unhealthy, and a beat was all that cleared
    StoreUnavailable: it stayed until the component recovered. The watch reads the config
    again until etcd answers, and that answer clears it, heartbeats held or not."""
    _seed(plane)
    target = plane.start_target()
    agent = plane.start_agent(
        target, "--health-check", "process", "--health-start-grace-seconds", "0"
    )
    plane.wait_heartbeat(agent, lambda h: h["status"] == "RUNNING", "RUNNING")

    def logged(message: str, level: str | None = None) -> bool:
        return any(
            message in e.get("message", "") and (level is None or e.get("level") == level)
            for e in agent.log_lines()
        )

    os.kill(target.proc.pid, signal.SIGSTOP)
    try:
        plane.wait_heartbeat(
            agent,
            lambda h: (h.get("last_error") or {}).get("reason") == "ComponentUnhealthy",
            "renewals held",
        )
        etcd = plane.etcd
        try:
            for i in range(len(etcd.endpoints)):
                etcd.kill_member(i)
            wait_for(
                "the agent to report StoreUnavailable",
                lambda: any(
                    e.get("level") == "ERROR" and e.get("reason") == "StoreUnavailable"
                    for e in agent.log_lines()
                ),
                timeout=90,
            )
        finally:
            etcd.restart_members()
            etcd.wait_for_leader()
        # Still unhealthy, so still no beat: only the watch's read again can clear it.
        wait_for(
            "StoreUnavailable cleared with the heartbeats held",
            lambda: logged("StoreUnavailable cleared"),  # the old wording too
            timeout=60,
        )
        assert target.proc.poll() is None  # stopped, not gone: the health check still fails
    finally:
        os.kill(target.proc.pid, signal.SIGCONT)
    plane.wait_heartbeat(agent, lambda h: h.get("last_error") is None, "the key back, no error")
    assert agent.proc.poll() is None
