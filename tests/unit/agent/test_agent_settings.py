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
        # A lease of one interval expires whenever a beat is late at all.
        ([*BASE, "--instance", "i", "--heartbeat-misses", "1"], "heartbeat_misses"),
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


def test_help_names_the_variable_of_an_aliased_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DEFENDER_AGENT_SETTINGS (after the alias) is not read: the help must name the one that is.
    text = " ".join(build_parser().format_help().split())
    assert "--settings is DEFENDER_AGENT_SETTINGS_FILE" in text
    shared = tmp_path / "defender.json"
    shared.write_text(json.dumps({"prefix": "/from-env-file"}))
    monkeypatch.setenv("DEFENDER_AGENT_SETTINGS_FILE", str(shared))
    assert load_agent_settings([*BASE, "--instance", "i"]).settings_file == shared


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


# --- the agent calls only its own pod ----------------------------------------------------------

NOT_THE_POD = [
    "http://10.0.0.7:8080/-/reload",
    "http://sniffer.other-ns.svc:8080/-/reload",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00::2]:8080/x",
    "http://[::ffff:127.0.0.1]:8080/x",  # IPv4-mapped: not a literal loopback address
    "http://127.1:8080/x",  # inet_aton shorthand for 127.0.0.1: refused, not guessed at
    "http://0x7f.0.0.1:8080/x",
    "http://0.0.0.0:8080/x",  # "any": connects to loopback on Linux, but says nothing of it
    "http://ip6-localhost:8080/x",  # a name that usually resolves to ::1: no lookups
    "http://sniffer.localhost:8080/x",
    "http://localhost.evil.example:8080/x",
    "http://127.0.0.1@evil.example/x",  # userinfo before the real host
    "https://127.0.0.1:8443/x",  # TLS over loopback: the agent speaks plain http only
    "ftp://127.0.0.1/x",
    "127.0.0.1:8080/x",
    "http://127.0.0.1:99999/x",
    "",
]
THE_POD = [
    "http://127.0.0.1:8080/-/reload",
    "http://localhost:8080/-/reload",
    "http://LOCALHOST/-/reload",
    "http://127.0.0.53:9/x",
    "http://[::1]:8080/-/reload",
    "http://user:token@127.0.0.1:8080/-/reload?token=x",
]


@pytest.mark.parametrize("url", NOT_THE_POD)
def test_a_reload_url_outside_the_pod_is_refused_in_one_line(url: str) -> None:
    argv = [*BASE[:4], "--instance", "i", "--reload-method", "http", "--reload-url", url]
    with pytest.raises(AgentSettingsError, match=r"reload_url: ") as info:
        load_agent_settings(argv)
    assert "\n" not in str(info.value)
    assert not url or url not in str(info.value)  # the URL may hold a token


@pytest.mark.parametrize("url", NOT_THE_POD)
def test_a_health_url_outside_the_pod_is_refused_in_one_line(url: str) -> None:
    argv = [*BASE, "--instance", "i", "--health-check", "http", "--health-url", url]
    with pytest.raises(AgentSettingsError, match=r"health_url: ") as info:
        load_agent_settings(argv)
    assert "\n" not in str(info.value)


def test_a_health_url_outside_the_pod_is_refused_even_when_the_check_is_off() -> None:
    # A value set for later is checked now, not when someone turns the check on.
    with pytest.raises(AgentSettingsError, match=r"health_url: "):
        load_agent_settings([*BASE, "--instance", "i", "--health-url", "http://10.0.0.7/"])


@pytest.mark.parametrize("url", THE_POD)
def test_loopback_urls_are_accepted(url: str) -> None:
    reload = [*BASE[:4], "--instance", "i", "--reload-method", "http", "--reload-url", url]
    assert load_agent_settings(reload).reload_url == url
    health = [*BASE, "--instance", "i", "--health-check", "http", "--health-url", url]
    assert load_agent_settings(health).health_url == url


@pytest.mark.parametrize(
    ("target", "ok"),
    [
        ("127.0.0.1:9000", True),
        ("localhost:9000", True),
        ("[::1]:9000", True),
        ("10.0.0.7:9000", False),
        ("db.other-ns.svc:5432", False),
        ("127.1:9000", False),
    ],
)
def test_a_tcp_check_outside_the_pod_is_refused(target: str, ok: bool) -> None:
    argv = [*BASE, "--instance", "i", "--health-check", "tcp", "--health-tcp", target]
    if ok:
        assert load_agent_settings(argv).health_tcp == target
    else:
        with pytest.raises(AgentSettingsError, match=r"health_tcp: .*own pod"):
            load_agent_settings(argv)


# Each of these was accepted and then crashed the running agent (OverflowError: a socket
# timeout, a sleep or a lease TTL out of range) or hung it for ever: refused at start instead.
_DURATIONS = [
    "--reload-grace-seconds",
    "--reload-timeout-seconds",
    "--reload-backoff-seconds",
    "--heartbeat-interval-seconds",
    "--health-file-max-age-seconds",
    "--health-timeout-seconds",
    "--health-start-grace-seconds",
    "--keyring-poll-seconds",
]


@pytest.mark.parametrize("flag", _DURATIONS)
@pytest.mark.parametrize("value", ["inf", "1e12", "nan"])
def test_a_duration_that_is_not_finite_or_beyond_its_bound_is_refused_in_one_line(
    flag: str, value: str
) -> None:
    name = flag[2:].replace("-", "_")
    with pytest.raises(AgentSettingsError, match=name) as info:
        load_agent_settings([*BASE, "--instance", "i", flag, value])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("flag", "largest"),
    [
        ("--reload-grace-seconds", "86400"),
        ("--reload-timeout-seconds", "86400"),
        ("--reload-backoff-seconds", "60"),
        ("--heartbeat-interval-seconds", "3600"),
        ("--heartbeat-misses", "100"),
        ("--health-file-max-age-seconds", "86400"),
        ("--health-timeout-seconds", "86400"),
        ("--health-start-grace-seconds", "86400"),
        ("--keyring-poll-seconds", "86400"),
    ],
)
def test_each_bounded_setting_takes_its_largest_value_and_refuses_more(
    flag: str, largest: str
) -> None:
    name = flag[2:].replace("-", "_")
    settings = load_agent_settings([*BASE, "--instance", "i", flag, largest])
    assert getattr(settings, name) == float(largest)
    with pytest.raises(AgentSettingsError, match=name):
        load_agent_settings([*BASE, "--instance", "i", flag, str(int(largest) + 1)])


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("DEFENDER_HEARTBEAT_INTERVAL_SECONDS", "inf"),
        ("DEFENDER_ETCD__TIMEOUT_SECONDS", "inf"),
        ("DEFENDER_KEYRING_POLL_SECONDS", "1e12"),
        ("DEFENDER_ETCD__BACKOFF_MAX_SECONDS", "1e12"),
    ],
)
def test_a_library_duration_beyond_its_bound_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str
) -> None:
    # The library's own variables reach the agent through library_settings(): accepted, each
    # crashed the running agent (a sleep, a gRPC deadline, a lease TTL out of range).
    import os

    for key in list(os.environ):
        if key.startswith("DEFENDER_") and not key.startswith("DEFENDER_AGENT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv(env, value)
    settings = load_agent_settings([*BASE, "--instance", "i"])
    with pytest.raises(SettingsError, match=env) as info:
        library_settings(settings)
    assert "\n" not in str(info.value)
