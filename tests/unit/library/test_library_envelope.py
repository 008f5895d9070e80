"""Envelope: round trips and every error path, with hand-crafted blobs where needed."""

from __future__ import annotations

import base64
import os
import struct

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defender_config import (
    AuthenticationFailedError,
    CodecMismatchError,
    Envelope,
    EnvelopeError,
    EnvelopeOptions,
    Keyring,
    KeyringError,
    NotAnEnvelopeError,
    SizeAnomalyError,
    UnexpectedEnvelopeError,
    UnknownCodecError,
    UnknownKeyError,
    UnsupportedFormatError,
    ValueTooLargeError,
    expect_plaintext,
    inspect,
    is_envelope,
)
from defender_config._codecs import AES256GCM, compressor_by_name
from defender_config._envelope import (
    _CHECKED,
    _CHECKED_MAX,
    FLAG_COMPRESSED,
    FLAG_ENCRYPTED,
    FLAG_REGISTRATION,
    MAGIC,
    REGISTRATION_BYTES,
    _checked_header,
    _worth_trying,
    registration_of,
)

PATH = "/ml-defender/components/detector/active_config"
PLAIN = EnvelopeOptions(compress=False, encrypt=False)
COMPRESS_ONLY = EnvelopeOptions(compress=True, encrypt=False)
MiB = 1024 * 1024


def craft(
    payload: bytes,
    *,
    declared: int,
    flags: int,
    comp: int,
    cipher: int = 0,
    key_id: bytes = b"",
    version: int = 1,
    keyring: Keyring | None = None,
    path: str = PATH,
    registration: bytes = b"",
) -> bytes:
    """Build an envelope by hand, encrypting correctly when a keyring is given, so the reader's
    checks after decryption can be reached. `registration`: the bytes written after the key id
    (whatever the flags say), part of the header and so of the associated data."""
    header = struct.pack(">4sBBBBIB", MAGIC, version, flags, comp, cipher, declared, len(key_id))
    header += key_id + registration
    if keyring is None:
        return header + payload
    nonce = os.urandom(12)
    aead = AES256GCM.aead(keyring.primary.material)
    return header + nonce + aead.encrypt(nonce, payload, header + path.encode())


# --- round trips ---------------------------------------------------------------------------------

paths = st.text(min_size=1, max_size=200).map(lambda s: "/" + s)
option_sets = st.builds(
    EnvelopeOptions,
    compress=st.booleans(),
    encrypt=st.booleans(),
    cipher=st.sampled_from(["aes-256-gcm", "chacha20-poly1305"]),
    level=st.integers(1, 9),
    threshold_bytes=st.integers(0, 512),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=8192), path=paths, opts=option_sets)
def test_round_trip_any_bytes_any_path_any_options(
    keyring: Keyring, data: bytes, path: str, opts: EnvelopeOptions
) -> None:
    env = Envelope(keyring, opts)
    blob = env.seal(data, path)
    assert env.open(blob, path) == data
    if opts.encrypt:
        header = inspect(blob)
        assert header.encrypted and header.key_id == keyring.primary.key_id
        assert header.cipher == opts.cipher
        assert header.declared_length == len(data)


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=2048), opts=option_sets)
def test_plaintext_starting_with_magic_still_round_trips(
    keyring: Keyring, data: bytes, opts: EnvelopeOptions
) -> None:
    env = Envelope(keyring, opts)
    value = MAGIC + data
    blob = env.seal(value, PATH)
    assert is_envelope(blob)  # never stored bare, or readers would misparse it
    assert env.open(blob, PATH) == value


def test_plain_options_store_plaintext_readable_with_etcdctl(keyring: Keyring) -> None:
    env = Envelope(keyring, PLAIN)
    assert env.seal(b'{"a": 1}', PATH) == b'{"a": 1}'
    assert env.open(b'{"a": 1}', PATH) == b'{"a": 1}'


def test_threshold_leaves_small_values_uncompressed(
    envelope: Envelope, config_bytes: bytes
) -> None:
    small = inspect(envelope.seal(b"x" * 100, PATH))
    assert not small.compressed and small.compression == "none"
    big = inspect(envelope.seal(config_bytes, PATH))
    assert big.compressed and big.compression == "zstd"
    assert big.stored_length < len(config_bytes)


def test_incompressible_value_is_stored_uncompressed(envelope: Envelope) -> None:
    data = os.urandom(4096)
    header = inspect(envelope.seal(data, PATH))
    assert not header.compressed
    assert envelope.open(envelope.seal(data, PATH), PATH) == data


