"""Where a library get spends its time beyond raw pyetcd (issue 17's point 7), in µs.

Run: .venv/bin/python bench/get_path_profile.py [--ops N]
For config (JSON) and random values it prints, each a median:

* open hot      Envelope.open of the same blob in a loop (warm caches);
* after idle    Envelope.open right after sleeping as long as a get waits (0.7 ms), nothing
                else running in this process: what waking an idle CPU costs by itself;
* open in situ  Envelope.open right after a real get from etcd (what a get actually pays);
* get p50       raw pyetcd, EtcdStore and DefenderClient.get_sealed, interleaved op by op in a
                random order like bench_kv, and the library/raw ratio.

The in-situ open is several times the hot one: after ~0.7 ms waiting on the network the CPU's
caches no longer hold the cipher's and zstd's code and tables.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
import timeit
from collections.abc import Callable
from typing import Any

from bench_support import config_bytes, three_clients
from defender_config import DefenderClient

CASES = [("config", 1 << 10), ("config", 4 << 10), ("config", 16 << 10), ("config", 256 << 10)]
CASES += [("random", 1 << 10), ("random", 16 << 10), ("random", 256 << 10)]
IDLE_SECONDS = 0.0007  # about one get's wait on this machine


def profile(kind: str, size: int, raw: Any, store: Any, lib: DefenderClient, ops: int) -> str:
    """One line of the table for `kind` data of `size` bytes."""
    data = config_bytes(size) if kind == "config" else os.urandom(size)
    base = f"/bench/profile/{kind}/{size}"
    raw.put(base + "/raw", data)
    store.put(base + "/store", data)
    lib_key = lib.layout.prefix + base + "/library"
    lib.put_sealed(lib_key, data)
    blob = lib.seal(lib_key, data)
    n = max(50, 20000 // (size >> 10))
    hot = min(timeit.repeat(lambda: lib.envelope.open(blob, lib_key), number=n)) / n
    after_idle: list[float] = []
    for _ in range(ops):
        time.sleep(IDLE_SECONDS)
        t = time.perf_counter()
        lib.envelope.open(blob, lib_key)
        after_idle.append(time.perf_counter() - t)
    fns: dict[str, Callable[[], object]] = {
        "raw": lambda: raw.get(base + "/raw"),
        "store": lambda: store.get(base + "/store"),
        "lib": lambda: lib.get_sealed(lib_key),
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    in_situ: list[float] = []
    names = list(fns)
    rng = random.Random(size)
    for _ in range(ops):
        rng.shuffle(names)
        for name in names:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
        stored = lib.store.get(lib_key)
        assert stored is not None
        t = time.perf_counter()
        lib.envelope.open(stored.value, lib_key)
        in_situ.append(time.perf_counter() - t)
    p50 = {name: statistics.median(v) * 1e6 for name, v in times.items()}
    return (
        f"{kind + ' ' + str(size >> 10) + 'K':<12}{hot * 1e6:9.1f}"
        f"{statistics.median(after_idle) * 1e6:11.1f}{statistics.median(in_situ) * 1e6:9.1f}"
        f"{p50['raw']:7.0f}{p50['store']:7.0f}"
        f"{p50['lib']:7.0f}  {p50['lib'] / p50['raw']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=1000, help="gets per client and case")
    args = parser.parse_args()
    with three_clients() as (raw, store, lib):
        print(
            f"{'case':<12}{'open hot':>9}{'after idle':>11}{'in situ':>9}"
            f"{'raw':>7}{'store':>7}{'lib':>7}  lib/raw"
        )
        for kind, size in CASES:
            print(profile(kind, size, raw, store, lib, args.ops), flush=True)


if __name__ == "__main__":
    main()
