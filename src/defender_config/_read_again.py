"""Reading again, with backoff, a change whose read etcd did not answer.

A watch event is spent once handed out, and a watch that resumes after an outage announces
nothing older: a change whose read then failed (etcd away) or was served from the last-known-good
cache would be lost until the next commit. Both watches that hand out configs
(`ConfigStore.watch_active`, `CanaryWatch`) follow this one rule for it, so they back off,
report and stop alike.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable

from ._errors import StoreError
from ._store_types import backoff_delay

__all__ = ["ReadAgain"]

log = logging.getLogger("defender_config.read_again")


class ReadAgain:
    """Runs of reads again for one watch.

    A run begins when a read is `missed` (etcd did not answer it: StoreError, or the cache
    did) and none is under way; it ends when a read again is answered by etcd.

    - backoff: read again number n of a run (n from 0) waits `backoff_delay(n, base, cap)`;
    - report once: the failure that begins a run is reported; failures while it is under way
      are not (one outage, one report, as the watch's own on_error), nor is a read the cache
      answered (the heartbeat says etcd is away);
    - stop: `wait(delay)` returning True (the watch was cancelled) ends the run at once;
    - a miss while a run is under way makes the run read once more after it would have ended,
      so a change announced while its last read was going is not lost;
    - `read` raising anything but StoreError is a bug, which waiting does not mend: the run
      ends and the error is logged with its traceback (ERROR), not raised, since the thread
      the run is on has nobody to hand it to (the watch's own thread would only log it as
      well). The next miss begins a new run.

    With `own_thread` a run goes on a daemon thread of its own (for a read that is not on a
    watch's thread, or a watch that must go on handing out events meanwhile); without, `missed`
    runs it on the caller's thread and returns when it ends.
    """

    def __init__(
        self,
        read: Callable[[], bool],
        *,
        wait: Callable[[float], bool],
        report: Callable[[StoreError], None],
        base: float,
        cap: float,
        name: str,
        own_thread: bool,
        rng: random.Random | None = None,
    ) -> None:
        """`read`: one read again, handing out what it found; True when etcd answered it, False
        when the cache did; StoreError when etcd did not answer. `wait(seconds)`: waits,
        True once the watch is stopped."""
        self._read, self._wait, self._report = read, wait, report
        self._base, self._cap, self._rng = base, cap, rng
        self._name, self._own_thread = name, own_thread
        self._lock = threading.Lock()
        self._running = False
        self._missed_meanwhile = False

    def missed(self, exc: StoreError | None) -> None:
        """A read etcd did not answer: `exc` when it failed, None when the cache answered it.
        Begins a run unless one is under way (reporting `exc` then)."""
        with self._lock:
            if self._running:
                self._missed_meanwhile = True
                return
            self._running, self._missed_meanwhile = True, False
        if exc is not None:
            self._report(exc)
        if self._own_thread:
            threading.Thread(
                target=self._run, name=f"defender-read-again:{self._name}", daemon=True
            ).start()
        else:
            self._run()

    def _run(self) -> None:
        ended = False  # set where the run's end is decided under the lock, with `missed`
        try:
            attempt = 0
            while not self._wait(backoff_delay(attempt, self._base, self._cap, self._rng)):
                attempt += 1
                with self._lock:
                    self._missed_meanwhile = False
                try:
                    answered = self._read()
                except StoreError as exc:
                    log.debug("%s: read again not answered (%s)", self._name, exc)
                    continue
                with self._lock:
                    if answered and not self._missed_meanwhile:
                        self._running, ended = False, True
                        return
        except Exception:
            log.exception("%s: read again failed; not read again until the next miss", self._name)
        finally:
            if not ended:
                with self._lock:
                    self._running = False