def test_large_values_are_probed_before_compressing() -> None:
    # From 32 KiB on, three 4 KiB samples (head, middle, tail) decide whether a full
    # compression attempt is worth it: random data skips it, base64 and text do not.
    size = 64 * 1024
    codec = compressor_by_name("zstd")
    assert not _worth_trying(codec, os.urandom(size))
    assert _worth_trying(codec, base64.b64encode(os.urandom(size * 3 // 4)))
    assert _worth_trying(codec, b'{"rule": "allow tcp 22"}' * (size // 24))
    # One compressible sample is enough.
    mixed = bytearray(os.urandom(size))
    mixed[-4096:] = bytes(4096)
    assert _worth_trying(codec, bytes(mixed))
    # Below the probe size every value is tried in full.
    assert _worth_trying(codec, os.urandom(16 * 1024))


def test_a_value_whose_samples_miss_its_compressible_part_is_stored_whole(
    envelope: Envelope,
) -> None:
    # The documented price of the probe: zeros between three random samples go uncompressed;
    # the value is stored as is, not lost or damaged.
    size = 64 * 1024
    data = bytearray(size)
    mid = (size - 4096) // 2
    for start in (0, mid, size - 4096):
        data[start : start + 4096] = os.urandom(4096)
    header = inspect(envelope.seal(bytes(data), PATH))
    assert not header.compressed
    assert envelope.open(envelope.seal(bytes(data), PATH), PATH) == bytes(data)


def test_per_call_options_override_the_store(envelope: Envelope, config_bytes: bytes) -> None:
    blob = envelope.seal(config_bytes, PATH, COMPRESS_ONLY)
    header = inspect(blob)
    assert header.compressed and not header.encrypted and header.key_id is None
    assert envelope.open(blob, PATH, COMPRESS_ONLY) == config_bytes
    # The store default (encrypt on) refuses the same unencrypted value.
    with pytest.raises(CodecMismatchError):
        envelope.open(blob, PATH)


def test_chacha_value_opens_for_a_reader_configured_for_aes(keyring: Keyring) -> None:
    writer = Envelope(keyring, EnvelopeOptions(cipher="chacha20-poly1305"))
    blob = writer.seal(b"hello" * 100, PATH)
    assert inspect(blob).cipher == "chacha20-poly1305"
    assert Envelope(keyring).open(blob, PATH) == b"hello" * 100


def _nonce_of(blob: bytes) -> bytes:
    start = inspect(blob).header_length
    return blob[start : start + 12]


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "chacha20-poly1305"])
def test_every_seal_draws_a_fresh_96_bit_nonce(
    keyring: Keyring, config_bytes: bytes, cipher: str
) -> None:
    """docs/security.md: "a fresh random 96-bit nonce per value". A nonce repeated under one key
    leaks the XOR of two plaintexts (and, for GCM, lets the tag key be recovered). The same value
    at the same path is the worst case for a nonce derived from the input or a counter reset per
    process: it must get a nonce of its own every time, as must each copy a seed writes."""
    env = Envelope(keyring, EnvelopeOptions(cipher=cipher))
    blobs = [env.seal(config_bytes, PATH) for _ in range(200)]
    blobs += env.seal_many(config_bytes, SEED_PATHS) + env.seal_many(config_bytes, SEED_PATHS)
    nonces = [_nonce_of(b) for b in blobs]
    assert {len(n) for n in nonces} == {12}
    assert len(set(nonces)) == len(nonces), "a nonce was used twice under one key"
    # The ciphertexts differ too, not only the tags (a repeated nonce keeps the body).
    bodies = {b[inspect(b).header_length + 12 : -16] for b in blobs[:200]}
    assert len(bodies) == 200
    assert all(env.open(b, PATH) == config_bytes for b in blobs[:200])


def test_a_key_derived_for_one_cipher_opens_no_value_of_the_other(
    keyring: Keyring, config_bytes: bytes
) -> None:
    """docs/security.md: HKDF "bound to the cipher's name". With one key's material, a value
    sealed with ChaCha20-Poly1305 does not open under the key HKDF gives AES-256-GCM, nor the
    reverse: each AEAD gets its own key, never the raw material."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    from defender_config._codecs import CHACHA20_POLY1305

    material = keyring.primary.material
    attempts: list[tuple[str, AESGCM | ChaCha20Poly1305]] = [
        ("chacha20-poly1305", ChaCha20Poly1305(AES256GCM.derive(material))),
        ("chacha20-poly1305", ChaCha20Poly1305(material)),
        ("aes-256-gcm", AESGCM(CHACHA20_POLY1305.derive(material))),
        ("aes-256-gcm", AESGCM(material)),
    ]
    for cipher, aead in attempts:
        blob = Envelope(keyring, EnvelopeOptions(cipher=cipher)).seal(config_bytes, PATH)
        start = inspect(blob).header_length
        header, nonce, sealed = blob[:start], blob[start : start + 12], blob[start + 12 :]
        with pytest.raises(InvalidTag):
            aead.decrypt(nonce, sealed, header + PATH.encode())


def test_codec_label(envelope: Envelope) -> None:
    assert envelope.codec_label() == "zstd+aes-256-gcm"
    assert envelope.codec_label(PLAIN) == "none+none"
    assert inspect(envelope.seal(b"y" * 1000, PATH)).codec == "zstd+aes-256-gcm"


# --- tampering, moving, keys ---------------------------------------------------------------------


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(min_value=0), flip=st.integers(1, 255))
def test_any_changed_byte_is_a_typed_error(
    envelope: Envelope, config_bytes: bytes, index: int, flip: int
) -> None:
    blob = bytearray(envelope.seal(config_bytes, PATH))
    header_len = inspect(bytes(blob)).header_length
    index %= len(blob)
    blob[index] ^= flip
    with pytest.raises(EnvelopeError) as info:
        envelope.open(bytes(blob), PATH)
    if index >= header_len:  # nonce, ciphertext or tag
        assert isinstance(info.value, AuthenticationFailedError)


def test_header_only_change_fails_authentication(envelope: Envelope, config_bytes: bytes) -> None:
    blob = bytearray(envelope.seal(config_bytes, PATH))
    # Declared length 4096 -> 4097: still under every cap, so only the AEAD can notice.
    struct.pack_into(">I", blob, 8, len(config_bytes) + 1)
    with pytest.raises(AuthenticationFailedError) as info:
        envelope.open(bytes(blob), PATH)
    assert info.value.reason == "AuthenticationFailed"
    assert envelope.keyring() is not None
    assert info.value.fingerprint == envelope.keyring().primary.fingerprint  # type: ignore[union-attr]


def test_value_moved_to_another_path_fails_authentication(envelope: Envelope) -> None:
    blob = envelope.seal(b"secret config" * 50, PATH)
    other = PATH.replace("detector", "firewall")
    with pytest.raises(AuthenticationFailedError) as info:
        envelope.open(blob, other)
    assert info.value.path == other
    assert other in str(info.value)


def test_unknown_key_id_names_the_key_and_what_is_held(config_bytes: bytes) -> None:
    writer_ring, reader_ring = Keyring.generate(), Keyring.generate()
    blob = Envelope(writer_ring).seal(config_bytes, PATH)
    with pytest.raises(UnknownKeyError) as info:
        Envelope(reader_ring).open(blob, PATH)
    err = info.value
    assert err.reason == "UnknownKey"
    assert err.key_id == writer_ring.primary.key_id
    assert err.known_key_ids == reader_ring.key_ids
    assert writer_ring.primary.key_id in str(err) and reader_ring.primary.key_id in str(err)


def test_same_key_id_with_other_material_fails_authentication(config_bytes: bytes) -> None:
    from defender_config import Key

    ring = Keyring.generate()
    impostor = Keyring([Key.generate(key_id=ring.primary.key_id)])
    blob = Envelope(ring).seal(config_bytes, PATH)
    with pytest.raises(AuthenticationFailedError):
        Envelope(impostor).open(blob, PATH)


def test_encrypted_value_without_any_keyring_is_unknown_key(envelope: Envelope) -> None:
    blob = envelope.seal(b"x" * 300, PATH)
    with pytest.raises(UnknownKeyError) as info:
        Envelope(None, PLAIN).open(blob, PATH, COMPRESS_ONLY)
    assert info.value.known_key_ids == ()


def test_envelope_needs_a_keyring_to_encrypt() -> None:
    with pytest.raises(KeyringError, match="no keyring was given; set keyring_path"):
        Envelope(None, EnvelopeOptions())
    env = Envelope(None, PLAIN)
    with pytest.raises(KeyringError, match="DEFENDER_KEYRING_PATH"):
        env.seal(b"x", PATH, EnvelopeOptions())


# --- codecs --------------------------------------------------------------------------------------


def test_unknown_compression_codec_id() -> None:
    blob = craft(b"abc", declared=3, flags=1, comp=0x07)
    with pytest.raises(UnknownCodecError) as info:
        Envelope(None, PLAIN).open(blob, PATH)
    assert info.value.codec_id == 0x07 and info.value.kind == "compression"
    assert "0x07" in str(info.value) and "zstd" in str(info.value)
    assert inspect(blob).compression == "unknown(0x07)"


def test_unknown_cipher_id(keyring: Keyring) -> None:
    blob = craft(b"\0" * 40, declared=3, flags=2, comp=0, cipher=0x09, key_id=b"k1")
    with pytest.raises(UnknownCodecError) as info:
        Envelope(keyring).open(blob, PATH)
    assert info.value.kind == "cipher" and info.value.reason == "UnknownCodec"
    assert inspect(blob).cipher == "unknown(0x09)"


@pytest.mark.parametrize(
    ("flags", "comp", "cipher", "key_id"),
    [
        (0x01, 0, 0, b""),  # compressed flag, codec none
        (0x00, 1, 0, b""),  # zstd codec, flag clear
        (0x02, 0, 0, b"k1"),  # encrypted flag, cipher none
        (0x00, 0, 1, b""),  # cipher set, flag clear
        (0x00, 0, 0, b"k1"),  # key id on an unencrypted value
    ],
)
def test_flags_that_contradict_codec_ids(flags: int, comp: int, cipher: int, key_id: bytes) -> None:
    blob = craft(
        b"abc" + b"\0" * 40, declared=3, flags=flags, comp=comp, cipher=cipher, key_id=key_id
    )
    with pytest.raises(CodecMismatchError) as info:
        Envelope(Keyring.generate(), PLAIN).open(blob, PATH)
    assert info.value.reason == "CodecMismatch"


def test_reader_requiring_encryption_refuses_unencrypted(envelope: Envelope) -> None:
    blob = Envelope(None, COMPRESS_ONLY).seal(b"z" * 1000, PATH)
    with pytest.raises(CodecMismatchError) as info:
        envelope.open(blob, PATH)
    assert info.value.expected.startswith("an encrypted value")
    assert info.value.found == "an unencrypted value"


# --- sizes ---------------------------------------------------------------------------------------


def test_declared_length_differs_from_uncompressed_payload() -> None:
    with pytest.raises(SizeAnomalyError) as info:
        Envelope(None, PLAIN).open(craft(b"abcd", declared=10, flags=0, comp=0), PATH)
    assert (info.value.declared, info.value.actual) == (10, 4)


def test_declared_length_differs_from_zstd_frame_size() -> None:
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"a" * 1000)
    with pytest.raises(SizeAnomalyError) as info:
        Envelope(None, PLAIN).open(craft(frame, declared=999, flags=1, comp=1), PATH)
    assert (info.value.declared, info.value.actual) == (999, 1000)


def test_declared_length_differs_after_decryption(keyring: Keyring) -> None:
    """A writer with a bug that lies consistently (valid tag) is still caught."""
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"a" * 1000)
    kid = keyring.primary.key_id.encode()
    blob = craft(frame, declared=2000, flags=3, comp=1, cipher=1, key_id=kid, keyring=keyring)
    with pytest.raises(SizeAnomalyError) as info:
        Envelope(keyring).open(blob, PATH)
    assert info.value.declared == 2000 and info.value.actual == 1000


def test_frame_without_size_that_expands_past_declared_is_stopped() -> None:
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 4 * MiB)
    with pytest.raises(SizeAnomalyError, match="longer than declared"):
        Envelope(None, PLAIN).open(craft(frame, declared=1000, flags=1, comp=1), PATH)


def test_bomb_declared_over_the_cap_is_refused_before_decompressing() -> None:
    # The payload is not even zstd: the cap check must come first.
    blob = craft(b"not zstd at all", declared=100 * MiB, flags=1, comp=1)
    with pytest.raises(SizeAnomalyError, match="max_decompressed_bytes") as info:
        Envelope(None, PLAIN).open(blob, PATH)
    assert info.value.declared == 100 * MiB


def test_bomb_frame_claiming_more_than_declared() -> None:
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * 64 * MiB)
    with pytest.raises(SizeAnomalyError, match="frame size differs") as info:
        Envelope(None, PLAIN).open(craft(frame, declared=1024, flags=1, comp=1), PATH)
    assert info.value.actual == 64 * MiB


def test_compression_ratio_over_the_cap(envelope: Envelope) -> None:
    data = b"\0" * (8 * MiB)  # zstd packs this ~10,000x
    # The writer refuses what its readers would refuse...
    with pytest.raises(SizeAnomalyError, match="compresses more than max_ratio 1000"):
        envelope.seal(data, PATH)
    # ...and a reader refuses what a more permissive writer stored.
    lenient = EnvelopeOptions(max_ratio=1e6)
    blob = envelope.seal(data, PATH, lenient)
    with pytest.raises(SizeAnomalyError, match="ratio over the cap of 1000"):
        envelope.open(blob, PATH)
    assert envelope.open(blob, PATH, lenient) == data


def test_smaller_cap_per_call(envelope: Envelope, config_bytes: bytes) -> None:
    blob = envelope.seal(config_bytes, PATH)
    with pytest.raises(SizeAnomalyError):
        envelope.open(blob, PATH, EnvelopeOptions(max_decompressed_bytes=1000))


def test_corrupt_zstd_payload_unencrypted() -> None:
    frame = bytearray(zstandard.ZstdCompressor().compress(b"hello world " * 100))
    frame[-3] ^= 0xFF
    frame[8] ^= 0xFF
    with pytest.raises(SizeAnomalyError):
        Envelope(None, PLAIN).open(craft(bytes(frame), declared=1200, flags=1, comp=1), PATH)
    with pytest.raises(SizeAnomalyError, match="not a zstd frame"):
        Envelope(None, PLAIN).open(craft(b"garbage!", declared=8, flags=1, comp=1), PATH)


@pytest.mark.parametrize("opts", [EnvelopeOptions(), COMPRESS_ONLY])
def test_every_truncation_is_a_typed_error(keyring: Keyring, opts: EnvelopeOptions) -> None:
    env = Envelope(keyring, opts)
    blob = env.seal(b"some config text " * 40, PATH)
    for cut in range(len(blob)):
        with pytest.raises(EnvelopeError):
            env.open(blob[:cut], PATH)
    # Short ones say "truncated" or "shorter", not just "bad".
    with pytest.raises(SizeAnomalyError, match="shorter than its fixed header"):
        env.open(blob[:8], PATH)
    with pytest.raises(SizeAnomalyError, match="truncated"):
        env.open(blob[: inspect(blob).header_length - 1], PATH)


def test_truncated_before_the_tag(envelope: Envelope) -> None:
    blob = envelope.seal(b"x" * 300, PATH)
    header_len = inspect(blob).header_length
    with pytest.raises(SizeAnomalyError, match="nonce and tag"):
        envelope.open(blob[: header_len + 20], PATH)


def test_value_over_the_etcd_request_limit(envelope: Envelope) -> None:
    data = os.urandom(int(1.6 * MiB))  # incompressible
    with pytest.raises(ValueTooLargeError) as info:
        envelope.seal(data, PATH)
    assert info.value.limit == 1_572_864 and info.value.size > info.value.limit
    assert info.value.reason == "ValueTooLarge"
    with pytest.raises(ValueTooLargeError):
        Envelope(None, PLAIN).seal(data, PATH)


def test_large_compressible_value_fits_after_compression(envelope: Envelope) -> None:
    data = b"".join(  # ~2.3 MiB of varied rules, packs ~10x
        b'{"id":"r%d","action":"deny","dst_cidr":"10.%d.%d.0/24"}\n' % (i, i % 256, i // 256 % 256)
        for i in range(40_000)
    )
    assert len(data) > 1.5 * MiB
    assert envelope.open(envelope.seal(data, PATH), PATH) == data


def test_value_over_the_readers_cap_is_refused_at_write(envelope: Envelope) -> None:
    with pytest.raises(ValueTooLargeError, match="max_decompressed_bytes"):
        envelope.seal(b"a" * 2000, PATH, EnvelopeOptions(max_decompressed_bytes=1000))


# --- format detection ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("blob", "hint"),
    [
        (b'{"node_id": "x"}', "JSON"),
        (b"", "empty"),
        (b"\x89DFX....", "damaged"),
        (b"node_id: x", "magic"),
    ],
)
def test_plaintext_where_envelope_expected(envelope: Envelope, blob: bytes, hint: str) -> None:
    with pytest.raises(NotAnEnvelopeError, match=hint) as info:
        envelope.open(blob, PATH)
    assert info.value.reason == "NotAnEnvelope"
    with pytest.raises(NotAnEnvelopeError):
        Envelope(None, COMPRESS_ONLY).open(blob, PATH)
    with pytest.raises(NotAnEnvelopeError):
        inspect(blob)


def test_envelope_where_plaintext_expected(envelope: Envelope) -> None:
    blob = envelope.seal(b'{"status": "RUNNING"}', PATH)
    with pytest.raises(UnexpectedEnvelopeError) as info:
        expect_plaintext(blob, "/ml-defender/components/x/status")
    assert info.value.reason == "UnexpectedEnvelope"
    assert "/ml-defender/components/x/status" in str(info.value)
    assert expect_plaintext(b'{"status": "RUNNING"}') == b'{"status": "RUNNING"}'


def test_newer_format_version_and_flags() -> None:
    with pytest.raises(UnsupportedFormatError, match="version 2"):
        Envelope(None, PLAIN).open(craft(b"abc", declared=3, flags=0, comp=0, version=2), PATH)
    with pytest.raises(UnsupportedFormatError, match="flag bits 0x80"):
        Envelope(None, PLAIN).open(craft(b"abc", declared=3, flags=0x80, comp=0), PATH)


def test_corrupt_key_id_fields(keyring: Keyring) -> None:
    env = Envelope(keyring)
    too_long = craft(b"\0" * 200, declared=3, flags=2, comp=0, cipher=1, key_id=b"k" * 65)
    with pytest.raises(SizeAnomalyError, match="key id length"):
        env.open(too_long, PATH)
    not_ascii = craft(b"\0" * 40, declared=3, flags=2, comp=0, cipher=1, key_id=b"\xff\xfe")
    with pytest.raises(NotAnEnvelopeError, match="not ASCII"):
        env.open(not_ascii, PATH)


# --- rotation through the envelope ---------------------------------------------------------------


def test_rotation_window(config_bytes: bytes) -> None:
    stage0 = Keyring.generate()
    old_id = stage0.primary.key_id
    old_blob = Envelope(stage0).seal(config_bytes, PATH)

    stage1 = stage0.with_new_decrypt_only()
    new_id = stage1.key_ids[-1]
    env1 = Envelope(stage1)
    assert inspect(env1.seal(config_bytes, PATH)).key_id == old_id  # still seals with old
    assert env1.open(old_blob, PATH) == config_bytes

    stage2 = stage1.promote(new_id)
    env2 = Envelope(stage2)
    new_blob = env2.seal(config_bytes, PATH)
    assert inspect(new_blob).key_id == new_id
    assert env2.open(old_blob, PATH) == config_bytes  # old key still decrypts
    assert env2.needs_reseal(old_blob) and not env2.needs_reseal(new_blob)
    # A component still on stage 1 reads what stage 2 writes: that is why stage 1 exists.
    assert env1.open(new_blob, PATH) == config_bytes

    stage4 = stage2.retire(old_id)
    env4 = Envelope(stage4)
    assert env4.open(new_blob, PATH) == config_bytes
    with pytest.raises(UnknownKeyError, match="retired") as info:
        env4.open(old_blob, PATH)
    assert info.value.retired and info.value.known_key_ids == (new_id,)


class SwitchableKeyring:
    """A keyring provider whose keyring the test replaces, as a KeyringSource reload does."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring

    def current(self) -> Keyring:
        return self.keyring


def test_one_envelope_follows_every_rotation_stage(config_bytes: bytes) -> None:
    # The same envelope through all stages: what it decrypts changes with the keyring even
    # after it has opened values with each key (and cached their AEADs).
    stage0 = Keyring.generate()
    old_id = stage0.primary.key_id
    provider = SwitchableKeyring(stage0)
    env = Envelope(provider)
    old_blob = env.seal(config_bytes, PATH)
    assert env.open(old_blob, PATH) == config_bytes

    stage1 = stage0.with_new_decrypt_only()
    new_id = stage1.key_ids[-1]
    new_blob = Envelope(stage1.promote(new_id)).seal(config_bytes, PATH)
    with pytest.raises(UnknownKeyError):  # stage 0 does not know the new key yet
        env.open(new_blob, PATH)

    provider.keyring = stage1
    assert env.open(new_blob, PATH) == config_bytes
    provider.keyring = stage2 = stage1.promote(new_id)
    assert env.open(old_blob, PATH) == config_bytes
    assert env.open(new_blob, PATH) == config_bytes

    provider.keyring = stage4 = stage2.retire(old_id)
    with pytest.raises(UnknownKeyError, match="retired"):
        env.open(old_blob, PATH)
    assert env.open(new_blob, PATH) == config_bytes

    provider.keyring = stage4.remove(old_id)
    with pytest.raises(UnknownKeyError) as info:
        env.open(old_blob, PATH)
    assert not info.value.retired

    provider.keyring = stage2  # a rollback to an older Secret makes the old key usable again
    assert env.open(old_blob, PATH) == config_bytes


def test_seal_follows_the_keyring_and_options_it_is_given(config_bytes: bytes) -> None:
    # seal keeps what it worked out for one keyring and one options object (key id, AEAD,
    # codec, caps); a new keyring or other options must never be sealed with the old ones.
    stage0 = Keyring.generate()
    provider = SwitchableKeyring(stage0)
    env = Envelope(provider)
    assert inspect(env.seal(config_bytes, PATH)).key_id == stage0.primary.key_id

    stage1 = stage0.with_new_decrypt_only()
    new_id = stage1.key_ids[-1]
    provider.keyring = stage1  # staged, not primary: still sealed with the old key
    assert inspect(env.seal(config_bytes, PATH)).key_id == stage0.primary.key_id
    provider.keyring = stage2 = stage1.promote(new_id)
    blob = env.seal(config_bytes, PATH)
    assert inspect(blob).key_id == new_id
    # Sealed with the new key's material, not merely labelled with its id.
    assert Envelope(Keyring([stage2.primary])).open(blob, PATH) == config_bytes
    with pytest.raises(UnknownKeyError):
        Envelope(Keyring([stage0.primary])).open(blob, PATH)

    chacha = EnvelopeOptions(cipher="chacha20-poly1305")
    assert inspect(env.seal(config_bytes, PATH, chacha)).cipher == "chacha20-poly1305"
    assert inspect(env.seal(config_bytes, PATH)).cipher == "aes-256-gcm"
    plain = env.seal(config_bytes, PATH, PLAIN)
    assert plain == config_bytes
    assert not inspect(env.seal(config_bytes, PATH, COMPRESS_ONLY)).encrypted
    small = EnvelopeOptions(max_decompressed_bytes=100)
    with pytest.raises(ValueTooLargeError):
        env.seal(config_bytes, PATH, small)
    tight = EnvelopeOptions(compress=False, request_limit_bytes=1024)
    with pytest.raises(ValueTooLargeError, match="etcd request limit"):
        env.seal(b"x" * 1024, PATH, tight)
    assert env.open(env.seal(config_bytes, PATH), PATH) == config_bytes


def test_seal_without_a_keyring_refuses_per_call_encryption() -> None:
    env = Envelope(None, COMPRESS_ONLY)
    assert not inspect(env.seal(b"config " * 100, PATH)).encrypted
    with pytest.raises(KeyringError):
        env.seal(b"config " * 100, PATH, EnvelopeOptions())
    assert not inspect(env.seal(b"config " * 100, PATH)).encrypted


def test_sealer_state_shows_no_key_material(keyring: Keyring, config_bytes: bytes) -> None:
    env = Envelope(keyring)
    env.seal(config_bytes, PATH)
    shown = repr(env._sealer) + repr(env)
    for key in keyring:
        assert key.material.hex() not in shown and repr(key.material) not in shown


def test_a_header_seen_before_still_has_the_rest_of_its_value_checked(
    envelope: Envelope, config_bytes: bytes
) -> None:
    # Checked headers are cached by their bytes; nothing about the body may be.
    blob = envelope.seal(config_bytes, PATH)
    assert envelope.open(blob, PATH) == config_bytes
    header_len = inspect(blob).header_length
    tampered = bytearray(blob)
    tampered[-1] ^= 0x01
    with pytest.raises(AuthenticationFailedError):
        envelope.open(bytes(tampered), PATH)
    with pytest.raises(SizeAnomalyError, match="nonce and tag"):
        envelope.open(blob[: header_len + 20], PATH)
    with pytest.raises(SizeAnomalyError, match="truncated in its key id"):
        envelope.open(blob[: header_len - 1], PATH)
    with pytest.raises(AuthenticationFailedError):
        envelope.open(blob, PATH + "/elsewhere")
    with pytest.raises(SizeAnomalyError, match="declared size over the cap"):
        envelope.open(blob, PATH, EnvelopeOptions(max_decompressed_bytes=100))
    with pytest.raises(UnknownKeyError):
        Envelope(Keyring.generate()).open(blob, PATH)
    assert envelope.open(blob, PATH) == config_bytes


def test_a_refused_header_is_refused_every_time(keyring: Keyring) -> None:
    unknown_codec = craft(b"abc", declared=3, flags=1, comp=0x7F)
    mismatch = craft(b"abc", declared=3, flags=0, comp=1)
    for _ in range(2):
        with pytest.raises(UnknownCodecError):
            Envelope(None, PLAIN).open(unknown_codec, PATH)
        with pytest.raises(CodecMismatchError):
            Envelope(None, PLAIN).open(mismatch, PATH)
    assert bytes(unknown_codec[:13]) not in _CHECKED and bytes(mismatch[:13]) not in _CHECKED


def test_a_reader_requiring_encryption_refuses_a_header_another_reader_accepted() -> None:
    blob = Envelope(None, COMPRESS_ONLY).seal(b"plain config " * 100, PATH)
    assert Envelope(None, COMPRESS_ONLY).open(blob, PATH) == b"plain config " * 100
    with pytest.raises(CodecMismatchError, match="refuse unencrypted"):
        Envelope(Keyring.generate()).open(blob, PATH)


def test_the_header_cache_stays_bounded() -> None:
    env = Envelope(None, PLAIN)
    for size in range(1, _CHECKED_MAX + 50):
        assert env.open(craft(b"x" * size, declared=size, flags=0, comp=0), PATH) == b"x" * size
    assert 0 < len(_CHECKED) <= _CHECKED_MAX


def test_needs_reseal_on_codec_changes(keyring: Keyring, config_bytes: bytes) -> None:
    env = Envelope(keyring)
    blob = env.seal(config_bytes, PATH)
    assert not env.needs_reseal(blob)
    assert env.needs_reseal(blob, EnvelopeOptions(cipher="chacha20-poly1305"))
    assert env.needs_reseal(blob, EnvelopeOptions(compress=False))
    assert env.needs_reseal(blob, COMPRESS_ONLY)
    plain = env.seal(config_bytes, PATH, COMPRESS_ONLY)
    assert env.needs_reseal(plain)
    assert not env.needs_reseal(plain, COMPRESS_ONLY)
    assert not Envelope(None, COMPRESS_ONLY).needs_reseal(plain)
    assert Envelope(None, PLAIN).needs_reseal(blob)
    # Plaintext left over from before encryption was switched on.
    assert env.needs_reseal(b'{"a": 1}')
    assert not env.needs_reseal(b'{"a": 1}', PLAIN)
    with pytest.raises(UnsupportedFormatError):
        env.needs_reseal(craft(b"abc", declared=3, flags=0, comp=0, version=9))


# --- writer and reader settings disagree ---------------------------------------------------------


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), writer=option_sets, reader=option_sets)
def test_reader_with_other_settings(
    keyring: Keyring, data: bytes, writer: EnvelopeOptions, reader: EnvelopeOptions
) -> None:
    """The header decides how to decode; the reader's settings only add requirements."""
    blob = Envelope(keyring, writer).seal(data, PATH)
    env = Envelope(keyring, reader)
    stored_plain = not is_envelope(blob)
    if stored_plain and (reader.compress or reader.encrypt):
        with pytest.raises(NotAnEnvelopeError):
            env.open(blob, PATH)
    elif not stored_plain and reader.encrypt and not inspect(blob).encrypted:
        with pytest.raises(CodecMismatchError):
            env.open(blob, PATH)
    else:
        assert env.open(blob, PATH) == data


def test_threads_share_one_envelope(keyring: Keyring, config_bytes: bytes) -> None:
    import threading

    env = Envelope(keyring)
    failures: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(200):
                data = config_bytes + str(n * 1000 + i).encode()
                path = f"{PATH}/{n}"
                if env.open(env.seal(data, path), path) != data:
                    raise AssertionError("round trip differs")
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


# --- the registration field (flag bit 2) ---------------------------------------------------------

REG = 1_764_000_000_123


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=4096),
    opts=option_sets.filter(lambda o: o.encrypt),
    registration=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_round_trip_with_and_without_a_registration(
    keyring: Keyring, data: bytes, opts: EnvelopeOptions, registration: int | None
) -> None:
    env = Envelope(keyring, opts)
    blob = env.seal(data, PATH, registration=registration)
    assert env.open(blob, PATH) == data
    header = inspect(blob)
    assert header.registration == registration == registration_of(blob)
    kid = len(keyring.primary.key_id)
    if registration is None:
        assert not header.flags & FLAG_REGISTRATION
        assert header.header_length == 13 + kid
    else:
        assert header.flags & FLAG_REGISTRATION and header.encrypted
        assert header.header_length == 13 + kid + REGISTRATION_BYTES
        assert blob[13 + kid : 13 + kid + 8] == struct.pack(">Q", registration)
    assert header.stored_length == len(blob) - header.header_length


