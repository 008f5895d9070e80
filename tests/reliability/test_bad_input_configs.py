"""Bad configs and bad stored values, through the real etcd.

* Configs the API server cannot judge (spec.config is opaque to it) are refused by the library's
  models when committed: ConfigValidationError naming the component, the field and the reason,
  an alert, and ACTIVE untouched.
* Stored values that were tampered with, truncated, sealed with another key, written with
  another codec, or that are too large give typed errors and alerts on read, never a wrong
  plaintext.
* The envelope decoder, fuzzed with hypothesis on structured inputs (valid headers with random
  fields, multi-byte edits and splices of real values): only typed errors.
"""

from __future__ import annotations

import copy
import json
import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import HYGIENE, make_client, new_keyring

from defender_config import (
    Alert,
    AuthenticationFailedError,
    CodecMismatchError,
    ConfigStore,
    ConfigValidationError,
    DefenderClient,
    Envelope,
    EnvelopeError,
    EnvelopeOptions,
    EtcdAlertSink,
    Key,
    Keyring,
    KeyState,
    NotAnEnvelopeError,
    SizeAnomalyError,
    UnknownCodecError,
    UnknownKeyError,
    ValueTooLargeError,
    validate_config,
)
from defender_devcluster import EtcdCluster, wait_for

pytestmark = pytest.mark.etcd

VALID: dict[str, dict[str, Any]] = {
    "sniffer": {"node_id": "sn-01", "version": "1.0.0", "interface": "eth0"},
    "ml-detector": {
        "node_id": "det-01",
        "version": "1.0.0",
        "capabilities": ["ddos", "ransomware"],
    },
    "firewall": {
        "node_id": "fw-01",
        "version": "1.0.0",
        "default_policy": "deny",
        # Enough rules that the sealed value is compressed (over the 256-byte threshold).
        "rules": [
            {"id": f"r{i}", "action": "allow", "proto": "tcp", "ports": [1000 + i]}
            for i in range(30)
        ],
    },
    "rag": {"node_id": "rag-01", "version": "1.0.0"},
}


def edit(ctype: str, path: str, value: Any) -> dict[str, Any]:
    """VALID[ctype] with `path` (dotted, list indexes as numbers) set to `value`, or removed
    when `value` is ...; a path of "" replaces the whole config."""
    doc = copy.deepcopy(VALID[ctype])
    if path == "":
        return value  # type: ignore[no-any-return]
    *parents, leaf = path.split(".")
    node: Any = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if value is ...:
        del node[leaf]
    elif isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value
    return doc


# (component type, path, bad value, field named in the message, reason phrase)
CONFIG_CASES: list[tuple[str, str, Any, str, str]] = [
    ("sniffer", "interface", "eth0-much-too-long", "interface", "should match pattern"),
    ("sniffer", "ring.block_size", 100000, "ring", "block_size must be a power of two"),
    (
        "sniffer",
        "ring",
        {"block_size": 4096, "frame_size": 8192},
        "ring",
        "block_size must be a multiple of frame_size",
    ),
    ("sniffer", "capture_mode", "pcap", "capture_mode", "'xdp' or 'af_packet'"),
    ("sniffer", "sample_rate", 0, "sample_rate", "greater than 0"),
    ("sniffer", "filters", ["tcp port 80", " "], "filters", "filter 1 is empty"),
    ("sniffer", "snaplen", 70000, "snaplen", "less than or equal to 65535"),
    ("sniffer", "promisc", True, "promisc", "Extra inputs are not permitted"),
    ("ml-detector", "capabilities", [], "capabilities", "at least 1 item"),
    ("ml-detector", "capabilities", ["ddos", "malware"], "capabilities.1", "'ddos', 'ransomware'"),
    ("ml-detector", "capabilities", ["ddos", "ddos"], "capabilities", "listed twice: ddos"),
    ("ml-detector", "detectors", {"traffic": {}}, "detectors", "not in capabilities: traffic"),
    ("ml-detector", "detectors", {"ddos": {"threshold": 1.5}}, "threshold", "less than or equal"),
    ("ml-detector", "batch_size", 0, "batch_size", "greater than or equal to 1"),
    ("firewall", "default_policy", ..., "default_policy", "Field required"),
    ("firewall", "rules.0.src_cidr", "10.0.0.1/8", "src_cidr", "not a network in CIDR form"),
    ("firewall", "rules.0.proto", "icmp", "rules.0", "ports need proto tcp or udp"),
    ("firewall", "rules.0.ports", [70000], "ports", "within 1-65535"),
    ("firewall", "rules.0.ports", ["9000-8000"], "ports", "low before high"),
    ("firewall", "rules.0.action", "drop", "action", "'allow', 'deny', 'reject' or 'log'"),
    ("firewall", "rules.0.prio", 5, "prio", "Extra inputs are not permitted"),
    (
        "firewall",
        "rules.0",
        {"id": "r0", "action": "deny", "src_cidr": "10.0.0.0/8", "dst_cidr": "fd00::/8"},
        "rules.0",
        "mix IPv4 and IPv6",
    ),
    ("rag", "modifiable_components", ["firewall"], "rag", "may_modify_active is false"),
    ("rag", "alert_intake.prefix", "alerts/", "prefix", "should match pattern"),
    ("rag", "log_sources", [{"name": "k", "kind": "kafka", "location": "x"}], "kind", "'file'"),
    ("rag", "node_id", "rag 01", "node_id", "should match pattern"),
    ("rag", "version", "1.0", "version", "should match pattern"),
    ("rag", "", ["not", "an", "object"], "rag", "must be a JSON object"),
]


