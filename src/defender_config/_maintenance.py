"""Day-2 operations of the defender etcd: snapshots kept N deep, a restore plan per member,
defragmentation one member at a time. Used by `kubectl defender backup|restore|defrag` and the
chart's CronJobs; the decisions (which member, which order, which files go) are pure functions.

A snapshot holds etcd's bytes as stored: sealed values stay sealed, keys are never in it (the
keyring lives in a Kubernetes Secret). Plaintext metadata (names, versions, heartbeats, alert
records) is readable by whoever holds the file (docs/security.md#snapshots).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from ._errors import (
    CompactionLagError,
    DefragIncompleteError,
    MaintenanceError,
    SnapshotInvalidError,
    StoreError,
    StoreUnavailableError,
)
from ._store import EtcdStore
from ._store_types import HealthReport, MemberHealth

# For fullmatch: `$` would also match before a final newline.
SNAPSHOT_PATTERN = re.compile(r"defender-etcd-(\d{8}T\d{6}Z)-r(\d+)\.db")
_ETCDUTL_TIMEOUT_SECONDS = 120.0


# --- decisions (pure) ----------------------------------------------------------------------------


def snapshot_member(report: HealthReport) -> MemberHealth | None:
    """The member to snapshot: a serving voter, a follower before the leader (the leader also
    carries every write), the most caught-up follower first. None when none serves."""
    fit = [m for m in report.members if m.serving and not m.is_learner]
    if not fit:
        return None
    return sorted(fit, key=lambda m: (m.is_leader, -(m.raft_index or 0), m.endpoint))[0]


def snapshot_name(now: datetime, revision: int) -> str:
    return f"defender-etcd-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-r{revision}.db"


def restore_token(now: datetime) -> str:
    """A cluster token of its own for each restore. The token picks the member ids and so the
    cluster id: a second restore with the first one's token and members would come back as the
    same cluster, and clients that ran through both would not see that it changed."""
    return f"ml-defender-etcd-restored-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}"


def snapshots_to_prune(names: Sequence[str], keep: int) -> list[str]:
    """The snapshot files (by our naming) beyond the newest `keep`; other files are not ours and
    never pruned. Newest = latest time, then highest revision."""
    if keep < 1:
        raise ValueError("keep at least one snapshot")
    ours = []
    for name in names:
        match = SNAPSHOT_PATTERN.fullmatch(name)
        if match:
            ours.append((match.group(1), int(match.group(2)), name))
    ours.sort(reverse=True)
    return [name for _, _, name in ours[keep:]]


def _not_serving(member: MemberHealth) -> str:
    said = f" ({member.error})" if member.error else ""
    return f"{member.endpoint} not serving{said}"


@dataclass(frozen=True)
class DefragPlan:
    """Members in the order to defragment them, or why nothing may run."""

    order: tuple[str, ...]
    refused: str | None = None


def plan_defrag(report: HealthReport) -> DefragPlan:
    """Followers first, the leader last, one at a time. Refused unless every member of the
    cluster answers (a defrag blocks its member: with one already down, quorum would hang on
    the member being defragmented). An alarm does not refuse: defrag is how NOSPACE ends."""
    down = [m for m in report.members if not m.serving]
    if down or len(report.members) < report.cluster_size:
        missing = report.cluster_size - len(report.members)
        # With what the member answered: "not serving" alone left a person to guess between a
        # member that is down and one whose health check ran out of time on a loaded machine
        # (try again) or refused the credentials.
        parts = [", ".join(_not_serving(m) for m in down)] if down else []
        if missing:
            parts.append(f"{missing} member(s) not in the endpoints")
        return DefragPlan((), f"cluster not healthy, skipped: {'; '.join(parts)}")
    leaders = [m for m in report.members if m.is_leader]
    if len(leaders) != 1:
        return DefragPlan((), "cluster not healthy, skipped: no single leader")
    followers = sorted(m.endpoint for m in report.members if not m.is_leader)
    return DefragPlan((*followers, leaders[0].endpoint))


@dataclass(frozen=True)
class OverQuota:
    endpoint: str
    db_size_bytes: int
    quota_bytes: int
    in_use_bytes: int | None = None

    @property
    def defrag_would_help(self) -> bool:
        """A defrag shrinks the file to about what is in use: worth another one only when that
        is under the quota (unknown: try)."""
        return self.in_use_bytes is None or self.in_use_bytes < self.quota_bytes


def over_quota(report: HealthReport) -> tuple[OverQuota, ...]:
    """The members whose database is at or over their quota. etcd judges its quota by the
    file's size, not by what is in use inside it: such a member raises NOSPACE again at its next
    write, whatever the alarm list says now. A member that reports no quota (etcd < 3.6) or no
    size is not judged."""
    return tuple(
        OverQuota(m.endpoint, m.db_size_bytes, m.db_size_quota_bytes, m.db_size_in_use_bytes)
        for m in report.members
        if m.db_size_bytes is not None
        and m.db_size_quota_bytes
        and m.db_size_bytes >= m.db_size_quota_bytes
    )


def short_of_room(report: HealthReport, room_bytes: int) -> tuple[OverQuota, ...]:
    """The members under their quota by no more than `room_bytes`. etcd takes a write only
    while the file's size plus the write's cost stays under the quota, and raises NOSPACE
    otherwise: such a member takes small writes but raises the alarm again at the first write
    costing `room_bytes`."""
    return tuple(
        OverQuota(m.endpoint, m.db_size_bytes, m.db_size_quota_bytes, m.db_size_in_use_bytes)
        for m in report.members
        if m.db_size_bytes is not None
        and m.db_size_quota_bytes
        and m.db_size_bytes < m.db_size_quota_bytes <= m.db_size_bytes + room_bytes
    )


@dataclass(frozen=True)
class RestoreStep:
    member: str
    data_dir: str
    argv: tuple[str, ...]


# Clients that ran through the restore saw revisions past the snapshot's. Without a bump the
# restored cluster hands those numbers out again: a watch resuming "after what it saw" would wait
# for a future revision and drop the new writes as already delivered. Bumped past anything seen
# and marked compacted, a resuming watch is told "compacted" and reloads the current state
# (etcd's own disaster-recovery advice; a billion is more writes than any snapshot age here).
RESTORE_REVISION_BUMP: Final = 1_000_000_000


def restore_plan(
    snapshot: str,
    members: Sequence[tuple[str, str]],
    *,
    data_dir: str,
    token: str,
    etcdutl: str = "etcdutl",
    own_volumes: bool = False,
) -> list[RestoreStep]:
    """One `etcdutl snapshot restore` per member of a fresh cluster: `members` are (name, peer
    URL) in cluster order, `data_dir` a path with `{name}` in it. Every member is restored from
    the same file with the same --initial-cluster and a token of its own, so the new cluster
    never mixes with a survivor of the old one. `own_volumes`: each line runs where only that
    member's volume is mounted, so one path without `{name}` is allowed."""
    if not members:
        raise MaintenanceError("a restore needs at least one member (name=peer URL)")
    # The chart's members all use /var/lib/etcd/data, each on its own PVC: a printed plan run
    # in one debug pod per member needs that path as it is. Run here, one path would be one
    # directory shared by every member.
    if "{name}" not in data_dir and len(members) > 1 and not own_volumes:
        raise MaintenanceError(
            "--data-dir must contain {name} with --run: each member needs its own directory"
        )
    names = [name for name, _ in members]
    if len(set(names)) != len(names):
        raise MaintenanceError(f"member names repeat: {', '.join(names)}")
    cluster = ",".join(f"{name}={url}" for name, url in members)
    steps = []
    for name, url in members:
        target = data_dir.replace("{name}", name)
        steps.append(
            RestoreStep(
                name,
                target,
                (
                    etcdutl,
                    "snapshot",
                    "restore",
                    snapshot,
                    f"--name={name}",
                    f"--initial-cluster={cluster}",
                    f"--initial-cluster-token={token}",
                    f"--initial-advertise-peer-urls={url}",
                    f"--data-dir={target}",
                    f"--bump-revision={RESTORE_REVISION_BUMP}",
                    "--mark-compacted",
                ),
            )
        )
    return steps


