"""The forms a key could leak in, for tests that search logs, Events, status and etcd for it."""

from __future__ import annotations

import base64


def key_forms(material: bytes) -> dict[str, bytes]:
    """Every form a key could leak in, by name: raw, hex (both cases), base64 (standard and
    url-safe, padded or not)."""
    b64, url = base64.b64encode(material), base64.urlsafe_b64encode(material)
    return {
        "raw": material,
        "hex": material.hex().encode(),
        "HEX": material.hex().upper().encode(),
        "base64": b64,
        "base64-unpadded": b64.rstrip(b"="),
        "base64url": url,
        "base64url-unpadded": url.rstrip(b"="),
    }