def _case_id(case: tuple[str, str, Any, str, str]) -> str:
    return f"{case[0]}:{case[1] or 'whole'}:{str(case[2])[:12]}"


def test_every_valid_base_config_passes() -> None:
    for ctype, config in VALID.items():
        validate_config(ctype, config)


@pytest.fixture
def client(
    healthy_etcd: EtcdCluster, etcd_prefix: str, alerts: list[Alert]
) -> Iterator[DefenderClient]:
    c = make_client(healthy_etcd, etcd_prefix, new_keyring(), alerts)
    yield c
    c.close()


@pytest.mark.parametrize(
    ("ctype", "path", "value", "field", "phrase"), CONFIG_CASES, ids=map(_case_id, CONFIG_CASES)
)
def test_bad_config_commit_is_refused_alerted_and_active_kept(
    client: DefenderClient,
    alerts: list[Alert],
    ctype: str,
    path: str,
    value: Any,
    field: str,
    phrase: str,
) -> None:
    configs = ConfigStore(client)
    name = f"{ctype}-main"
    configs.seed(name, VALID[ctype], ctype, by="test")
    with pytest.raises(ConfigValidationError) as info:
        configs.commit(name, edit(ctype, path, value), by="test")
    message = str(info.value)
    assert f"config for {name!r} rejected" in message
    assert field in message and phrase in message, message
    active = configs.get_active(name)
    assert active.version == 1 and active.config == validate_config(ctype, VALID[ctype])
    assert [a.kind for a in alerts] == ["ConfigInvalid"]
    assert alerts[0].component == name and phrase in alerts[0].detail


def test_custom_component_config_checked_against_its_schema(
    client: DefenderClient, alerts: list[Alert]
) -> None:
    schema = {
        "type": "object",
        "properties": {"workers": {"type": "integer", "minimum": 1}},
        "required": ["workers"],
        "additionalProperties": False,
    }
    configs = ConfigStore(client)
    configs.seed("plugin", {"workers": 2}, "custom", by="test", json_schema=schema)
    for bad, phrase in [
        ({"workers": 0}, "less than the minimum of 1"),
        ({"workers": "2"}, "is not of type 'integer'"),
        ({}, "'workers' is a required property"),
        ({"workers": 2, "extra": 1}, "Additional properties are not allowed"),
    ]:
        with pytest.raises(ConfigValidationError) as info:
            configs.commit("plugin", bad, by="test")
        assert phrase in str(info.value)
    with pytest.raises(ConfigValidationError) as info:
        configs.seed("schemaless", {"workers": 2}, "custom", by="test")
    assert "must carry a JSON schema" in str(info.value)
    assert configs.get_active("plugin").config == {"workers": 2}
    assert len(alerts) == 5


# --- bad stored values -------------------------------------------------------------------------


def _flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0x55]) + blob[index + 1 :]


def _set_byte(blob: bytes, index: int, value: int) -> bytes:
    return blob[:index] + bytes([value]) + blob[index + 1 :]


