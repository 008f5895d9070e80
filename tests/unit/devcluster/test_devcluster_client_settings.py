"""The harness's client settings are plain data that the library's EtcdSettings must accept:
the harness cannot import the library, so this is where a renamed field would show."""

from __future__ import annotations

from defender_config import EtcdSettings
from defender_devcluster import etcd_client_settings

ENDPOINTS = ["http://127.0.0.1:2379", "http://127.0.0.1:2479"]


def test_library_accepts_every_field() -> None:
    settings = EtcdSettings.model_validate(etcd_client_settings(ENDPOINTS))
    assert settings.model_dump(include=set(etcd_client_settings(ENDPOINTS))) == (
        etcd_client_settings(ENDPOINTS)
    )


def test_deadline_outlasts_the_harness_election_timeout() -> None:
    # Members run with --election-timeout=2000: a write during an election must not time out.
    assert etcd_client_settings(ENDPOINTS)["timeout_seconds"] > 2.0


def test_endpoints_are_copied_into_a_fresh_list() -> None:
    given = tuple(ENDPOINTS)
    first = etcd_client_settings(given)
    first["endpoints"].append("http://127.0.0.1:9")
    assert etcd_client_settings(given)["endpoints"] == ENDPOINTS
