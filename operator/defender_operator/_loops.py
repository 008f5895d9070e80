"""The operator-wide background loops (one each per process, started by `handlers.startup`).

They run in every replica, also a paused peering standby: etcd health must be known before a
replica takes over, and rotation steps are safe to race (see `_rotation`).

Each loop handles the errors it expects (typed: the library's, the operator's) itself; a round
that fails with anything else is survived (`_Survive`): counted, logged, retried after a pause.
A loop that ends all the same is reported at once (`start`) and fails the liveness probe
(`ended`): a replica missing one would never again restore the keyring Secret or rotate keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Final, TypeVar

from defender_config import DefenderConfigError
from defender_operator import _crd_deletion, _keyguard, _rotation
from defender_operator._backend import EtcdHealth, InstanceRecord, InstanceWatching, Watching
from defender_operator._changes import ChangeView
from defender_operator._decisions.etcd import NOSPACE_ADVICE, nospace_change
from defender_operator._errors import OperatorError
from defender_operator._heartbeats import HeartbeatView
from defender_operator._keys import keyring_digest
from defender_operator._metrics import CHANGE_RESYNCS, ERRORS, HEARTBEAT_RESYNCS, LOOP_FAILURES
from defender_operator._runtime import Runtime, utcnow

log = logging.getLogger("defender_operator")

# The pause after a round failed unexpectedly, doubled for each such round in a row up to the
# cap: a failure that repeats every round (a bug) is not retried, and logged, in a tight loop.
_UNEXPECTED_PAUSE_SECONDS = 1.0
_UNEXPECTED_PAUSE_MAX_SECONDS = 60.0
# Innermost frames logged with an unexpected error: enough to find the call that failed.
_FRAMES_LOGGED = 6


class _Survive:
    """`async with` around one round of a loop: an Exception escaping the round is counted,
    logged and paused after, then the loop goes on. Cancellation passes (the operator stops).

    The log holds the error's class and where it was raised, never its message: nobody typed
    this error, so nothing says its text is free of key material."""

    def __init__(self, loop: str) -> None:
        self.loop = loop
        self.failures = 0  # unexpected failures in a row

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None:
            self.failures = 0
            return False
        if not isinstance(exc, Exception):
            return False
        self.failures += 1
        LOOP_FAILURES.labels(self.loop).inc()
        pause = min(
            _UNEXPECTED_PAUSE_SECONDS * 2 ** (self.failures - 1), _UNEXPECTED_PAUSE_MAX_SECONDS
        )
        log.error(
            "background loop %s: unexpected %s (%d in a row), retrying in %.0fs",
            self.loop,
            _kind(exc),
            self.failures,
            pause,
            extra={
                "loop": self.loop,
                "error_type": _kind(exc),
                "failures_in_a_row": self.failures,
                "at": _frames(tb),
            },
        )
        await asyncio.sleep(pause)
        return True


def _kind(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


def _frames(tb: TracebackType | None) -> list[str]:
    return [
        f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
        for frame in traceback.extract_tb(tb)[-_FRAMES_LOGGED:]
    ]


def start(rt: Runtime) -> list[asyncio.Task[None]]:
    """The operator-wide loops, as tasks that report it at once if they ever end."""
    tasks = [
        asyncio.create_task(etcd_health(rt), name="etcd-health"),
        asyncio.create_task(key_rotation(rt), name="key-rotation"),
        asyncio.create_task(heartbeat_watch(rt), name="heartbeat-watch"),
        asyncio.create_task(change_watch(rt), name="change-watch"),
        asyncio.create_task(registrations(rt), name="registrations"),
        asyncio.create_task(crd_deletion(rt), name="crd-deletion"),
    ]
    for task in tasks:
        task.add_done_callback(_report_end)
    return tasks


def _report_end(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return  # `stop`
    log.error(
        "background loop %s ended (%s); the liveness probe fails until the operator restarts",
        task.get_name(),
        _ending(task),
        extra={"loop": task.get_name(), "error_type": _ending(task)},
    )


def _ending(task: asyncio.Task[None]) -> str:
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return "returned" if exc is None else _kind(exc)


def ended(tasks: Iterable[asyncio.Task[None]]) -> list[str]:
    """The loops among `tasks` that are no longer running, each with how it ended. Every loop
    runs until `stop`: any other end leaves the replica half-alive."""
    return [f"{task.get_name()} ({_ending(task)})" for task in tasks if task.done()]


async def stop(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel the loops and wait until they are done. Never raises what a loop raised (its
    end was logged when it happened): what the caller does next must still run."""
    waited = list(tasks)
    for task in waited:
        task.cancel()
    await asyncio.gather(*waited, return_exceptions=True)


