"""The store layer's public face: etcd access below the config API.

Most users need only the domain API in `defender_config` (DefenderClient, ConfigStore,
Registry, ...), whose `client.store` is an `EtcdStore`. What is here is for code that reads or
writes raw keys itself: transactions (`Compare`, `PutOp`, `GetOp`, `DeleteOp`, `TxnResult`),
the records the store hands back (`StoredValue`, `WatchEvent`, `Lease`), health and metrics,
the endpoint grammar, and etcd's Auth service for deployment tooling
(`EtcdAuthSession`). Only `defender_config._store` talks to the etcd client and gRPC.
"""

from __future__ import annotations

from ._settings import ETCD_REQUEST_LIMIT_BYTES
from ._store import EtcdStore, WatchHandle, parse_endpoint
from ._store._auth import (
    AuthPermission,
    AuthRight,
    AuthRootRefusedError,
    EtcdAuthError,
    EtcdAuthSession,
)
from ._store_types import (
    Compare,
    DeleteOp,
    GetOp,
    HealthReport,
    Lease,
    MemberHealth,
    PutOp,
    SnapshotFile,
    StoredValue,
    StoreMetrics,
    TxnResult,
    WatchEvent,
)

__all__ = [
    "ETCD_REQUEST_LIMIT_BYTES",
    "AuthPermission",
    "AuthRight",
    "AuthRootRefusedError",
    "Compare",
    "DeleteOp",
    "EtcdAuthError",
    "EtcdAuthSession",
    "EtcdStore",
    "GetOp",
    "HealthReport",
    "Lease",
    "MemberHealth",
    "PutOp",
    "SnapshotFile",
    "StoreMetrics",
    "StoredValue",
    "TxnResult",
    "WatchEvent",
    "WatchHandle",
    "parse_endpoint",
]
