"""The agent holds its component's registration as the operator publishes it in the keyring
Secret (`registrations.json`): read at start before the first read of the config, re-read on the
keyring's poll period, a broken file reported and survived.

The agent's start-up step and main-loop poll on a store held in memory, with a keyring so the
metadata record is signed and its registration checked."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

# The in-memory store and the alert sink of the memory-budget tests (same directory).
from test_agent_memory import Alerts, MemoryStore

from defender_agent import load_agent_settings
from defender_agent._agent import Agent
from defender_config import (
    REGISTRATIONS_FILE,
    DefenderClient,
    EnvelopeOptions,
    Keyring,
    LibrarySettings,
    config_digest,
    render_registrations,
)
from defender_config._configs import ConfigMetadata

R1, R2 = 1_767_225_600_000, 1_767_225_600_500
OLD = {"v": "registration one"}
NEW = {"v": "registration two"}


@pytest.fixture(autouse=True)
def _no_defender_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DEFENDER_"):
            monkeypatch.delenv(name)


class Pod:
    """One agent (component demo, instance demo-0) with the keyring Secret mounted at
    `mount`; `start()` is the agent's start-up step, without etcd."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mount = tmp_path / "keyring"
        self.mount.mkdir()
        keyring = Keyring.generate()
        (self.mount / "keyring.json").write_bytes(keyring.to_json())
        self.output = tmp_path / "demo.json"
        settings = load_agent_settings(
            ["--component", "demo", "--instance", "demo-0", "--reload-method", "none",
             "--component-type", "custom", "--output-path", str(self.output)]
        )  # fmt: skip
        library = LibrarySettings(
            keyring_path=self.mount,
            keyring_poll_seconds=0.001,
            envelope=EnvelopeOptions(encrypt=False, compress=False),
        )
        self.agent = Agent(settings, library)
        self.store, self.alerts = MemoryStore(), Alerts()
        self.client = DefenderClient(
            library,
            keyring,
            store=self.store,  # type: ignore[arg-type]
            alert_sinks=[self.alerts],
            instance="demo-0",
        )
        self.agent.client = self.client
        self.heartbeat: dict[str, Any] = {}
        self.agent._pending_fields = self.heartbeat  # what the heartbeat would carry
        self.layout = self.client.layout
        # The registration the reader held when the agent registered (its first possible read
        # of the config, with a seed config).
        self.held_at_register: list[int | None] = []

        def register() -> None:
            assert self.agent.configs is not None
            self.held_at_register.append(self.agent.configs.held_registration("demo"))

        monkeypatch.setattr(self.agent, "_register", register)

    def publish(self, content: bytes | None) -> None:
        """The operator's registrations.json (None: the Secret has none), replaced whole."""
        target = self.mount / REGISTRATIONS_FILE
        if content is None:
            target.unlink(missing_ok=True)
            return
        tmp = self.mount / ".tmp"
        tmp.write_bytes(content)
        os.replace(tmp, target)  # a new inode, as kubelet's ..data swap gives

    def commit(self, config: Any, version: int, registration: int) -> None:
        """Signed metadata and ACTIVE of `registration` (or saved ones put back)."""
        meta_path, active = self.layout.metadata("demo"), self.layout.active_config("demo")
        meta = ConfigMetadata(
            version=version,
            last_modified=datetime.now(UTC),
            modified_by="test",
            digest=config_digest(config),
            type="custom",
            registration=registration,
        )
        self.store.put(
            meta_path, self.client.encode_record(meta_path, meta.model_dump(mode="json"))
        )
        self.store.put(active, json.dumps(config).encode())

    def start(self) -> None:
        self.agent._connect_step()

    def poll(self) -> None:
        """One main-loop tick once the keyring poll period has passed."""
        time.sleep(0.005)
        self.agent._poll_registrations()

    def delivered(self) -> Any:
        return json.loads(self.output.read_text()) if self.output.exists() else None

    def kinds(self) -> list[str]:
        return [alert.kind for alert in self.alerts.seen]

    def held(self) -> int | None:
        assert self.agent.configs is not None
        return self.agent.configs.held_registration("demo")

    def close(self) -> None:
        if self.agent._watch is not None:
            self.agent._watch.cancel()


@pytest.fixture
def pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    p = Pod(tmp_path, monkeypatch)
    yield p
    p.close()


