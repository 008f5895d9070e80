"""Run the benchmarks (`make bench`): JSON under docs/bench/, then the report (README.md + PNGs).

Run: .venv/bin/python bench/run.py [--quick] [--only kv,envelope,...] [--report-only]
Each benchmark starts its own 3-member etcd (and, for the operator, its own control plane), so
they can run one at a time in any order. The fuzz target is separate: bench/fuzz_envelope.py.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from bench_support import mark_start, write_result

BENCHMARKS = {
    "library": "bench_library",
    "envelope": "bench_envelope",
    "kv": "bench_kv",
    "rewrap": "bench_rewrap",
    "heartbeat_detection": "bench_heartbeat",
    "heartbeaters": "bench_heartbeaters",
    "operator": "bench_operator",
    "plugin": "bench_plugin",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few iterations (smoke test)")
    parser.add_argument(
        "--only", default="", help="comma-separated subset of " + ",".join(BENCHMARKS)
    )
    parser.add_argument("--report-only", action="store_true", help="only re-render the report")
    args = parser.parse_args()
    chosen = [b for b in args.only.split(",") if b] or list(BENCHMARKS)
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if not args.report_only:
        for name in chosen:
            started = time.monotonic()
            mark_start()
            print(f"== {name}", flush=True)
            module = importlib.import_module(BENCHMARKS[name])
            if name == "library":
                # The library engineer's benchmark writes its own JSON (docs/bench/library.json).
                module.main(["--rounds", "2", "--ops", "50"] if args.quick else [])
            else:
                write_result(name, module.run(quick=args.quick))
            print(f"== {name} done in {time.monotonic() - started:.0f}s", flush=True)
    import report

    report.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
