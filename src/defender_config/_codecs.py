"""Compression codecs and AEAD ciphers, each a small class registered under its header id.

A new codec is one class plus one `register_*` call; the envelope looks codecs up by the one-byte
ids it finds in the header and never names a concrete codec itself.

Ids are part of the stored format: never reuse or renumber one.

| id   | compression | cipher             |
|------|-------------|--------------------|
| 0x00 | none        | none (unencrypted) |
| 0x01 | zstd        | aes-256-gcm        |
| 0x02 |             | chacha20-poly1305  |
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import ClassVar, Protocol, TypeVar

import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._errors import SizeAnomalyError, UnknownCodecError

__all__ = [
    "AES256GCM",
    "CHACHA20_POLY1305",
    "NO_CIPHER",
    "NO_COMPRESSION",
    "ZSTD",
    "Aead",
    "Cipher",
    "Compressor",
    "cipher_by_id",
    "cipher_by_name",
    "cipher_names",
    "compression_names",
    "compressor_by_id",
    "compressor_by_name",
    "register_cipher",
    "register_compressor",
]


class Compressor(ABC):
    """A compression codec. Instances are shared between threads."""

    id: ClassVar[int]
    name: ClassVar[str]

    @abstractmethod
    def compress(self, data: bytes, level: int) -> bytes:
        """Compress `data`."""

    @abstractmethod
    def decompress(self, data: bytes, declared: int, path: str | None = None) -> bytes:
        """Decompress `data`, which must expand to exactly `declared` bytes.

        The caller has already checked `declared` against its cap, so implementations must never
        produce more than `declared` bytes (that is the bomb guard). Raise SizeAnomalyError on
        any mismatch or corrupt input.
        """


class NoCompression(Compressor):
    """Identity codec: values under the threshold, or compression switched off."""

    id = 0x00
    name = "none"

    def compress(self, data: bytes, level: int) -> bytes:
        return data

    def decompress(self, data: bytes, declared: int, path: str | None = None) -> bytes:
        if len(data) != declared:
            raise SizeAnomalyError(
                declared, len(data), "stored length differs from the header", path=path
            )
        return data


class ZstdCompressor(Compressor):
    """zstd via `zstandard`, with one (de)compression context per thread and level.

    zstd contexts are not thread-safe and cost ~100 µs to create, so they are made once per
    thread and reused; that is most of what keeps a 4 KiB seal near 10 µs.
    """

    id = 0x01
    name = "zstd"

    def __init__(self) -> None:
        self._local = threading.local()

    def _compressor(self, level: int) -> zstandard.ZstdCompressor:
        cache: dict[int, zstandard.ZstdCompressor] | None = getattr(self._local, "c", None)
        if cache is None:
            cache = self._local.c = {}
        ctx = cache.get(level)
        if ctx is None:
            # Content size in the frame lets the reader check it against the header before it
            # allocates anything; the AEAD tag already covers integrity, so no frame checksum.
            ctx = cache[level] = zstandard.ZstdCompressor(
                level=level, write_content_size=True, write_checksum=False
            )
        return ctx

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        ctx: zstandard.ZstdDecompressor | None = getattr(self._local, "d", None)
        if ctx is None:
            ctx = self._local.d = zstandard.ZstdDecompressor()
        return ctx

    def compress(self, data: bytes, level: int) -> bytes:
        out: bytes = self._compressor(level).compress(data)
        return out

    def decompress(self, data: bytes, declared: int, path: str | None = None) -> bytes:
        try:
            frame_size: int = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise SizeAnomalyError(declared, None, f"not a zstd frame ({exc})", path=path) from exc
        # A frame that states its size is decoded into exactly that much memory, whatever
        # max_output_size says, so the stated size must match the (capped) header first.
        if frame_size not in (-1, declared):
            raise SizeAnomalyError(
                declared, frame_size, "zstd frame size differs from the header", path=path
            )
        try:
            if frame_size == declared:
                # The size is in the frame, so max_output_size would change nothing; leaving
                # it out measured 2-5 µs less per get (one keyword less to parse, in situ).
                out: bytes = self._decompressor().decompress(data, allow_extra_data=False)
            else:
                out = self._decompressor().decompress(
                    data, max_output_size=declared, allow_extra_data=False
                )
        except zstandard.ZstdError as exc:
            raise SizeAnomalyError(
                declared, None, f"zstd data is corrupt or longer than declared ({exc})", path=path
            ) from exc
        if len(out) != declared:
            raise SizeAnomalyError(
                declared, len(out), "decompressed length differs from the header", path=path
            )
        return out


class Aead(Protocol):
    """What `cryptography`'s AEAD classes offer; the envelope needs nothing more."""

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...

    def decrypt(
        self, nonce: bytes | memoryview, data: bytes | memoryview, associated_data: bytes | None
    ) -> bytes: ...


