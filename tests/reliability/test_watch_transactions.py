"""A watch must deliver every key a transaction changed: seeding and commits write MASTER,
ACTIVE, metadata and history in ONE transaction, so all four share one revision.

Found by the reliability suites: `WatchHandle._dispatch` used to advance `next_revision` after the
first event of a revision and then skip the other keys of the same transaction.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from reliability_support import etcd_settings

from defender_config.store import EtcdStore, PutOp, WatchEvent
from defender_devcluster import EtcdCluster, wait_for

pytestmark = pytest.mark.etcd


def test_watch_delivers_every_key_of_a_transaction(
    healthy_etcd: EtcdCluster, etcd_prefix: str
) -> None:
    with EtcdStore(etcd_settings(healthy_etcd), registry=CollectorRegistry()) as store:
        seen: list[WatchEvent] = []
        handle = store.watch_prefix(etcd_prefix, seen.append)
        try:
            keys = [f"{etcd_prefix}{k}" for k in ("master", "active", "metadata", "history")]
            store.txn([], [PutOp(k, b"v") for k in keys])
            store.put(etcd_prefix + "after", b"v")
            wait_for("the last put", lambda: any(e.key.endswith("after") for e in seen), timeout=60)
        finally:
            handle.cancel()
    assert [e.key for e in seen] == [*keys, etcd_prefix + "after"]
