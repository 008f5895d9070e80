"""A stored value that opens but is not a JSON object, reaching the agent through its canary
watch (`Rollouts.watch`, the only watch the agent runs): ACTIVE while a rollout names this
instance, and the candidate itself.

The whole agent path on a store held in memory, with a keyring so the signed rollout record is
obeyed: the library's read, the watch, the applier, the heartbeat fields, the alert, the file."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

# The in-memory store and the alert sink of the memory-budget tests (same directory).
from test_agent_memory import Alerts, MemoryStore

from defender_agent import ConfigTooLargeError, load_agent_settings
from defender_agent._agent import Agent
from defender_config import (
    ConfigValidationError,
    DefenderClient,
    EnvelopeOptions,
    Keyring,
    LibrarySettings,
    Rollouts,
    config_digest,
)
from defender_config._configs import ConfigMetadata
from defender_config._rollout import CanaryWatch, RolloutRecord

# What the agent reports for a config that is not one (ConfigApplier.apply on a non-object, see
# test_agent_core.test_custom_without_schema_needs_an_object): the same kind is expected here.
INVALID = ConfigValidationError.reason
assert INVALID == "ConfigInvalid"

NOT_OBJECTS = [[1, 2], 42, "a string", None, True]


@pytest.fixture(autouse=True)
def _no_defender_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DEFENDER_"):
            monkeypatch.delenv(name)


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class Cluster:
    """One agent (instance demo-0) and what the operator would write for component demo."""

    def __init__(self, tmp_path: Path, *flags: str) -> None:
        self.output = tmp_path / "demo.json"
        settings = load_agent_settings(
            ["--component", "demo", "--instance", "demo-0", "--reload-method", "none",
             "--component-type", "custom", "--output-path", str(self.output), *flags]
        )  # fmt: skip
        library = LibrarySettings(envelope=EnvelopeOptions(encrypt=False, compress=False))
        self.agent = Agent(settings, library)
        self.store, self.alerts = MemoryStore(), Alerts()
        # A keyring: without one the rollout record cannot be authenticated and is ignored.
        self.client = DefenderClient(
            library,
            Keyring.generate(),
            store=self.store,  # type: ignore[arg-type]
            alert_sinks=[self.alerts],
            instance="demo-0",
        )
        self.agent.client = self.client
        self.agent.configs = self.agent.config_store(self.client)
        self.heartbeat: dict[str, Any] = {}
        self.agent._pending_fields = self.heartbeat  # what the heartbeat would carry
        self.layout = self.agent.configs.layout
        self.watch: CanaryWatch | None = None

    def start(self) -> None:
        assert self.agent.configs is not None
        self.watch = Rollouts(self.agent.configs).watch(
            "demo", "demo-0", self.agent._on_active, on_error=self.agent._on_watch_error
        )

    def commit(self, config: Any, version: int) -> None:
        """ACTIVE and its signed metadata, as a commit writes them."""
        meta_path, active = self.layout.metadata("demo"), self.layout.active_config("demo")
        meta = ConfigMetadata(
            version=version,
            last_modified=datetime.now(UTC),
            modified_by="test",
            digest=config_digest(config),
            type="custom",
        )
        record = self.client.encode_record(meta_path, meta.model_dump(mode="json"))
        self.store.put(meta_path, record)
        self.store.put(active, self.client.seal(active, _json(config)))

    def put_active(self, config: Any) -> None:
        """ACTIVE alone (a value put there with etcd write access, or damaged)."""
        active = self.layout.active_config("demo")
        self.store.put(active, self.client.seal(active, _json(config)))

    def rollout(self, config: Any, version: int, base: int, sequence: int) -> None:
        """A candidate and the signed record naming demo-0, as `Rollouts.start` writes them."""
        candidate, rollout = self.layout.candidate("demo"), self.layout.rollout("demo")
        self.store.put(candidate, self.client.seal(candidate, _json(config)))
        record = RolloutRecord(
            version=version,
            base_version=base,
            digest=config_digest(config),
            canaries=("demo-0",),
            since=datetime.now(UTC),
            by="test",
            sequence=sequence,
        )
        self.store.put(rollout, self.client.encode_record(rollout, record.model_dump(mode="json")))

    def kinds(self) -> list[str]:
        return [alert.kind for alert in self.alerts.seen]

    def close(self) -> None:
        if self.watch is not None:
            self.watch.cancel()


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    c = Cluster(tmp_path)
    yield c
    c.close()


@pytest.mark.parametrize("bad", NOT_OBJECTS, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("canary", [True, False], ids=["canary", "no-rollout"])
def test_a_non_object_active_keeps_the_file_and_is_alerted_like_an_invalid_config(
    cluster: Cluster, bad: Any, canary: bool
) -> None:
    cluster.commit({"v": 1}, 1)
    cluster.start()
    expected: dict[str, Any] = {"v": 1}
    version = 1
    if canary:
        cluster.rollout({"v": 2}, 2, 1, sequence=10)
        expected, version = {"v": 2}, 2  # demo-0 runs the candidate
    assert json.loads(cluster.output.read_text()) == expected
    good = cluster.output.read_bytes()

    cluster.put_active(bad)  # through the watch, as a write arrives

    assert cluster.output.read_bytes() == good  # the last good file, byte for byte
    assert cluster.agent.applier.config_version == version
    error = cluster.agent.applier.last_error
    assert error is not None and error.reason == INVALID
    assert "not a JSON object" in error.detail
    assert cluster.heartbeat["last_error"].reason == INVALID
    # Reported as a config that is not one: one alert of that kind, for this instance, by the
    # library's canary watch as `watch_active` does (before the fix: none at all).
    assert cluster.kinds() == [INVALID]
    assert cluster.alerts.seen[0].instance == "demo-0"
    assert cluster.alerts.seen[0].component == "demo"

    cluster.put_active(bad)  # another bad write: another alert (as `watch_active`), same file
    assert cluster.kinds() == [INVALID, INVALID]
    assert cluster.output.read_bytes() == good

    cluster.commit({"v": 3}, 2)  # the next good value (a new base: the rollout is stale)
    assert json.loads(cluster.output.read_text()) == {"v": 3}
    assert cluster.agent.applier.config_version == 2
    assert cluster.agent.applier.last_error is None
    assert cluster.heartbeat["last_error"] is None
    assert cluster.kinds() == [INVALID, INVALID]


@pytest.mark.parametrize("bad", NOT_OBJECTS, ids=lambda v: type(v).__name__)
def test_a_non_object_candidate_never_reaches_the_file_and_the_next_good_one_does(
    cluster: Cluster, bad: Any
) -> None:
    cluster.commit({"v": 1}, 1)
    cluster.start()
    good = cluster.output.read_bytes()

    cluster.rollout(bad, 2, 1, sequence=10)  # a rollout starts with a candidate that is no config
    assert cluster.output.read_bytes() == good  # demo-0 stays on ACTIVE, byte for byte
    assert cluster.agent.applier.config_version == 1

    cluster.rollout({"v": 2}, 2, 1, sequence=11)  # the next good candidate is taken
    assert json.loads(cluster.output.read_text()) == {"v": 2}
    assert cluster.agent.applier.config_version == 2

    # A bad candidate over the one running: the library's rule is to fall back to ACTIVE (the
    # known good base), never to the bad value.
    cluster.rollout(bad, 3, 1, sequence=12)
    assert cluster.output.read_bytes() == good
    assert cluster.agent.applier.config_version == 1
    assert cluster.agent.applier.last_error is None


def test_a_non_object_candidate_is_reported_like_an_invalid_config(cluster: Cluster) -> None:
    cluster.commit({"v": 1}, 1)
    cluster.start()
    good = cluster.output.read_bytes()
    cluster.rollout([1, 2], 2, 1, sequence=10)
    assert cluster.kinds() == [INVALID]
    alert = cluster.alerts.seen[0]
    assert alert.instance == "demo-0" and alert.component == "demo"
    assert "not a JSON object" in alert.detail
    assert cluster.output.read_bytes() == good  # stays on ACTIVE


def test_a_candidate_over_the_memory_budget_is_reported_and_never_reaches_the_file(
    tmp_path: Path,
) -> None:
    # The budget check runs inside the library's read of the candidate (`before_parse`): the
    # candidate is refused like any config the agent cannot take, ACTIVE stays in the file.
    cluster = Cluster(tmp_path, "--max-config-bytes", "1000")
    try:
        cluster.commit({"v": 1}, 1)
        cluster.start()
        good = cluster.output.read_bytes()

        cluster.rollout({"v": 2, "pad": "x" * 2000}, 2, 1, sequence=10)

        assert cluster.output.read_bytes() == good
        assert cluster.agent.applier.config_version == 1
        assert cluster.kinds() == [ConfigTooLargeError.reason]
        alert = cluster.alerts.seen[0]
        assert alert.instance == "demo-0" and alert.component == "demo"
        assert "--max-config-bytes" in alert.detail

        cluster.rollout({"v": 2}, 2, 1, sequence=11)  # a candidate within the budget is taken
        assert json.loads(cluster.output.read_text()) == {"v": 2}
        assert cluster.agent.applier.config_version == 2
        assert cluster.kinds() == [ConfigTooLargeError.reason]
    finally:
        cluster.close()