# --- procedures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupResult:
    path: str
    size_bytes: int
    revision: int
    member: str
    keys: int
    verified: tuple[str, ...]
    etcdutl_status: dict[str, Any] | None
    pruned: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def etcdutl_status(etcdutl: str, path: str) -> dict[str, Any]:
    """`etcdutl snapshot status -w json`: hash, revision, totalKey, totalSize of the file."""
    try:
        done = subprocess.run(
            [etcdutl, "snapshot", "status", "-w", "json", path],
            capture_output=True,
            text=True,
            timeout=_ETCDUTL_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SnapshotInvalidError(path, f"etcdutl could not run ({exc})") from exc
    if done.returncode != 0:
        raise SnapshotInvalidError(path, f"etcdutl snapshot status: {done.stderr.strip()}")
    try:
        status = json.loads(done.stdout)
    except ValueError as exc:
        raise SnapshotInvalidError(path, f"etcdutl printed no JSON ({exc})") from exc
    if not isinstance(status, dict):
        raise SnapshotInvalidError(path, "etcdutl printed no JSON object")
    return status


def verify_snapshot(
    path: str, *, etcdutl: str | None, min_revision: int = 0, min_keys: int = 0
) -> dict[str, Any]:
    """Check a snapshot file: the SHA-256 trailer always, and with `etcdutl` its revision (at
    least `min_revision`) and key count (at least `min_keys`). Returns etcdutl's status ({}
    without etcdutl)."""
    from ._store._maintenance import snapshot_hash_ok

    try:
        ok = snapshot_hash_ok(Path(path))
    except OSError as exc:
        raise SnapshotInvalidError(path, f"cannot read it ({exc.strerror or exc})") from exc
    if not ok:
        raise SnapshotInvalidError(path, "its SHA-256 trailer does not match its content")
    if etcdutl is None:
        return {}
    status = etcdutl_status(etcdutl, path)
    revision = int(status.get("revision", 0))
    # A cluster that never stored a key is at revision 1 while its file says 0.
    if revision < min_revision and not (revision == 0 and min_revision <= 1):
        raise SnapshotInvalidError(
            path, f"it holds revision {revision}, older than {min_revision} seen before it"
        )
    # totalKey counts key revisions in the file: at least one per key that was live when the
    # snapshot began.
    total = int(status.get("totalKey", 0))
    if total < min_keys:
        raise SnapshotInvalidError(
            path, f"etcdutl counts {total} key(s) in it, fewer than the {min_keys} stored"
        )
    return status


def take_backup(
    store: EtcdStore,
    directory: str | Path,
    *,
    keep: int,
    prefix: str,
    etcdutl: str | None = None,
    now: datetime | None = None,
) -> BackupResult:
    """Snapshot a serving member into `directory`, verify it, write a manifest beside it, then
    prune our snapshots beyond the newest `keep`. A file that fails its check is deleted (it
    must never be mistaken for a backup) and SnapshotInvalidError raised; older snapshots are
    then kept as they are."""
    if keep < 1:
        raise MaintenanceError("--keep must be at least 1")
    target = Path(directory)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MaintenanceError(f"cannot use {target}: {exc.strerror or exc}") from exc
    report = store.health()
    member = snapshot_member(report)
    if member is None:
        raise MaintenanceError(
            "no etcd member serves reads, no snapshot taken: "
            + "; ".join(f"{m.endpoint}: {m.error or 'down'}" for m in report.members)
        )
    keys = store.count_prefix(prefix)
    when = now or datetime.now(UTC)
    part = target / snapshot_name(when, 0)
    taken = store.snapshot(member.endpoint, str(part))
    final = target / snapshot_name(when, taken.revision)
    part.replace(final)
    try:
        if not taken.hash_ok:
            raise SnapshotInvalidError(str(final), "its SHA-256 trailer does not match")
        status = verify_snapshot(
            str(final), etcdutl=etcdutl, min_revision=taken.revision, min_keys=keys
        )
    except SnapshotInvalidError:
        final.unlink(missing_ok=True)
        raise
    verified = ("sha256", "etcdutl") if etcdutl else ("sha256",)
    result = BackupResult(
        path=str(final),
        size_bytes=taken.size_bytes,
        revision=int(status.get("revision", taken.revision)),
        member=member.name or member.endpoint,
        keys=keys,
        verified=verified,
        etcdutl_status=status or None,
    )
    manifest = final.with_suffix(".json")
    manifest.write_text(json.dumps(result.as_dict(), indent=2, sort_keys=True) + "\n")
    pruned = snapshots_to_prune([p.name for p in target.iterdir()], keep)
    for name in pruned:
        (target / name).unlink(missing_ok=True)
        (target / name).with_suffix(".json").unlink(missing_ok=True)
    return BackupResult(**{**result.as_dict(), "pruned": tuple(pruned)})


@dataclass(frozen=True)
class DefragStep:
    endpoint: str
    was_leader: bool
    db_size_before: int | None
    db_size_after: int | None


@dataclass(frozen=True)
class DefragResult:
    steps: tuple[DefragStep, ...] = ()
    skipped: str | None = None
    compacted_to: int | None = None
    disarmed: tuple[str, ...] = ()
    alarms_left: tuple[str, ...] = ()
    # Members still at or over their quota after every defrag (see over_quota).
    over_quota: tuple[str, ...] = ()
    # Members under their quota by no more than the `room_bytes` asked for (see short_of_room).
    short_of_room: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Waiter:
    timeout: float
    every: float = 0.5
    sleep: Callable[[float], None] = field(default=time.sleep)


def _wait_serving(store: EtcdStore, endpoint: str, wait: _Waiter) -> HealthReport:
    deadline = time.monotonic() + wait.timeout
    while True:
        report = store.health()
        if all(m.serving for m in report.members) and report.leader_id is not None:
            return report
        if time.monotonic() >= deadline:
            down = ", ".join(m.endpoint for m in report.members if not m.serving) or "no leader"
            raise MaintenanceError(
                f"after defragmenting {endpoint} the cluster did not serve again within"
                f" {wait.timeout:.0f}s ({down}); stopped before the next member"
            )
        wait.sleep(wait.every)


def _wait_compacted(store: EtcdStore, endpoint: str, revision: int, wait: _Waiter) -> None:
    deadline = time.monotonic() + wait.timeout
    while True:
        left = deadline - time.monotonic()
        try:
            store.wait_compacted(endpoint, revision, max(left, wait.every))
            return
        except StoreUnavailableError as exc:
            # A refused connection fails at once: try again until the deadline, not once.
            if time.monotonic() >= deadline:
                raise CompactionLagError(endpoint, revision, str(exc)) from exc
        wait.sleep(wait.every)


def _wait_disarmed(store: EtcdStore, wait: _Waiter) -> None:
    """Until no member reports NOSPACE any more. A disarm goes through the raft log like a
    write: a member that applies it late keeps listing the alarm (in `status`, and in an alarm
    GET, which the member the client reaches answers from its own state) after the member that
    served the disarm dropped it. So a listed alarm is "not yet" until `wait.timeout`, unless a
    member is over its quota again: then it was raised anew, and no wait will clear it."""
    deadline = time.monotonic() + wait.timeout
    while True:
        raised = tuple(f"{mid:x}" for mid, alarm in store.alarms() if alarm == "NOSPACE")
        report = store.health()
        behind = tuple(m.endpoint for m in report.members if "NOSPACE" in m.alarms)
        if not raised and not behind:
            return
        full = over_quota(report)
        if full:
            raise DefragIncompleteError(
                f"NOSPACE was raised again right after it was disarmed ({_sizes(full)}): a write"
                " needed more than the quota left; delete data or raise the quota",
                members=tuple(m.endpoint for m in full),
            )
        if time.monotonic() >= deadline:
            named = behind or tuple(f"member {member_id}" for member_id in raised)
            raise DefragIncompleteError(
                f"NOSPACE was disarmed, but {', '.join(named)} still report(s) it after"
                f" {wait.timeout:.0f}s: they have not applied the disarm, or a write raised it"
                " again; check their logs and `status`",
                members=behind or raised,
            )
        wait.sleep(wait.every)


def _sizes(members: Sequence[OverQuota]) -> str:
    return ", ".join(
        f"{m.endpoint} holds {m.db_size_bytes} bytes, quota {m.quota_bytes}" for m in members
    )


def defragment_cluster(
    store: EtcdStore,
    *,
    compact: bool = False,
    disarm_nospace: bool = False,
    settle_timeout: float = 60.0,
    room_bytes: int = 0,
    on_step: Callable[[DefragStep], None] | None = None,
) -> DefragResult:
    """Defragment every member, one at a time, followers first and the leader last; before each
    member the whole cluster must serve again (never two members blocked at once). Skipped,
    with the reason, while a member is down. `compact` first compacts to the current revision
    (what frees the space NOSPACE is about) and defragments each member only once it has applied
    that compaction (CompactionLagError when it has not within `settle_timeout`).

    A member still at or over its quota afterwards is defragmented once more. `disarm_nospace`
    then clears NOSPACE alarms and waits until no member reports it any more; a member still
    over its quota, the alarm back right after, or a member that still reports it after
    `settle_timeout` is a DefragIncompleteError, never a result that says no alarm is left.

    `room_bytes` is the largest write the caller expects (the envelope's request limit): a
    member left under its quota by no more than that takes small writes but raises NOSPACE again
    at such a write. It is defragmented once more when that would give the room, and reported
    in `short_of_room` otherwise (not an error: the cluster takes the writes that fit)."""
    report = store.health()
    plan = plan_defrag(report)
    if plan.refused is not None:
        return DefragResult(skipped=plan.refused, alarms_left=report.alarms)
    compacted: int | None = None
    if compact:
        compacted = store.current_revision()
        try:
            store.compact(compacted)
        except StoreError as exc:
            # Auto-compaction may already have compacted past it: nothing to do then.
            if "compacted" not in str(exc):
                raise
    by_endpoint = {m.endpoint: m for m in report.members}
    waiter = _Waiter(settle_timeout)
    steps: list[DefragStep] = []

    def defragment(endpoint: str) -> HealthReport:
        if compacted is not None:
            # The compaction above waited for the member that served it only. A member that
            # applies it after its defrag keeps a file as large as before (etcd frees pages
            # inside the file, never the file) and raises NOSPACE again at the next write.
            _wait_compacted(store, endpoint, compacted, waiter)
        before = by_endpoint[endpoint]
        store.defragment(endpoint)
        after_report = _wait_serving(store, endpoint, waiter)
        after = next((m for m in after_report.members if m.endpoint == endpoint), None)
        step = DefragStep(
            endpoint,
            before.is_leader,
            before.db_size_bytes,
            after.db_size_bytes if after is not None else None,
        )
        steps.append(step)
        if on_step is not None:
            on_step(step)
        return after_report

    for endpoint in plan.order:
        report = defragment(endpoint)
    # A compaction that reached a member after its defrag by another way than ours (an
    # auto-compaction in flight) leaves its file as large as before, the space free inside it.
    still = {m.endpoint for m in over_quota(report) if m.defrag_would_help}
    still |= {
        m.endpoint
        for m in short_of_room(report, room_bytes)
        if m.in_use_bytes is None or m.in_use_bytes + room_bytes < m.quota_bytes
    }
    if still:
        for endpoint in plan.order:
            if endpoint in still:
                report = defragment(endpoint)
    left_over = over_quota(report)
    disarmed: list[str] = []
    if disarm_nospace:
        if left_over:
            raise DefragIncompleteError(
                f"still at or over the quota after defragmentation: {_sizes(left_over)};"
                " NOSPACE not disarmed (it would come back at the next write): compact"
                " (--compact), delete data or raise the quota",
                members=tuple(m.endpoint for m in left_over),
            )
        for member_id, alarm in store.alarms():
            if alarm == "NOSPACE":
                store.disarm_alarm(member_id, alarm)
                disarmed.append(f"{member_id:x}")
        _wait_disarmed(store, waiter)
    left = tuple(sorted({alarm for _, alarm in store.alarms()}))
    return DefragResult(
        tuple(steps),
        None,
        compacted,
        tuple(disarmed),
        left,
        tuple(m.endpoint for m in left_over),
        tuple(m.endpoint for m in short_of_room(report, room_bytes)),
    )
