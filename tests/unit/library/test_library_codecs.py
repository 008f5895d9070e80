"""Codec registry: lookups, registration rules, and a new codec as one class."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator

import pytest

from defender_config import (
    Compressor,
    Envelope,
    EnvelopeOptions,
    Keyring,
    SizeAnomalyError,
    UnknownCodecError,
    _codecs,
    inspect,
    register_cipher,
    register_compressor,
)
from defender_config._codecs import (
    AES256GCM,
    CHACHA20_POLY1305,
    NO_CIPHER,
    ZSTD,
    AesGcmCipher,
    cipher_by_id,
    cipher_by_name,
    compressor_by_id,
    compressor_by_name,
)


class ZlibCompressor(Compressor):
    """A test codec: everything a new codec needs."""

    id = 0xF0
    name = "test-zlib"

    def compress(self, data: bytes, level: int) -> bytes:
        return zlib.compress(data, min(level, 9))

    def decompress(self, data: bytes, declared: int, path: str | None = None) -> bytes:
        d = zlib.decompressobj()
        out = d.decompress(data, declared)
        if len(out) != declared or d.unconsumed_tail or not d.eof:
            raise SizeAnomalyError(declared, len(out), "zlib length mismatch", path=path)
        return out


@pytest.fixture
def zlib_codec() -> Iterator[ZlibCompressor]:
    codec = ZlibCompressor()
    register_compressor(codec)
    try:
        yield codec
    finally:
        del _codecs._COMPRESSORS[codec.id]
        del _codecs._COMPRESSORS_BY_NAME[codec.name]


def test_a_new_codec_is_one_class(zlib_codec: ZlibCompressor) -> None:
    keyring = Keyring.generate()
    env = Envelope(keyring, EnvelopeOptions(compression="test-zlib"))
    data = b"firewall rule " * 200
    blob = env.seal(data, "/p")
    header = inspect(blob)
    assert header.compression == "test-zlib" and header.compression_id == 0xF0
    # Any reader opens it: the header names the codec.
    assert Envelope(keyring).open(blob, "/p") == data


def test_new_codec_unknown_to_an_older_reader(zlib_codec: ZlibCompressor) -> None:
    blob = Envelope(None, EnvelopeOptions(encrypt=False, compression="test-zlib")).seal(
        b"x" * 1000, "/p"
    )
    del _codecs._COMPRESSORS[zlib_codec.id]  # the reader's library lacks it
    try:
        with pytest.raises(UnknownCodecError, match="0xf0"):
            Envelope(None, EnvelopeOptions(encrypt=False)).open(blob, "/p")
    finally:
        _codecs._COMPRESSORS[zlib_codec.id] = zlib_codec


def test_registration_rules() -> None:
    with pytest.raises(ValueError, match="already taken"):
        register_compressor(_codecs.ZstdCompressor())
    with pytest.raises(ValueError, match="already taken"):
        register_cipher(AesGcmCipher())

    class Wide(ZlibCompressor):
        id = 0x100

    with pytest.raises(ValueError, match="does not fit one byte"):
        register_compressor(Wide())

    class WideCipher(AesGcmCipher):
        id = 0x1FF
        name = "wide"

    with pytest.raises(ValueError, match="does not fit one byte"):
        register_cipher(WideCipher())

    # A name is taken as well as an id: settings name codecs, headers number them.
    class ZstdAgain(_codecs.ZstdCompressor):
        id = 0xF7

    class AesAgain(AesGcmCipher):
        id = 0xF7

    with pytest.raises(ValueError, match="name 'zstd' already taken"):
        register_compressor(ZstdAgain())
    with pytest.raises(ValueError, match="name 'aes-256-gcm' already taken"):
        register_cipher(AesAgain())
    assert 0xF7 not in _codecs._COMPRESSORS and 0xF7 not in _codecs._CIPHERS


def test_lookups() -> None:
    assert compressor_by_id(1) is ZSTD and compressor_by_name("zstd") is ZSTD
    assert cipher_by_id(1) is AES256GCM and cipher_by_name("chacha20-poly1305") is CHACHA20_POLY1305
    with pytest.raises(UnknownCodecError, match="'lz4'"):
        compressor_by_name("lz4")
    with pytest.raises(UnknownCodecError, match="unknown cipher codec 'rot13'"):
        cipher_by_name("rot13")
    with pytest.raises(UnknownCodecError, match="0x42"):
        cipher_by_id(0x42, "/p")
    with pytest.raises(TypeError, match="no AEAD"):
        NO_CIPHER.aead(os.urandom(32))


def test_hkdf_separates_ciphers_and_never_uses_material_directly() -> None:
    material = os.urandom(32)
    aes_key = AES256GCM.derive(material)
    chacha_key = CHACHA20_POLY1305.derive(material)
    assert len(aes_key) == len(chacha_key) == 32
    assert len({material, aes_key, chacha_key}) == 3
    assert AES256GCM.derive(material) == aes_key  # deterministic


def test_aead_objects_are_cached_and_bounded() -> None:
    cipher = AesGcmCipher()
    material = os.urandom(32)
    assert cipher.aead(material) is cipher.aead(material)
    for _ in range(70):
        cipher.aead(os.urandom(32))
    assert len(cipher._cache) <= 64


def test_zstd_contexts_are_per_thread() -> None:
    import threading

    seen: list[object] = []

    def grab() -> None:
        seen.append(ZSTD._compressor(3))

    threads = [threading.Thread(target=grab) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(s) for s in seen}) == 3
    assert ZSTD._compressor(3) is ZSTD._compressor(3)
