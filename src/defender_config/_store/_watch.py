"""Watches that survive a member dying: re-created from the next revision on another endpoint."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from pyetcd import exceptions as etcd_exc
from pyetcd import utils as etcd_utils

from .._errors import StoreError
from .._store_types import (
    WatchEvent,
    backoff_delay,
)
from ._pyetcd import _event, _stored
from ._rules import _details, _is_compacted

if TYPE_CHECKING:
    from ._etcd_store import EtcdStore

log = logging.getLogger("defender_config.store")

_Item = tuple[int, Any]  # (generation, pyetcd WatchResponse | exception | None | _STOP)
_STOP: Final = object()
# A stream silent this many progress intervals stalled (when no `stall_seconds` is given): the
# watch asks after one, and etcd answers within a round trip (later only while a watch on the
# stream catches up, and what it then sends is an answer too).
STALL_ROUNDS: Final = 3
# How often a watch not yet proven caught up on its stream asks for progress (`_vouched`), at
# first: etcd answers none while a watch on the stream is still being caught up (a new watch is
# for its first ~100 ms), and an unanswered request is not answered later.
_PROOF_RETRY_SECONDS: Final = 0.1
# How many of those asks come `_PROOF_RETRY_SECONDS` apart before they back off
# (`proof_retry_seconds`): one second, ten of etcd's catch-up rounds (100 ms, up to 512 watches
# each), past what even thousands of watches reconnecting together take. An answer still not
# come is one etcd withholds until something is written (a watch started past its current
# revision), and asking ten times a second would cost as many messages for nothing.
_PROOF_FAST_ASKS: Final = 10
# Doublings past this are capped by any interval a watch could use anyway (0.1 s * 2**30 is
# three years), and 2.0 ** n overflows a float past ~1000: a quarter of an hour of asks left
# unanswered at a 1 s interval.
_PROOF_MAX_DOUBLINGS: Final = 30


def proof_retry_seconds(asked: int, progress_seconds: float) -> float:
    """How long a watch not yet proven caught up on its stream waits before its next progress
    request, having sent `asked` unanswered since it was (re)created there: `_PROOF_RETRY_SECONDS`
    for the first `_PROOF_FAST_ASKS` (a new watch is answered within a few hundred ms, and the
    operator's start-up waits for that answer), then twice as long each time, up to
    `progress_seconds` (what an idle proven watch asks at anyway)."""
    if asked < _PROOF_FAST_ASKS:
        return _PROOF_RETRY_SECONDS
    doublings = min(asked - _PROOF_FAST_ASKS + 1, _PROOF_MAX_DOUBLINGS)
    return min(max(_PROOF_RETRY_SECONDS, progress_seconds), _PROOF_RETRY_SECONDS * 2.0**doublings)


class WatchHandle:
    """A running watch. Call `cancel()` (or the handle itself) to stop it."""

    def __init__(
        self,
        store: EtcdStore,
        key: str,
        prefix: bool,
        callback: Callable[[WatchEvent], None],
        start_revision: int,
        on_error: Callable[[StoreError], None] | None,
        prev_kv: bool,
        progress_seconds: float | None = None,
        stall_seconds: float | None = None,
    ) -> None:
        self._store = store
        self._progress_seconds = progress_seconds
        # Silent longer than this, the stream stalled and is replaced (`_replace_stalled`).
        # Only a watch that asks for progress can tell a stall from quiet: an idle stream that
        # is never asked answers nothing, however well it works.
        self._stall_seconds: float | None = None
        if progress_seconds is not None:
            self._stall_seconds = (
                stall_seconds if stall_seconds is not None else STALL_ROUNDS * progress_seconds
            )
        self.key = key
        self._range_end = etcd_utils.prefix_range_end(key.encode()) if prefix else None
        self._callback = callback
        self._on_error = on_error
        self._prev_kv = prev_kv
        self.next_revision = start_revision
        self.restarts = 0
        # The store's count of cluster changes this watch's revisions belong to, and whether a
        # change seen after a lost stream still needs the current state handed out.
        self._cluster_changes = store.cluster_changes
        self._cluster_resync = False
        # Keys this watch handed out as present (put, not deleted since): a resync tells the
        # callback which of them are gone, as a delete, since the gap's own deletes are lost.
        self._present: set[str] = set()
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._generation = 0
        self._watch_id: int | None = None
        self._watcher: Any = None
        # When the watch running now was created (time.monotonic): a progress answer after it
        # proves it caught up (`silent_seconds`).
        self._established_at = 0.0
        # The `_established_at` a progress answer proved caught up (`silent_seconds`).
        self._proven_for: float | None = None
        self._asked_at = 0.0  # when `_ask_progress` last asked (time.monotonic)
        # Progress requests sent unanswered since the watch running now was created, while it
        # was not yet vouched for: how far its asks have backed off (`proof_retry_seconds`).
        self._proof_asks = 0
        # Whether the watch running now was created one revision early (`_establish`), and
        # whether the next creation may not be (that revision was compacted).
        self._started_before = False
        self._exact_next = False
        self._stopped = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"defender-watch:{key}", daemon=True)

    def _start(self) -> None:
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def silent_seconds(self) -> float | None:
        """Seconds since the stream this watch is on last answered anything (an event of any
        watch on it, a creation, a progress answer); None while the watch is not on a stream
        (not established yet, or between streams after an outage) and, with
        `progress_seconds`, until the stream has answered a progress request since this watch
        was created on it.

        With `progress_seconds`, a stream that works never stays silent much longer than that:
        the watch asks etcd for progress whenever it has been. More silence than that says the
        stream stalled without an error (a wedged member, a proxy holding it open), which
        neither etcd nor gRPC reports: events that should come do not. Past the stall bound
        the watch gives the stream up and resumes on a new one (`_replace_stalled`).

        Why the wait for a progress answer: a watch created again on a new stream (after a
        stall or an outage) first catches up on the events written meanwhile, and etcd answers
        progress only once it has been sent them; before that, a short silence would vouch for
        a view that still lacks them."""
        watcher = self._watcher
        if watcher is None or not self._connected.is_set() or not self._vouched(watcher):
            return None
        return self._heard_silence(watcher)

    def _vouched(self, watcher: Any) -> bool:
        """Whether the stream answered a progress request since this watch was created on it
        (always, without `progress_seconds`), and what it queued before that answer has
        reached the callback: nothing queued is left unhandled (a busy stream may take a few
        looks to show that). Once true, true until the watch is created again."""
        established = self._established_at
        if self._progress_seconds is None or self._proven_for == established:
            return True
        proven: float | None = watcher.progress_at
        if proven is None or proven < established or self._queue.unfinished_tasks:
            return False
        self._proven_for = established
        return True

    @staticmethod
    def _heard_silence(watcher: Any) -> float:
        heard: float = watcher.heard_at
        return max(0.0, time.monotonic() - heard)

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` for `cancel()`; True once cancelled (for a callback that waits
        on the watch's own thread, so a cancel ends its wait)."""
        return self._stopped.wait(timeout)

    def cancel(self) -> None:
        """Stop the watch; no callback runs after this returns (unless called from one)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._queue.put((self._generation, _STOP))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        self._store._forget(self)

    __call__ = cancel

    # The thread: (re)establish the watch, then dispatch what pyetcd's watcher thread queued.
    def _run(self) -> None:
        failures = 0
        reported = False
        store = self._store
        while not self._stopped.is_set():
            if self._watch_id is None:
                try:
                    if self._cluster_resync or (self.restarts and self._cluster_moved()):
                        self._cluster_resync = not self._resync()
                        continue
                    self._establish()
                except StoreError as exc:
                    if _is_compacted(exc):
                        if not self._only_before_compacted(exc.__cause__):
                            self._resync()
                        continue
                    if not reported and self._on_error is not None:
                        reported = True
                        _safe(self._on_error, exc)
                    delay = backoff_delay(
                        failures,
                        store.settings.backoff_base_seconds,
                        store.settings.backoff_max_seconds,
                        store._rng,
                    )
                    failures += 1
                    log.warning(
                        "watch on %s not established (%s); retry in %.2fs", self.key, exc, delay
                    )
                    self._stopped.wait(delay)
                    continue
                if reported or failures:
                    log.info(
                        "watch on %s re-established at revision %d", self.key, self.next_revision
                    )
                failures = 0
                reported = False
            unvouched = self._progress_seconds is not None and not self._vouched(self._watcher)
            try:
                generation, item = self._queue.get(timeout=self._wait_seconds())
            except queue.Empty:
                self._idle()
                continue
            try:
                if not self._take(generation, item):
                    break
            finally:
                # Counted as handled only once its callbacks ran (`silent_seconds`).
                self._queue.task_done()
            if unvouched:
                self._ask_progress()  # a busy stream is not idle long enough to time out
        self._cancel_server_watch()
        self._connected.clear()

    def _wait_seconds(self) -> float | None:
        """How long the loop waits for the next item before `_idle` (None: for ever, when no
        progress is asked): the progress interval, and for a watch not yet vouched for, until
        its next ask is due (`proof_retry_seconds`)."""
        seconds = self._progress_seconds
        if seconds is None or self._vouched(self._watcher):
            return seconds
        return max(0.0, self._proof_due_in(seconds, time.monotonic()))

    def _proof_due_in(self, seconds: float, now: float) -> float:
        """Seconds from `now` until a watch not yet vouched for asks again (due at 0 or less).
        One expression for the wait and the ask, so a wait that ends when the ask is due finds
        it due, not a rounding error short of it."""
        return self._asked_at + proof_retry_seconds(self._proof_asks, seconds) - now

    def _idle(self) -> None:
        """Nothing came for `_wait_seconds`: give the stream up if it stalled, else ask."""
        if not self._replace_stalled():
            self._ask_progress()

    def _take(self, generation: int, item: Any) -> bool:
        """Handle one queued item; False when it says stop."""
        if item is _STOP:
            return False
        if generation != self._generation:
            return True  # leftovers of a stream that was already replaced
        if isinstance(item, etcd_exc.RevisionCompactedError):
            self._lost_stream(item)
            if not self._only_before_compacted(item):
                self._resync()
            return True
        if item is None or isinstance(item, BaseException):
            self._lost_stream(item)
            return True
        self._dispatch(item)
        return True

    def _establish(self) -> None:
        self._generation += 1
        generation = self._generation

        def enqueue(response: Any) -> None:
            self._queue.put((generation, response))

        # From the revision before the next one wanted (its events, delivered already, are
        # dropped by `_dispatch`'s floor): etcd withholds progress answers from a stream while
        # any watch on it starts past its current revision (`progressIfSync`: "rev <
        # w.startRev"), and the next revision wanted is past it until anything is written.
        # One watch created that way left every idle stream it shared without an answer.
        self._started_before = self.next_revision > 1 and not self._exact_next
        self._exact_next = False
        start = self.next_revision - 1 if self._started_before else self.next_revision
        self._watcher, self._watch_id = self._store._call(
            "watch",
            lambda c: c.add_watch(
                self.key,
                enqueue,
                range_end=self._range_end,
                start_revision=start,
                prev_kv=self._prev_kv,
            ),
            path=self.key,
            retry=False,
        )
        self._established_at = time.monotonic()
        # A new creation is caught up afresh: its first asks come fast again.
        self._asked_at, self._proof_asks = self._established_at, 0
        self._connected.set()

    def _only_before_compacted(self, error: BaseException | None) -> bool:
        """Whether `error`, etcd's "compacted", took only the revision before the next one
        this watch wants, where `_establish` started it: nothing it needs is gone, and the next
        creation starts at the next revision instead of re-reading the prefix."""
        if not self._started_before or not isinstance(error, etcd_exc.RevisionCompactedError):
            return False
        if int(error.compacted_revision) > self.next_revision:
            return False
        self._exact_next = True
        return True

    def _ask_progress(self) -> None:
        """Nothing came for this watch for `progress_seconds`: unless its stream answered
        meanwhile (another watch's events), ask etcd to say it is there (`silent_seconds`).
        Until an answer has proven the watch caught up since it was created on the stream,
        asked on `proof_retry_seconds`' schedule however busy or idle the stream is."""
        watcher, seconds = self._watcher, self._progress_seconds
        if watcher is None or seconds is None:
            return
        now = time.monotonic()
        if self._vouched(watcher):
            if now - watcher.heard_at < seconds / 2:
                return
        elif self._proof_due_in(seconds, now) > 0:
            return
        else:
            self._proof_asks += 1
        self._asked_at = now
        watcher.request_progress()

    def _replace_stalled(self) -> bool:
        """Whether the stream this watch is on was silent past the stall bound, and so given up:
        it answered no progress request, though it reported no error (a wedged member, a proxy
        holding it open: gRPC's keep-alive pings may be answered for minutes). The store drops
        it (its member is avoided for a while) and every watch on it resumes on a new stream
        from the revision after the last event it delivered, as after a broken one; so does
        this watch, at once (`_lost_stream`: `_establish` and `_dispatch` see to it that
        nothing is lost or delivered twice). One warning and one count per stream given up:
        a watch that finds it given up already by another on it only resumes."""
        watcher, bound = self._watcher, self._stall_seconds
        if watcher is None or not self._connected.is_set() or bound is None:
            return False
        # Heard at all, not proven caught up (`silent_seconds`): a stream busy sending a new
        # watch its catch-up answers, and a stall is silence.
        silent = self._heard_silence(watcher)
        if silent <= bound:
            return False
        if self._store._drop_stream(watcher):
            self._store.metrics.watch_stalls.inc()
            log.warning(
                "watch stream on %s silent for %.1fs (no event, no progress answer), over the"
                " %.1fs bound: replaced, resuming from revision %d",
                self.key,
                silent,
                bound,
                self.next_revision,
                extra={"silent_seconds": round(silent, 1)},
            )
            self._leave_stream()
        else:
            self._lost_stream("stalled stream replaced")
        return True

    def _cancel_server_watch(self) -> None:
        # Cancel on the stream the watch was created on: watch ids are per stream, so the same
        # id on a newer stream (after a failover) may belong to another watch.
        watcher, watch_id = self._watcher, self._watch_id
        self._watcher, self._watch_id = None, None
        if watcher is not None and watch_id is not None:
            try:
                watcher.cancel(watch_id)
            except Exception as exc:  # the stream may already be gone: nothing to cancel
                log.debug("watch cancel of %s: %s", self.key, exc)

    def _lost_stream(self, why: Any) -> None:
        self._leave_stream()
        log.info(
            "watch stream on %s ended (%s); resuming from revision %d",
            self.key,
            _details(why) if isinstance(why, BaseException) else why or "closed",
            self.next_revision,
        )

    def _leave_stream(self) -> None:
        """Off the stream: the loop creates the watch again from `next_revision`. What the old
        stream still delivers is dropped (`_establish` starts a new generation)."""
        self._watcher, self._watch_id = None, None
        self._connected.clear()
        self.restarts += 1
        self._store.metrics.watch_restarts.inc()

    def _cluster_moved(self) -> bool:
        """After a lost stream: whether etcd now answers as another cluster (restored from a
        snapshot). Its revisions are not this watch's: resuming "after the last one seen" could
        wait for one the new cluster hands out much later, or drop its writes as delivered
        (when the restore bumped them past, etcd says "compacted" anyway; not when the same
        snapshot is restored twice). One read asks; StoreError as for establishing the watch."""
        self._store.current_revision(self.key)
        changes = self._store.cluster_changes
        if changes == self._cluster_changes:
            return False
        self._cluster_changes = changes
        log.info("watch on %s: etcd is another cluster now; handing out its state", self.key)
        return True

    def _resync(self) -> bool:
        """The revision to resume from was compacted (or is another cluster's): hand out the
        current state instead, a delete for each key handed out before that is gone, then a put
        for each key there. False when it could not be read (waited a little)."""
        try:
            if self._range_end is None:
                response = self._store._call(
                    "list", lambda c: c.range(self.key.encode(), None), path=self.key
                )
                values, revision = [_stored(kv) for kv in response.kvs], response.header.revision
            else:
                values, revision = self._store._list(self.key)
        except StoreError as exc:
            log.warning("watch resync of %s failed: %s", self.key, exc)
            self._stopped.wait(self._store.settings.backoff_base_seconds)
            return False
        if not revision:
            # Served from the stale cache: no revision to resume from. Try again later.
            self._stopped.wait(self._store.settings.backoff_base_seconds)
            return False
        self._watcher, self._watch_id = None, None
        listed = {v.key for v in values}
        for key in gone_since(self._present, listed):
            if self._stopped.is_set():
                return True
            # Deleted at or before the listing's revision; exactly when is lost with the gap.
            gone = WatchEvent(
                kind="delete",
                key=key,
                value=b"",
                mod_revision=int(revision),
                version=0,
                resync=True,
            )
            _safe(self._callback, gone)
        self._present = listed
        for v in values:
            if self._stopped.is_set():
                return True
            event = WatchEvent(
                kind="put",
                key=v.key,
                value=v.value,
                mod_revision=v.mod_revision,
                version=v.version,
                lease_id=v.lease_id,
                resync=True,
            )
            _safe(self._callback, event)
        self.next_revision = int(revision) + 1
        return True

    def _dispatch(self, response: Any) -> None:
        self._store.observe_cluster(response.header.cluster_id)
        delivered = False
        # Every key of one transaction shares one revision and arrives in one response: compare
        # against the floor as it was before this response, else only the first key gets through.
        floor = self.next_revision
        for raw in response.events:
            if self._stopped.is_set():
                return
            event = _event(raw)
            if event.mod_revision < floor:
                continue  # already delivered before the stream was re-created
            self.next_revision = max(self.next_revision, event.mod_revision + 1)
            if event.kind == "put":
                self._present.add(event.key)
            else:
                self._present.discard(event.key)
            delivered = True
            _safe(self._callback, event)
        if not delivered and not response.events:
            # A progress notification: nothing changed up to the header revision.
            self.next_revision = max(self.next_revision, int(response.header.revision) + 1)


def gone_since(present: set[str], listed: set[str]) -> list[str]:
    """The keys handed out as present that a listing no longer holds, in key order (the order a
    listing hands out its puts)."""
    return sorted(present - listed)


def _safe(fn: Callable[[Any], None], arg: Any) -> None:
    try:
        fn(arg)
    except Exception:
        log.exception("watch callback %r failed; the watch goes on", fn)
