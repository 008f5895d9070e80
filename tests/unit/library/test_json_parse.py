"""JSON nested deeper than the recursion limit, as anyone with etcd write access can store it:
`parse_json` fails with the ValueError every reader handles, and the readers built on it refuse
such a record like any other malformed one instead of letting RecursionError end the process.
The same reads against the real etcd: tests/integration/library (test_library_error_paths,
test_cadence_etcd, test_rollout_etcd)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from defender_config import (
    Alert,
    CallableSink,
    ConfigStore,
    ConfigValidationError,
    DefenderClient,
    EnvelopeOptions,
    EtcdSettings,
    Keyring,
    LibrarySettings,
    RecordAuthError,
    Rollouts,
    decode_alerts,
)
from defender_config._cadence import decode_cadence
from defender_config._configs import _decode_config
from defender_config._json_parse import MAX_JSON_DEPTH, check_depth, parse_json
from defender_config._models import canonical_json, validate_config
from defender_config.store import StoredValue

DEEP = b"[" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000


def stored(key: str, value: bytes) -> StoredValue:
    return StoredValue(key, value, mod_revision=7, create_revision=7, version=1)


@pytest.mark.parametrize("data", [DEEP, DEEP_OBJECT, DEEP.decode()])
def test_too_deep_is_a_value_error_quoting_no_input(data: bytes | str) -> None:
    with pytest.raises(ValueError, match="nested too deeply") as info:
        parse_json(data)
    assert not isinstance(info.value, RecursionError)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "[" not in str(info.value) and "[" not in repr(info.value)


@pytest.mark.parametrize("data", [b"{not json", b"\xff\xfe{}", b""])
def test_malformed_input_is_still_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_json(data)


def test_parses_json_nested_as_deep_as_a_config_goes() -> None:
    assert parse_json(b"[" * 100 + b"]" * 100) == parse_json("[" * 100 + "]" * 100)
    assert parse_json(b'{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}


def nested(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


@pytest.mark.parametrize("kind", ["[]", '{"a":}'])
def test_deeper_than_the_limit_is_refused_though_the_decoder_could_parse_it(kind: str) -> None:
    # Parsed, a value this deep would still overflow the walks after the parse (the record
    # MAC's json.dumps, pydantic, repr): refused at the parse, as malformed.
    if kind == "[]":
        ok, deep = nested(MAX_JSON_DEPTH), nested(MAX_JSON_DEPTH + 1)
    else:
        ok = '{"a":' * (MAX_JSON_DEPTH - 1) + "{}" + "}" * (MAX_JSON_DEPTH - 1)
        deep = '{"a":' * MAX_JSON_DEPTH + "{}" + "}" * MAX_JSON_DEPTH
    parse_json(ok)
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_json(deep)
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_json(deep.encode())


def test_brackets_inside_strings_do_not_count() -> None:
    # The cheap bound counts every bracket; the walk then decides on the parsed value.
    text = '{"pattern": "' + "[" * 500 + '"}'
    assert parse_json(text) == {"pattern": "[" * 500}


def test_check_depth_walks_tuples_and_leaves_scalars() -> None:
    value: object = 1
    for _ in range(MAX_JSON_DEPTH):
        value = (value,)
    check_depth(value)
    with pytest.raises(ValueError, match="nested too deeply"):
        check_depth([value])


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 500, 990, 5_000])
def test_a_config_too_deep_to_read_back_is_never_written(depth: int) -> None:
    # Writers refuse what readers refuse: stored, it would be unreadable by every reader.
    config: dict[str, object] = {"a": 1}
    for _ in range(depth - 1):
        config = {"a": config}
    with pytest.raises(ConfigValidationError, match="nested too deeply"):
        canonical_json(config, component="rag")
    with pytest.raises(ConfigValidationError, match="nested too deeply"):
        validate_config("custom", config, json_schema={"type": "object"}, component="rag")


def test_a_config_as_deep_as_allowed_round_trips() -> None:
    config: dict[str, object] = {"a": 1}
    for _ in range(MAX_JSON_DEPTH - 1):
        config = {"a": config}
    assert parse_json(canonical_json(config)) == config


@pytest.fixture
def alerts() -> list[Alert]:
    return []


@pytest.fixture
def keyed(alerts: list[Alert]) -> Iterator[DefenderClient]:
    etcd = EtcdSettings(endpoints=["127.0.0.1:1"])  # never contacted
    client = DefenderClient(
        LibrarySettings(etcd=etcd), Keyring.generate(), alert_sinks=[CallableSink(alerts.append)]
    )
    yield client
    client.close()


def test_client_reads_refuse_it(keyed: DefenderClient, alerts: list[Alert]) -> None:
    path = keyed.layout.metadata("sniffer")
    with pytest.raises(ValueError, match="nested too deeply"):
        keyed.decode_json(path, DEEP)
    # A control record: refused with the MAC error every unparsable record gets, and alerted.
    with pytest.raises(RecordAuthError, match="not JSON"):
        keyed.decode_record(path, DEEP)
    assert [a.kind for a in alerts] == ["RecordUnauthenticated"]
    # Without a keyring the parse error itself reaches the caller, as for any malformed record.
    etcd = EtcdSettings(endpoints=["127.0.0.1:1"])
    keyless = DefenderClient(
        LibrarySettings(etcd=etcd, envelope=EnvelopeOptions(encrypt=False)), None, alert_sinks=[]
    )
    try:
        with pytest.raises(ValueError, match="nested too deeply"):
            keyless.decode_record(path, DEEP)
    finally:
        keyless.close()


def test_a_record_nested_just_below_what_the_decoder_survives_is_a_mac_error() -> None:
    # An etcd writer's record with a well-formed `auth` (key ids are in every envelope
    # header), nested so that the decoder just copes and json.dumps of it (the MAC) would
    # overflow: the audit found a bare RecursionError at depths 850-999.
    alerts: list[Alert] = []
    keyring = Keyring.generate()
    keyed = DefenderClient(
        LibrarySettings(etcd=EtcdSettings(endpoints=["127.0.0.1:1"])),
        keyring,
        alert_sinks=[CallableSink(alerts.append)],
    )
    path = keyed.layout.metadata("sniffer")
    kid = keyring.primary.key_id
    for depth in [MAX_JSON_DEPTH + 1, *range(840, 1000)]:
        blob = f'{{"auth":{{"v":1,"kid":"{kid}","mac":"{"0" * 64}"}},"x":{nested(depth)}}}'
        with pytest.raises(RecordAuthError):
            keyed.decode_record(path, blob.encode())
    keyed.close()
    assert {a.kind for a in alerts} == {"RecordUnauthenticated"}


def test_stored_config_is_refused(keyed: DefenderClient) -> None:
    with pytest.raises(ConfigValidationError, match="is not JSON"):
        _decode_config("/p/components/sniffer/active", DEEP, "sniffer")


def test_cadence_falls_back_to_the_local_setting(
    keyed: DefenderClient, caplog: pytest.LogCaptureFixture
) -> None:
    key = keyed.layout.cadence("sniffer")
    with caplog.at_level(logging.WARNING, logger="defender_config.cadence"):
        assert decode_cadence(keyed, key, stored(key, DEEP)) is None
    assert "unreadable heartbeat cadence" in caplog.text


def test_rollout_record_is_ignored(keyed: DefenderClient, alerts: list[Alert]) -> None:
    path = keyed.layout.rollout("sniffer")
    assert Rollouts(ConfigStore(keyed)).decode("sniffer", stored(path, DEEP)) is None
    assert [(a.kind, a.path) for a in alerts] == [("RecordUnauthenticated", path)]


def test_an_alert_is_skipped(keyed: DefenderClient) -> None:
    good = Alert(kind="First", component="rag", detail="one")
    values = [
        stored("/a/1", DEEP),
        stored("/a/2", keyed.encode_json(good.model_dump(mode="json"))),
    ]
    assert [a.kind for a in decode_alerts(keyed, values, good.time)] == ["First"]


def test_a_sealed_value_where_a_record_belongs_is_an_unauthenticated_record(
    keyed: DefenderClient, alerts: list[Alert]
) -> None:
    # Callers repair or ignore a RecordAuthError (the operator re-signs, rollouts fall back to
    # ACTIVE); an envelope's magic must not give them another error to trip on.
    path = keyed.layout.metadata("sniffer")
    sealed = keyed.seal(keyed.layout.active_config("sniffer"), b"{}", None)
    for blob in (sealed, b"\x89DFC"):
        with pytest.raises(RecordAuthError, match="sealed value, not a plaintext record"):
            keyed.decode_record(path, blob)
    assert [a.kind for a in alerts] == ["RecordUnauthenticated"] * 2
