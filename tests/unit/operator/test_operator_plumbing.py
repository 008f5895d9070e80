"""Error translation to kopf, settings validation, JSON logs, keyring Secret errors."""

from __future__ import annotations

import kopf
import pytest

from defender_config import (
    AuthenticationFailedError,
    ConfigFrozenError,
    ConfigValidationError,
    ConflictError,
    FieldError,
    Keyring,
    KeyringError,
    NotFoundError,
    RecordAuthError,
    RecordReplayError,
    StoreAuthError,
    StoreUnavailableError,
    UnknownKeyError,
    ValueTooLargeError,
)
from defender_operator import __main__ as entry
from defender_operator import _settings
from defender_operator._errors import (
    RETRY_CONFLICT,
    RETRY_STORE_UNAVAILABLE,
    KeySecretError,
    KubeError,
    OperatorConfigurationError,
    kopf_errors,
)
from defender_operator._keys import MutableKeyringSource, keyring_digest
from defender_operator._settings import load_operator_settings, watch_only


def _raise(exc: Exception) -> None:
    with kopf_errors():
        raise exc


@pytest.mark.parametrize(
    ("error", "delay"),
    [
        (StoreUnavailableError(["http://127.0.0.1:2379"], "no leader"), RETRY_STORE_UNAVAILABLE),
        (KeySecretError("read", "ns", "s", 500, "boom"), RETRY_STORE_UNAVAILABLE),
        (KubeError("cannot list pods"), RETRY_STORE_UNAVAILABLE),
        (ConflictError("/p/components/x/active_config"), RETRY_CONFLICT),
        (ConflictError("/p/x", expected=3, found=4, detail="another commit"), RETRY_CONFLICT),
        (AuthenticationFailedError("/p/x", "k1"), 60.0),
        (KeyringError("no primary"), 60.0),
        (NotFoundError("/p/x"), 10.0),
        # A replayed record is repaired by the next pass.
        (RecordReplayError("/p/components/x/metadata", "older than version 3"), 60.0),
    ],
)
def test_retryable_errors_become_temporary(error: Exception, delay: float) -> None:
    with pytest.raises(kopf.TemporaryError) as info:
        _raise(error)
    assert info.value.delay == delay
    assert info.value.__cause__ is error


@pytest.mark.parametrize(
    "error",
    [
        ConfigValidationError("firewall", [FieldError("rules.0.src_cidr", "not a network")]),
        ConfigFrozenError("firewall", why="breaker"),
        StoreAuthError("permission denied"),
        ValueTooLargeError(1_900_000, 1_572_864, path="/p/components/x/active_config"),
        UnknownKeyError("k9", ["k1", "k2"], path="/p/components/x/master_config"),
        ConflictError("/p/components/x/metadata", detail="MASTER without it", retryable=False),
        RecordAuthError("/p/components/x/metadata", "names a key this reader does not hold"),
    ],
)
def test_errors_a_person_must_fix_are_permanent(error: Exception) -> None:
    with pytest.raises(kopf.PermanentError) as info:
        _raise(error)
    assert info.value.__cause__ is error


def test_other_exceptions_pass_through() -> None:
    with pytest.raises(ZeroDivisionError):
        _raise(ZeroDivisionError())


def test_bad_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFENDER_OPERATOR_MONITOR_INTERVAL_SECONDS", "0")
    monkeypatch.setenv("DEFENDER_OPERATOR_LOG_FORMAT", "xml")
    with pytest.raises(OperatorConfigurationError) as info:
        load_operator_settings()
    text = str(info.value)
    assert "DEFENDER_OPERATOR_MONITOR_INTERVAL_SECONDS" in text
    assert "DEFENDER_OPERATOR_LOG_FORMAT" in text


def test_entry_point_fails_fast_on_bad_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEFENDER_OPERATOR_METRICS_PORT", "70000")
    assert entry.main([]) == 2
    assert "DEFENDER_OPERATOR_METRICS_PORT" in capsys.readouterr().err


def test_library_settings_errors_fail_fast_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEFENDER_ETCD__TIMEOUT_SECONDS", "-1")
    assert entry.main([]) == 2
    assert "timeout_seconds" in capsys.readouterr().err


def test_defaults_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    ours, library = load_operator_settings()
    assert ours.namespace == "ml-defender"
    assert ours.rotation_every_seconds == 0
    assert library.prefix == "/ml-defender"


def test_namespace_flags_win_over_the_environment_in_every_later_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The keyring fan-out and the keyguard read the settings, not kopf's flags: without this an
    # operator started with `-n a` wrote the keyring into every namespace with a component.
    monkeypatch.setattr(_settings, "_flag_namespaces", [])
    monkeypatch.setenv("DEFENDER_OPERATOR_WATCH_NAMESPACES", '["from-env"]')
    assert load_operator_settings()[0].watch_namespaces == ["from-env"]
    watch_only(["a", "b"])
    assert load_operator_settings()[0].watch_namespaces == ["a", "b"]
    watch_only([])
    assert load_operator_settings()[0].watch_namespaces == ["from-env"]


def test_key_secret_error_says_what_to_check_and_holds_no_key() -> None:
    keyring = Keyring.generate()
    err = KeySecretError("replace", "ml-defender", "ml-defender-keyring", 403, "Forbidden")
    assert "RBAC" in str(err)
    material = keyring.primary.material
    assert material.hex() not in str(err)
    # The in-memory source and digests never show material either.
    shown = repr(MutableKeyringSource(keyring)) + keyring_digest(keyring)
    assert material.hex() not in shown
    assert keyring.primary_fingerprint in repr(MutableKeyringSource(keyring))


def test_the_keyring_digest_follows_the_keyring_not_the_last_one_asked() -> None:
    # Serialized once per keyring object (every monitor pass asks): a rotated keyring is a new
    # object with a new digest, and going back to an earlier one gives its own digest again.
    first = Keyring.generate()
    rotated = first.with_new_decrypt_only()
    digest = keyring_digest(first)
    assert keyring_digest(first) == digest
    assert keyring_digest(rotated) != digest
    assert keyring_digest(first) == digest
    assert keyring_digest(Keyring(first.keys)) == digest  # same content, another object
