"""The agent refuses, before parsing it, a config its memory cannot take (``_memory``).

Budget arithmetic and cgroup reading on fake files (never the machine's own /sys), then the
whole agent path: the library's read of ACTIVE through a store held in memory, the watch, the
applier, the alert, the file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from defender_agent import load_agent_settings
from defender_agent._agent import Agent
from defender_agent._errors import ConfigTooLargeError
from defender_agent._memory import (
    WORST_CASE_EXPANSION,
    MemoryBudget,
    config_budget,
    memory_limit,
    resident_bytes,
)
from defender_config import (
    ConfigStore,
    ConfigValidationError,
    DefenderClient,
    DefenderConfigError,
    EnvelopeOptions,
    LibrarySettings,
    Rollouts,
)
from defender_config._alerts import Alert
from defender_config._store_types import StoredValue

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _no_defender_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The settings read DEFENDER_* variables; a developer's shell must not change the outcome.
    for name in list(os.environ):
        if name.startswith("DEFENDER_"):
            monkeypatch.delenv(name)


# --- the budget -------------------------------------------------------------------------------


def test_budget_is_what_the_limit_leaves_divided_by_the_expansion() -> None:
    assert config_budget(None, 70 * MiB) is None
    assert config_budget(128 * MiB, 64 * MiB, expansion=64) == MiB
    assert config_budget(256 * MiB, 64 * MiB) == 192 * MiB // WORST_CASE_EXPANSION
    assert config_budget(64 * MiB, 100 * MiB) == 0  # already over: nothing fits


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"memory.max": "134217728\n"}, 128 * MiB),  # cgroup v2
        ({"memory.max": "max\n"}, None),
        ({"memory/memory.limit_in_bytes": "268435456\n"}, 256 * MiB),  # cgroup v1 mount
        ({"memory.limit_in_bytes": "268435456\n"}, 256 * MiB),  # v1 mounted at the root
        ({"memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),  # v1 "no limit"
        ({}, None),  # no cgroup files: not in a container
        ({"memory.max": "lots\n"}, None),
        # v2 wins over a stray v1 file.
        ({"memory.max": "134217728", "memory/memory.limit_in_bytes": "1"}, 128 * MiB),
    ],
)
def test_memory_limit_from_the_cgroup_files(
    tmp_path: Path, files: dict[str, str], limit: int | None
) -> None:
    assert memory_limit(_cgroup(tmp_path, files)) == limit


def test_resident_bytes_from_statm(tmp_path: Path) -> None:
    statm = tmp_path / "statm"
    statm.write_text("5000 1000 300 10 0 900 0\n")
    assert resident_bytes(statm) == 1000 * os.sysconf("SC_PAGE_SIZE")
    assert resident_bytes(tmp_path / "absent") == 0
    assert resident_bytes(Path("/proc/self/statm")) > 0


def test_memory_budget_refuses_over_the_limit_with_a_typed_error(tmp_path: Path) -> None:
    root = _cgroup(tmp_path / "cg", {"memory.max": str(128 * MiB)})
    statm = tmp_path / "statm"
    statm.write_text(f"0 {64 * MiB // os.sysconf('SC_PAGE_SIZE')} 0 0 0 0 0\n")
    budget = MemoryBudget(cgroup_root=root, statm=statm)
    allowed = 64 * MiB // WORST_CASE_EXPANSION
    assert budget.allowance()[0] == allowed
    budget.check("demo", allowed)
    with pytest.raises(ConfigTooLargeError) as caught:
        budget.check("demo", allowed + 1)
    exc = caught.value
    assert exc.reason == "ConfigTooLarge"
    assert isinstance(exc, DefenderConfigError)  # the library's watch passes it on
    assert (exc.size, exc.max_bytes) == (allowed + 1, allowed)
    assert "container memory limit 128 MiB" in str(exc)
    assert "agent.resources.limits.memory" in str(exc)


def test_memory_budget_without_a_limit_takes_anything(tmp_path: Path) -> None:
    budget = MemoryBudget(cgroup_root=_cgroup(tmp_path, {"memory.max": "max"}))
    budget.check("demo", 1 << 40)


def test_max_config_bytes_replaces_the_estimate(tmp_path: Path) -> None:
    unlimited = _cgroup(tmp_path, {"memory.max": "max"})
    budget = MemoryBudget(1000, cgroup_root=unlimited)
    budget.check("demo", 1000)
    with pytest.raises(ConfigTooLargeError, match="--max-config-bytes"):
        budget.check("demo", 1001)
    # ... also when the limit would allow more or less.
    tiny = _cgroup(tmp_path / "tiny", {"memory.max": str(MiB)})
    MemoryBudget(10 * MiB, cgroup_root=tiny).check("demo", 5 * MiB)


def test_max_config_bytes_setting_from_flag_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["--component", "demo", "--instance", "demo-0", "--reload-method", "none",
            "--output-path", str(tmp_path / "demo.json")]  # fmt: skip
    assert load_agent_settings(base).max_config_bytes is None
    assert load_agent_settings([*base, "--max-config-bytes", "4096"]).max_config_bytes == 4096
    monkeypatch.setenv("DEFENDER_AGENT_MAX_CONFIG_BYTES", "2048")
    assert load_agent_settings(base).max_config_bytes == 2048


# --- the library calls it before parsing --------------------------------------------------------


class MemoryStore:
    """The few EtcdStore calls a reader of ACTIVE makes, on a dict; watches fire on put."""

    def __init__(self) -> None:
        self.values: dict[str, StoredValue] = {}
        self.revision = 0
        self.watchers: list[tuple[str, Callable[[Any], None]]] = []
        self.cluster_changes = 0  # one cluster: never restored

    def put(self, key: str, value: bytes) -> None:
        self.revision += 1
        old = self.values.get(key)
        self.values[key] = StoredValue(
            key, value, self.revision, old.create_revision if old else self.revision, 1
        )
        for watched, callback in list(self.watchers):
            if watched == key:
                callback(object())

    def get(self, key: str, revision: int | None = None) -> StoredValue | None:
        return self.values.get(key)

    def current_revision(self, key: str = "") -> int:
        return self.revision

    def watch_key(self, key: str, callback: Callable[[Any], None], **kw: Any) -> Any:
        entry = (key, callback)
        self.watchers.append(entry)
        store = self

        class Handle:
            def cancel(self) -> None:
                store.watchers.remove(entry)

        return Handle()

    def close(self) -> None:
        pass


class Alerts:
    def __init__(self) -> None:
        self.seen: list[Alert] = []

    def emit(self, alert: Alert) -> None:
        self.seen.append(alert)


def _client(store: MemoryStore, alerts: Alerts) -> DefenderClient:
    # Plaintext values and no keyring: what is under test is the size check, not the envelope.
    settings = LibrarySettings(envelope=EnvelopeOptions(encrypt=False, compress=False))
    return DefenderClient(settings, store=store, alert_sinks=[alerts])  # type: ignore[arg-type]


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def test_the_library_checks_the_decoded_size_before_parsing() -> None:
    store, seen = MemoryStore(), []
    configs = ConfigStore(_client(store, Alerts()), before_parse=lambda c, n: seen.append((c, n)))
    active = configs.layout.active_config("demo")
    store.put(active, _json({"a": 1}))
    assert configs.get_active("demo").config == {"a": 1}
    assert seen == [("demo", len(_json({"a": 1})))]

    def refuse(component: str, size: int) -> None:
        raise ConfigTooLargeError(size, 0, "too large")

    # Not JSON at all, yet refused for its size: the check came first, nothing was parsed.
    store.put(active, b"[" * 1000)
    configs.before_parse = refuse
    with pytest.raises(ConfigTooLargeError):
        configs.get_active("demo")
    configs.before_parse = None
    with pytest.raises(ConfigValidationError):
        configs.get_active("demo")


# --- the agent --------------------------------------------------------------------------------


def test_the_agent_refuses_a_config_over_its_budget_and_takes_a_smaller_one_after(
    tmp_path: Path,
) -> None:
    output = tmp_path / "demo.json"
    settings = load_agent_settings(
        ["--component", "demo", "--instance", "demo-0", "--reload-method", "none",
         "--component-type", "custom", "--output-path", str(output),
         "--max-config-bytes", "1000"]
    )  # fmt: skip
    library = LibrarySettings(envelope=EnvelopeOptions(encrypt=False, compress=False))
    agent = Agent(settings, library)
    store, alerts = MemoryStore(), Alerts()
    agent.client = _client(store, alerts)
    agent.configs = agent.config_store(agent.client)
    heartbeat: dict[str, Any] = {}
    agent._pending_fields = heartbeat  # what the heartbeat would carry (no etcd here)
    active = agent.configs.layout.active_config("demo")

    store.put(active, _json({"v": 1}))
    watch = Rollouts(agent.configs).watch(
        "demo", "demo-0", agent._on_active, on_error=agent._on_watch_error
    )
    assert json.loads(output.read_text()) == {"v": 1}

    big = {"data": list(range(400))}
    assert len(_json(big)) > 1000
    store.put(active, _json(big))  # through the watch, as a commit arrives
    assert json.loads(output.read_text()) == {"v": 1}  # the last good file kept
    assert agent.applier.last_error is not None
    assert agent.applier.last_error.reason == "ConfigTooLarge"
    assert heartbeat["last_error"].reason == "ConfigTooLarge"
    assert "--max-config-bytes" in heartbeat["last_error"].detail
    assert [a.kind for a in alerts.seen] == ["ConfigTooLarge"]
    assert not agent.applier.pending  # nothing retried: the same config is as large again

    agent._reread_active()  # a keyring change reads ACTIVE again: still refused, not re-alerted
    assert [a.kind for a in alerts.seen] == ["ConfigTooLarge"]
    assert json.loads(output.read_text()) == {"v": 1}

    store.put(active, _json({"v": 2}))
    assert json.loads(output.read_text()) == {"v": 2}
    assert agent.applier.last_error is None
    assert heartbeat["last_error"] is None
    watch.cancel()
