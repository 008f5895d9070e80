"""Where a library put spends its time beyond raw pyetcd (issue 17's point 7), in µs.

Run: .venv/bin/python bench/put_path_profile.py [--ops N]
For config (JSON) and random values it prints, each a median unless said otherwise:

* seal hot      Envelope.seal of the same value in a loop (warm caches);
* seal in situ  Envelope.seal right after a real put to etcd (what a put actually pays);
* put p50       raw pyetcd, EtcdStore and DefenderClient.put_sealed, interleaved op by op in a
                random order like bench_kv, and the library/raw ratio;
* cpu           mean CPU time of the calling thread per put (time.thread_time), which the
                load of other processes changes much less than wall time.

Like opening (get_path_profile.py), sealing right after an RPC costs several times what it
costs in a loop: zstd's and OpenSSL's code and tables are no longer in the CPU's caches.
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

CASES = [("config", 1 << 10), ("config", 16 << 10), ("config", 256 << 10)]
CASES += [("random", 1 << 10), ("random", 16 << 10), ("random", 256 << 10)]


def profile(kind: str, size: int, raw: Any, store: Any, lib: DefenderClient, ops: int) -> str:
    """One line of the table for `kind` data of `size` bytes."""
    data = config_bytes(size) if kind == "config" else os.urandom(size)
    base = f"/bench/putprofile/{kind}/{size}"
    lib_key = lib.layout.prefix + base + "/library"
    fns: dict[str, Callable[[], object]] = {
        "raw": lambda: raw.put(base + "/raw", data),
        "store": lambda: store.put(base + "/store", data),
        "lib": lambda: lib.put_sealed(lib_key, data),
    }
    for fn in fns.values():
        fn()
    n = max(20, 5000 // (size >> 10))
    hot = min(timeit.repeat(lambda: lib.seal(lib_key, data), number=n, repeat=3)) / n
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    in_situ: list[float] = []
    names = list(fns)
    rng = random.Random(size)
    for _ in range(ops):
        rng.shuffle(names)
        for name in names:
            c = time.thread_time()
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.thread_time() - c)
        raw.put(base + "/raw", data)
        t = time.perf_counter()
        lib.seal(lib_key, data)
        in_situ.append(time.perf_counter() - t)
    p50 = {name: statistics.median(v) * 1e6 for name, v in times.items()}
    c = {name: statistics.fmean(v) * 1e6 for name, v in cpu.items()}
    return (
        f"{kind + ' ' + str(size >> 10) + 'K':<12}{hot * 1e6:9.1f}"
        f"{statistics.median(in_situ) * 1e6:9.1f}{p50['raw']:7.0f}{p50['store']:7.0f}"
        f"{p50['lib']:7.0f}  {p50['lib'] / p50['raw']:.3f}"
        f"{c['raw']:8.0f}{c['store']:7.0f}{c['lib']:7.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=300, help="puts per client and case")
    args = parser.parse_args()
    with three_clients() as (raw, store, lib):
        print(
            f"{'case':<12}{'seal hot':>9}{'in situ':>9}{'raw':>7}{'store':>7}{'lib':>7}  lib/raw"
            f"{'cpu raw':>8}{'store':>7}{'lib':>7}"
        )
        for kind, size in CASES:
            print(profile(kind, size, raw, store, lib, args.ops), flush=True)


if __name__ == "__main__":
    main()
