"""Library get/set of a 4 KiB config through the envelope versus raw pyetcd, same cluster, same run.

    .venv/bin/python bench/bench_library.py [--endpoints URL,URL,URL] [--rounds N] [--ops N]

Without --endpoints it starts a throwaway 3-member etcd on 127.0.0.1 (the harness's
EtcdCluster) and stops it afterwards. Raw and library calls alternate op by op (random order
per pair) so drift of a shared machine hits both sides alike; each side's latency is the median
over all its ops. Both clients talk to the same member.
Prints the ratio library/raw per operation (target <= 1.05) and writes docs/bench/library.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyetcd
from prometheus_client import CollectorRegistry

from defender_config import (
    DefenderClient,
    EtcdSettings,
    Keyring,
    LibrarySettings,
)
from defender_config import (
    __name__ as lib_name,
)
from defender_devcluster import EtcdCluster

TARGET_RATIO = 1.05
OUT = Path(__file__).resolve().parent.parent / "docs" / "bench" / "library.json"


def config_4k() -> bytes:
    """A realistic firewall config of ~4 KiB (compressible JSON, like the real ones)."""
    rules = [
        {
            "id": f"r{i:03d}",
            "action": "deny" if i % 3 else "allow",
            "proto": "tcp",
            "src_cidr": f"10.{i}.0.0/16",
            "ports": [443, 8443],
        }
        for i in range(40)
    ]
    doc = {"node_id": "fw-01", "version": "1.0.0", "default_policy": "deny", "rules": rules}
    data = json.dumps(doc).encode()
    return data[:4096] if len(data) > 4096 else data + b" " * (4096 - len(data))


def run(endpoints: list[str], rounds: int, ops: int) -> dict[str, Any]:
    payload = config_4k()
    prefix = f"/bench-{int(time.time())}"
    settings = LibrarySettings(
        etcd=EtcdSettings(endpoints=endpoints), prefix=prefix, keyring_path=None
    )
    client = DefenderClient(
        settings, Keyring.generate(), registry=CollectorRegistry(), alert_sinks=[]
    )
    raw = pyetcd.MultiEndpointEtcd3Client(
        endpoints=[
            pyetcd.Endpoint(
                e.split("://")[-1].rsplit(":", 1)[0], int(e.rsplit(":", 1)[1]), secure=False
            )
            for e in endpoints
        ],
        timeout=5,
        failover=True,
    )
    # Both clients must talk to the same member: a follower serves a linearizable read with
    # one more round trip (ReadIndex to the leader) than the leader does, which would swamp
    # the envelope's cost. pyetcd picks a random endpoint, so pin the raw one to ours.
    raw._current_endpoint_label = client.store._client._current_endpoint_label
    lib_keys = [f"{prefix}/lib/{i}" for i in range(ops)]
    raw_keys = [f"{prefix}/raw/{i}" for i in range(ops)]
    samples: dict[str, list[float]] = {"raw_set": [], "raw_get": [], "lib_set": [], "lib_get": []}

    def raw_get(i: int) -> None:
        value, _meta = raw.get(raw_keys[i])
        assert value == payload

    def lib_get(i: int) -> None:
        got = client.get_sealed(lib_keys[i])
        assert got is not None and got.data == payload

    # Warm up both paths (channels, codec contexts, AEAD objects).
    for i in range(min(50, ops)):
        raw.put(raw_keys[i], payload)
        client.put_sealed(lib_keys[i], payload)
        raw_get(i)
        lib_get(i)
    # Interleave op by op, in random order per pair: machine drift and any order effect (a
    # warm cache for whoever runs second) hit both sides alike.
    order = random.Random(42)
    sides = {
        "set": {
            "raw": lambda i: raw.put(raw_keys[i], payload),
            "lib": lambda i: client.put_sealed(lib_keys[i], payload),
        },
        "get": {"raw": raw_get, "lib": lib_get},
    }
    for _ in range(rounds):
        for op in ("set", "get"):
            for i in range(ops):
                pair = ["raw", "lib"]
                order.shuffle(pair)
                for side in pair:
                    t0 = time.perf_counter()
                    sides[op][side](i)
                    samples[f"{side}_{op}"].append(time.perf_counter() - t0)
    member = client.store._client._current_endpoint_label
    assert member == raw._current_endpoint_label, "the clients drifted to different members"
    stored = client.store.get(lib_keys[0])
    stored_size = len(stored.value) if stored else 0
    client.store.delete_prefix(prefix + "/")
    client.close()
    raw.close()

    def summary(xs: list[float]) -> dict[str, float]:
        qs = statistics.quantiles(xs, n=100)
        return {
            "n": len(xs),
            "p50_ms": round(statistics.median(xs) * 1e3, 4),
            "p90_ms": round(qs[89] * 1e3, 4),
            "p99_ms": round(qs[98] * 1e3, 4),
            "ops_per_s": round(len(xs) / sum(xs), 1),
        }

    result = {name: summary(xs) for name, xs in samples.items()}
    ratios = {
        op: round(result[f"lib_{op}"]["p50_ms"] / result[f"raw_{op}"]["p50_ms"], 4)
        for op in ("set", "get")
    }
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "what": "4 KiB config: library (zstd + AES-256-GCM envelope, EtcdStore) vs raw pyetcd",
        "library": lib_name,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "endpoints": len(endpoints),
        "member_used": member,
        "payload_bytes": len(payload),
        "stored_bytes": stored_size,
        "rounds": rounds,
        "ops_per_round": ops,
        "results": result,
        "ratio_p50": ratios,
        "target_ratio": TARGET_RATIO,
        "within_target": all(v <= TARGET_RATIO for v in ratios.values()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoints", help="comma-separated etcd endpoints (default: start one)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--ops", type=int, default=300)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-etcd-") as tmp:
        cluster: EtcdCluster | None = None
        if args.endpoints:
            endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
        else:
            cluster = EtcdCluster(Path(tmp), members=3, name="bench", die_with_parent=True)
            cluster.start()
            endpoints = cluster.endpoints
        try:
            report = run(endpoints, args.rounds, args.ops)
        finally:
            if cluster is not None:
                cluster.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    res = report["results"]
    print(f"{'op':<8}{'raw p50 ms':>12}{'lib p50 ms':>12}{'ratio':>8}")
    for op in ("set", "get"):
        print(
            f"{op:<8}{res['raw_' + op]['p50_ms']:>12.3f}{res['lib_' + op]['p50_ms']:>12.3f}"
            f"{report['ratio_p50'][op]:>8.3f}"
        )
    verdict = "within" if report["within_target"] else "OVER"
    print(
        f"library/raw ratio {verdict} target {TARGET_RATIO} (stored {report['stored_bytes']} B "
        f"for {report['payload_bytes']} B); wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
