"""Settings: files (JSON/YAML), env overrides, and the error messages of bad input."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest

from defender_config import (
    EnvelopeOptions,
    EtcdSettings,
    LibrarySettings,
    SettingsError,
    load_settings,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("DEFENDER_") and not name.startswith("DEFENDER_TOOLS"):
            monkeypatch.delenv(name)


def test_defaults_without_a_file() -> None:
    settings = load_settings()
    assert settings.prefix == "/ml-defender"
    assert settings.etcd.endpoints == ["http://127.0.0.1:2379"]
    assert settings.envelope == EnvelopeOptions()
    assert settings.envelope.compress and settings.envelope.encrypt
    assert settings.heartbeat_interval_seconds == 30.0


def test_json_and_yaml_files(tmp_path: Path) -> None:
    doc = {
        "prefix": "/lab",
        "etcd": {"endpoints": ["https://e1:2379", "https://e2:2379"], "retries": 2},
        "envelope": {"compress": False, "level": 7, "cipher": "chacha20-poly1305"},
        "keyring_path": "/var/run/defender/keyring",
    }
    as_json = tmp_path / "s.json"
    as_json.write_text(json.dumps(doc))
    as_yaml = tmp_path / "s.yaml"
    as_yaml.write_text(
        "prefix: /lab\n"
        "etcd:\n  endpoints: [https://e1:2379, https://e2:2379]\n  retries: 2\n"
        "envelope:\n  compress: false\n  level: 7\n  cipher: chacha20-poly1305\n"
        "keyring_path: /var/run/defender/keyring\n"
    )
    for path in (as_json, str(as_yaml)):
        settings = load_settings(path)
        assert settings.prefix == "/lab"
        assert settings.etcd.endpoints == ["https://e1:2379", "https://e2:2379"]
        assert settings.etcd.retries == 2 and settings.etcd.timeout_seconds == 5.0
        assert not settings.envelope.compress and settings.envelope.level == 7
        assert settings.envelope.cipher == "chacha20-poly1305"
        assert settings.keyring_path == Path("/var/run/defender/keyring")


def test_empty_yaml_means_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "s.yml"
    empty.write_text("")
    assert load_settings(empty) == LibrarySettings()


def test_env_overrides_the_file_field_by_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("etcd:\n  retries: 3\n  timeout_seconds: 9\nenvelope:\n  level: 4\n")
    monkeypatch.setenv("DEFENDER_ETCD__TIMEOUT_SECONDS", "2")
    monkeypatch.setenv("DEFENDER_ETCD__ENDPOINTS", "http://a:2379, http://b:2379")
    monkeypatch.setenv("DEFENDER_ENVELOPE__ENCRYPT", "false")
    monkeypatch.setenv("DEFENDER_TOOLS_BIN", "/somewhere")  # other DEFENDER_* vars are ignored
    settings = load_settings(path)
    assert settings.etcd.timeout_seconds == 2.0
    assert settings.etcd.retries == 3  # from the file, not lost by the env merge
    assert settings.etcd.endpoints == ["http://a:2379", "http://b:2379"]
    assert settings.envelope.level == 4 and not settings.envelope.encrypt


def test_endpoints_as_json_list_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFENDER_ETCD__ENDPOINTS", '["127.0.0.1:2379", "127.0.0.1:22379"]')
    assert load_settings().etcd.endpoints == ["127.0.0.1:2379", "127.0.0.1:22379"]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_file_nested_too_deeply_is_a_settings_error(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"settings{suffix}"
    path.write_text("[" * 100_000)
    with pytest.raises(SettingsError, match="nested too deeply to parse") as info:
        load_settings(path)
    assert info.value.path == str(path)


def test_a_json_list_in_env_nested_too_deeply_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DEFENDER_ETCD__ENDPOINTS", "[" * 100_000)
    with pytest.raises(SettingsError, match="JSON nested too deeply to parse"):
        load_settings()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"cannot read it .*check the path") as info:
        load_settings(tmp_path / "nope.yaml")
    assert info.value.reason == "InvalidSettings"
    assert info.value.path == str(tmp_path / "nope.yaml")


def test_a_file_that_is_not_utf8_is_a_settings_error(tmp_path: Path) -> None:
    binary = tmp_path / "settings.yaml"
    binary.write_bytes(b"etcd:\n  password: \xffsecret\n")
    with pytest.raises(SettingsError, match="not UTF-8 text") as info:
        load_settings(binary)
    assert info.value.path == str(binary)
    assert "secret" not in str(info.value) and "xff" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("s.json", "{not json", "not valid JSON"),
        ("s.yaml", "etcd: [unclosed", "not valid YAML"),
        ("s.yaml", "- a\n- b\n", "top level must be a mapping of settings, found list"),
        ("s.json", '{"etcd": {"timeout_seconds": -1}}', r"etcd\.timeout_seconds: .*greater than 0"),
        ("s.json", '{"etcd": {"timeout_secs": 1}}', r"etcd\.timeout_secs: Extra inputs"),
        ("s.json", '{"etcd": {"endpoints": []}}', "at least one endpoint"),
        ("s.json", '{"etcd": {"endpoints": ["grpc://x:1"]}}', "must use http:// or https://"),
        ("s.json", '{"etcd": {"endpoints": ["nohost"]}}', r"must look like \[scheme://\]host"),
        ("s.json", '{"etcd": {"endpoints": ["h:99999"]}}', "must look like"),
        ("s.json", '{"etcd": {"cert_file": "/c.pem"}}', "cert_file and key_file"),
        ("s.json", '{"etcd": {"user": "root"}}', "user and password"),
        (
            "s.json",
            '{"etcd": {"backoff_base_seconds": 2, "backoff_max_seconds": 1}}',
            "backoff_max_seconds must be >=",
        ),
        ("s.json", '{"envelope": {"compression": "lz4"}}', "unknown compression 'lz4'"),
        ("s.json", '{"envelope": {"cipher": "rot13"}}', "unknown cipher 'rot13'"),
        # "none" only marks a value stored without: the setting that says so is named.
        (
            "s.json",
            '{"envelope": {"compression": "none"}}',
            r"unknown compression 'none'; use one of [^;]*zstd[^;]* \(or compress: false\)",
        ),
        (
            "s.json",
            '{"envelope": {"cipher": "none"}}',
            r"unknown cipher 'none'; use one of [^;]*aes-256-gcm[^;]* \(or encrypt: false\)",
        ),
        ("s.json", '{"envelope": {"level": 40}}', r"envelope\.level"),
        ("s.json", '{"prefix": "no-slash"}', "prefix"),
        ("s.json", '{"surprise": 1}', "surprise: Extra inputs"),
    ],
)
def test_bad_files_say_which_field(tmp_path: Path, name: str, content: str, match: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SettingsError, match=match) as info:
        load_settings(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("content", "shown"),
    [
        # PyYAML's own message quotes the line: `password: "s3cr3t...` in full.
        (
            'etcd:\n  user: root\n  password: "s3cr3t-Pa55\n',
            "while scanning a quoted scalar at line 3, column 13: "
            "found unexpected end of stream at line 4, column 1",
        ),
        # Its problem text quotes the alias or tag an unquoted value is read as.
        (
            "etcd:\n  user: root\n  password: *s3cr3t-Pa55\n",
            "found undefined alias '…' at line 3, column 13",
        ),
        (
            "etcd:\n  user: root\n  password: !s3cr3t-Pa55 x\n",
            "could not determine a constructor for the tag '…' at line 3, column 13",
        ),
        # Not a marked error (a control character): nothing about the text at all.
        ("etcd:\n  user: root\n  password: s3cr3t-Pa55\x00\n", "the file cannot be parsed"),
    ],
)
def test_yaml_errors_name_the_place_never_the_text(
    tmp_path: Path, content: str, shown: str
) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(content)
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert str(info.value) == f"settings file {path}: not valid YAML: {shown}"
    assert "s3cr3t" not in repr(info.value)
    # Not chained either: a logged traceback would print the YAMLError's text.
    assert info.value.__cause__ is None and info.value.__suppress_context__


_DIGITS = "7" * 5000


@pytest.mark.parametrize(
    ("name", "content", "shown"),
    [
        ("s.json", '{"history_limit": ' + _DIGITS + "}", "not valid JSON: it holds a number over"),
        ("s.yaml", f"history_limit: {_DIGITS}\n", "not valid YAML: a value cannot be read"),
        ("s.yaml", "prefix: 2020-13-45\n", "a date that does not exist"),
        # Read as a date, the password is quoted by the ValueError of the day out of range.
        ("s.yaml", "etcd:\n  user: u\n  password: 2024-02-30\n", "a date that does not exist"),
        # Tags on values not of their type: ValueError, KeyError, IndexError, TypeError,
        # AttributeError, each from deep in PyYAML, the first two quoting the value.
        ("s.yaml", "etcd:\n  password: !!int s3cr3t-Pa55\n", "a tag such as !!int"),
        ("s.yaml", "etcd:\n  password: !!bool s3cr3t-Pa55\n", "a tag such as !!int"),
        ("s.yaml", "etcd:\n  password: !!int\n", "a tag such as !!int"),
        ("s.yaml", "etcd: !!timestamp\n  =: s3cr3t-Pa55\n", "a tag such as !!int"),
        ("s.yaml", "etcd: !!timestamp s3cr3t-Pa55\n", "a tag such as !!int"),
    ],
)
def test_a_value_the_parser_cannot_convert_is_a_settings_error(
    tmp_path: Path, name: str, content: str, shown: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SettingsError, match=shown) as info:
        load_settings(path)
    assert info.value.path == str(path)
    logged = "".join(traceback.format_exception(info.value))
    for quoted in ("s3cr3t", "2024-02-30", _DIGITS[:100]):
        assert quoted not in logged


def test_bad_env_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFENDER_ETCD__RETRIES", "many")
    with pytest.raises(SettingsError, match="DEFENDER_ETCD__RETRIES"):
        load_settings()


def test_undecodable_env_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFENDER_ENVELOPE", '{"s3cr3t-Pa55": broken')
    with pytest.raises(SettingsError, match="DEFENDER_") as info:
        load_settings()
    # The decoder's position stays in the message, the chain (and the text it parsed) goes.
    assert "line 1 column 17" in str(info.value)
    assert "s3cr3t" not in "".join(traceback.format_exception(info.value))


@pytest.mark.parametrize(
    ("name", "content", "shown"),
    [
        # A password under a misspelt key, or of the wrong type: pydantic's error quotes it.
        (
            "s.yaml",
            'etcd:\n  user: defender\n  pasword: "s3cr3t-Pa55"\n',
            "etcd.pasword: Extra inputs are not permitted",
        ),
        (
            "s.json",
            '{"etcd": {"user": "defender", "password": 918273645}}',
            "etcd.password: Input should be a valid string",
        ),
    ],
)
def test_a_rejected_file_value_reaches_no_message_or_traceback(
    tmp_path: Path, name: str, content: str, shown: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SettingsError, match=shown) as info:
        load_settings(path)
    logged = "".join(traceback.format_exception(info.value))
    for secret in ("s3cr3t", "918273645"):
        assert secret not in logged and secret not in repr(info.value)


def test_a_rejected_env_value_reaches_no_message_or_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DEFENDER_ETCD", '{"user": "defender", "pasword": "s3cr3t-Pa55"}')
    with pytest.raises(SettingsError, match=r"etcd\.pasword: Extra inputs") as info:
        load_settings()
    assert "s3cr3t" not in "".join(traceback.format_exception(info.value))


def test_password_is_hidden() -> None:
    etcd = EtcdSettings(user="root", password="hunter2")  # type: ignore[arg-type]
    assert "hunter2" not in repr(etcd) and "hunter2" not in str(etcd)
    assert etcd.password is not None and etcd.password.get_secret_value() == "hunter2"


def test_envelope_options_are_frozen() -> None:
    opts = EnvelopeOptions()
    with pytest.raises(ValueError, match="frozen"):
        opts.level = 9
    assert hash(opts) == hash(EnvelopeOptions())


def test_plaintext_components_from_env_and_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert load_settings().requires_encryption("firewall") is True
    monkeypatch.setenv("DEFENDER_PLAINTEXT_COMPONENTS", "rag, sniffer")
    settings = load_settings()
    assert settings.plaintext_components == ["rag", "sniffer"]
    assert settings.requires_encryption("rag") is False
    assert settings.requires_encryption("firewall") is True
    monkeypatch.setenv("DEFENDER_PLAINTEXT_COMPONENTS", '["rag"]')
    assert load_settings().plaintext_components == ["rag"]
    monkeypatch.delenv("DEFENDER_PLAINTEXT_COMPONENTS")
    path = tmp_path / "s.json"
    path.write_text('{"plaintext_components": ["rag"], "envelope": {"encrypt": false}}')
    loaded = load_settings(path)
    # With encryption off store-wide nothing is required, listed or not.
    assert loaded.requires_encryption("rag") is False
    assert loaded.requires_encryption("firewall") is False


# Each duration and count the library reads, with its largest value. Beyond it (`inf` and
# `1e12` included) each was accepted and then crashed the running agent, component or operator
# (OverflowError: a gRPC deadline, a sleep, a wait or a lease TTL out of range).
_DURATIONS = {
    "DEFENDER_ETCD__TIMEOUT_SECONDS": 86400,
    "DEFENDER_ETCD__BACKOFF_BASE_SECONDS": 86400,
    "DEFENDER_ETCD__BACKOFF_MAX_SECONDS": 86400,
    "DEFENDER_KEYRING_POLL_SECONDS": 86400,
    "DEFENDER_HEARTBEAT_INTERVAL_SECONDS": 3600,
}
_COUNTS = {
    "DEFENDER_ETCD__RETRIES": 100,
    "DEFENDER_HISTORY_LIMIT": 1000,
    "DEFENDER_HEARTBEAT_ALLOWED_MISSES": 100,
}


def _field(env: str) -> tuple[str, ...]:
    return tuple(env.removeprefix("DEFENDER_").lower().split("__"))


@pytest.mark.parametrize("env", sorted(_DURATIONS))
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e12", "-1"])
def test_a_duration_not_finite_or_beyond_its_bound_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError, match=env) as info:
        load_settings()
    assert ".".join(_field(env)) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("env", sorted({**_DURATIONS, **_COUNTS}))
def test_each_bounded_setting_takes_its_largest_value_and_refuses_more(
    monkeypatch: pytest.MonkeyPatch, env: str
) -> None:
    largest = {**_DURATIONS, **_COUNTS}[env]
    # The base delay may not exceed the longest one.
    monkeypatch.setenv("DEFENDER_ETCD__BACKOFF_MAX_SECONDS", "86400")
    monkeypatch.setenv(env, str(largest))
    settings: object = load_settings()
    for part in _field(env):
        settings = getattr(settings, part)
    assert settings == largest
    for beyond in (largest + 1, 10**12):
        monkeypatch.setenv(env, str(beyond))
        with pytest.raises(SettingsError, match=env):
            load_settings()


def test_a_duration_from_the_file_is_bounded_too(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("keyring_poll_seconds: .inf\netcd:\n  timeout_seconds: 1.0e+12\n")
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert "keyring_poll_seconds: Input should be a finite number" in str(info.value)
    assert "etcd.timeout_seconds: Input should be less than or equal to 86400" in str(info.value)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_the_ratio_cap_is_finite(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    # With nan no value's ratio is ever over the cap: the decompression-bomb check was off.
    monkeypatch.setenv("DEFENDER_ENVELOPE__MAX_RATIO", value)
    with pytest.raises(SettingsError, match=r"envelope\.max_ratio: Input should be a finite"):
        load_settings()


# --- override_settings: a program's own flags on top of the file and the environment ----------


def test_overrides_win_over_the_environment_which_is_not_read_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from defender_config import override_settings

    path = tmp_path / "s.json"
    path.write_text(json.dumps({"etcd": {"timeout_seconds": 2}, "history_limit": 7}))
    monkeypatch.setenv("DEFENDER_PREFIX", "/from-env")
    monkeypatch.setenv("DEFENDER_ETCD__ENDPOINTS", '["http://env:2379"]')
    base = load_settings(path)
    got = override_settings(
        base,
        etcd={"endpoints": ["https://flag:2379"]},
        prefix="/from-flag",
        envelope=base.envelope.model_copy(update={"encrypt": False}),
    )
    assert got.prefix == "/from-flag" and got.etcd.endpoints == ["https://flag:2379"]
    assert got.envelope.encrypt is False
    # What was not overridden is the base's: the file's and the environment's.
    assert got.etcd.timeout_seconds == 2 and got.history_limit == 7
    assert override_settings(base).prefix == "/from-env"
    assert type(got) is LibrarySettings


@pytest.mark.parametrize(
    ("etcd", "fields", "where"),
    [
        ({"endpoints": ["ftp://x:1"]}, {}, "etcd.endpoints"),
        # A rule across fields: a password without its user.
        ({"password": "hunter2-secret"}, {}, "etcd"),
        ({}, {"prefix": "no-slash/"}, "prefix"),
        ({}, {"heartbeat_allowed_misses": 1}, "heartbeat_allowed_misses"),
        ({}, {"no_such_setting": 1}, "no_such_setting"),
    ],
)
def test_a_refused_override_names_its_field_never_its_value(
    etcd: dict[str, object], fields: dict[str, object], where: str
) -> None:
    from defender_config import override_settings

    with pytest.raises(SettingsError) as caught:
        override_settings(load_settings(), etcd=etcd, **fields)
    assert [loc for loc, _ in caught.value.problems] == [where]
    message = str(caught.value)
    assert "\n" not in message and where in message
    assert "hunter2" not in message and "errors.pydantic.dev" not in message