async def etcd_health(rt: Runtime) -> None:
    survive = _Survive("etcd-health")
    while True:
        async with survive:
            await _etcd_health_round(rt)
        await asyncio.sleep(rt.settings.etcd_health_interval_seconds)


async def _etcd_health_round(rt: Runtime) -> None:
    try:
        health = await asyncio.to_thread(rt.backend.health)
    except DefenderConfigError as exc:
        health = EtcdHealth(reachable=False, quorum=False, detail=str(exc))
    except Exception:
        # Unknown is not healthy: with the last reading kept, the key rotation and the monitor
        # would go on acting on an etcd nobody has looked at since. `_Survive` logs the error.
        failed = EtcdHealth(reachable=False, quorum=False, detail="the health check failed")
        rt.etcd.record(utcnow(), failed)
        raise
    was_ok = rt.etcd.last.reachable and rt.etcd.last.quorum
    alarms_before = rt.etcd.last.alarms
    rt.etcd.record(utcnow(), health)
    if (was_ok, alarms_before) != (health.reachable and health.quorum, health.alarms):
        # Every pass judges etcd's health (conditions, whether restarts may go ahead).
        rt.wake_all("etcd-health")
    await _tell_nospace(rt, alarms_before, health)
    now_ok = health.reachable and health.quorum
    if was_ok != now_ok:
        log.log(
            logging.INFO if now_ok else logging.WARNING,
            "defender etcd %s: %s",
            "healthy" if now_ok else "UNHEALTHY",
            health.detail,
        )


async def _tell_nospace(rt: Runtime, before: tuple[str, ...], health: EtcdHealth) -> None:
    """An Event on every DefenderComponent and an alert per component when NOSPACE starts and
    when it ends. The alert written while NOSPACE lasts is refused by etcd (it only reaches the
    logs); the one at the end reaches `<prefix>/alerts/`, so rag learns of the outage."""
    change = nospace_change(before, health.alarms)
    if change is None:
        return
    try:
        if change == "raised":
            log.error("defender etcd NOSPACE alarm: writes refused; %s", NOSPACE_ADVICE)
            await _keyguard._tell(
                rt,
                "Warning",
                "EtcdNoSpace",
                f"defender etcd raised NOSPACE: every write is refused; {NOSPACE_ADVICE}",
                alert=True,
            )
        else:
            log.info("defender etcd NOSPACE alarm cleared: writes accepted again")
            await _keyguard._tell(
                rt,
                "Normal",
                "EtcdSpaceRecovered",
                "defender etcd NOSPACE alarm cleared: writes are accepted again (commits and"
                " heartbeats that failed meanwhile are retried by their writers)",
                alert=True,
            )
    except (DefenderConfigError, OperatorError) as exc:
        ERRORS.labels("etcd_alarm_event").inc()
        log.warning("could not post the NOSPACE event: %s", exc)


# A stream silent for this many progress intervals stalled: the watch asks after one, and
# etcd answers within a round trip (later only while a watch on the stream catches up, and
# what it then sends is an answer too).
_SILENT_ROUNDS = 3
# ... and is replaced by the library one interval later: a view stops trusting a stalled
# stream before the replacement, not in a race with it (equal bounds left a view trusted
# across a whole stall whenever the replacement came between two of its judgements).
_STALL_ROUNDS = _SILENT_ROUNDS + 1
# How often a view whose stream was judged not live is judged again (`_until_resync`).
_RELOOK_SECONDS: Final = 0.1
# How long a new watch's first progress answer is waited for before its first resync, and how
# often it is looked for meanwhile (`_start_watch`).
_VOUCH_WAIT_SECONDS: Final = 2.0
_VOUCH_POLL_SECONDS: Final = 0.02
_W = TypeVar("_W", InstanceWatching, Watching)