@pytest.mark.parametrize("opts", [PLAIN, COMPRESS_ONLY])
def test_an_unencrypted_value_never_carries_a_registration(
    opts: EnvelopeOptions, config_bytes: bytes
) -> None:
    # Nothing would authenticate it: the writer leaves it out rather than write a bit 2 that
    # every reader refuses.
    env = Envelope(None, opts)
    blob = env.seal(config_bytes, PATH, registration=REG)
    assert env.open(blob, PATH) == config_bytes
    assert registration_of(blob) is None
    if is_envelope(blob):
        assert inspect(blob).registration is None
        assert not blob[5] & FLAG_REGISTRATION


@pytest.mark.parametrize("flags", [FLAG_REGISTRATION, FLAG_REGISTRATION | FLAG_COMPRESSED])
def test_a_registration_flag_on_an_unencrypted_value_is_unsupported(flags: int) -> None:
    payload = zstandard.ZstdCompressor().compress(b"abc") if flags & FLAG_COMPRESSED else b"abc"
    blob = craft(
        payload,
        declared=3,
        flags=flags,
        comp=1 if flags & FLAG_COMPRESSED else 0,
        registration=struct.pack(">Q", REG),
    )
    for _ in range(2):  # refused every time: a refused header is never cached
        with pytest.raises(UnsupportedFormatError, match="registration on an unencrypted"):
            Envelope(None, PLAIN).open(blob, PATH)
    with pytest.raises(UnsupportedFormatError, match="registration on an unencrypted"):
        inspect(blob)
    assert not any(key.startswith(blob[:13]) for key in _CHECKED)
    # The key-less read does not vouch for it either.
    assert registration_of(blob) is None


