"""The etcd cluster itself: its members in `status`, and `backup`, `restore`, `defrag`
(docs/operations.md). The procedures are the library's (`defender_config._maintenance`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from defender_config import (
    DefenderClient,
    DefragStep,
    MaintenanceError,
    defragment_cluster,
    restore_plan,
    restore_token,
    take_backup,
    verify_snapshot,
)
from defender_config.store import HealthReport

from ._errors import CliError, SkippedError
from ._output import Printer


def find_etcdutl(flag: str | None) -> str | None:
    """--etcdutl, else etcdutl on PATH; None when there is none (hash check only)."""
    if flag:
        if not (os.path.isfile(flag) and os.access(flag, os.X_OK)):
            raise CliError(f"--etcdutl {flag}: not an executable file")
        return flag
    return shutil.which("etcdutl")


# ------------------------------------------------------------------------------------- status


def etcd_view(report: HealthReport) -> dict[str, Any]:
    members = []
    for m in report.members:
        members.append(
            {
                "name": m.name,
                "endpoint": m.endpoint,
                "id": f"{m.member_id:x}" if m.member_id is not None else None,
                "leader": m.is_leader,
                "learner": m.is_learner,
                "healthy": m.healthy,
                "dbSizeBytes": m.db_size_bytes,
                "dbSizeInUseBytes": m.db_size_in_use_bytes,
                "dbSizeQuotaBytes": m.db_size_quota_bytes,
                "revision": m.revision,
                "raftTerm": m.raft_term,
                "version": m.version,
                "alarms": list(m.alarms),
                "error": m.error,
            }
        )
    leader = report.leader
    return {
        "healthy": report.quorum and not report.degraded,
        "quorum": report.quorum,
        "healthyMembers": report.healthy_count,
        "clusterSize": report.cluster_size,
        "leader": (leader.name or leader.endpoint) if leader else None,
        "revision": max((m.revision or 0 for m in report.members), default=0) or None,
        "alarms": list(report.alarms),
        "members": members,
    }


def collect_etcd(client: DefenderClient) -> dict[str, Any]:
    return etcd_view(client.store.health())


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n = n / 1024  # type: ignore[assignment]
    return f"{n:.1f}GiB"


def show_etcd(printer: Printer, etcd: dict[str, Any]) -> None:
    state = (
        "healthy"
        if etcd["healthy"]
        else ("degraded" if etcd["quorum"] else "NO QUORUM / unreachable")
    )
    colour = "green" if etcd["healthy"] else ("yellow" if etcd["quorum"] else "red")
    alarms = ", ".join(etcd["alarms"]) or "none"
    printer.line(
        f"etcd: {printer.paint(state, colour)}, {etcd['healthyMembers']}/{etcd['clusterSize']}"
        f" members healthy, leader {etcd['leader'] or '-'}, revision {etcd['revision'] or '-'},"
        f" alarms {printer.paint(alarms, 'red') if etcd['alarms'] else alarms}"
    )
    rows = []
    for m in etcd["members"]:
        health = "healthy" if m["healthy"] else (m["error"] or "unhealthy")
        rows.append(
            [
                m["name"] or "-",
                m["endpoint"],
                "leader" if m["leader"] else ("learner" if m["learner"] else "follower"),
                printer.paint("healthy", "green") if m["healthy"] else printer.paint(health, "red"),
                _size(m["dbSizeBytes"]),
                _size(m["dbSizeInUseBytes"]),
                _size(m["dbSizeQuotaBytes"]),
                str(m["revision"] or "-"),
                ", ".join(m["alarms"]) or "-",
            ]
        )
    printer.table(
        ["MEMBER", "ENDPOINT", "ROLE", "HEALTH", "DB", "IN USE", "QUOTA", "REVISION", "ALARMS"],
        rows,
    )


# ------------------------------------------------------------------------------------- backup


def backup(
    client: DefenderClient, directory: Path, keep: int, etcdutl: str | None
) -> dict[str, Any]:
    result = take_backup(
        client.store, directory, keep=keep, prefix=client.layout.prefix + "/", etcdutl=etcdutl
    )
    return result.as_dict()


def show_backup(printer: Printer, data: dict[str, Any]) -> None:
    checks = " + ".join(data["verified"])
    printer.line(
        f"Snapshot {data['path']} ({data['size_bytes']} bytes, revision {data['revision']},"
        f" {data['keys']} defender keys) from {data['member']}, verified: {checks}."
    )
    if "etcdutl" not in data["verified"]:
        printer.line(
            "etcdutl not found: only the SHA-256 was checked; pass --etcdutl to also check the"
            " revision and key count."
        )
    for name in data["pruned"]:
        printer.line(f"Pruned {name} (beyond --keep).")


# ------------------------------------------------------------------------------------- restore


def parse_member(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or "://" not in url:
        raise CliError(f"--member {text!r}: use NAME=PEER_URL, e.g. etcd-0=http://10.0.0.1:2380")
    return name, url


def restore(
    snapshot: Path,
    members: list[str],
    data_dir: str,
    token: str | None,
    etcdutl: str | None,
    *,
    run: bool,
) -> dict[str, Any]:
    """Verify the snapshot, then print (or, with --run, execute) one etcdutl restore per
    member. --run never touches a data directory that already has content. Without `token`,
    one named for the time (`restore_token`)."""
    if not snapshot.is_file():
        raise CliError(f"snapshot {snapshot} does not exist")
    status = verify_snapshot(str(snapshot), etcdutl=etcdutl)
    steps = restore_plan(
        str(snapshot.resolve()),
        [parse_member(m) for m in members],
        data_dir=data_dir,
        token=token or restore_token(datetime.now(UTC)),
        etcdutl=etcdutl or "etcdutl",
        own_volumes=not run,
    )
    if run:
        if etcdutl is None:
            raise CliError("--run needs etcdutl (on PATH or --etcdutl)")
        full = [s for s in steps if Path(s.data_dir).exists() and any(Path(s.data_dir).iterdir())]
        if full:
            raise MaintenanceError(
                "refusing to overwrite member data: "
                + ", ".join(f"{s.member} ({s.data_dir})" for s in full)
                + " is not empty; move it away first (a restore starts every member fresh)"
            )
        for s in steps:
            done = subprocess.run(list(s.argv), capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise MaintenanceError(
                    f"etcdutl restore of {s.member} failed: {done.stderr.strip()[-500:]}"
                )
    return {
        "snapshot": str(snapshot),
        "revision": status.get("revision"),
        "ran": run,
        "steps": [{"member": s.member, "dataDir": s.data_dir, "argv": list(s.argv)} for s in steps],
    }


def show_restore(printer: Printer, data: dict[str, Any]) -> None:
    if data["ran"]:
        for s in data["steps"]:
            printer.line(f"Restored {s['member']} into {s['dataDir']}.")
        printer.line(
            "Start every member now, all at once (they form the new cluster together);"
            " then check `kubectl defender status`."
        )
        return
    printer.line("# Stop every etcd member and move its data directory away, then on each member:")
    for s in data["steps"]:
        printer.line(f"# {s['member']}")
        printer.line(" ".join(s["argv"]))
    printer.line("# Then start all members at once (see docs/operations.md#restore).")


# ------------------------------------------------------------------------------------- defrag


def defrag(
    client: DefenderClient,
    *,
    compact: bool,
    disarm_nospace: bool,
    printer: Printer | None,
    settle_timeout: float = 60.0,
) -> dict[str, Any]:
    def step(s: DefragStep) -> None:
        if printer is not None:
            printer.line(
                f"Defragmented {s.endpoint}{' (leader)' if s.was_leader else ''}:"
                f" {_size(s.db_size_before)} -> {_size(s.db_size_after)}"
            )

    # The largest write this client's library sends: a member with less room than that
    # raises NOSPACE again at the next large config.
    room = client.envelope.options.request_limit_bytes
    result = defragment_cluster(
        client.store,
        compact=compact,
        disarm_nospace=disarm_nospace,
        settle_timeout=settle_timeout,
        room_bytes=room,
        on_step=step,
    )
    if result.skipped is not None:
        raise SkippedError(f"{result.skipped}; nothing defragmented")
    return {**result.as_dict(), "room_bytes": room}


def show_defrag(printer: Printer, data: dict[str, Any]) -> None:
    if data["compacted_to"] is not None:
        printer.line(f"Compacted to revision {data['compacted_to']}.")
    if data["disarmed"]:
        printer.line(f"Disarmed NOSPACE on member(s) {', '.join(data['disarmed'])}.")
    if data["over_quota"]:
        printer.line(f"Still at or over the quota: {', '.join(data['over_quota'])}.")
    if data["short_of_room"]:
        printer.line(
            f"{_size(data['room_bytes'])} or less (the largest write) left under the quota:"
            f" {', '.join(data['short_of_room'])}. A write that large raises NOSPACE again:"
            " compact (--compact), delete data or raise the quota."
        )
    left = ", ".join(data["alarms_left"])
    printer.line(f"Alarms left: {left}." if left else "No alarm left.")
