"""The self-describing envelope around every sealed value (format: docs/envelope.md).

Write: data → compress → encrypt. Read: decrypt → decompress. Encrypting first would leave
compression nothing to find, so the order is fixed.

```
offset  size  field
0       4     magic 0x89 'D' 'F' 'C'   (0x89 never starts UTF-8 text, JSON or YAML)
4       1     format version (1)
5       1     flags: bit 0 compressed, bit 1 encrypted, bit 2 registration, others reserved (0)
6       1     compression codec id (0 none, 1 zstd)
7       1     cipher id (0 none, 1 aes-256-gcm, 2 chacha20-poly1305)
8       4     uncompressed length, big endian
12      1     key id length n (0 when unencrypted, ≤ 64)
13      n     key id, ASCII
13+n    8     registration, big endian (bit 2 only, which needs bit 1)
13+n+r  12    nonce                  (encrypted only; r = 8 with bit 2, else 0)
...           AEAD ciphertext + 16-byte tag, or the (compressed) payload when unencrypted
```

Associated data = header bytes [0, 13+n+r) followed by the UTF-8 etcd key path, so a changed
header byte, registration included, or a value copied to another key fails authentication.
The registration names the component registration a config value belongs to (its signed
metadata names the same one): a value of an earlier registration of the same name, put back,
opens but carries another number, and `ConfigStore` refuses it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag

from ._codecs import (
    NO_CIPHER,
    NO_COMPRESSION,
    Aead,
    Cipher,
    Compressor,
    cipher_by_id,
    cipher_by_name,
    compressor_by_id,
    compressor_by_name,
)
from ._errors import (
    AuthenticationFailedError,
    CodecMismatchError,
    KeyringError,
    NotAnEnvelopeError,
    SizeAnomalyError,
    UnexpectedEnvelopeError,
    UnknownCodecError,
    UnknownKeyError,
    UnsupportedFormatError,
    ValueTooLargeError,
)
from ._keyring import Key, Keyring
from ._settings import EnvelopeOptions

__all__ = [
    "FLAG_COMPRESSED",
    "FLAG_ENCRYPTED",
    "FLAG_REGISTRATION",
    "FORMAT_VERSION",
    "MAGIC",
    "Envelope",
    "EnvelopeHeader",
    "KeyringProvider",
    "expect_plaintext",
    "inspect",
    "is_encrypted",
    "is_envelope",
    "registration_of",
]

MAGIC = b"\x89DFC"
FORMAT_VERSION = 1
FLAG_COMPRESSED = 0x01
FLAG_ENCRYPTED = 0x02
FLAG_REGISTRATION = 0x04
_KNOWN_FLAGS = FLAG_COMPRESSED | FLAG_ENCRYPTED | FLAG_REGISTRATION
_REGISTRATION = struct.Struct(">Q")
REGISTRATION_BYTES = _REGISTRATION.size  # 8
_FIXED = struct.Struct(">4sBBBBIB")
FIXED_HEADER_BYTES = _FIXED.size  # 13
MAX_KEY_ID_BYTES = 64
MAX_DECLARED_BYTES = 0xFFFFFFFF
#: Bytes a PutRequest adds around key and value (field tags, lengths, lease id), rounded up.
_REQUEST_OVERHEAD = 64
_NO_KEYRING = (
    "encryption is on (envelope.encrypt) but no keyring was given; set keyring_path "
    "(DEFENDER_KEYRING_PATH) to the mounted keyring Secret, or switch encryption off"
)


class KeyringProvider(Protocol):
    """Anything with `current() -> Keyring`: KeyringSource, StaticKeyringSource."""

    def current(self) -> Keyring: ...


class _Fixed:
    """Adapts a bare Keyring to the provider protocol."""

    __slots__ = ("_keyring",)

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring

    def current(self) -> Keyring:
        return self._keyring


@dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    """What `inspect` sees in a header. Holds no secret: safe to log and print."""

    version: int
    flags: int
    compressed: bool
    encrypted: bool
    compression_id: int
    compression: str
    cipher_id: int
    cipher: str
    key_id: str | None
    declared_length: int
    header_length: int
    stored_length: int
    registration: int | None = None
    """The component registration the value was sealed for (None: sealed before values
    carried one, or unencrypted, where nothing would authenticate it)."""

    @property
    def codec(self) -> str:
        """`compression+cipher`, e.g. `zstd+aes-256-gcm`, as heartbeats report it."""
        return f"{self.compression}+{self.cipher}"


def is_envelope(blob: bytes) -> bool:
    """True when `blob` starts with the envelope magic."""
    return blob[:4] == MAGIC


def is_encrypted(blob: bytes) -> bool:
    """True when `blob` is an envelope whose flags say encrypted (read without a key: its
    header, registration included, is authenticated once the value opens)."""
    return len(blob) > 5 and blob[:4] == MAGIC and bool(blob[5] & FLAG_ENCRYPTED)


def expect_plaintext(blob: bytes, path: str | None = None) -> bytes:
    """Return `blob` unchanged; UnexpectedEnvelopeError if it is a sealed envelope.

    For keys that must stay plaintext (metadata, status, heartbeats).
    """
    if blob[:4] == MAGIC:
        raise UnexpectedEnvelopeError(path=path)
    return blob


def _describe_plaintext(blob: bytes) -> str:
    if not blob:
        return "the value is empty"
    head = blob.lstrip()[:1]
    if head in (b"{", b"["):
        return "it looks like JSON text"
    if blob[:1] == MAGIC[:1]:
        return "it starts like an envelope but the magic is damaged"
    return "it does not start with the envelope magic 89 44 46 43"


def _codec_name(codec_id: int, kind: str) -> str:
    try:
        return (compressor_by_id if kind == "compression" else cipher_by_id)(codec_id).name
    except UnknownCodecError:
        return f"unknown(0x{codec_id:02x})"


def _parse(
    blob: bytes, path: str | None
) -> tuple[int, int, int, int, int, int, str | None, int | None]:
    """(flags, compression id, cipher id, declared, header length, key id length, key id,
    registration)."""
    if len(blob) < FIXED_HEADER_BYTES:
        raise SizeAnomalyError(
            FIXED_HEADER_BYTES, len(blob), "envelope shorter than its fixed header", path=path
        )
    _, version, flags, comp_id, cipher_id, declared, kid_len = _FIXED.unpack_from(blob)
    if version != FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"format version {version}, this library reads {FORMAT_VERSION}", path=path
        )
    if flags & ~_KNOWN_FLAGS:
        raise UnsupportedFormatError(f"unknown flag bits 0x{flags & ~_KNOWN_FLAGS:02x}", path=path)
    if kid_len > MAX_KEY_ID_BYTES:
        raise SizeAnomalyError(
            MAX_KEY_ID_BYTES, kid_len, "key id length over the maximum; corrupt header", path=path
        )
    header_len = FIXED_HEADER_BYTES + kid_len
    if len(blob) < header_len:
        raise SizeAnomalyError(header_len, len(blob), "envelope truncated in its key id", path=path)
    key_id: str | None = None
    if kid_len:
        try:
            key_id = blob[FIXED_HEADER_BYTES:header_len].decode("ascii")
        except UnicodeDecodeError:
            raise NotAnEnvelopeError(path=path, detail="its key id is not ASCII") from None
    registration: int | None = None
    if flags & FLAG_REGISTRATION:
        if not flags & FLAG_ENCRYPTED:
            raise UnsupportedFormatError(
                "a registration on an unencrypted value (nothing would authenticate it)",
                path=path,
            )
        if len(blob) < header_len + REGISTRATION_BYTES:
            raise SizeAnomalyError(
                header_len + REGISTRATION_BYTES,
                len(blob),
                "envelope truncated in its registration",
                path=path,
            )
        (registration,) = _REGISTRATION.unpack_from(blob, header_len)
        header_len += REGISTRATION_BYTES
    return flags, comp_id, cipher_id, declared, header_len, kid_len, key_id, registration


@dataclass(frozen=True, slots=True, eq=False)
class _Checked:
    """A header that passed every check `open` makes without a key or options: its codecs are
    known and agree with the flags. Depends only on the header bytes (codec ids are never
    reused), so it is cached by them."""

    comp: Compressor
    cipher: Cipher
    compressed: bool
    encrypted: bool
    declared: int
    header_len: int
    body_start: int
    """Where the ciphertext starts: after the header and the nonce."""
    key_id: str | None
    aead_ref: str
    """`cipher id:key id`, the key of Envelope's AEAD cache (a str caches its hash)."""


