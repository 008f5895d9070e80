"""`--etcd-endpoints` and `--prefix` replace the DEFENDER_* settings for one command
(docs/operations.md, "Reaching etcd"), also when the environment sets them: before, the
settings were validated once more with the environment on top, and a flag given beside
DEFENDER_ETCD__ENDPOINTS (as env.sh / etcd.sh export it) was ignored without a word."""

from __future__ import annotations

import argparse

import pytest

from defender_cli._connect import Connection
from defender_cli._errors import CliError
from defender_config import LibrarySettings

ENV_ENDPOINTS = '["http://env-member:2379"]'


def _settings(
    monkeypatch: pytest.MonkeyPatch, *, endpoints: str | None, prefix: str | None
) -> LibrarySettings:
    monkeypatch.setenv("DEFENDER_ETCD__ENDPOINTS", ENV_ENDPOINTS)
    monkeypatch.setenv("DEFENDER_PREFIX", "/from-env")
    args = argparse.Namespace(settings=None, etcd_endpoints=endpoints, prefix=prefix)
    return Connection(args).settings(decrypting=False)


def test_the_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(monkeypatch, endpoints="https://127.0.0.1:23790", prefix="/from-flag")
    assert settings.etcd.endpoints == ["https://127.0.0.1:23790"]
    assert settings.prefix == "/from-flag"


def test_without_flags_the_environment_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(monkeypatch, endpoints=None, prefix=None)
    assert settings.etcd.endpoints == ["http://env-member:2379"]
    assert settings.prefix == "/from-env"


def test_a_bad_flag_is_refused_even_when_the_environment_has_a_good_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(CliError, match="--prefix 'bad/': String should match pattern"):
        _settings(monkeypatch, endpoints=None, prefix="bad/")