async def _start_watch(
    view: HeartbeatView | ChangeView,
    start: Callable[..., _W],
    on_event: Callable[..., None],
    on_error: Callable[[Exception], None],
    progress: float | None,
) -> _W:
    """Create a view's watch (`start`: the backend's watch call) and tell the view how its
    stream's silence is judged."""
    handle = await asyncio.to_thread(
        start,
        on_event,
        on_error,
        progress_seconds=progress,
        stall_seconds=progress and _STALL_ROUNDS * progress,
    )
    if progress is not None:
        view.listen(handle.silent_seconds, _SILENT_ROUNDS * progress)
        # A new watch is vouched for once etcd answered a progress request after catching it
        # up (a few hundred ms): waited for here, so the resync that follows is trusted as
        # soon as it is done instead of at the next judgement.
        end = asyncio.get_running_loop().time() + _VOUCH_WAIT_SECONDS
        while handle.silent_seconds() is None and asyncio.get_running_loop().time() < end:
            await asyncio.sleep(_VOUCH_POLL_SECONDS)
    view.watching = True
    return handle


async def heartbeat_watch(rt: Runtime) -> None:
    """One watch on every instance key feeding `rt.heartbeats`, plus a full re-read every
    heartbeat_resync_seconds (sooner after the watch reported an outage)."""
    loop = asyncio.get_running_loop()
    view = rt.heartbeats

    def on_event(component: str, instance: str, record: InstanceRecord | None) -> None:
        loop.call_soon_threadsafe(view.apply, utcnow(), component, instance, record)

    def on_error(exc: Exception) -> None:
        log.warning("heartbeat watch interrupted, it reconnects by itself: %s", exc)
        loop.call_soon_threadsafe(view.watch_failed)

    handle: InstanceWatching | None = None
    survive = _Survive("heartbeat-watch")
    progress = rt.settings.heartbeat_watch_progress_seconds or None
    told_live = True
    try:
        while True:
            wait = rt.settings.heartbeat_resync_seconds
            async with survive:
                try:
                    if handle is None:
                        handle = await _start_watch(
                            view, rt.backend.watch_instances, on_event, on_error, progress
                        )
                    since = view.begin_resync()
                    listing = await asyncio.to_thread(rt.backend.all_instances)
                    view.resync(utcnow(), since, listing)
                    view.judge_stream()
                    HEARTBEAT_RESYNCS.inc()
                except (DefenderConfigError, OperatorError) as exc:
                    ERRORS.labels("heartbeat_resync").inc()
                    log.warning("heartbeat watch/resync failed, retrying: %s", exc)
                    wait = min(wait, rt.settings.etcd_health_interval_seconds)
            if survive.failures:
                wait = min(wait, rt.settings.etcd_health_interval_seconds)
            # Looked at twice per progress interval: a stall is judged within 3.5 of them.
            told_live = await _until_resync(
                view, wait, progress and progress / 2, told_live, _HEARTBEAT_STREAM
            )
    finally:
        view.watching = False
        if handle is not None:
            await asyncio.to_thread(handle.cancel)


# How each loop's stream is named in its logs, and what its stall costs meanwhile.
_HEARTBEAT_STREAM: Final = (
    "heartbeat",
    "monitors read heartbeats from etcd and plan deadline passes until it answers",
)
_CHANGE_STREAM: Final = (
    "component change",
    "monitor passes read etcd instead of reusing their views until it answers",
)