def test_bad_stored_values_give_typed_errors_and_alerts_never_plaintext(
    client: DefenderClient, alerts: list[Alert], etcd_prefix: str
) -> None:
    configs = ConfigStore(client)
    configs.seed("firewall", VALID["firewall"], "firewall", by="test")
    configs.seed("rag", VALID["rag"], "rag", by="test")
    active = client.layout.active_config("firewall")
    good = client.store.get(active)
    assert good is not None
    blob = good.value
    keyring = client.envelope.keyring()
    assert keyring is not None
    key_id = keyring.primary.key_id
    header_len = 13 + len(key_id)
    plain = client.open(active, blob)

    other = new_keyring()  # another deployment's key
    same_id_other_material = HYGIENE.register(
        Keyring([Key(key_id, other.primary.material, KeyState.PRIMARY, other.primary.created)])
    )
    compress_only = EnvelopeOptions(encrypt=False)
    no_crypto = Envelope(None, compress_only)
    zeros = b"\0" * (8 << 20)
    roomy = EnvelopeOptions(max_decompressed_bytes=64 << 20, max_ratio=1e6)
    # A bomb sealed with the right key (an insider, or a bug): authentic, still refused.
    bomb = Envelope(keyring, roomy).seal(zeros, active)
    zeros_writer = Envelope(None, roomy.model_copy(update={"encrypt": False})).seal(zeros, active)
    client.alerter.add_sink(EtcdAlertSink(client.store, client.layout, ttl_seconds=600))

    cases: list[tuple[str, bytes, type[EnvelopeError], str]] = [
        ("ciphertext byte", _flip(blob, len(blob) - 20), AuthenticationFailedError, "modified"),
        ("tag byte", _flip(blob, len(blob) - 1), AuthenticationFailedError, "modified"),
        ("declared length", _flip(blob, 9), AuthenticationFailedError, "modified"),
        ("truncated tail", blob[:-5], AuthenticationFailedError, "modified"),
        ("truncated to header", blob[: header_len + 4], SizeAnomalyError, "truncated"),
        ("truncated to 10 bytes", blob[:10], SizeAnomalyError, "shorter than its fixed header"),
        (
            "moved from rag",
            client.store.get(client.layout.active_config("rag")).value,  # type: ignore[union-attr]
            AuthenticationFailedError,
            "modified",
        ),
        (
            "other deployment's key",
            Envelope(other).seal(plain, active),
            UnknownKeyError,
            "which this component does not",
        ),
        (
            "same key id, other material",
            Envelope(same_id_other_material).seal(plain, active),
            AuthenticationFailedError,
            key_id,
        ),
        ("unknown compression id", _set_byte(blob, 6, 9), UnknownCodecError, "0x09"),
        ("unknown cipher id", _set_byte(blob, 7, 9), UnknownCodecError, "0x09"),
        ("compressed flag, no codec", _set_byte(blob, 6, 0), CodecMismatchError, "codec mismatch"),
        (
            "unencrypted value",
            no_crypto.seal(plain, active),
            CodecMismatchError,
            "refuse unencrypted values",
        ),
        ("old design's plaintext JSON", b'{"default_policy": "allow"}', NotAnEnvelopeError, "JSON"),
        ("authentic decompression bomb", bomb, SizeAnomalyError, "compression ratio over the cap"),
        ("unencrypted bomb", zeros_writer, CodecMismatchError, "refuse unencrypted"),
    ]
    seen: list[str] = []
    for label, value, error, phrase in cases:
        alerts.clear()
        client.store.put(active, value)
        with pytest.raises(error) as info:
            configs.get_active("firewall")
        assert phrase in str(info.value), f"{label}: {info.value}"
        assert info.value.path == active
        assert [a.kind for a in alerts] == [error.reason], f"{label}: {alerts}"
        assert alerts[0].component == "firewall" and alerts[0].path == active
        seen.append(label)
    assert len(seen) == len(cases)

    # Bombs for a reader that accepts unencrypted values: the ratio cap stops them.
    with pytest.raises(SizeAnomalyError) as bomb:
        no_crypto.open(zeros_writer, active, compress_only)
    assert "compression ratio over the cap" in str(bomb.value)
    # A declared size over the cap is refused before any decompression.
    huge = zeros_writer[:8] + struct.pack(">I", 1 << 30) + zeros_writer[12:]
    with pytest.raises(SizeAnomalyError) as declared:
        no_crypto.open(huge, active, compress_only)
    assert "declared size over the cap" in str(declared.value)

    # Oversized writes are refused before they reach etcd, and nothing is written.
    client.store.put(active, blob)
    with pytest.raises(ValueTooLargeError) as big:
        client.put_sealed(active, os.urandom(2 << 20))
    assert "etcd request limit" in str(big.value)
    assert client.store.get(active).value == blob  # type: ignore[union-attr]
    assert configs.get_active("firewall").config == validate_config("firewall", VALID["firewall"])

    # Every alert reached etcd too (the rag component reads them there).
    stored = client.store.list_prefix(client.layout.component_alerts_dir("firewall"))
    kinds = sorted(json.loads(a.value)["kind"] for a in stored)
    assert kinds == sorted(error.reason for _, _, error, _ in cases)