def test_a_value_truncated_inside_its_registration_is_a_size_anomaly(keyring: Keyring) -> None:
    env = Envelope(keyring)
    blob = env.seal(b"some config text " * 40, PATH, registration=REG)
    assert env.open(blob, PATH) == b"some config text " * 40  # its header is now cached
    start = 13 + len(keyring.primary.key_id)
    for cut in range(start, start + REGISTRATION_BYTES):
        short = blob[:cut]
        with pytest.raises(SizeAnomalyError, match="truncated in its registration") as info:
            env.open(short, PATH)
        assert info.value.reason == "SizeAnomaly"
        with pytest.raises(SizeAnomalyError, match="truncated in its registration"):
            inspect(short)
        assert registration_of(short) is None
    # One byte past it the registration is whole: what is missing is nonce and tag.
    with pytest.raises(SizeAnomalyError, match="nonce and tag"):
        env.open(blob[: start + REGISTRATION_BYTES], PATH)


def test_every_truncation_of_a_registered_value_is_a_typed_error(keyring: Keyring) -> None:
    env = Envelope(keyring)
    blob = env.seal(b"some config text " * 40, PATH, registration=REG)
    for cut in range(len(blob)):
        with pytest.raises(EnvelopeError):
            env.open(blob[:cut], PATH)


