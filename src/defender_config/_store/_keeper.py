"""The keep-alive keeper: one thread per store renews every kept lease on a shared tick.

A lease renewed by its owner's own thread costs that thread a wake-up per beat, and the answer
(a Future resolved on the stream's reader thread) wakes it again: with a hundred heartbeaters in
a process those wake-ups cost more CPU than the keep-alive itself. A kept lease costs its owner
nothing per beat: the keeper thread wakes once per tick (`_keeper_schedule.tick_seconds`: short
enough that a tick sends some tens of leases, not hundreds), puts every lease that is due on
the store's shared LeaseKeepAlive stream in one burst, and the stream's reader thread records
each answer (`on_renewed`). The owner's thread sleeps until it is needed.

The keeper hands a lease back (removes it and calls `on_lost` once, from whichever thread
noticed) when it cannot vouch for it: the answer says TTL 0 (expired), the stream failed, no
answer came within the request timeout (the stream is reset, as `KeepAliveMux.refresh` does), no
stream could be opened, a tick failed (a bug), or the store was closed. The owner then renews
on its own, through the store's retry loop, and counts and backs off from failures as it would
without a keeper; once it succeeded it hands the lease to the keeper again. Nothing here
waits on etcd, so a failure never blocks the keeper or an owner.

Callbacks run on the stream's reader thread (or on the keeper's, or on a thread that failed the
stream): they must be quick and must not call back into the keeper while holding their own
locks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from itertools import count
from typing import Final, Literal

import grpc

from .._errors import StoreError
from .._store_types import StoreMetrics
from ._keepalive import KeepAliveMux, _Failure, _Stream
from ._keeper_schedule import DueSchedule, IntervalCounts, next_due, next_wake, tick_seconds
from ._pyetcd import _SharedClient

log = logging.getLogger("defender_config.store")

# Why a lease was handed back: the `reason` label of the handbacks counter (a fixed set).
HandBack = Literal[
    "expired", "stream_failed", "timeout", "no_stream", "closed", "tick_failed", "keeper_ended"
]

# After a timed-out stream was reset, how long its unanswered keep-alives may still be resolved
# by another thread (an answer or the reset's failure on its way) before they are handed back.
_SETTLE_SECONDS: Final = 1.0

# After a tick failed (a bug), how long `keep` refuses leases: their owners renew on their own
# at their interval meanwhile, instead of handing over, being handed back by the next failing
# tick and beating again at once, every tick.
_COOL_DOWN_SECONDS: Final = 30.0

OnRenewed = Callable[[int], None]
OnLost = Callable[[str], None]


@dataclass(eq=False, slots=True)
class _Kept:
    lease_id: int
    interval: float
    on_renewed: OnRenewed
    on_lost: OnLost
    due: float
    # The keep-alive in flight (None: none): a token that only its own answer matches, so an
    # answer for a lease released and kept again meanwhile is not taken for the new one's.
    token: int | None = None


@dataclass(slots=True)
class _Burst:
    """The keep-alives of one tick, for the timeout check."""

    sent_at: float
    stream: _Stream
    sent: list[tuple[_Kept, int]]
    reset: bool = False


class LeaseKeeper:
    """Renews kept leases from one thread, started on the first `keep` and ended by `close`."""

    def __init__(
        self,
        mux: KeepAliveMux,
        client: Callable[[], _SharedClient],
        metrics: StoreMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._mux = mux
        self._client = client
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._kept: dict[int, _Kept] = {}
        self._schedule = DueSchedule()
        self._intervals = IntervalCounts()
        self._tokens = count(1)
        self._bursts: deque[_Burst] = deque()  # only the keeper thread touches them
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._refuse_until = 0.0  # monotonic; see _COOL_DOWN_SECONDS
        self._sleep_until = 0.0  # when the keeper thread wakes next (a sooner lease wakes it)

    # --- owners' side ---------------------------------------------------------------------------

    def keep(self, lease_id: int, interval: float, on_renewed: OnRenewed, on_lost: OnLost) -> None:
        """Renew `lease_id` every `interval` seconds from now on, until `release` or a hand-back
        (`on_lost`). Keeping a lease already kept replaces its interval and callbacks. Raises
        StoreError once closed, and for a while after a tick failed (the owner renews on its
        own meanwhile)."""
        if interval <= 0:
            raise ValueError("a kept lease needs an interval above 0")
        kept = _Kept(lease_id, interval, on_renewed, on_lost, due=self._clock() + interval)
        with self._lock:
            if self._closed:
                raise StoreError("the EtcdStore is closed; create a new one")
            if self._clock() < self._refuse_until:
                raise StoreError("the lease keeper failed a tick just now; renew on your own")
            self._forget(lease_id)
            wake = not self._kept or kept.due < self._sleep_until
            self._kept[lease_id] = kept
            self._schedule.add(lease_id, kept.due)
            self._intervals.add(interval)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="defender-lease-keeper", daemon=True
                )
                self._thread.start()
        if wake:
            self._wake.set()

    def release(self, lease_id: int) -> bool:
        """Stop renewing `lease_id` (its owner takes over, or revokes it); False if it was not
        kept. An answer still in flight for it is ignored."""
        with self._lock:
            return self._forget(lease_id) is not None

    def __contains__(self, lease_id: object) -> bool:
        with self._lock:
            return lease_id in self._kept

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)

    @property
    def thread(self) -> threading.Thread | None:
        """The keeper thread while it runs (None before the first `keep` and after `close`)."""
        thread = self._thread
        return thread if thread is not None and thread.is_alive() else None

    def close(self, timeout: float = 10.0) -> None:
        """Hand every kept lease back (reason "closed") and end the thread. Idempotent."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._hand_back_all("closed", "the store was closed")

    # --- the keeper thread ----------------------------------------------------------------------

    def _run(self) -> None:
        why: tuple[HandBack, str] = ("keeper_ended", "the keeper thread ended unexpectedly")
        try:
            # The ticks are anchor + k x tick: a lease's beats stay on one grid (see
            # `_keeper_schedule`); a new tick length starts a new grid.
            anchor, anchored_tick = self._clock(), 0.0
            while True:
                with self._lock:
                    if self._closed:
                        why = ("closed", "the store was closed")
                        return
                    idle = not self._kept
                    tick = tick_seconds(self._intervals.shortest(), len(self._kept))
                if idle and not self._bursts:
                    # Nothing to renew and nothing in flight: no ticks until a `keep`.
                    self._wake.wait()
                    self._wake.clear()
                    continue
                if tick != anchored_tick:
                    anchor, anchored_tick = self._clock(), tick
                try:
                    now = self._clock()
                    self._check_bursts(now)
                    self._send_due(now, tick)
                except Exception:
                    # A bug here must not silence renewals while the owners sleep: every lease
                    # goes back to its owner, which renews on its own and hands it over again
                    # after its next beat (a keeper that keeps failing costs the owners' own
                    # wake-ups, never a lease).
                    log.exception("lease keeper: a tick failed; its leases go back to their owners")
                    with self._lock:
                        self._refuse_until = self._clock() + _COOL_DOWN_SECONDS
                    self._hand_back_all("tick_failed", "a keeper tick failed")
                now = self._clock()
                with self._lock:
                    # Not before the tick the next lease is due on (a lone heartbeater at the
                    # default 30 s would otherwise cost 120 wake-ups a beat), unless answers
                    # are outstanding: their timeout is checked on every tick.
                    wake_at = self._sleep_until = next_wake(
                        anchor, tick, now, self._schedule.earliest(), bool(self._bursts)
                    )
                self._wake.wait(wake_at - now)
                self._wake.clear()
        finally:
            # Closed, or ended by something no tick caught: the owners renew on their own.
            self._hand_back_all(*why)

    def _send_due(self, now: float, tick: float) -> None:
        batch: list[tuple[_Kept, int]] = []
        with self._lock:
            # Half a tick either way: a beat is at most tick/2 off its grid point.
            for lease_id in self._schedule.pop_due(now + tick / 2):
                kept = self._kept[lease_id]
                kept.due = next_due(kept.due, kept.interval, now)
                self._schedule.add(lease_id, kept.due)
                if kept.token is not None:
                    continue  # still unanswered: the timeout check decides, not a second ask
                kept.token = token = next(self._tokens)
                batch.append((kept, token))
        if not batch:
            return
        try:
            stream = self._mux.stream(self._client())
        except Exception as exc:
            self._hand_back([k for k, _ in batch], "no_stream", f"no keep-alive stream: {exc}")
            return
        for kept, token in batch:
            waiter = stream.send(kept.lease_id)
            waiter.add_done_callback(partial(self._answered, kept, token))
        self._bursts.append(_Burst(now, stream, batch))
        self._metrics.kept_keepalives.inc(len(batch))

    def _check_bursts(self, now: float) -> None:
        """Reset a stream that left keep-alives unanswered past the request timeout (which
        fails them, and they are handed back); hand back any still unresolved a moment later."""
        timeout = self._client().timeout
        bursts = self._bursts
        while bursts:
            burst = bursts[0]
            burst.sent = [(k, t) for k, t in burst.sent if k.token == t]
            if not burst.sent:
                bursts.popleft()
                continue
            late = now - burst.sent_at
            if late < timeout:
                return
            if not burst.reset:
                burst.reset = True
                self._mux.reset(
                    burst.stream,
                    _Failure(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no keep-alive answer within {timeout:g}s from {burst.stream.label}; "
                        "stream reset",
                    ),
                )
                continue  # the reset failed (and so handed back) what it still held
            if late < timeout + _SETTLE_SECONDS:
                return
            bursts.popleft()
            self._hand_back(
                [k for k, _ in burst.sent],
                "timeout",
                f"no keep-alive answer within {timeout:g}s, and none after the stream reset",
            )

    # --- answers (on the stream's reader thread, or whichever thread failed the stream) ---------

    def _answered(self, kept: _Kept, token: int, waiter: Future[int]) -> None:
        with self._lock:
            if kept.token != token:
                return  # released (and maybe kept again) since it was sent
            kept.token = None
        error = waiter.exception()
        if error is not None:
            reason: HandBack = "closed" if isinstance(error, StoreError) else "stream_failed"
            self._hand_back([kept], reason, f"keep-alive failed: {error}")
            return
        ttl = waiter.result()
        if ttl <= 0:
            self._hand_back([kept], "expired", "the lease expired")
            return
        try:
            kept.on_renewed(ttl)
        except Exception:
            log.exception("lease keeper: on_renewed of lease %x failed", kept.lease_id)

    # --- bookkeeping ----------------------------------------------------------------------------

    def _forget(self, lease_id: int) -> _Kept | None:
        """Take `lease_id` out of every structure (the keeper's lock held)."""
        kept = self._kept.pop(lease_id, None)
        if kept is not None:
            self._schedule.remove(lease_id)
            self._intervals.remove(kept.interval)
            kept.token = None
        return kept

    def _hand_back(self, kepts: list[_Kept], reason: HandBack, detail: str) -> None:
        gone: list[_Kept] = []
        with self._lock:
            for kept in kepts:
                if self._kept.get(kept.lease_id) is kept:  # not released or replaced meanwhile
                    self._forget(kept.lease_id)
                    gone.append(kept)
        if not gone:
            return
        self._metrics.kept_handbacks.labels(reason).inc(len(gone))
        log.debug(
            "lease keeper: %d lease(s) handed back to their owners (%s)",
            len(gone),
            detail,
            extra={"event": "kept_leases_handed_back", "reason": reason, "leases": len(gone)},
        )
        for kept in gone:
            try:
                kept.on_lost(detail)
            except Exception:
                log.exception("lease keeper: on_lost of lease %x failed", kept.lease_id)

    def _hand_back_all(self, reason: HandBack, detail: str) -> None:
        with self._lock:
            kepts = list(self._kept.values())
        self._hand_back(kepts, reason, detail)
