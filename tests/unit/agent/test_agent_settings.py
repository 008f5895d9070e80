from __future__ import annotations

from pathlib import Path

import pytest

from defender_agent import AgentSettingsError, load_agent_settings
from defender_agent._settings import build_parser

BASE = [
    "--component",
    "sniffer",
    "--output-path",
    "/shared/sniffer.json",
    "--reload-process",
    "sniffer",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("DEFENDER_AGENT_") or key in ("POD_NAME", "NODE_NAME"):
            monkeypatch.delenv(key)


def test_instance_from_downward_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "sniffer-7d9f-abc")
    monkeypatch.setenv("NODE_NAME", "node-a")
    settings = load_agent_settings(BASE)
    assert settings.instance == "sniffer-7d9f-abc"
    assert settings.node_id == "node-a"
    assert settings.reload_signal == "SIGHUP"


def test_flag_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "from-env")
    monkeypatch.setenv("DEFENDER_AGENT_HEARTBEAT_INTERVAL_SECONDS", "4")
    settings = load_agent_settings(
        [*BASE, "--instance", "from-flag", "--heartbeat-interval-seconds", "2"]
    )
    assert settings.instance == "from-flag"
    assert settings.heartbeat_interval_seconds == 2


def test_everything_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFENDER_AGENT_COMPONENT", "firewall")
    monkeypatch.setenv("DEFENDER_AGENT_COMPONENT_TYPE", "firewall")
    monkeypatch.setenv("DEFENDER_AGENT_INSTANCE", "fw-0")
    monkeypatch.setenv("DEFENDER_AGENT_OUTPUT_PATH", "/shared/fw.json")
    monkeypatch.setenv(
        "DEFENDER_AGENT_ETCD_ENDPOINTS", "http://a:2379, http://b:2379,,http://c:2379"
    )
    monkeypatch.setenv("DEFENDER_AGENT_RELOAD_METHOD", "http")
    monkeypatch.setenv("DEFENDER_AGENT_RELOAD_URL", "http://127.0.0.1:8080/-/reload")
    monkeypatch.setenv("DEFENDER_AGENT_FILE_MODE", "0600")
    monkeypatch.setenv("DEFENDER_AGENT_HEARTBEAT_INTERVAL_SECONDS", "2.5")
    monkeypatch.setenv("DEFENDER_AGENT_HEARTBEAT_MISSES", "3")
    settings = load_agent_settings([])
    assert settings.etcd_endpoints == ["http://a:2379", "http://b:2379", "http://c:2379"]
    assert settings.file_mode == 0o600
    assert settings.output_path == Path("/shared/fw.json")
    assert settings.lease_ttl_seconds == 8  # ceil(2.5 * 3)


def test_signal_by_short_name() -> None:
    settings = load_agent_settings([*BASE, "--instance", "i", "--reload-signal", "usr1"])
    assert settings.reload_signal == "SIGUSR1"
    assert settings.reload_signum.name == "SIGUSR1"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--output-path", "/x", "--reload-process", "s", "--instance", "i"], "component"),
        (["--component", "sniffer", "--output-path", "/x", "--reload-process", "s"], "POD_NAME"),
        ([*BASE, "--instance", "i", "--component-type", "nope"], "component_type"),
        ([*BASE, "--instance", "i", "--reload-signal", "SIGNOPE"], "unknown signal"),
        ([*BASE, "--instance", "i", "--reload-pidfile", "/run/x.pid"], "exactly one"),
        (["--component", "s", "--output-path", "/x", "--instance", "i"], "exactly one"),
        ([*BASE[:4], "--instance", "i", "--reload-method", "http"], "reload_url"),
        (
            [*BASE[:4], "--instance", "i", "--reload-method", "http", "--reload-url", "ftp://x"],
            "http://",
        ),
        ([*BASE, "--instance", "i", "--file-mode", "rw-r"], "octal"),
        ([*BASE, "--instance", "i", "--etcd-endpoints", " , "], "endpoint"),
        ([*BASE, "--instance", "i", "--heartbeat-interval-seconds", "0"], "heartbeat_interval"),
        (
            [
                "--component",
                "Bad_Name",
                "--output-path",
                "/x",
                "--reload-process",
                "s",
                "--instance",
                "i",
            ],
            "component",
        ),
        ([*BASE[:4], "--instance", "i", "--reload-process", "/usr/bin/sniffer"], "not a path"),
        (
            [
                "--component",
                "s",
                "--output-path",
                "/",
                "--reload-method",
                "none",
                "--instance",
                "i",
            ],
            "name a file",
        ),
    ],
)
def test_bad_settings_name_the_field(argv: list[str], expected: str) -> None:
    with pytest.raises(AgentSettingsError, match=expected):
        load_agent_settings(argv)


def test_password_not_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFENDER_AGENT_ETCD_PASSWORD", "hunter2-secret")
    settings = load_agent_settings([*BASE, "--instance", "i"])
    assert "hunter2-secret" not in repr(settings)
    assert settings.etcd_password is not None
    assert settings.etcd_password.get_secret_value() == "hunter2-secret"


def test_help_lists_documented_flags() -> None:
    text = build_parser().format_help()
    assert "--reload-process" in text
    assert "shareProcessNamespace" in text
