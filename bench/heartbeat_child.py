"""One component instance for bench_heartbeat.py and bench_operator.py's restart trials:
registers a lease-bound heartbeat through the library, prints READY, then beats until it is
killed (SIGKILL: a crash, no lease revoke).

Usage: heartbeat_child.py ENDPOINTS_JSON PREFIX COMPONENT INSTANCE INTERVAL MISSES [KEYRING_FILE]

With KEYRING_FILE (a keyring JSON) its records are signed, as an operator judging pods needs;
without, they are plain records, enough for measuring lease expiry alone.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry

from defender_config import (
    DefenderClient,
    EnvelopeOptions,
    EtcdSettings,
    Heartbeater,
    Keyring,
    LibrarySettings,
)


def main() -> None:
    endpoints, prefix, component, instance, interval, misses = sys.argv[1:7]
    keyring = Keyring.from_json(Path(sys.argv[7]).read_bytes()) if len(sys.argv) > 7 else None
    settings = LibrarySettings(
        etcd=EtcdSettings(endpoints=json.loads(endpoints), backoff_base_seconds=0.05),
        prefix=prefix,
        keyring_path=None,
        # Heartbeat records are never sealed: without a keyring nothing here needs one.
        **({} if keyring else {"envelope": EnvelopeOptions(compress=False, encrypt=False)}),
    )
    client = DefenderClient(settings, keyring, registry=CollectorRegistry(), alert_sinks=[])
    Heartbeater(
        client,
        component,
        instance,
        interval_seconds=float(interval),
        allowed_misses=int(misses),
        pod=instance,  # the operator maps heartbeats to pods by this field
    ).start()
    print("READY", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