@pytest.mark.parametrize("index", range(REGISTRATION_BYTES))
def test_a_changed_registration_byte_fails_authentication(
    envelope: Envelope, config_bytes: bytes, index: int
) -> None:
    # The registration is read without a key (`registration_of`): only the AEAD, which covers
    # it, tells a value sealed for one registration from the same value relabelled.
    blob = bytearray(envelope.seal(config_bytes, PATH, registration=REG))
    at = 13 + blob[12] + index
    blob[at] ^= 0x01
    assert registration_of(bytes(blob)) != REG
    with pytest.raises(AuthenticationFailedError):
        envelope.open(bytes(blob), PATH)


def test_a_registration_added_to_or_stripped_from_a_value_fails_authentication(
    envelope: Envelope, config_bytes: bytes
) -> None:
    with_reg = envelope.seal(config_bytes, PATH, registration=REG)
    start = 13 + with_reg[12]
    stripped = bytearray(with_reg[:start] + with_reg[start + REGISTRATION_BYTES :])
    stripped[5] &= ~FLAG_REGISTRATION
    with pytest.raises(AuthenticationFailedError):
        envelope.open(bytes(stripped), PATH)
    without = envelope.seal(config_bytes, PATH)
    added = bytearray(without[:start] + struct.pack(">Q", REG) + without[start:])
    added[5] |= FLAG_REGISTRATION
    with pytest.raises(AuthenticationFailedError):
        envelope.open(bytes(added), PATH)


