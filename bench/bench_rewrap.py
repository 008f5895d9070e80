"""Rewrap of 1,000 sealed values during a key rotation (target <= 10 s), next to its baseline:
the raw client reading the same 1,000 values and writing each back unchanged (the I/O floor,
without decrypt, re-encrypt or compare-and-swap).

Values are 2 KiB JSON configs sealed with the old primary; the rewrap runs with the promoted
keyring (ConfigStore.rewrap_all: list, open, seal, compare-and-swap per value).
"""

from __future__ import annotations

import time
from typing import Any

import pyetcd
from prometheus_client import CollectorRegistry

from bench_support import config_bytes, etcd_cluster, settings_for, summary, write_result
from defender_config import (
    ConfigStore,
    DefenderClient,
    Keyring,
    LibrarySettings,
    inspect,
)
from defender_config.store import parse_endpoint

TARGET_SECONDS = 10.0


def client(endpoint: str, prefix: str, keyring: Keyring) -> DefenderClient:
    return DefenderClient(
        LibrarySettings(etcd=settings_for([endpoint]), prefix=prefix),
        keyring,
        registry=CollectorRegistry(),
        alert_sinks=[],
    )


def run(quick: bool = False) -> dict[str, Any]:
    count = 100 if quick else 1000
    reps = 1 if quick else 3
    lib_times: list[float] = []
    raw_times: list[float] = []
    reports = []
    with etcd_cluster() as cluster:
        leader = cluster.wait_for_leader()
        host, port, _ = parse_endpoint(leader)
        raw = pyetcd.client(host, port, timeout=30)
        try:
            for rep in range(reps):
                old = Keyring.generate()
                staged = old.with_new_decrypt_only()
                new_id = staged.keys[-1].key_id
                promoted = staged.promote(new_id)
                prefix = f"/bench-rewrap/r{rep}"
                writer = client(leader, prefix, staged)
                keys = [f"{prefix}/components/c{i % 50:02d}/history/{i:010d}" for i in range(count)]
                for i, key in enumerate(keys):
                    writer.put_sealed(key, config_bytes(2048, seed=i))
                writer.close()

                rotated = client(leader, prefix, promoted)
                started = time.perf_counter()
                report = ConfigStore(rotated).rewrap_all()
                lib_times.append(time.perf_counter() - started)
                assert report.rewrapped == count and report.failed == 0, report
                for sv in rotated.store.list_prefix(prefix + "/"):
                    assert inspect(sv.value).key_id == new_id
                rotated.close()
                reports.append(
                    {
                        "scanned": report.scanned,
                        "rewrapped": report.rewrapped,
                        "conflicts": report.conflicts,
                        "failed": report.failed,
                    }
                )

                started = time.perf_counter()
                values = list(raw.get_prefix(prefix + "/"))
                for value, meta in values:
                    raw.put(meta.key.decode(), value)
                raw_times.append(time.perf_counter() - started)
                assert len(values) == count
                print(
                    f"rewrap {count}: library {lib_times[-1]:.2f}s, raw read+write "
                    f"{raw_times[-1]:.2f}s"
                )
        finally:
            raw.close()
    worst = max(lib_times)
    return {
        "description": __doc__,
        "unit": "seconds for all values",
        "values": count,
        "value_bytes": 2048,
        "target_seconds": TARGET_SECONDS,
        "library_seconds": summary(lib_times),
        "baseline_raw_seconds": summary(raw_times),
        "reports": reports,
        "target_met": worst <= TARGET_SECONDS and count >= 1000,
    }


if __name__ == "__main__":
    import sys

    write_result("rewrap", run(quick="--quick" in sys.argv))