async def _until_resync(
    view: HeartbeatView | ChangeView,
    wait: float,
    every: float | None,
    told_live: bool,
    stream: tuple[str, str],
) -> bool:
    """Until the next resync: `wait` seconds, or sooner when one is requested. With `every`,
    whether the watch's stream is live is judged that often meanwhile (`judge_stream`), and a
    change is logged (`told_live`: what was logged last; returned updated; `stream`: the
    watch's name in the log and what the stall costs): a stream stalled without an error is
    otherwise seen only in the direct reads it costs. Judged not live, it is judged again
    every `_RELOOK_SECONDS`: a watch just created (or created again) is vouched for within a
    few hundred ms (`WatchHandle.silent_seconds`), and until it is judged so every pass reads
    etcd."""
    loop = asyncio.get_running_loop()
    end = loop.time() + wait
    while True:
        left = end - loop.time()
        if left <= 0:
            return told_live
        step = every if view.live or not every else min(every, _RELOOK_SECONDS)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                view.resync_requested.wait(), timeout=min(left, step) if step else left
            )
            return told_live
        live = view.judge_stream()
        silent = view.silent_for()
        # Between streams (None) is an outage the watch reports itself, or a moment's
        # reconnection: only a stream that is up and silent is told.
        if live == told_live or silent is None:
            continue
        told_live = live
        if live:
            log.info(
                "%s watch stream answers again",
                stream[0],
                extra={"silent_seconds": round(silent, 1)},
            )
        else:
            log.warning(
                "%s watch stream silent for %.0fs (no event, no progress answer): %s",
                stream[0],
                silent,
                stream[1],
                extra={"silent_seconds": round(silent, 1)},
            )


# While the change watch is (re)connecting: how often to look whether it is up. No etcd call.
_CONNECT_POLL_SECONDS = 0.5


async def change_watch(rt: Runtime) -> None:
    """One watch on every key a monitor pass reads, feeding `rt.changes`; a resync (etcd's
    current revision, once the watch is connected) at start and after every reported outage
    or compaction. No periodic resync: the watch misses nothing it does not report, and the
    monitor's own bound (monitor_full_read_seconds) caps the age of a reused view. A stream
    that stalls reports nothing: as for the heartbeat watch, it asks for progress while idle,
    and the view is not trusted while its stream is silent past three progress intervals
    (judged twice per interval); the library replaces such a stream, resuming where it
    stopped, so no resync is needed once it answers."""
    loop = asyncio.get_running_loop()
    view = rt.changes

    def on_change(component: str, revision: int, replayed: bool) -> None:
        loop.call_soon_threadsafe(view.apply, component, revision, replayed)

    def on_error(exc: Exception) -> None:
        log.warning("component change watch interrupted, it reconnects by itself: %s", exc)
        loop.call_soon_threadsafe(view.watch_failed)

    handle: Watching | None = None
    survive = _Survive("change-watch")
    progress = rt.settings.heartbeat_watch_progress_seconds or None
    told_live = True
    try:
        while True:
            # Nothing to do until the watch reports trouble.
            wait: float = rt.settings.heartbeat_resync_seconds
            async with survive:
                try:
                    if handle is None:
                        handle = await _start_watch(
                            view, rt.backend.watch_changes, on_change, on_error, progress
                        )
                    if not view.synced:
                        if handle.connected:
                            since = view.begin_resync()
                            revision = await asyncio.to_thread(rt.backend.revision)
                            # The watch delivers every change after `revision` (it resumes
                            # where it stopped; a gap makes it replay, which asks for another
                            # resync).
                            if view.resync(since, revision):
                                CHANGE_RESYNCS.inc()
                        else:
                            # Events after an outage come once it is up again: trust it from
                            # then. (Still unsynced, so the next round tries again: no request
                            # is lost.)
                            view.resync_requested.clear()
                            wait = _CONNECT_POLL_SECONDS
                    view.judge_stream()
                except (DefenderConfigError, OperatorError) as exc:
                    ERRORS.labels("change_resync").inc()
                    log.warning("component change watch/resync failed, retrying: %s", exc)
                    wait = min(wait, rt.settings.etcd_health_interval_seconds)
            if survive.failures:
                wait = min(wait, rt.settings.etcd_health_interval_seconds)
            told_live = await _until_resync(
                view, wait, progress and progress / 2, told_live, _CHANGE_STREAM
            )
    finally:
        view.watching = False
        if handle is not None:
            await asyncio.to_thread(handle.cancel)


