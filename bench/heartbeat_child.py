"""One component instance for bench_heartbeat.py: registers a lease-bound heartbeat through the
library, prints READY, then beats until it is killed (SIGKILL: a crash, no lease revoke).

Usage: heartbeat_child.py ENDPOINTS_JSON PREFIX COMPONENT INSTANCE INTERVAL MISSES
"""

from __future__ import annotations

import json
import sys
import threading

from prometheus_client import CollectorRegistry

from defender_config import (
    DefenderClient,
    EnvelopeOptions,
    EtcdSettings,
    Heartbeater,
    LibrarySettings,
)


def main() -> None:
    endpoints, prefix, component, instance, interval, misses = sys.argv[1:7]
    settings = LibrarySettings(
        etcd=EtcdSettings(endpoints=json.loads(endpoints), backoff_base_seconds=0.05),
        prefix=prefix,
        # Heartbeats are plaintext records: no keyring needed in this process.
        envelope=EnvelopeOptions(compress=False, encrypt=False),
    )
    client = DefenderClient(settings, None, registry=CollectorRegistry(), alert_sinks=[])
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
