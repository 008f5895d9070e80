"""Micro-benchmark of the envelope alone (no etcd): µs per seal/open of a 4 KiB JSON config.

Run: .venv/bin/python bench/envelope_micro.py [--number N]
Prints the best of 5 runs for each option set; compare with ~1 ms per etcd round trip.
"""

from __future__ import annotations

import argparse
import json
import random
import timeit

from defender_config import Envelope, EnvelopeOptions, Keyring

PATH = "/ml-defender/components/ml-detector/active_config"


def sample_config(size: int = 4096) -> bytes:
    """A JSON firewall-like config cut to `size` bytes: varied enough to compress like real ones."""
    rng = random.Random(7)
    rules = [
        {
            "id": f"rule-{i}",
            "action": rng.choice(["allow", "deny"]),
            "proto": rng.choice(["tcp", "udp"]),
            "src_cidr": f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.0/24",
            "ports": [rng.randint(1, 65535)],
        }
        for i in range(80)
    ]
    return json.dumps({"node_id": "fw-01", "version": "1.0.0", "rules": rules}, indent=1).encode()[
        :size
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=20000, help="calls per timing run")
    args = parser.parse_args()
    data = sample_config()
    envelope = Envelope(Keyring.generate())
    cases = {
        "zstd+aes-256-gcm": EnvelopeOptions(),
        "zstd+chacha20-poly1305": EnvelopeOptions(cipher="chacha20-poly1305"),
        "none+aes-256-gcm": EnvelopeOptions(compress=False),
        "zstd+none": EnvelopeOptions(encrypt=False),
    }
    print(
        f"{'options':<24} {'seal µs':>8} {'open µs':>8} {'stored bytes':>13}  (data {len(data)} B)"
    )
    for name, opts in cases.items():
        blob = envelope.seal(data, PATH, opts)
        assert envelope.open(blob, PATH, opts) == data
        seal = min(
            timeit.repeat(lambda o=opts: envelope.seal(data, PATH, o), number=args.number, repeat=5)
        )
        opened = min(
            timeit.repeat(
                lambda o=opts, b=blob: envelope.open(b, PATH, o), number=args.number, repeat=5
            )
        )
        print(
            f"{name:<24} {seal / args.number * 1e6:8.2f} {opened / args.number * 1e6:8.2f} "
            f"{len(blob):13d}"
        )


if __name__ == "__main__":
    main()