@pytest.mark.parametrize("published", [True, False], ids=["told", "not-told"])
def test_the_agent_holds_the_published_registration_before_its_first_read(
    pod: Pod, published: bool
) -> None:
    # Registration one's metadata and ACTIVE, saved before a purge and put back after the
    # operator registered the name again (R2), before this agent starts.
    pod.commit(OLD, 5, R1)
    pod.publish(render_registrations({"demo": R2, "other": R1}) if published else None)
    pod.start()
    if published:
        assert pod.held_at_register == [R2]  # held before the seed's register reads anything
        assert pod.held() == R2  # its own component only
        assert pod.agent.configs is not None
        assert pod.agent.configs.held_registration("other") is None
        assert pod.delivered() is None  # registration one's config never reaches the file
        assert pod.agent.applier.last_error is not None
        assert pod.agent.applier.last_error.reason == "RegistrationReplayed"
        assert "RegistrationReplayed" in pod.kinds()
        # The operator's repair writes registration two's record again: delivered.
        pod.commit(NEW, 1, R2)
        assert pod.delivered() == NEW
    else:
        # The residual for an agent not told: it takes the pair put back.
        assert pod.held_at_register == [None]
        assert pod.delivered() == OLD


def test_a_later_registrations_file_is_picked_up_and_a_stale_one_never_lowers(
    pod: Pod,
) -> None:
    pod.commit(OLD, 1, R1)
    pod.publish(render_registrations({"demo": R1}))
    pod.start()
    assert pod.held() == R1 and pod.delivered() == OLD

    pod.publish(render_registrations({"demo": R2}))  # purged and registered again
    pod.poll()
    assert pod.held() == R2
    # Registration one's data put back at a higher version: the running agent refuses it (it
    # would take it as registration one's next version without the file).
    pod.commit({"v": "replayed"}, 9, R1)
    assert pod.delivered() == OLD
    assert "RegistrationReplayed" in pod.kinds()
    pod.commit(NEW, 1, R2)
    assert pod.delivered() == NEW

    pod.publish(render_registrations({"demo": R1}))  # a stale file
    pod.poll()
    assert pod.held() == R2

    pod.publish(None)  # gone: nothing changes for what is held
    pod.poll()
    assert pod.held() == R2 and pod.agent.applier.last_error is None


def test_a_malformed_file_at_start_is_reported_once_and_the_agent_runs_on(
    pod: Pod, caplog: pytest.LogCaptureFixture
) -> None:
    pod.commit(OLD, 1, R1)
    pod.publish(b'{"version": 1, "registrations": {"demo": true}}')
    with caplog.at_level(logging.ERROR):
        pod.start()  # does not raise
    assert pod.held_at_register == [None]  # nothing held from the file: today's behaviour
    assert pod.delivered() == OLD  # the agent runs on (and holds what it accepted)
    assert pod.kinds() == ["RegistrationsFileInvalid"]
    assert any(
        "RegistrationsFileInvalid" in r.getMessage() and "is a bool" in r.getMessage()
        for r in caplog.records
    )
    for _ in range(3):
        pod.poll()  # the same broken file: not reported again
    assert pod.kinds() == ["RegistrationsFileInvalid"]

    pod.publish(render_registrations({"demo": R2}))
    pod.poll()
    assert pod.held() == R2


def test_a_file_broken_later_is_reported_keeps_what_is_held_and_clears_when_fixed(
    pod: Pod,
) -> None:
    pod.publish(render_registrations({"demo": R1}))
    pod.start()
    assert pod.held() == R1 and pod.agent.applier.last_error is None

    pod.publish(b'{"version": 2, "registrations": {}}')
    pod.poll()
    error = pod.agent.applier.last_error
    assert error is not None and error.reason == "RegistrationsFileInvalid"
    assert "version 2 is not supported" in error.detail
    assert pod.heartbeat["last_error"].reason == "RegistrationsFileInvalid"
    assert pod.kinds() == ["RegistrationsFileInvalid"]
    assert pod.held() == R1
    pod.poll()
    assert pod.kinds() == ["RegistrationsFileInvalid"]  # once

    pod.publish(render_registrations({"demo": R2}))
    pod.poll()
    assert pod.agent.applier.last_error is None and pod.heartbeat["last_error"] is None
    assert pod.held() == R2


def test_an_unexpected_failure_of_the_poll_never_stops_the_agent(
    pod: Pod, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pod.publish(render_registrations({"demo": R1}))
    pod.start()

    def boom() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(pod.agent, "_check_registrations", boom)
    with caplog.at_level(logging.ERROR):
        pod.poll()
    assert "checking the registrations file failed" in caplog.text


def test_without_a_keyring_path_nothing_is_read(tmp_path: Path) -> None:
    settings = load_agent_settings(
        ["--component", "demo", "--instance", "demo-0", "--reload-method", "none",
         "--component-type", "custom", "--output-path", str(tmp_path / "demo.json")]
    )  # fmt: skip
    library = LibrarySettings(envelope=EnvelopeOptions(encrypt=False, compress=False))
    agent = Agent(settings, library)
    agent.client = DefenderClient(library, store=MemoryStore())  # type: ignore[arg-type]
    agent.configs = agent.config_store(agent.client)
    agent._check_registrations()
    assert agent.registrations is None and agent.applier.last_error is None