# Readers see a few headers again and again (one per key id, codecs and value size). Cached by
# their bytes, parsing and checking one costs a slice and a dict lookup (~5-15 µs less per get
# right after an RPC, when caches are cold). Only headers that passed are kept, and a full cache
# is dropped, so a flood of distinct headers costs no more than parsing them.
_CHECKED: dict[bytes, _Checked] = {}
_CHECKED_MAX = 1024


def _check_header(blob: bytes, path: str) -> _Checked:
    flags, comp_id, cipher_id, declared, header_len, kid_len, key_id, _ = _parse(blob, path)
    comp = compressor_by_id(comp_id, path)
    cipher: Cipher = cipher_by_id(cipher_id, path)
    compressed = bool(flags & FLAG_COMPRESSED)
    encrypted = bool(flags & FLAG_ENCRYPTED)
    if compressed != (comp is not NO_COMPRESSION):
        raise CodecMismatchError(
            "a compression codec" if compressed else "compression 'none'",
            comp.name,
            path=path,
            detail=f"the compressed flag is {'set' if compressed else 'clear'}",
        )
    if encrypted != (cipher is not NO_CIPHER) or encrypted != bool(kid_len):
        raise CodecMismatchError(
            "a cipher and key id" if encrypted else "cipher 'none' and no key id",
            f"cipher {cipher.name}, key id length {kid_len}",
            path=path,
            detail=f"the encrypted flag is {'set' if encrypted else 'clear'}",
        )
    return _Checked(
        comp=comp,
        cipher=cipher,
        compressed=compressed,
        encrypted=encrypted,
        declared=declared,
        header_len=header_len,
        body_start=header_len + cipher.nonce_size,
        key_id=key_id,
        aead_ref=f"{cipher.id}:{key_id}",
    )