def test_values_differing_only_in_registration_have_their_own_header_cache_entries(
    envelope: Envelope, config_bytes: bytes
) -> None:
    _CHECKED.clear()
    one = envelope.seal(config_bytes, PATH, registration=REG)
    two = envelope.seal(config_bytes, PATH, registration=REG + 1)
    none = envelope.seal(config_bytes, PATH)
    header_len = inspect(one).header_length
    assert one[: header_len - REGISTRATION_BYTES] == two[: header_len - REGISTRATION_BYTES]
    for blob in (one, two, none):
        assert envelope.open(blob, PATH) == config_bytes
    keys = {_checked_header(blob, PATH)[0] for blob in (one, two, none)}
    assert keys == {one[:header_len], two[:header_len], none[: header_len - REGISTRATION_BYTES]}
    assert keys <= _CHECKED.keys()
    # Each entry is the whole header, registration included: the associated data.
    assert _CHECKED[one[:header_len]].header_len == header_len
    assert _CHECKED[none[: header_len - REGISTRATION_BYTES]].header_len == (
        header_len - REGISTRATION_BYTES
    )
    # A value relabelled with the other (cached) registration still fails authentication.
    relabelled = two[:header_len] + one[header_len:]
    with pytest.raises(AuthenticationFailedError):
        envelope.open(relabelled, PATH)


