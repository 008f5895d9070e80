"""Envelope seal/open in µs (no etcd), next to its baseline: the bare primitives doing the same
work (zstd level 3 compress + AES-256-GCM encrypt with the path as associated data, and back)
without the envelope's header, checks, key lookup and caps.

bench/envelope_micro.py is the quick interactive version for one 4 KiB config; this one covers
1 KiB to 1 MiB and writes JSON for the report.
"""

from __future__ import annotations

import os
import timeit
from typing import Any

import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench_support import config_bytes, summary, write_result
from defender_config import Envelope, Keyring

PATH = "/ml-defender/components/firewall/active_config"
SIZES = [1 << 10, 4 << 10, 64 << 10, 1 << 20]


def per_call_us(fn: Any, number: int, repeat: int = 5) -> dict[str, float]:
    runs = timeit.repeat(fn, number=number, repeat=repeat)
    return summary([r / number * 1e6 for r in runs])


def run(quick: bool = False) -> dict[str, Any]:
    keyring = Keyring.generate()
    envelope = Envelope(keyring)
    material = keyring.primary.material
    aead = AESGCM(material)
    aad = PATH.encode()
    cctx = zstandard.ZstdCompressor(level=3)
    dctx = zstandard.ZstdDecompressor()
    results = []
    for size in SIZES:
        data = config_bytes(size)
        number = max(3, (200 if quick else 2000) * 1024 // size)
        blob = envelope.seal(data, PATH)
        assert envelope.open(blob, PATH) == data

        def prim_seal(d: bytes = data) -> bytes:
            nonce = os.urandom(12)  # a fresh nonce per value, as the envelope does
            return nonce + aead.encrypt(nonce, cctx.compress(d), aad)

        sealed = prim_seal()

        def prim_open(s: bytes = sealed) -> bytes:
            return dctx.decompress(aead.decrypt(s[:12], s[12:], aad), max_output_size=1 << 24)

        assert prim_open() == data
        row = {
            "size": size,
            "stored_bytes": len(blob),
            "calls_per_run": number,
            "seal_us": per_call_us(lambda d=data: envelope.seal(d, PATH), number),
            "open_us": per_call_us(lambda b=blob: envelope.open(b, PATH), number),
            "baseline_seal_us": per_call_us(prim_seal, number),
            "baseline_open_us": per_call_us(prim_open, number),
        }
        row["overhead_seal_us"] = row["seal_us"]["min"] - row["baseline_seal_us"]["min"]
        row["overhead_open_us"] = row["open_us"]["min"] - row["baseline_open_us"]["min"]
        results.append(row)
        print(
            f"{size:>8d} B  seal {row['seal_us']['min']:9.1f} µs (primitives "
            f"{row['baseline_seal_us']['min']:9.1f})  open {row['open_us']['min']:9.1f} µs "
            f"(primitives {row['baseline_open_us']['min']:9.1f})  stored {len(blob)} B"
        )
    return {
        "description": __doc__,
        "unit": "microseconds per call; min and percentiles over 5 runs",
        "codec": "zstd level 3 + aes-256-gcm",
        "results": results,
    }


if __name__ == "__main__":
    import sys

    write_result("envelope", run(quick="--quick" in sys.argv))