class Cipher(ABC):
    """An AEAD cipher. `aead(material)` derives the cipher key with HKDF-SHA256 and caches it."""

    id: ClassVar[int]
    name: ClassVar[str]
    nonce_size: ClassVar[int] = 12
    tag_size: ClassVar[int] = 16

    def __init__(self) -> None:
        self._cache: dict[bytes, Aead] = {}
        self._lock = threading.Lock()

    def derive(self, material: bytes) -> bytes:
        """The cipher key for `material`: HKDF-SHA256, bound to this cipher's name.

        Binding the name means the same keyring key never feeds two ciphers the same bytes.
        """
        info = b"ml-defender/envelope/v1/" + self.name.encode("ascii")
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)

    @abstractmethod
    def _new(self, key: bytes) -> Aead: ...

    def aead(self, material: bytes) -> Aead:
        """A ready AEAD object for `material`, made once per key (HKDF + key schedule are the
        slow parts)."""
        aead = self._cache.get(material)
        if aead is None:
            with self._lock:
                aead = self._cache.get(material)
                if aead is None:
                    if len(self._cache) >= 64:
                        # Keyrings hold a handful of keys; a full cache means keys were rotated
                        # many times in one process, so drop the old ones.
                        self._cache.clear()
                    aead = self._cache[material] = self._new(self.derive(material))
        return aead


class NoCipher(Cipher):
    """Marker for unencrypted envelopes (id 0). Never used to encrypt."""

    id = 0x00
    name = "none"
    nonce_size = 0
    tag_size = 0

    def _new(self, key: bytes) -> Aead:
        raise TypeError("the 'none' cipher has no AEAD")


class AesGcmCipher(Cipher):
    """AES-256-GCM: hardware-accelerated on x86-64 and ARMv8 with crypto extensions; the default."""

    id = 0x01
    name = "aes-256-gcm"

    def _new(self, key: bytes) -> Aead:
        return AESGCM(key)


class ChaChaPolyCipher(Cipher):
    """ChaCha20-Poly1305: fast in software, for CPUs without AES instructions."""

    id = 0x02
    name = "chacha20-poly1305"

    def _new(self, key: bytes) -> Aead:
        return ChaCha20Poly1305(key)


_Codec = TypeVar("_Codec", Compressor, Cipher)

_COMPRESSORS: dict[int, Compressor] = {}
_COMPRESSORS_BY_NAME: dict[str, Compressor] = {}
_CIPHERS: dict[int, Cipher] = {}
_CIPHERS_BY_NAME: dict[str, Cipher] = {}


def register_compressor(codec: Compressor) -> Compressor:
    """Make `codec` known under its id and name. Ids are stored format: ids never change."""
    return _register(codec, _COMPRESSORS, _COMPRESSORS_BY_NAME, "compression codec")


def register_cipher(cipher: Cipher) -> Cipher:
    """Make `cipher` known under its id and name."""
    return _register(cipher, _CIPHERS, _CIPHERS_BY_NAME, "cipher")


def _register(
    codec: _Codec, by_id: dict[int, _Codec], by_name: dict[str, _Codec], what: str
) -> _Codec:
    # An envelope's header names its codecs by a one-byte id, and settings by name: neither
    # may come to mean another codec once values are stored with it.
    if not 0 <= codec.id <= 0xFF:
        raise ValueError(f"{what} id {codec.id} does not fit one byte")
    if codec.id in by_id or codec.name in by_name:
        raise ValueError(f"{what} id {codec.id} or name {codec.name!r} already taken")
    by_id[codec.id] = by_name[codec.name] = codec
    return codec


NO_COMPRESSION = register_compressor(NoCompression())
ZSTD = register_compressor(ZstdCompressor())
NO_CIPHER = register_cipher(NoCipher())
AES256GCM = register_cipher(AesGcmCipher())
CHACHA20_POLY1305 = register_cipher(ChaChaPolyCipher())


def compression_names() -> list[str]:
    """Registered compression codec names, sorted."""
    return sorted(_COMPRESSORS_BY_NAME)


def cipher_names() -> list[str]:
    """Registered cipher names, sorted."""
    return sorted(_CIPHERS_BY_NAME)


def compressor_by_id(codec_id: int, path: str | None = None) -> Compressor:
    """The compression codec for a header id, or UnknownCodecError."""
    codec = _COMPRESSORS.get(codec_id)
    if codec is None:
        raise UnknownCodecError(
            codec_id, kind="compression", known=sorted(_COMPRESSORS_BY_NAME), path=path
        )
    return codec


def compressor_by_name(name: str) -> Compressor:
    """The compression codec called `name`, or UnknownCodecError."""
    codec = _COMPRESSORS_BY_NAME.get(name)
    if codec is None:
        raise UnknownCodecError(name, kind="compression", known=sorted(_COMPRESSORS_BY_NAME))
    return codec


def cipher_by_id(cipher_id: int, path: str | None = None) -> Cipher:
    """The cipher for a header id, or UnknownCodecError."""
    cipher = _CIPHERS.get(cipher_id)
    if cipher is None:
        raise UnknownCodecError(cipher_id, kind="cipher", known=sorted(_CIPHERS_BY_NAME), path=path)
    return cipher


def cipher_by_name(name: str) -> Cipher:
    """The cipher called `name`, or UnknownCodecError."""
    cipher = _CIPHERS_BY_NAME.get(name)
    if cipher is None:
        raise UnknownCodecError(name, kind="cipher", known=sorted(_CIPHERS_BY_NAME))
    return cipher