def test_registration_of_reads_only_an_encrypted_registered_header(
    envelope: Envelope, config_bytes: bytes
) -> None:
    blob = envelope.seal(config_bytes, PATH, registration=REG)
    assert registration_of(blob) == REG
    assert registration_of(envelope.seal(config_bytes, PATH)) is None
    assert registration_of(b'{"plain": true}') is None
    assert registration_of(b"") is None
    assert registration_of(blob[:12]) is None
    assert registration_of(b"XXXX" + blob[4:]) is None
    assert FLAG_ENCRYPTED & blob[5]


# --- one value for several keys ------------------------------------------------------------------

SEED_PATHS = (PATH.replace("active", "master"), PATH, PATH.replace("active_config", "history/1"))


def test_one_value_sealed_for_several_keys_opens_at_each_and_only_there(
    envelope: Envelope, config_bytes: bytes
) -> None:
    blobs = envelope.seal_many(config_bytes, SEED_PATHS, registration=7)
    assert len(blobs) == 3 and len(set(blobs)) == 3  # a nonce of its own each
    for path, blob in zip(SEED_PATHS, blobs, strict=True):
        assert envelope.open(blob, path) == config_bytes
        assert registration_of(blob) == 7
        assert blob[5] & FLAG_COMPRESSED and blob[5] & FLAG_ENCRYPTED
    # Bound to its own key: MASTER's copy put at ACTIVE does not open.
    with pytest.raises(AuthenticationFailedError):
        envelope.open(blobs[0], SEED_PATHS[1])


