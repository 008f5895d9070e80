"""Alerter fan-out: every sink gets the alert, a failing sink never reaches the caller."""

from __future__ import annotations

import logging

import pytest

from defender_config import (
    Alert,
    Alerter,
    CallableSink,
    LoggingSink,
    UnknownKeyError,
)


def test_alert_from_error_uses_reason_and_path() -> None:
    err = UnknownKeyError("k2", ["k1"], path="/p/components/rag/active_config")
    alert = Alert.from_error(err, "rag", instance="rag-0")
    assert alert.kind == "UnknownKey"
    assert alert.path == "/p/components/rag/active_config"
    assert "k2" in alert.detail and alert.time.tzinfo is not None


def test_failing_sink_does_not_raise_and_others_still_get_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    got: list[Alert] = []

    def broken(_alert: Alert) -> None:
        raise RuntimeError("rag intake down")

    alerter = Alerter([CallableSink(broken), CallableSink(got.append)])
    with caplog.at_level(logging.ERROR, logger="defender_config.alerts"):
        alerter.event("ConfigDrift", "rag", "differs from MASTER")
    assert [a.kind for a in got] == ["ConfigDrift"]
    assert alerter.failed == 1 and alerter.delivered == 1
    assert "rag intake down" in caplog.text


def test_logging_sink_is_structured(caplog: pytest.LogCaptureFixture) -> None:
    alerter = Alerter([LoggingSink()])
    with caplog.at_level(logging.WARNING, logger="defender_config.alerts"):
        alerter.error(UnknownKeyError("k2", ["k1"]), "sniffer", instance="s-0")
    [record] = caplog.records
    assert record.alert["kind"] == "UnknownKey"  # type: ignore[attr-defined]
    assert record.alert["component"] == "sniffer"  # type: ignore[attr-defined]


def test_bad_alert_fields_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    got: list[Alert] = []
    alerter = Alerter([CallableSink(got.append)])
    with caplog.at_level(logging.ERROR, logger="defender_config.alerts"):
        alerter.event("", "rag", "empty kind is invalid")
    assert got == [] and "cannot build alert" in caplog.text


def test_etcd_sink_refuses_tiny_ttl() -> None:
    from defender_config import EtcdSettings, Layout
    from defender_config._alerts import EtcdAlertSink
    from defender_config.store import EtcdStore

    store = EtcdStore(EtcdSettings(endpoints=["127.0.0.1:1"]))
    with pytest.raises(ValueError, match="at least 10 seconds"):
        EtcdAlertSink(store, Layout(), ttl_seconds=5)
    store.close()


def test_heartbeater_refuses_unknown_fields() -> None:
    from defender_config import (
        DefenderClient,
        EnvelopeOptions,
        EtcdSettings,
        Heartbeater,
        LibrarySettings,
    )

    settings = LibrarySettings(
        etcd=EtcdSettings(endpoints=["127.0.0.1:1"]),
        envelope=EnvelopeOptions(encrypt=False),
    )
    with DefenderClient(settings, alert_sinks=[]) as client:
        with pytest.raises(TypeError, match="unknown heartbeat fields"):
            Heartbeater(client, "rag", "rag-0", colour="blue")
        beat = Heartbeater(client, "rag", "rag-0", interval_seconds=10, allowed_misses=3)
        assert beat.ttl == 30 and beat.record.codec == "zstd+none"
        with pytest.raises(TypeError, match="unknown heartbeat fields"):
            beat.update(status="RUNNING")  # status goes through set_status


def test_client_without_keyring_fails_fast_when_encrypting() -> None:
    from defender_config import (
        DefenderClient,
        EtcdSettings,
        LibrarySettings,
        SettingsError,
    )

    settings = LibrarySettings(etcd=EtcdSettings(endpoints=["127.0.0.1:1"]))
    with pytest.raises(SettingsError, match="keyring_path"):
        DefenderClient(settings, alert_sinks=[])