def _checked_header(blob: bytes, path: str) -> tuple[bytes, _Checked]:
    """(header bytes, what they say) of an envelope; raises like `open` for a bad header."""
    # A truncated blob gives a slice shorter than 13 + its key id length, which no valid
    # (cached) header has, so it misses the cache and fails in _parse.
    # The registration (flag bit 2) is part of the header, so of the cache key.
    header = (
        bytes(
            blob[
                : FIXED_HEADER_BYTES
                + blob[12]
                + (REGISTRATION_BYTES if blob[5] & FLAG_REGISTRATION else 0)
            ]
        )
        if len(blob) > 12
        else b""
    )
    checked = _CHECKED.get(header)
    if checked is None:
        checked = _check_header(blob, path)
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED[header] = checked
    return header, checked


def inspect(blob: bytes) -> EnvelopeHeader:
    """Read the header of a sealed value without any key.

    NotAnEnvelopeError for plaintext, SizeAnomalyError when too short, UnsupportedFormatError for
    a newer format. Unknown codec ids are shown as `unknown(0x..)` rather than raised.
    """
    if blob[:4] != MAGIC:
        raise NotAnEnvelopeError(detail=_describe_plaintext(blob))
    flags, comp_id, cipher_id, declared, header_len, _, key_id, registration = _parse(blob, None)
    return EnvelopeHeader(
        version=FORMAT_VERSION,
        flags=flags,
        compressed=bool(flags & FLAG_COMPRESSED),
        encrypted=bool(flags & FLAG_ENCRYPTED),
        compression_id=comp_id,
        compression=_codec_name(comp_id, "compression"),
        cipher_id=cipher_id,
        cipher=_codec_name(cipher_id, "cipher"),
        key_id=key_id,
        declared_length=declared,
        header_length=header_len,
        stored_length=len(blob) - header_len,
        registration=registration,
    )


def registration_of(blob: bytes) -> int | None:
    """The registration in an encrypted envelope's header (None: none, or not an encrypted
    envelope). Read without a key: trust it only after the value opened (the AEAD covers it)."""
    if len(blob) <= 12 or blob[:4] != MAGIC:
        return None
    if blob[5] & (FLAG_REGISTRATION | FLAG_ENCRYPTED) != FLAG_REGISTRATION | FLAG_ENCRYPTED:
        return None  # none, or on an unencrypted value, which every reader refuses
    at = FIXED_HEADER_BYTES + blob[12]
    if len(blob) < at + REGISTRATION_BYTES:
        return None
    return int(_REGISTRATION.unpack_from(blob, at)[0])


