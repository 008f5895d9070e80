"""Heartbeaters of two source trees in one run, against one etcd: e.g. main's library and this
branch's, each beside the old design's plain put (bench_heartbeaters.library_run and
old_design_run of the tree given). For a before/after on a machine whose load changes between
runs; not part of `make bench`.

Run: .venv/bin/python bench/heartbeaters_ab.py TREE INSTANCES   (TREE: a checkout, e.g. /work/main)
"""

from __future__ import annotations

import sys


def main() -> None:
    tree, n = sys.argv[1], int(sys.argv[2])
    sys.path[:0] = [f"{tree}/bench", f"{tree}/src"]
    import bench_heartbeaters as beats
    import defender_config
    from bench_support import etcd_cluster

    print(f"library from {defender_config.__file__}")
    with etcd_cluster() as cluster:
        for runner in (beats.old_design_run, beats.library_run):
            r = runner(cluster, n)
            print(
                f"{r['design']:38s} n={n}: {r['beats_per_second']:.1f} beats/s, CPU/beat "
                f"{r['client_cpu_ms_per_beat']:.3f} ms, gap p99 {r['gap_seconds']['p99']:.2f} s, "
                f"regrants {r['lease_regrants']}, etcd CPU {r['etcd_cpu_percent']:.1f}%",
                flush=True,
            )


if __name__ == "__main__":
    main()
