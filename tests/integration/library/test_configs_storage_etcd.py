"""Per-component storage options (ConfigStore `options=`) against the real cluster: what the raw
etcd values look like, that a reader accepts an unencrypted component only when its own settings
list it (`plaintext_components`), and that a record requiring encryption only tightens a
lenient reader."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import zstandard
from prometheus_client import CollectorRegistry

from defender_config import (
    ActiveConfig,
    CodecMismatchError,
    ConfigStore,
    ConflictError,
    DefenderClient,
    DefenderConfigError,
    EnvelopeOptions,
    Heartbeater,
    Keyring,
    LibrarySettings,
    NotAnEnvelopeError,
    NotFoundError,
    StoragePolicy,
    canonical_json,
    inspect,
    is_envelope,
)
from defender_devcluster import wait_for

pytestmark = pytest.mark.etcd

# Long enough (over the default 256-byte threshold) and repetitive enough to be compressed.
RULES = [
    {"action": "deny", "src": f"10.{i}.0.0/16", "dst": "0.0.0.0/0", "ports": [22, 23, 3389]}
    for i in range(40)
]
SCHEMA: dict[str, Any] = {"type": "object"}


def config(n: int = 0) -> dict[str, Any]:
    return {"node_id": "fw-01", "revision": n, "rules": RULES}


def raw(client: DefenderClient, path: str) -> bytes:
    stored = client.store.get(path)
    assert stored is not None, path
    return stored.value


def sealed_paths(client: DefenderClient, component: str) -> list[str]:
    lay = client.layout
    history = [sv.key for sv in client.store.list_prefix(lay.history_dir(component))]
    return [lay.master_config(component), lay.active_config(component), *history]


def seed(configs: ConfigStore, component: str, options: EnvelopeOptions | None) -> None:
    result = configs.seed(
        component, config(), "custom", by="test", json_schema=SCHEMA, options=options
    )
    assert result.created


#: Components the tests below store unencrypted on purpose; the reader's own settings list them.
PLAINTEXT = {"fw", "fw19", "plain"}


@pytest.fixture
def configs(client: DefenderClient) -> ConfigStore:
    return ConfigStore(client, plaintext_components=PLAINTEXT)


@pytest.fixture
def plain_reader(settings: LibrarySettings) -> Iterator[DefenderClient]:
    """A reader without keyring whose store-wide options neither encrypt nor compress."""
    s = settings.model_copy(update={"envelope": EnvelopeOptions(compress=False, encrypt=False)})
    c = DefenderClient(s, None, registry=CollectorRegistry(), alert_sinks=[])
    yield c
    c.close()


def watch_first(configs: ConfigStore, component: str) -> ActiveConfig:
    seen: list[ActiveConfig] = []
    errors: list[DefenderConfigError] = []
    handle = configs.watch_active(component, seen.append, on_error=errors.append)
    try:
        wait_for("initial ACTIVE delivered", lambda: bool(seen or errors), timeout=15)
    finally:
        handle.cancel()
    assert errors == []
    return seen[0]


def test_compression_off_is_stored_uncompressed_and_reads_back(
    configs: ConfigStore, client: DefenderClient
) -> None:
    seed(configs, "fw", EnvelopeOptions(compress=False))
    for path in sealed_paths(client, "fw"):
        header = inspect(raw(client, path))
        assert (header.compressed, header.encrypted) == (False, True), path
    meta = configs.get_metadata("fw")
    assert meta is not None and meta.storage is not None
    assert (meta.storage.compress, meta.storage.encrypt) == (False, True)
    # The default policy compresses the same config: the option made the difference.
    seed(configs, "fw-default", None)
    assert inspect(raw(client, client.layout.active_config("fw-default"))).compressed
    assert configs.get_active("fw").config == config()
    assert watch_first(configs, "fw").config == config()


def test_encryption_off_is_readable_by_an_encrypting_reader(
    configs: ConfigStore, client: DefenderClient, alerts: list[Any]
) -> None:
    seed(configs, "fw", EnvelopeOptions(encrypt=False))
    for path in sealed_paths(client, "fw"):
        header = inspect(raw(client, path))
        assert (header.compressed, header.encrypted, header.key_id) == (True, False, None)
    # `client` encrypts store-wide: a reader whose settings do not list "fw" refuses it, whatever
    # the (authentic) metadata record says; `configs` lists it.
    assert client.envelope.options.encrypt
    with pytest.raises(CodecMismatchError):
        ConfigStore(client).get_active("fw")
    with pytest.raises(CodecMismatchError):
        ConfigStore(client).get_master("fw")
    assert [a.kind for a in alerts] == ["CodecMismatch", "CodecMismatch"]
    alerts.clear()
    assert configs.get_active("fw").config == config()
    assert configs.get_master("fw") == config()
    version = configs.commit("fw", config(1), by="ops")
    assert [e.version for e in configs.history("fw")] == [1, 2]
    assert not inspect(raw(client, client.layout.active_config("fw"))).encrypted  # kept policy
    assert watch_first(configs, "fw").version == version
    assert alerts == []


def test_both_off_is_bare_json_in_etcd(configs: ConfigStore, client: DefenderClient) -> None:
    seed(configs, "fw", EnvelopeOptions(compress=False, encrypt=False))
    value = raw(client, client.layout.active_config("fw"))
    assert not is_envelope(value)
    assert value == canonical_json(config())
    assert configs.get_active("fw").config == config()
    assert watch_first(configs, "fw").config == config()


def test_custom_level_and_threshold(configs: ConfigStore, client: DefenderClient) -> None:
    seed(configs, "fw19", EnvelopeOptions(encrypt=False, level=19))
    value = raw(client, client.layout.active_config("fw19"))
    header = inspect(value)
    data = canonical_json(config())
    level19 = zstandard.ZstdCompressor(level=19, write_checksum=False).compress(data)
    level1 = zstandard.ZstdCompressor(level=1, write_checksum=False).compress(data)
    assert level19 != level1  # the check below tells the two levels apart
    assert header.compressed and value[header.header_length :] == level19
    meta = configs.get_metadata("fw19")
    assert meta is not None and meta.storage == StoragePolicy(
        compress=True, encrypt=False, level=19, threshold_bytes=256
    )
    # A threshold above the value's size leaves it uncompressed (the flag is clear).
    seed(configs, "fwbig", EnvelopeOptions(threshold_bytes=len(data) + 1))
    assert not inspect(raw(client, client.layout.active_config("fwbig"))).compressed
    assert configs.get_active("fw19").config == configs.get_active("fwbig").config == config()


def test_reader_refuses_plaintext_when_metadata_requires_encryption(
    configs: ConfigStore, client: DefenderClient, plain_reader: DefenderClient
) -> None:
    seed(configs, "fw", EnvelopeOptions(encrypt=True))
    active = client.layout.active_config("fw")
    lenient = ConfigStore(plain_reader)
    # Forged values: bare JSON, and an unencrypted envelope. The reader's own options would
    # accept both; the component's metadata requires encryption, so it refuses them.
    forged_plain = canonical_json(config(9))
    client.store.put(active, forged_plain)
    with pytest.raises(NotAnEnvelopeError) as plain_err:
        lenient.get_active("fw")
    assert plain_err.value.reason == "NotAnEnvelope"
    client.store.put(active, client.seal(active, forged_plain, EnvelopeOptions(encrypt=False)))
    with pytest.raises(CodecMismatchError):
        configs.get_active("fw")
    with pytest.raises(CodecMismatchError):
        lenient.get_active("fw")
    errors: list[DefenderConfigError] = []
    handle = lenient.watch_active("fw", lambda a: None, on_error=errors.append)
    try:
        wait_for("decode error delivered", lambda: bool(errors), timeout=15)
    finally:
        handle.cancel()
    assert isinstance(errors[0], CodecMismatchError)


def test_policy_change_reseals_master_and_history(
    configs: ConfigStore, client: DefenderClient, plain_reader: DefenderClient
) -> None:
    seed(configs, "fw", None)
    configs.commit("fw", config(1), by="ops")
    configs.commit("fw", config(2), by="ops", options=EnvelopeOptions(encrypt=False))
    for path in sealed_paths(client, "fw"):
        assert not inspect(raw(client, path)).encrypted, path
    # Without a keyring, this reader can now read every value of the component.
    lenient = ConfigStore(plain_reader)
    assert [e.version for e in lenient.history("fw")] == [1, 2, 3]
    assert lenient.get_master("fw") == config()
    # Same config, encryption back on: a new version, everything encrypted again.
    v = configs.commit("fw", config(2), by="ops", options=EnvelopeOptions())
    assert v == 4
    for path in sealed_paths(client, "fw"):
        assert inspect(raw(client, path)).encrypted, path
    # history_limit is 3: versions 2-4 are kept, each readable under the current policy.
    assert configs.rollback("fw", 2, by="ops") == 5
    assert configs.get_active("fw").config == config(1)
    assert configs.rollback("fw", "master", by="ops") == 6
    assert configs.get_active("fw").config == config()


def test_rewrap_keeps_each_components_policy(
    configs: ConfigStore, settings: LibrarySettings, keyring: Keyring
) -> None:
    seed(configs, "plain", EnvelopeOptions(encrypt=False))
    seed(configs, "sealed", None)
    # A heartbeat record signed with the old key: its heartbeater's word, left as it is.
    beat = Heartbeater(configs.client, "sealed", "s-0", follow_cadence=False).start()
    instance = configs.client.layout.instance("sealed", "s-0")
    signed = raw(configs.client, instance)
    staged = keyring.with_new_decrypt_only()
    new_id = next(k for k in staged.key_ids if k != keyring.primary.key_id)
    try:
        with DefenderClient(
            settings, staged.promote(new_id), registry=CollectorRegistry(), alert_sinks=[]
        ) as c2:
            report = ConfigStore(c2).rewrap_all()
            assert raw(c2, instance) == signed and beat.overwrites == 0
            # "sealed": MASTER, ACTIVE, hist/1; and both metadata records are re-signed
            assert report.failed == 0 and report.rewrapped == 5
            for path in sealed_paths(c2, "plain"):
                assert not inspect(raw(c2, path)).encrypted, path
            for path in sealed_paths(c2, "sealed"):
                assert inspect(raw(c2, path)).key_id == new_id, path
            assert ConfigStore(c2, plaintext_components=PLAINTEXT).get_active("plain").config == (
                config()
            )
    finally:
        beat.stop()


def test_set_storage_reseals_without_a_new_version(
    configs: ConfigStore, client: DefenderClient, plain_reader: DefenderClient
) -> None:
    seed(configs, "fw", None)
    configs.commit("fw", config(1), by="ops")
    off = EnvelopeOptions(compress=False, encrypt=False)
    assert configs.set_storage("fw", off, by="ops")
    for path in sealed_paths(client, "fw"):
        assert not is_envelope(raw(client, path)), path
    meta = configs.get_metadata("fw")
    assert (
        meta is not None and meta.version == 2 and meta.storage == StoragePolicy.from_options(off)
    )
    lenient = ConfigStore(plain_reader)
    assert lenient.get_active("fw").version == 2
    assert [e.config for e in lenient.history("fw")] == [config(), config(1)]
    assert not configs.set_storage("fw", off, by="ops")  # already so: nothing written
    with pytest.raises(NotFoundError):
        configs.set_storage("nope", off, by="ops")


def test_set_storage_loses_to_a_concurrent_commit(
    configs: ConfigStore, client: DefenderClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(configs, "fw", None)
    real = configs._reseal_kept

    def commit_meanwhile(*args: Any, **kwargs: Any) -> Any:
        # Another writer commits after set_storage read the metadata, before its transaction.
        ConfigStore(client).commit("fw", config(5), by="other")
        return real(*args, **kwargs)

    monkeypatch.setattr(configs, "_reseal_kept", commit_meanwhile)
    with pytest.raises(ConflictError, match="retry"):
        configs.set_storage("fw", EnvelopeOptions(encrypt=False), by="ops")
    meta = configs.get_metadata("fw")
    assert meta is not None and meta.storage is None and meta.version == 2
    assert inspect(raw(client, client.layout.active_config("fw"))).encrypted


def test_policy_change_refuses_to_launder_a_forged_value(
    configs: ConfigStore, client: DefenderClient, alerts: list[Any]
) -> None:
    seed(configs, "fw", EnvelopeOptions(encrypt=True))
    history = client.layout.history("fw", 1)
    client.store.put(history, canonical_json(config(7)))  # forged: bare JSON in history
    # Re-sealing under the new policy opens every kept value under the old one first: the
    # forged value is refused (and alerted), and nothing of the commit is written.
    with pytest.raises(NotAnEnvelopeError):
        configs.commit("fw", config(1), by="ops", options=EnvelopeOptions(encrypt=False))
    meta = configs.get_metadata("fw")
    assert meta is not None and meta.version == 1 and meta.storage is not None
    assert meta.storage.encrypt
    assert [a.kind for a in alerts] == ["NotAnEnvelope"]
    assert raw(client, history) == canonical_json(config(7))


@pytest.mark.parametrize(
    ("options", "codec"),
    [
        (None, "zstd+aes-256-gcm"),
        (EnvelopeOptions(encrypt=False), "zstd+none"),
        (EnvelopeOptions(compress=False, encrypt=False), "none+none"),
    ],
    ids=["default", "no-encryption", "plaintext"],
)
def test_active_says_how_it_is_stored(
    configs: ConfigStore, options: EnvelopeOptions | None, codec: str
) -> None:
    # What a component reports in its heartbeat: its own rule, not the store-wide default
    # (this client's default is zstd+aes-256-gcm).
    seed(configs, "fw", options)
    assert configs.get_active("fw").codec == codec
    assert watch_first(configs, "fw").codec == codec
