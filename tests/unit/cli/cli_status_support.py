"""What the status rendering tests share: the data `collect_status` returns (`-o json`) for one
sniffer component, built by hand, and its table as the plugin prints it."""

from __future__ import annotations

import io
from datetime import datetime, timedelta
from typing import Any

from defender_cli._commands import show_status
from defender_cli._output import Printer


def instance(
    name: str,
    version: int,
    digest: str,
    now: datetime,
    *,
    node: str = "node-1",
    age: float = 1.0,
    software: str = "1.0",
    key: str = "fp",
) -> dict[str, Any]:
    return {
        "instance": name,
        "pod": name,
        "node": node,
        "status": "RUNNING",
        "configVersion": version,
        "configDigest": digest,
        "softwareVersion": software,
        "keyFingerprint": key,
        "codec": "zstd",
        "heartbeatTime": (now - timedelta(seconds=age)).isoformat(),
        "heartbeatAgeSeconds": age,
        "lastError": None,
    }


def render_sniffer(
    instances: list[dict[str, Any]],
    rollout: dict[str, Any] | None,
    frozen: dict[str, Any] | None = None,
    *,
    modified_by: str = "op",
    active_version: int = 1,
    active_digest: str | None = None,
) -> str:
    """`kubectl defender status` tables (without the etcd members) for sniffer at version 1
    (or `active_version`, whose config has `active_digest`)."""
    data = {
        "prefix": "/ml-defender",
        "alertWindowSeconds": 3600,
        "components": [
            {
                "name": "sniffer",
                "type": "sniffer",
                "status": "RUNNING",
                "activeVersion": active_version,
                "activeDigest": active_digest,
                "lastModified": None,
                "modifiedBy": modified_by,
                "instances": instances,
                "alerts": 0,
                "rollout": rollout,
                "frozen": frozen,
            }
        ],
    }
    out = io.StringIO()
    show_status(Printer(out, colour=False), data)
    return out.getvalue()
