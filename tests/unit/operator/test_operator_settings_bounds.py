"""Operator settings: no value a person can type is accepted and then crashes a running loop;
a bad one stops the operator at start with one line naming the variable (exit 2)."""

from __future__ import annotations

import os

import pytest

from defender_operator import __main__ as entry
from defender_operator import _settings
from defender_operator._errors import OperatorConfigurationError
from defender_operator._settings import load_operator_settings

_P = "DEFENDER_OPERATOR_"

# Every duration, its largest value. Beyond it (`inf`, `1e12`) the ones without a bound were
# accepted, then crashed a loop on every turn (a timedelta out of range: the rotation schedule
# and waits, the misconfiguration window), stopped it (rotation stepping slept for ever) or
# turned a liveness check off.
_DURATIONS = {
    "MONITOR_INTERVAL_SECONDS": 300,
    "MONITOR_FULL_READ_SECONDS": 3600,
    "STATUS_HEARTBEAT_REFRESH_SECONDS": 3600,
    "SECRET_COPY_CHECK_SECONDS": 3600,
    "REGISTRATIONS_PUBLISH_SECONDS": 300,
    "ETCD_HEALTH_INTERVAL_SECONDS": 300,
    "LIVENESS_ETCD_MAX_UNAVAILABLE_SECONDS": 86400,
    "HEARTBEAT_RESYNC_SECONDS": 3600,
    "LIVENESS_WATCH_STALL_SECONDS": 86400,
    "SCRUB_INTERVAL_SECONDS": 86400,
    "ROTATION_INTERVAL_SECONDS": 300,
}
# Whole seconds and counts: `inf` is no integer, 10**12 was taken.
_INTEGERS = {
    "MISCONFIG_WINDOW_SECONDS": 86400,
    "ROTATION_EVERY_SECONDS": 366 * 86400,
    "ROTATION_DISTRIBUTE_TIMEOUT_SECONDS": 86400,
    "ROTATION_GRACE_SECONDS": 7 * 86400,
    "WORKER_THREADS": 256,
    "MONITOR_THREADS": 256,
    "API_CONNECTIONS": 1024,
    "ADMISSION_TIMEOUT_SECONDS": 30,
}


def _started(*_: object) -> None:
    raise AssertionError("the operator started with these settings")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DEFENDER_") and not name.startswith("DEFENDER_TOOLS"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(_settings, "_flag_namespaces", [])
    # Settings it accepts would run the operator (kopf) until the test times out.
    monkeypatch.setattr(entry, "configure", _started)


@pytest.mark.parametrize("name", sorted(_DURATIONS))
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e12", "-1"])
def test_a_duration_not_finite_or_beyond_its_bound_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(_P + name, value)
    with pytest.raises(OperatorConfigurationError, match=_P + name) as info:
        load_operator_settings()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", sorted({**_DURATIONS, **_INTEGERS}))
def test_each_bounded_setting_takes_its_largest_value_and_refuses_more(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    largest = {**_DURATIONS, **_INTEGERS}[name]
    # The stall limit must exceed the resync period.
    monkeypatch.setenv(_P + "LIVENESS_WATCH_STALL_SECONDS", "86400")
    monkeypatch.setenv(_P + name, str(largest))
    ours, _ = load_operator_settings()
    assert getattr(ours, name.lower()) == largest
    for beyond in (largest + 1, 10**12):
        monkeypatch.setenv(_P + name, str(beyond))
        with pytest.raises(OperatorConfigurationError, match=_P + name):
            load_operator_settings()


def test_the_entry_point_refuses_an_endless_duration_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(_P + "ROTATION_INTERVAL_SECONDS", "inf")
    assert entry.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and _P + "ROTATION_INTERVAL_SECONDS" in err


@pytest.mark.parametrize("name", ["WATCH_NAMESPACES", "ADMISSION_CERT_HOSTS"])
def test_a_list_variable_that_is_not_json_is_refused_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    # pydantic-settings raised its own error before validation: the operator died with a
    # traceback, again at every restart of the pod.
    monkeypatch.setenv(_P + name, '["s3cr3t", ')
    with pytest.raises(OperatorConfigurationError, match=name.lower()) as info:
        load_operator_settings()
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "s3cr3t" not in str(info.value)
    assert entry.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "JSON list" in err and "Traceback" not in err


def test_a_rule_across_fields_is_named_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_P + "HEARTBEAT_RESYNC_SECONDS", "300")
    monkeypatch.setenv(_P + "LIVENESS_WATCH_STALL_SECONDS", "300")
    with pytest.raises(OperatorConfigurationError) as info:
        load_operator_settings()
    assert str(info.value).startswith("bad operator settings: settings: ")