def test_watchers_get_typed_errors_for_tampered_values(
    client: DefenderClient, alerts: list[Alert]
) -> None:
    configs = ConfigStore(client)
    configs.seed("firewall", VALID["firewall"], "firewall", by="test")
    active_path = client.layout.active_config("firewall")
    delivered: list[Any] = []
    errors: list[Exception] = []
    handle = configs.watch_active("firewall", delivered.append, on_error=errors.append)
    try:
        good = client.store.get(active_path)
        assert good is not None
        client.store.put(active_path, _flip(good.value, len(good.value) - 3))
        wait_for("the watcher to report the tampering", lambda: errors != [], timeout=30)
    finally:
        handle.cancel()
    assert isinstance(errors[0], AuthenticationFailedError)
    assert len(delivered) == 1, "only the initial good value may be delivered"
    assert "AuthenticationFailed" in [a.kind for a in alerts]


# --- fuzzing the decoder -------------------------------------------------------------------------

FUZZ_PATH = "/ml-defender/components/firewall/active_config"
_FUZZ_KEYRING = HYGIENE.register(Keyring.generate())
_READER = Envelope(_FUZZ_KEYRING)
_LENIENT = Envelope(_FUZZ_KEYRING, EnvelopeOptions(encrypt=False))
_SAMPLES = (
    [_READER.seal(b'{"default_policy":"deny","rules":[]}' * n, FUZZ_PATH) for n in (1, 20, 300)]
    + [
        # Carrying a registration (flag bit 2): 8 more header bytes, covered by the AEAD.
        _READER.seal(b'{"default_policy":"deny","rules":[]}' * n, FUZZ_PATH, registration=r)
        for n, r in ((1, 1), (20, 1_764_000_000_000))
    ]
    + [
        _LENIENT.seal(b"x" * 1000, FUZZ_PATH),
        _LENIENT.seal(b"y" * 10, FUZZ_PATH),
    ]
)
_ORIGINALS = {s: _LENIENT.open(s, FUZZ_PATH) for s in _SAMPLES}


@st.composite
def structured_blobs(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    """(blob, the plaintext the blob must decode to if it decodes at all, or None)."""
    kind = draw(st.sampled_from(["header", "edits", "splice", "raw"]))
    if kind == "raw":
        return draw(st.binary(max_size=512)), None
    if kind == "header":
        kid = draw(st.binary(max_size=70))
        head = struct.pack(
            ">4sBBBBIB",
            b"\x89DFC",
            draw(st.sampled_from([1, 1, 1, 0, 2, 255])),
            draw(st.integers(0, 255)),
            draw(st.sampled_from([0, 1, 2, 255])),
            draw(st.sampled_from([0, 1, 2, 3, 255])),
            draw(st.sampled_from([0, 1, 16, 1 << 20, 16 << 20, (16 << 20) + 1, 0xFFFFFFFF])),
            draw(st.sampled_from([len(kid), 0, 64, 65, 255])),
        )
        registration = draw(st.sampled_from([b"", b"", b"\0\0\1", b"\0" * 7 + b"\1"]))
        return head + kid + registration + draw(st.binary(max_size=512)), None
    base = draw(st.sampled_from(_SAMPLES))
    if kind == "edits":
        out = bytearray(base)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] = draw(st.integers(0, 255))
        cut = draw(st.integers(0, len(out)))
        data = bytes(out[:cut]) if draw(st.booleans()) else bytes(out)
        return data, _ORIGINALS[base]
    other = draw(st.sampled_from(_SAMPLES))
    a, b = draw(st.integers(0, len(base))), draw(st.integers(0, len(other)))
    return base[:a] + other[b:], None


def _fuzz_once(blob: bytes, original: bytes | None) -> None:
    for reader in (_READER, _LENIENT):
        try:
            out = reader.open(blob, FUZZ_PATH)
        except EnvelopeError as exc:
            # Messages never carry more than a few bytes of input.
            assert len(str(exc)) < 1000
            continue
        if reader is _READER and original is not None:
            # Authenticated reader: anything it returns is exactly what was sealed.
            assert out == original


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(structured_blobs())
def test_decoder_fuzz_only_typed_errors(case: tuple[bytes, bytes | None]) -> None:
    _fuzz_once(*case)


@pytest.mark.slow
@settings(max_examples=20_000, deadline=None)
@given(structured_blobs())
def test_decoder_fuzz_only_typed_errors_long(case: tuple[bytes, bytes | None]) -> None:
    _fuzz_once(*case)
