"""Many component instances in one process, for bench_operator.py's 1,000-component batch:
every instance is a library Heartbeater of one DefenderClient holding the namespace's keyring
(so instances report the primary key and components can be Ready). Prints READY once every
instance has registered, then beats until killed.

Usage: heartbeat_many.py PLAN_JSON_FILE
plan: {"endpoints": [...], "prefix": str, "keyring_file": path to keyring.json,
       "interval": seconds, "misses": int, "instances": [[component, pod], ...]}
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry

from defender_config import DefenderClient, EtcdSettings, Heartbeater, Keyring, LibrarySettings


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    settings = LibrarySettings(
        etcd=EtcdSettings(endpoints=plan["endpoints"]), prefix=plan["prefix"], keyring_path=None
    )
    keyring = Keyring.from_json(Path(plan["keyring_file"]).read_bytes())
    client = DefenderClient(settings, keyring, registry=CollectorRegistry(), alert_sinks=[])
    for component, pod in plan["instances"]:
        hb = Heartbeater(
            client,
            component,
            pod,
            interval_seconds=float(plan["interval"]),
            allowed_misses=int(plan["misses"]),
            pod=pod,
        )
        hb.start()
        hb.set_status("RUNNING")
    print("READY", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