def _key_facts(rt: Runtime) -> tuple[bool, str, str | None, dict[str, str | None]]:
    held = rt.keyring.peek()
    return (
        rt.keyring_ready,
        rt.rotation_stage,
        keyring_digest(held) if held is not None else None,
        rt.secrets.known_copy_digests(),
    )


async def key_rotation(rt: Runtime) -> None:
    ticks = 0
    survive = _Survive("key-rotation")
    while True:
        before = _key_facts(rt)
        async with survive:
            try:
                # The keyring is checked first: a deleted or replaced source Secret is judged
                # (restored, or refused) before a rotation step could act on it.
                etcd_ok = rt.etcd.last.reachable and rt.etcd.last.quorum
                judged = await _keyguard.settle_source(rt) if etcd_ok else None
                if judged is not None:
                    await _rotation.step(rt, judged)
                if ticks % 6 == 0 and rt.keyring_ready:
                    # Keep copies in sync even if someone edited or deleted one.
                    await _rotation.fan_out_everywhere(rt, rt.keyring.current())
            except (DefenderConfigError, OperatorError) as exc:
                ERRORS.labels("rotation").inc()
                log.warning("key rotation step failed, retrying: %s", exc)
        after = _key_facts(rt)
        if after[2] != before[2]:
            # Records were verified with the keyring held when read (none before it was
            # loaded): read them all again with this one.
            rt.heartbeats.reverify()
        if after != before:
            # Every pass judges the keyring (KeyCurrent, the rotation stage it publishes).
            rt.wake_all("keyring")
        ticks += 1
        await asyncio.sleep(rt.settings.rotation_interval_seconds)


async def crd_deletion(rt: Runtime) -> None:
    """Apply the retention kopf cannot while the DefenderComponent CRD is being deleted
    (`_crd_deletion`): without it, `kubectl delete crd` waits for good on every Purge resource."""
    survive = _Survive("crd-deletion")
    while True:
        await asyncio.sleep(rt.settings.monitor_interval_seconds)
        async with survive:
            await _crd_deletion.finalize_round(rt)


async def registrations(rt: Runtime) -> None:
    """Publish the registration each component's status anchors to the keyring Secret its
    readers mount (`KeyringSecrets.publish_registrations`): a reader started after an earlier
    registration's data was put back in etcd is told the current one and refuses it.

    Off the create path: a batch of new components in a namespace is one Secret write a round.
    A replica paused by peering monitors no component, so it publishes nothing."""
    survive = _Survive("registrations")
    while True:
        await asyncio.sleep(rt.settings.registrations_publish_seconds)
        async with survive:
            if not rt.keyring_ready or rt.keyring_refused is not None:
                continue
            await publish_registrations(rt)


async def publish_registrations(rt: Runtime) -> None:
    """One round of `registrations`: every namespace with a component known or deleted."""
    known = rt.anchored_registrations()
    removed = {ns: frozenset(names) for ns, names in rt.registrations_removed.items()}
    for namespace in sorted(known.keys() | removed.keys()):
        gone = removed.get(namespace, frozenset())
        try:
            await asyncio.to_thread(
                rt.secrets.publish_registrations,
                namespace,
                known.get(namespace, {}),
                gone,
                max_age=rt.settings.secret_copy_check_seconds,
            )
        except OperatorError as exc:
            ERRORS.labels("registrations").inc()
            log.warning("publishing registrations to %s failed, retrying: %s", namespace, exc)
            continue
        # Dropped (or never there): only the names this round saw; a deletion seen meanwhile
        # waits for the next round.
        left = rt.registrations_removed.get(namespace)
        if left is not None:
            left -= gone
            if not left:
                del rt.registrations_removed[namespace]
