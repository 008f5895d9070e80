"""Fuzz the envelope decoder with >= 1 M generated inputs: only typed errors (EnvelopeError
subclasses), and an authenticated reader never returns anything but the sealed plaintext.

Inputs (seeded, reproducible): random bytes; headers with valid magic and random fields
(version, flags, codec ids, declared length, key id length/bytes, registration bytes) followed
by random bodies; real sealed values (some carrying a registration) with 1-8 random byte edits
and optional truncation or extension; splices of two real values. Each input goes through
`inspect`, an authenticated reader (encryption on) and a lenient one (accepts unencrypted
values). Writes docs/bench/fuzz_envelope.json; exits 1 on any untyped exception or wrong
plaintext.

Run: .venv/bin/python bench/fuzz_envelope.py [--count N] [--seed S]
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

from bench_support import config_bytes, write_result
from defender_config import Envelope, EnvelopeError, EnvelopeOptions, Keyring, inspect

PATH = "/ml-defender/components/firewall/active_config"


def build_corpus(keyring: Keyring) -> list[tuple[bytes, bytes]]:
    """(sealed value, its plaintext) for several sizes and option sets."""
    sealed = Envelope(keyring)
    plain = Envelope(keyring, EnvelopeOptions(encrypt=False))
    chacha = Envelope(keyring, EnvelopeOptions(cipher="chacha20-poly1305"))
    corpus = []
    for size in (10, 200, 300, 4096, 40000):
        data = config_bytes(size, seed=size)
        for env in (sealed, plain, chacha):
            corpus.append((env.seal(data, PATH), data))
        # Encrypted values carrying a registration (flag bit 2, 8 header bytes after the key id).
        for env in (sealed, chacha):
            corpus.append((env.seal(data, PATH, registration=1_764_000_000_000 + size), data))
    return corpus


def generator(
    rng: random.Random, corpus: list[tuple[bytes, bytes]]
) -> Callable[[], tuple[str, bytes, bytes | None]]:
    rb = rng.randbytes

    def raw() -> tuple[str, bytes, bytes | None]:
        return "raw", rb(rng.choice((0, 1, 4, 12, 13, 40, 300))), None

    def header() -> tuple[str, bytes, bytes | None]:
        kid = rb(rng.choice((0, 1, 8, 22, 64, 70)))
        head = struct.pack(
            ">4sBBBBIB",
            b"\x89DFC",
            rng.choice((1, 1, 1, 0, 2, 255)),
            rng.randrange(256) if rng.random() < 0.3 else rng.choice((0, 1, 2, 3, 4, 5, 6, 7)),
            rng.choice((0, 1, 2, 255)),
            rng.choice((0, 1, 2, 3, 255)),
            rng.choice((0, 1, 16, 1 << 20, 16 << 20, (16 << 20) + 1, 0xFFFFFFFF)),
            rng.choice((len(kid), len(kid), 0, 64, 65, 255)),
        )
        registration = rb(rng.choice((0, 0, 3, 8)))  # read only when flag bit 2 is set
        return "header", head + kid + registration + rb(rng.choice((0, 11, 12, 28, 200))), None

    def edits() -> tuple[str, bytes, bytes | None]:
        blob, data = rng.choice(corpus)
        out = bytearray(blob)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        r = rng.random()
        if r < 0.3:
            out = out[: rng.randrange(len(out) + 1)]
        elif r < 0.4:
            out += rb(rng.randint(1, 32))
        return "edits", bytes(out), data

    def splice() -> tuple[str, bytes, bytes | None]:
        (a, _), (b, _) = rng.choice(corpus), rng.choice(corpus)
        return "splice", a[: rng.randrange(len(a) + 1)] + b[rng.randrange(len(b) + 1) :], None

    kinds = (raw, header, header, edits, edits, edits, splice)
    return lambda: rng.choice(kinds)()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=20261125)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    keyring = Keyring.generate()
    corpus = build_corpus(keyring)
    reader = Envelope(keyring)
    lenient = Envelope(keyring, EnvelopeOptions(encrypt=False))
    originals = {blob: data for blob, data in corpus}
    next_input = generator(rng, corpus)
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    started = time.perf_counter()
    for i in range(args.count):
        kind, blob, original = next_input()
        kinds[kind] += 1
        if original is None:
            original = originals.get(blob)
        for name, fn in (
            ("inspect", lambda b=blob: inspect(b)),
            ("authenticated", lambda b=blob: reader.open(b, PATH)),
            ("lenient", lambda b=blob: lenient.open(b, PATH)),
        ):
            try:
                out = fn()
            except EnvelopeError as exc:
                outcomes[f"{name}:{type(exc).__name__}"] += 1
                continue
            except Exception as exc:
                outcomes[f"{name}:UNTYPED:{type(exc).__name__}"] += 1
                if len(failures) < 20:
                    failures.append(
                        {
                            "input": i,
                            "reader": name,
                            "blob_hex": blob[:256].hex(),
                            "error": "".join(traceback.format_exception_only(exc)).strip(),
                        }
                    )
                continue
            outcomes[f"{name}:ok"] += 1
            if name == "authenticated" and original is not None and out != original:
                outcomes["authenticated:WRONG_PLAINTEXT"] += 1
                if len(failures) < 20:
                    failures.append({"input": i, "reader": name, "blob_hex": blob[:256].hex()})
        if i and i % 200_000 == 0:
            print(f"{i} inputs, {time.perf_counter() - started:.0f}s", flush=True)
    seconds = time.perf_counter() - started
    untyped = sum(v for k, v in outcomes.items() if "UNTYPED" in k or "WRONG" in k)
    write_result(
        "fuzz_envelope",
        {
            "description": __doc__,
            "inputs": args.count,
            "seed": args.seed,
            "seconds": seconds,
            "inputs_per_second": args.count / seconds,
            "input_kinds": dict(sorted(kinds.items())),
            "outcomes": dict(sorted(outcomes.items())),
            "untyped_or_wrong": untyped,
            "failures": failures,
            "target_met": untyped == 0 and args.count >= 1_000_000,
        },
    )
    print(f"{args.count} inputs in {seconds:.0f}s: {untyped} untyped errors or wrong plaintexts")
    return 1 if untyped else 0


if __name__ == "__main__":
    sys.exit(main())
