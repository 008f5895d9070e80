"""Shared plumbing of the benchmarks: a private 3-member etcd, timing statistics, JSON output.

Benchmarks run as scripts (`python bench/run.py`), so this folder is on sys.path and the
bench modules import this one by name.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyetcd
from prometheus_client import CollectorRegistry

from defender_config import DefenderClient, EtcdSettings, Keyring, LibrarySettings
from defender_config.store import EtcdStore, parse_endpoint
from defender_devcluster import EtcdCluster, etcd_client_settings

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "docs" / "bench"

# Stages of the operator benchmark's time split (bench_operator writes them, report reads them).
STAGE_SEEDED = "create call → claimed and seeded in etcd"
STAGE_SEEDED_TO_PATCH = "seeded → status patch received"
STAGE_PATCH_RECEIVED = "create call → status patch received"


@contextmanager
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A fresh 3-member etcd on 127.0.0.1 (the harness's, same flags as the tests), stopped
    afterwards; its processes die with this one."""
    with tempfile.TemporaryDirectory(prefix="defender-bench-") as tmp:
        cluster = EtcdCluster(Path(tmp), members=3, name="bench", die_with_parent=True)
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()


def settings_for(endpoints: Sequence[str], **overrides: Any) -> EtcdSettings:
    return EtcdSettings.model_validate({**etcd_client_settings(endpoints), **overrides})


def store_for(endpoints: Sequence[str], **overrides: Any) -> EtcdStore:
    return EtcdStore(settings_for(endpoints, **overrides), registry=CollectorRegistry())


@contextmanager
def three_clients() -> Iterator[tuple[Any, EtcdStore, DefenderClient]]:
    """A fresh 3-member etcd and three clients of its leader, for library-vs-raw comparisons:
    pyetcd's own client (raw bytes), the library's EtcdStore (no envelope), and a
    DefenderClient with a generated keyring (zstd + AES-256-GCM envelope)."""
    with etcd_cluster() as cluster:
        leader = cluster.wait_for_leader()
        host, port, _ = parse_endpoint(leader)
        raw = pyetcd.client(host, port, timeout=10)
        store = store_for([leader], timeout_seconds=10)
        lib = DefenderClient(
            LibrarySettings(etcd=store.settings, prefix="/bench"),
            Keyring.generate(),
            store=store_for([leader], timeout_seconds=10),
            registry=CollectorRegistry(),
            alert_sinks=[],
        )
        try:
            yield raw, store, lib
        finally:
            raw.close()
            store.close()
            lib.store.close()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of `values`."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/min/max of `values` (same unit as the input), and the count."""
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values) if values else float("nan"),
        "min": min(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
    }


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def process_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# The load when the benchmark started: when this process started, or when run.py started the
# benchmark (`mark_start`). It was read when the result was written, i.e. at the end, where a
# benchmark's own load (and whatever started meanwhile) is already in it.
_load_at_start = os.getloadavg()


def mark_start() -> None:
    """A benchmark starts now: its result reports the load of this moment as its start."""
    global _load_at_start
    _load_at_start = os.getloadavg()


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in _load_at_start],
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    result = {"benchmark": name, "machine": machine(), **result}
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path.relative_to(REPO)}")
    return path


def config_bytes(size: int, seed: int = 7) -> bytes:
    """JSON text shaped like a firewall config, exactly `size` bytes: compresses like real
    configs (repetitive keys, varied values)."""
    import random

    rng = random.Random(seed)
    parts: list[str] = ['{"node_id":"fw-01","version":"1.0.0","rules":[']
    total = len(parts[0])
    i = 0
    while total < size:
        rule = (
            f'{{"id":"rule-{i}","action":"{rng.choice(["allow", "deny"])}",'
            f'"proto":"{rng.choice(["tcp", "udp"])}",'
            f'"src_cidr":"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.0/24",'
            f'"ports":[{rng.randint(1, 65535)}]}},'
        )
        parts.append(rule)
        total += len(rule)
        i += 1
    return "".join(parts).encode()[:size]
