"""`kubectl defender` start-up: wall time of `--help`, an argument error, `status` and `diff`,
each run through kubectl's plugin dispatch as a user types it, next to its baselines from the
same run: the bare interpreter (`python -c pass`) and kubectl alone (`kubectl version
--client`). `status` and `diff` read a private 3-member etcd holding one registered component.

Target (issue 17): `--help` and argument errors in <= 0.3 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_support import etcd_cluster, settings_for, summary
from defender_config import (
    ComponentStatus,
    ConfigStore,
    DefenderClient,
    Keyring,
    LibrarySettings,
    Registry,
)
from defender_devcluster import tools_bin

TARGET_SECONDS = 0.3
PREFIX = "/bench-plugin"


def _timed(argv: list[str], env: dict[str, str], runs: int) -> dict[str, Any]:
    times = []
    codes = set()
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True, check=False)
        times.append(time.perf_counter() - started)
        codes.add(done.returncode)
    return {**summary(times), "exit_codes": sorted(codes)}


def _seed(endpoints: list[str], keyring: Keyring) -> tuple[DefenderClient, Any]:
    settings = LibrarySettings(etcd=settings_for(endpoints), prefix=PREFIX)
    client = DefenderClient(settings, keyring, instance="bench-plugin")
    configs = ConfigStore(client)
    reg = Registry(client, configs).register(
        "ml-detector",
        "detector-01",
        {"ddos": {"threshold": 0.8}, "interval": 5},
        "custom",
        json_schema={"type": "object"},
        pod="ml-detector-0",
        node_id="node-a",
        software_version="1.0.0",
        interval_seconds=30,
    )
    reg.heartbeater.set_status(ComponentStatus.RUNNING)
    return client, reg.heartbeater


def run(quick: bool = False) -> dict[str, Any]:
    runs = 3 if quick else 15
    kubectl = str(tools_bin() / "kubectl")
    venv_bin = str(Path(sys.executable).parent)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DEFENDER_", "ETCDCTL_")) and k != "KUBECONFIG"
    }
    # kubectl finds `kubectl-defender` on PATH, as after `pip install`.
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    rows: dict[str, Any] = {
        "baseline python -c pass": _timed([sys.executable, "-c", "pass"], env, runs),
        "baseline kubectl version --client": _timed([kubectl, "version", "--client"], env, runs),
        "kubectl defender --help": _timed([kubectl, "defender", "--help"], env, runs),
        "kubectl defender (argument error)": _timed(
            [kubectl, "defender", "status", "--alerts-since", "soon"], env, runs
        ),
    }
    with etcd_cluster() as cluster, tempfile.TemporaryDirectory() as tmp:
        keyring = Keyring.generate()
        keyring_file = Path(tmp) / "keyring.json"
        keyring_file.write_bytes(keyring.to_json())
        client, beat = _seed(cluster.endpoints, keyring)
        try:
            flags = ["--etcd-endpoints", ",".join(cluster.endpoints), "--prefix", PREFIX]
            rows["kubectl defender status"] = _timed(
                [kubectl, "defender", "status", *flags], env, runs
            )
            rows["kubectl defender diff"] = _timed(
                [
                    kubectl,
                    "defender",
                    "diff",
                    "ml-detector",
                    *flags,
                    "--keyring",
                    str(keyring_file),
                ],
                env,
                runs,
            )
        finally:
            beat.stop()
            client.close()
    quick_ones = ("kubectl defender --help", "kubectl defender (argument error)")
    met = all(rows[name]["p50"] <= TARGET_SECONDS for name in quick_ones)
    for name, row in rows.items():
        print(
            f"{name:40s} p50 {row['p50']:.3f} s  max {row['max']:.3f} s  exit {row['exit_codes']}"
        )
    return {
        "description": __doc__,
        "unit": "seconds of wall time per invocation",
        "runs": runs,
        "target_seconds": TARGET_SECONDS,
        "target_met": met,
        "results": rows,
    }


if __name__ == "__main__":
    from bench_support import write_result

    write_result("plugin", run(quick="--quick" in sys.argv))