def test_one_value_for_several_keys_is_compressed_once(
    envelope: Envelope, config_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    codec = compressor_by_name("zstd")
    calls: list[int] = []
    original = codec.compress

    def counting(data: bytes, level: int) -> bytes:
        calls.append(len(data))
        return original(data, level)

    monkeypatch.setattr(codec, "compress", counting)
    envelope.seal_many(config_bytes, SEED_PATHS)
    assert calls == [len(config_bytes)]


@pytest.mark.parametrize("opts", [PLAIN, COMPRESS_ONLY], ids=["plain", "compress-only"])
def test_unencrypted_values_for_several_keys_are_what_seal_gives(
    keyring: Keyring, config_bytes: bytes, opts: EnvelopeOptions
) -> None:
    env = Envelope(keyring, opts)
    assert env.seal_many(config_bytes, SEED_PATHS) == [env.seal(config_bytes, SEED_PATHS[0])] * 3


def test_a_value_too_large_for_one_of_its_keys_is_refused_naming_that_key(keyring: Keyring) -> None:
    # Key + value must fit in etcd's request limit: the longest key is the one over it.
    data = os.urandom(2000)
    short, long = "/a", "/" + "b" * 200
    room = len(Envelope(keyring, EnvelopeOptions()).seal(data, short)) + len(short) + 100
    env = Envelope(keyring, EnvelopeOptions(request_limit_bytes=room + 64))
    env.seal_many(data, (short,))
    with pytest.raises(ValueTooLargeError) as info:
        env.seal_many(data, (short, long))
    assert info.value.path == long
