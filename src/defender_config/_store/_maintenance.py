"""etcd maintenance calls aimed at one chosen member: status fields our protobuf stubs lack,
snapshot, defragment, compact, alarms.

pyetcd ships etcd's rpc.proto of 3.3: its StatusResponse has no `errors` (the alarms a member
reports), `dbSizeInUse` or `isLearner`. etcd 3.4+ sends them anyway and protobuf keeps them as
unknown fields, so they are read back from the message's own wire bytes (`status_extras`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pyetcd import etcdrpc

from .._files import write_file_atomic

# StatusResponse field numbers in etcd's api/etcdserverpb/rpc.proto (3.4+).
_STATUS_ERRORS: Final = 8
_STATUS_DB_SIZE_IN_USE: Final = 9
_STATUS_IS_LEARNER: Final = 10
_STATUS_DB_SIZE_QUOTA: Final = 12

# etcd appends the SHA-256 of the database to the snapshot stream; etcdutl checks it on restore.
SNAPSHOT_HASH_BYTES: Final = 32
# Owner-only: a snapshot holds every stored record (sealed values stay sealed, but metadata,
# heartbeats and alerts are plaintext).
SNAPSHOT_FILE_MODE: Final = 0o600


@dataclass(frozen=True, slots=True)
class StatusExtras:
    alarms: tuple[str, ...] = ()
    db_size_in_use_bytes: int | None = None
    is_learner: bool = False
    db_size_quota_bytes: int | None = None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of every top-level field; varints as int, bytes as bytes."""
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, value
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated field")
            yield number, data[pos : pos + length]
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


_ALARM = re.compile(r"alarm:(\w+)")


def _alarm_of(text: str) -> str:
    """etcd words an alarm as "memberID:<id> alarm:NOSPACE ": keep the alarm's name."""
    match = _ALARM.search(text)
    return match.group(1) if match else text.strip()


def status_extras(raw: bytes) -> StatusExtras:
    """The 3.4+ fields of a serialized StatusResponse (absent ones keep their defaults).
    A malformed message yields the defaults: these fields inform, they never decide alone."""
    alarms: list[str] = []
    in_use: int | None = None
    learner = False
    quota: int | None = None
    try:
        for number, value in _fields(raw):
            if number == _STATUS_ERRORS and isinstance(value, bytes):
                alarms.append(_alarm_of(value.decode("utf-8", "replace")))
            elif number == _STATUS_DB_SIZE_IN_USE and isinstance(value, int):
                in_use = value
            elif number == _STATUS_IS_LEARNER and isinstance(value, int):
                learner = bool(value)
            elif number == _STATUS_DB_SIZE_QUOTA and isinstance(value, int):
                quota = value
    except ValueError:
        return StatusExtras()
    return StatusExtras(tuple(alarms), in_use, learner, quota)


def snapshot_to(channel: Any, metadata: Any, timeout: float, dest: Path) -> tuple[int, int]:
    """Stream a snapshot of the member behind `channel` into `dest` (never a partial file, mode
    0600: it holds every stored record, see `write_file_atomic`). Returns (bytes written, the
    revision the member reported in the stream's header)."""
    seen = [0, 0]  # bytes written, revision

    def chunks() -> Iterator[bytes]:
        stream = etcdrpc.MaintenanceStub(channel).Snapshot(
            etcdrpc.SnapshotRequest(), timeout, metadata=metadata
        )
        for chunk in stream:
            if chunk.HasField("header") and chunk.header.revision:
                seen[1] = max(seen[1], int(chunk.header.revision))
            seen[0] += len(chunk.blob)
            yield chunk.blob

    write_file_atomic(dest, chunks(), SNAPSHOT_FILE_MODE)
    return seen[0], seen[1]


def snapshot_hash_ok(path: Path) -> bool:
    """True when the file ends with the SHA-256 of everything before it (what etcd appends)."""
    size = path.stat().st_size
    if size <= SNAPSHOT_HASH_BYTES:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        remaining = size - SNAPSHOT_HASH_BYTES
        while remaining:
            block = fh.read(min(remaining, 1 << 20))
            if not block:
                return False
            digest.update(block)
            remaining -= len(block)
        trailer = fh.read()
    return digest.digest() == trailer


def defragment(channel: Any, metadata: Any, timeout: float) -> None:
    etcdrpc.MaintenanceStub(channel).Defragment(
        etcdrpc.DefragmentRequest(), timeout, metadata=metadata
    )


def alarm_request(action: str, member_id: int = 0, alarm: str = "NONE") -> Any:
    return etcdrpc.AlarmRequest(
        action=etcdrpc.AlarmRequest.AlarmAction.Value(action),
        memberID=member_id,
        alarm=etcdrpc.AlarmType.Value(alarm),
    )


def alarm_name(alarm: int) -> str:
    try:
        return str(etcdrpc.AlarmType.Name(alarm))
    except ValueError:
        return f"ALARM_{alarm}"