# Values this large are probed before a full compression attempt: three samples (head, middle,
# tail) that all fail to shrink by _PROBE_GAIN mean random or already-compressed data, and the
# attempt would only burn CPU and memory bandwidth before being thrown away. Base64 of random
# bytes still shrinks ~25 % and passes; a value whose samples all miss its compressible parts is
# stored uncompressed, as correct as before and only larger.
_PROBE_MIN_BYTES = 32 * 1024
_PROBE_SAMPLE_BYTES = 4096
_PROBE_GAIN = 0.95


def _worth_trying(codec: Compressor, data: bytes) -> bool:
    size = len(data)
    if size < _PROBE_MIN_BYTES:
        return True
    view = memoryview(data)
    for start in (0, (size - _PROBE_SAMPLE_BYTES) // 2, size - _PROBE_SAMPLE_BYTES):
        sample = bytes(view[start : start + _PROBE_SAMPLE_BYTES])
        if len(codec.compress(sample, 1)) < _PROBE_GAIN * _PROBE_SAMPLE_BYTES:
            return True
    return False


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class _Sealer:
    """What `seal` works out from one keyring and one (frozen) options object: the size caps,
    the compressor, and the primary key's id, cipher and ready AEAD. Made once per pair and
    reused while `seal` sees the same two objects again: a rotation or reload is a new Keyring
    and per-call options are another object, so either makes a new one."""

    keyring: Keyring | None
    options: EnvelopeOptions
    max_size: int
    """min(options.max_decompressed_bytes, MAX_DECLARED_BYTES): larger values are refused."""
    codec: Compressor | None
    """The compressor to try, None when compression is off."""
    cipher: Cipher
    """NO_CIPHER when encryption is off."""
    key_id: bytes
    aead: Aead | None
    """The primary key's AEAD (None when encryption is off)."""
    request_room: int
    """request_limit_bytes minus the PutRequest's own overhead: key + value must fit in it."""


class Envelope:
    """Seals and opens values with a keyring and store-wide options (overridable per call).

    Thread-safe: it keeps no per-call state; codecs keep per-thread contexts, ciphers cache one
    AEAD object per key, and `open` keeps a table of the current keyring's AEADs by key id
    (replaced whole when the provider hands out another keyring).
    """

    __slots__ = ("_aeads", "_options", "_provider", "_sealer")

    def __init__(
        self,
        keyring: Keyring | KeyringProvider | None = None,
        options: EnvelopeOptions | None = None,
    ) -> None:
        self._provider: KeyringProvider | None = (
            _Fixed(keyring) if isinstance(keyring, Keyring) else keyring
        )
        self._options = options if options is not None else EnvelopeOptions()
        # (keyring, {aead_ref: (key, AEAD)}) for the keyring `open` saw last. A keyring never
        # changes, and a reload or rotation is a new Keyring object, which starts an empty
        # table: a key removed or retired since is looked up again (and refused) by
        # `decryption_key`, never served from here.
        self._aeads: tuple[Keyring | None, dict[str, tuple[Key, Aead]]] = (None, {})
        # What `seal` used last (see _Sealer); replaced whole, so threads never see it half made.
        self._sealer: _Sealer | None = None
        if self._options.encrypt and self._provider is None:
            raise KeyringError(_NO_KEYRING)
        # Fail at construction, not at the first write, on a codec name this library lacks.
        compressor_by_name(self._options.compression)
        cipher_by_name(self._options.cipher)

    @property
    def options(self) -> EnvelopeOptions:
        return self._options

    def keyring(self) -> Keyring | None:
        """The current keyring (None when this envelope has none)."""
        return self._provider.current() if self._provider is not None else None

    def codec_label(self, options: EnvelopeOptions | None = None) -> str:
        """What `seal` writes with these options, e.g. `zstd+aes-256-gcm` (for heartbeats)."""
        opts = options or self._options
        return (
            f"{opts.compression if opts.compress else 'none'}+"
            f"{opts.cipher if opts.encrypt else 'none'}"
        )

    # --- write ---------------------------------------------------------------------------------

    def seal(
        self,
        data: bytes,
        path: str,
        options: EnvelopeOptions | None = None,
        *,
        registration: int | None = None,
    ) -> bytes:
        """data → compress → encrypt, bound to `path` (and to `registration`, when encrypted:
        written into the header, which the AEAD covers). Returns the bytes to store.

        With compression and encryption both off the value is stored as plaintext (readable with
        etcdctl), unless it happens to start with the magic, which gets an empty envelope so
        readers stay unambiguous.
        """
        return self.seal_many(data, (path,), options, registration=registration)[0]

    def seal_many(
        self,
        data: bytes,
        paths: Sequence[str],
        options: EnvelopeOptions | None = None,
        *,
        registration: int | None = None,
    ) -> list[bytes]:
        """`seal` of one value for each of `paths` (a seed writes MASTER, ACTIVE and history
        alike): compressed once, then encrypted once per path, each with a nonce of its own
        and bound to its own path."""
        opts = options or self._options
        s = self._sealer_for(opts)
        size = len(data)
        if size > s.max_size:
            raise ValueTooLargeError(
                size,
                s.max_size,
                path=paths[0] if paths else None,
                what="readers' decompressed-size cap (envelope.max_decompressed_bytes)",
            )
        codec = s.codec
        aead = s.aead
        if codec is None and aead is None and data[:4] != MAGIC:
            for path in paths:
                self._check_request(len(data), len(path.encode("utf-8")), s, path)
            return [bytes(data) for _ in paths]

        flags = 0
        comp: Compressor = NO_COMPRESSION
        payload = data
        if codec is not None and size >= opts.threshold_bytes:
            packed = codec.compress(data, opts.level) if _worth_trying(codec, data) else data
            # Incompressible data (already compressed, random) is kept as is: smaller and
            # faster to read.
            if len(packed) < size:
                flags, comp, payload = FLAG_COMPRESSED, codec, packed
                if size > opts.ratio_floor_bytes and size > opts.max_ratio * len(packed):
                    # Readers with the same options would refuse it as a bomb: fail the write
                    # now rather than store a value nobody can read.
                    raise SizeAnomalyError(
                        size,
                        len(packed),
                        f"value compresses more than max_ratio {opts.max_ratio:g}, so readers "
                        "would refuse it; raise envelope.max_ratio on writers and readers",
                        path=paths[0] if paths else None,
                    )
            # Drop the unused attempt now, not at return: freed before the next large buffers
            # are allocated, its memory is reused instead of fresh pages (for 1 MiB, one less
            # megabyte of page faults per write).
            del packed

        blobs: list[bytes] = []
        if aead is not None:
            kid = s.key_id
            flags |= FLAG_ENCRYPTED
            if registration is not None:
                flags |= FLAG_REGISTRATION
            header = _FIXED.pack(MAGIC, FORMAT_VERSION, flags, comp.id, s.cipher.id, size, len(kid))
            header += kid
            if registration is not None:
                header += _REGISTRATION.pack(registration)
            last = len(paths) - 1
            for i, path in enumerate(paths):
                path_b = path.encode("utf-8")
                # A random 96-bit nonce per value: configs are written a few times a day, far
                # from the ~2^32 messages per key where random GCM nonces start to risk a
                # collision.
                nonce = os.urandom(s.cipher.nonce_size)
                sealed = aead.encrypt(nonce, payload, header + path_b)
                if i == last:
                    del payload  # the compressed copy: free before the join allocates the blob
                blob = b"".join((header, nonce, sealed))
                del sealed  # free before the next path's ciphertext is allocated
                self._check_request(len(blob), len(path_b), s, path)
                blobs.append(blob)
        else:
            header = _FIXED.pack(MAGIC, FORMAT_VERSION, flags, comp.id, NO_CIPHER.id, size, 0)
            blob = header + payload
            for path in paths:
                self._check_request(len(blob), len(path.encode("utf-8")), s, path)
                blobs.append(blob)
        return blobs

    def _sealer_for(self, opts: EnvelopeOptions) -> _Sealer:
        """The _Sealer for `opts` and the provider's current keyring (made when either changed)."""
        provider = self._provider
        keyring = provider.current() if provider is not None else None
        sealer = self._sealer
        if sealer is not None and sealer.options is opts and sealer.keyring is keyring:
            return sealer
        aead: Aead | None = None
        cipher: Cipher = NO_CIPHER
        key_id = b""
        if opts.encrypt:
            if keyring is None:
                raise KeyringError(_NO_KEYRING)
            key = keyring.primary
            cipher = cipher_by_name(opts.cipher)
            key_id = key.key_id.encode("ascii")
            aead = cipher.aead(key.material)
        sealer = _Sealer(
            keyring=keyring,
            options=opts,
            max_size=min(opts.max_decompressed_bytes, MAX_DECLARED_BYTES),
            codec=compressor_by_name(opts.compression) if opts.compress else None,
            cipher=cipher,
            key_id=key_id,
            aead=aead,
            request_room=opts.request_limit_bytes - _REQUEST_OVERHEAD,
        )
        self._sealer = sealer
        return sealer

    @staticmethod
    def _check_request(value_len: int, path_len: int, s: _Sealer, path: str) -> None:
        if value_len + path_len > s.request_room:
            raise ValueTooLargeError(
                value_len + path_len + _REQUEST_OVERHEAD,
                s.options.request_limit_bytes,
                path=path,
                what="etcd request limit",
            )

    # --- read ----------------------------------------------------------------------------------

    def open(self, blob: bytes, path: str, options: EnvelopeOptions | None = None) -> bytes:
        """fetch → decrypt → decompress. Returns the original data or raises an EnvelopeError."""
        opts = options or self._options
        if blob[:4] != MAGIC:
            if opts.encrypt or opts.compress:
                raise NotAnEnvelopeError(path=path, detail=_describe_plaintext(blob))
            return bytes(blob)
        header, h = _checked_header(blob, path)
        if opts.encrypt and not h.encrypted:
            raise CodecMismatchError(
                f"an encrypted value ({opts.cipher})",
                "an unencrypted value",
                path=path,
                detail="readers with encryption on refuse unencrypted values, which anyone with "
                "etcd write access could forge",
            )
        declared = h.declared
        if declared > opts.max_decompressed_bytes:
            raise SizeAnomalyError(
                declared,
                None,
                f"declared size over the cap of {opts.max_decompressed_bytes} bytes "
                "(envelope.max_decompressed_bytes)",
                path=path,
            )

        if h.encrypted:
            key_id = h.key_id
            assert key_id is not None  # checked with the header
            body_start = h.body_start
            if len(blob) < body_start + h.cipher.tag_size:
                raise SizeAnomalyError(
                    body_start + h.cipher.tag_size,
                    len(blob),
                    "envelope truncated before the end of nonce and tag",
                    path=path,
                )
            provider = self._provider
            if provider is None:
                raise UnknownKeyError(key_id, (), path=path)
            keyring = provider.current()
            held, aeads = self._aeads
            if held is not keyring:
                aeads = {}
                self._aeads = (keyring, aeads)
            entry = aeads.get(h.aead_ref)
            if entry is None:
                key = keyring.decryption_key(key_id, path)
                entry = aeads[h.aead_ref] = (key, h.cipher.aead(key.material))
            key, aead = entry
            # Nonce and ciphertext as views of the blob: slicing a 1 MiB value copied it first,
            # which cost more than decrypting it (1.5 ms vs 0.13 ms, fresh pages each time).
            view = memoryview(blob)
            try:
                payload = aead.decrypt(
                    view[h.header_len : body_start], view[body_start:], header + path.encode()
                )
            except InvalidTag:
                raise AuthenticationFailedError(path, key_id, fingerprint=key.fingerprint) from None
        else:
            payload = blob[h.header_len :]

        if h.compressed:
            stored = len(payload)
            if declared > opts.ratio_floor_bytes and declared > opts.max_ratio * stored:
                raise SizeAnomalyError(
                    declared,
                    stored,
                    f"compression ratio over the cap of {opts.max_ratio:g} (envelope.max_ratio)",
                    path=path,
                )
        return h.comp.decompress(payload, declared, path)

    # --- maintenance ---------------------------------------------------------------------------

    def needs_reseal(self, blob: bytes, options: EnvelopeOptions | None = None) -> bool:
        """True when `blob` is not sealed as `seal` would seal it now: another key than the
        primary, other codecs, or plaintext while compression or encryption is on. Raises like
        `inspect` for a damaged header."""
        opts = options or self._options
        if blob[:4] != MAGIC:
            return opts.encrypt or opts.compress
        header = inspect(blob)
        if opts.encrypt:
            keyring = self.keyring()
            if keyring is None or header.key_id != keyring.primary.key_id:
                return True
            if header.cipher != opts.cipher:
                return True
        elif header.encrypted:
            return True
        return header.compressed and (not opts.compress or header.compression != opts.compression)

    def __repr__(self) -> str:
        return f"Envelope(codec={self.codec_label()!r}, provider={self._provider!r})"
