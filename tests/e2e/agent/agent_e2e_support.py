"""Helpers for the agent end-to-end tests (used by conftest and the tests): the real 3-member
etcd, the agent as a real subprocess, a real target process that reloads on SIGHUP, and a keyring
directory that stands in for the mounted Secret (replaced atomically, as the kubelet swaps its
``..data`` link)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defender_config import (
    ConfigStore,
    DefenderClient,
    Keyring,
    KeyringSource,
    Registry,
)
from defender_devcluster import EtcdCluster, popen_dying_with_parent, wait_for

HERE = Path(__file__).resolve().parent
TARGET_SCRIPT = HERE / "reload_target.py"

# Short heartbeats so lease expiry is observable in seconds: TTL = 1 s x 3 misses.
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_MISSES = 3
KEYRING_POLL = 0.2


def write_keyring(directory: Path, keyring: Keyring) -> None:
    """Replace keyring.json atomically, like the kubelet updating a mounted Secret."""
    tmp = directory / ".keyring.json.tmp"
    tmp.write_bytes(keyring.to_json())
    os.replace(tmp, directory / "keyring.json")


@dataclass
class Target:
    """The reload target process and what it recorded."""

    proc: subprocess.Popen[bytes]
    name: str
    config_path: Path
    record_path: Path

    def records(self) -> list[dict[str, Any]]:
        if not self.record_path.exists():
            return []
        return [json.loads(line) for line in self.record_path.read_text().splitlines() if line]

    def loaded(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["event"] == "loaded"]

    def bad_reads(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["event"] == "bad_file"]


@dataclass
class AgentProc:
    proc: subprocess.Popen[bytes]
    instance: str
    log_path: Path

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"level": "RAW", "message": line})
        return out

    def errors(self) -> list[dict[str, Any]]:
        return [entry for entry in self.log_lines() if entry.get("level") in ("ERROR", "RAW")]


@dataclass
class Plane:
    """What one test works with: its own prefix, keyring dir, client and started processes."""

    etcd: EtcdCluster
    prefix: str
    keyring_dir: Path
    shared_dir: Path
    component: str
    client: DefenderClient
    keyring: KeyringSource
    configs: ConfigStore
    registry: Registry
    tmp: Path
    agents: list[AgentProc] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    @property
    def output_path(self) -> Path:
        return self.shared_dir / f"{self.component}.json"

    def start_target(self) -> Target:
        name = f"dfa-target-{uuid.uuid4().hex[:6]}"
        record = self.tmp / f"{name}.records"
        # argv[0] is the process name the agent looks for under /proc (like a C++ binary).
        proc = subprocess.Popen(
            [name, str(TARGET_SCRIPT), str(self.output_path), str(record)],
            executable=sys.executable,
        )
        target = Target(proc, name, self.output_path, record)
        self.targets.append(target)
        wait_for("the target to start", lambda: target.records(), timeout=15)
        return target

    def start_agent(
        self, target: Target | None, *extra: str, instance: str | None = None
    ) -> AgentProc:
        instance = instance or f"pod-{uuid.uuid4().hex[:6]}"
        log_path = self.tmp / f"agent-{instance}.log"
        reload_args = (
            ["--reload-method", "signal", "--reload-process", target.name]
            if target is not None
            else ["--reload-method", "none"]
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEFENDER_")}
        env["POD_NAME"] = instance
        env["NODE_NAME"] = "node-e2e"
        args = [
            sys.executable,
            "-m",
            "defender_agent",
            "--component",
            self.component,
            "--output-path",
            str(self.output_path),
            "--etcd-endpoints",
            ",".join(self.etcd.endpoints),
            "--prefix",
            self.prefix,
            "--keyring-path",
            str(self.keyring_dir),
            "--keyring-poll-seconds",
            str(KEYRING_POLL),
            "--heartbeat-interval-seconds",
            str(HEARTBEAT_INTERVAL),
            "--heartbeat-misses",
            str(HEARTBEAT_MISSES),
            *reload_args,
            *extra,
        ]
        with log_path.open("wb") as log_file:
            proc = popen_dying_with_parent(args, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        agent = AgentProc(proc, instance, log_path)
        self.agents.append(agent)
        return agent

    def heartbeat(self, instance: str) -> dict[str, Any] | None:
        got = self.client.get_json(self.client.layout.instance(self.component, instance))
        return got[0] if got is not None else None

    def wait_heartbeat(
        self,
        agent: AgentProc,
        predicate: Callable[[dict[str, Any]], bool],
        what: str,
        timeout: float = 20,
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            assert agent.proc.poll() is None, (
                f"agent exited with {agent.proc.returncode}: {agent.log_path.read_text()[-3000:]}"
            )
            hb = self.heartbeat(agent.instance)
            return hb if hb is not None and predicate(hb) else None

        try:
            result: dict[str, Any] = wait_for(what, check, timeout=timeout)
        except AssertionError as exc:
            tail = agent.log_path.read_text()[-4000:]
            hb = self.heartbeat(agent.instance)
            raise AssertionError(f"{exc}\nheartbeat: {hb}\nagent log tail:\n{tail}") from None
        return result

    def alerts(self) -> list[dict[str, Any]]:
        prefix = self.client.layout.component_alerts_dir(self.component)
        return [json.loads(sv.value) for sv in self.client.store.list_prefix(prefix)]
