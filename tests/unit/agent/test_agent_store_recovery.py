"""``StoreUnavailable`` leaves the instance record once etcd answers again, with no new config.

The config side reports it (the watch could not be re-created, a read failed), but a watch
that comes back from the next revision, or a read that finds the config already delivered,
hands nothing to the applier: the error stayed in the heartbeat until the next commit (seen
after an etcd restore, and after any outage). The agent's main loop clears it once a heartbeat
got through after it was reported; errors of other reasons stay.

The agent on a store held in memory, its canary watch, and a heartbeater that only counts."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# The in-memory store and the alert sink of the memory-budget tests (same directory).
from test_agent_memory import Alerts, MemoryStore

from defender_agent import load_agent_settings
from defender_agent._agent import Agent
from defender_config import (
    DefenderClient,
    EnvelopeOptions,
    LibrarySettings,
    Rollouts,
    StoreError,
    StoreUnavailableError,
)

UNAVAILABLE = StoreUnavailableError.reason


@pytest.fixture(autouse=True)
def _no_defender_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DEFENDER_"):
            monkeypatch.delenv(name)


class FailingWatchStore(MemoryStore):
    """Keeps each watch's ``on_error``, as the store's watch thread calls it when the watch
    cannot be re-created (once per outage)."""

    def __init__(self) -> None:
        super().__init__()
        self.on_errors: list[Callable[[StoreError], None]] = []

    def watch_key(self, key: str, callback: Callable[[Any], None], **kw: Any) -> Any:
        self.on_errors.append(kw["on_error"])
        return super().watch_key(key, callback, **kw)

    def watch_lost(self) -> None:
        down = StoreUnavailableError(["https://127.0.0.1:2379"], "connection refused")
        self.on_errors[0](down)


class CountingBeat:
    """What the agent asks of its heartbeater here: the fields it pushes and its beat count."""

    def __init__(self) -> None:
        self.beats = 1
        self.fields: dict[str, Any] = {}
        self.status = "STARTING"

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)

    def set_status(self, status: str) -> None:
        self.status = status


class Pod:
    def __init__(self, tmp_path: Path) -> None:
        self.output = tmp_path / "demo.json"
        settings = load_agent_settings(
            ["--component", "demo", "--instance", "demo-0", "--reload-method", "none",
             "--component-type", "custom", "--output-path", str(self.output)]
        )  # fmt: skip
        library = LibrarySettings(envelope=EnvelopeOptions(encrypt=False, compress=False))
        self.agent = Agent(settings, library)
        self.store, self.alerts = FailingWatchStore(), Alerts()
        self.agent.client = DefenderClient(
            library,
            store=self.store,  # type: ignore[arg-type]
            alert_sinks=[self.alerts],
        )
        self.agent.configs = self.agent.config_store(self.agent.client)
        self.beat = CountingBeat()
        self.agent.heartbeater = self.beat  # type: ignore[assignment]
        self.active = self.agent.configs.layout.active_config("demo")

    def put(self, config: Any) -> None:
        self.store.put(self.active, json.dumps(config).encode())

    def start(self) -> None:
        assert self.agent.configs is not None
        self.agent._watch = Rollouts(self.agent.configs).watch(
            "demo", "demo-0", self.agent._on_active, on_error=self.agent._on_watch_error
        )

    def reason(self) -> str | None:
        error = self.agent.applier.last_error
        return error.reason if error is not None else None

    def reported(self) -> str | None:
        """The last_error the heartbeat record carries."""
        error = self.beat.fields.get("last_error")
        return error.reason if error is not None else None


def test_store_unavailable_clears_on_the_first_beat_after_it_no_config_change(
    tmp_path: Path,
) -> None:
    pod = Pod(tmp_path)
    pod.put({"v": 1})
    pod.start()
    assert json.loads(pod.output.read_text()) == {"v": 1}
    applied = pod.agent.applier.applied

    pod.store.watch_lost()
    assert pod.reason() == pod.reported() == UNAVAILABLE
    # etcd still away: no beat got through, the error is true and stays.
    for _ in range(3):
        pod.agent._tick()
    assert pod.reason() == pod.reported() == UNAVAILABLE

    pod.beat.beats += 1  # a lease renewed: etcd answered
    pod.agent._tick()
    assert pod.reason() is None
    assert "last_error" in pod.beat.fields and pod.reported() is None
    # Cleared without a config delivered: nothing new was written or applied.
    assert pod.agent.applier.applied == applied
    assert json.loads(pod.output.read_text()) == {"v": 1}
    # StoreUnavailable is transient: never an alert record.
    assert [a.kind for a in pod.alerts.seen] == []


def test_a_beat_before_the_error_was_reported_does_not_clear_it(tmp_path: Path) -> None:
    pod = Pod(tmp_path)
    pod.put({"v": 1})
    pod.start()
    pod.store.watch_lost()
    pod.beat.beats += 1
    pod.agent._tick()
    assert pod.reason() is None
    # A second outage: the beats counted before it prove nothing about it.
    pod.beat.beats += 5
    pod.store.watch_lost()
    pod.agent._tick()
    assert pod.reason() == pod.reported() == UNAVAILABLE
    pod.beat.beats += 1
    pod.agent._tick()
    assert pod.reason() is None


def test_errors_of_other_reasons_stay_when_etcd_answers(tmp_path: Path) -> None:
    pod = Pod(tmp_path)
    pod.put({"v": 1})
    pod.start()
    pod.put([1, 2])  # not a config: refused, the last good file kept
    assert pod.reason() == pod.reported() == "ConfigInvalid"
    pod.beat.beats += 3
    pod.agent._tick()
    assert pod.reason() == pod.reported() == "ConfigInvalid"
    assert json.loads(pod.output.read_text()) == {"v": 1}
