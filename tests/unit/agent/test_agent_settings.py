from __future__ import annotations

import json
from pathlib import Path

import pytest

from defender_agent import AgentSettingsError, load_agent_settings
from defender_agent._settings import build_parser, library_settings
from defender_config import SettingsError

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
    lib = library_settings(settings)
    assert lib.heartbeat_interval_seconds == 2.5
    assert lib.heartbeat_allowed_misses == 3
    assert lib.etcd.endpoints == settings.etcd_endpoints


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
        ([*BASE, "--instance", "i", "--reload-signal", "9"], "SIGKILL cannot be handled"),
        ([*BASE, "--instance", "i", "--reload-signal", "STOP"], "SIGSTOP cannot be handled"),
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


def test_library_settings_file_with_agent_overrides(tmp_path: Path) -> None:
    shared = tmp_path / "defender.json"
    shared.write_text(
        json.dumps(
            {
                "etcd": {"endpoints": ["http://etcd-0:2379"], "timeout_seconds": 2},
                "prefix": "/from-file",
                "keyring_path": "/etc/ml-defender/keyring",
                "envelope": {"compress": False},
            }
        )
    )
    plain = load_agent_settings([*BASE, "--instance", "i", "--settings", str(shared)])
    lib = library_settings(plain)
    assert lib.prefix == "/from-file"
    assert lib.etcd.endpoints == ["http://etcd-0:2379"]
    assert lib.envelope.compress is False
    assert lib.keyring_path == Path("/etc/ml-defender/keyring")
    over = load_agent_settings(
        [
            *BASE,
            "--instance",
            "i",
            "--settings-file",
            str(shared),
            "--etcd-endpoints",
            "http://127.0.0.1:1,http://127.0.0.1:2",
            "--prefix",
            "/test-x",
            "--keyring-path",
            str(tmp_path),
        ]
    )
    lib = library_settings(over)
    assert lib.etcd.endpoints == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert lib.etcd.timeout_seconds == 2  # untouched fields come from the file
    assert lib.prefix == "/test-x"
    assert lib.keyring_path == tmp_path


def test_library_settings_bad_endpoint() -> None:
    settings = load_agent_settings([*BASE, "--instance", "i", "--etcd-endpoints", "ftp://x:1"])
    with pytest.raises(AgentSettingsError, match="http"):
        library_settings(settings)


def test_library_settings_missing_file(tmp_path: Path) -> None:
    settings = load_agent_settings(
        [*BASE, "--instance", "i", "--settings", str(tmp_path / "no.json")]
    )
    with pytest.raises(SettingsError, match="cannot read"):
        library_settings(settings)


def test_every_setting_is_documented() -> None:
    from defender_agent import AgentSettings

    undocumented = [n for n, f in AgentSettings.model_fields.items() if not f.description]
    assert undocumented == []


def test_allow_plaintext_lists_the_component_for_the_library() -> None:
    strict = library_settings(load_agent_settings([*BASE, "--instance", "i"]))
    assert strict.plaintext_components == []
    assert strict.requires_encryption("sniffer") is True
    lenient = library_settings(
        load_agent_settings([*BASE, "--instance", "i", "--allow-plaintext", "true"])
    )
    assert lenient.plaintext_components == ["sniffer"]
    assert lenient.requires_encryption("sniffer") is False
    assert lenient.requires_encryption("firewall") is True


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--etcd-endpoints", "not a url"], "etcd_endpoints: "),
        (["--etcd-cert-file", "/tls/client.pem"], "etcd: "),  # a pair with half given
        ([], "etcd: "),  # the password from the environment, no user
    ],
)
def test_a_bad_etcd_setting_is_one_line_naming_it_without_the_values(
    monkeypatch: pytest.MonkeyPatch, args: list[str], named: str
) -> None:
    monkeypatch.setenv("DEFENDER_AGENT_ETCD_PASSWORD", "hunter2-very-secret")
    settings = load_agent_settings([*BASE, "--instance", "i", *args])
    with pytest.raises(AgentSettingsError) as info:
        library_settings(settings)
    message = str(info.value)
    assert "\n" not in message
    assert named in message
    assert "hunter2" not in message
    assert "input_value" not in message and "pydantic.dev" not in message
