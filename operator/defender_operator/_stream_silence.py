"""Whether an etcd watch's stream still answers, for the views fed by one (`HeartbeatView`,
`ChangeView`): a view trusted to learn of every change through the watch is not trusted while
the stream is silent past its limit.

A stream can stall without an error (a wedged member, a proxy holding it open; gRPC's pings
are answered by the connection): events simply stop. The watch asks etcd for a progress answer
whenever it was idle (`heartbeat_watch_progress_seconds`), so a working stream is never silent
long; the library gives a stream silent past its bound up and resumes on another member, and
while it does the watch is on no stream (silence None), not live either.
"""

from __future__ import annotations

from collections.abc import Callable


class StreamSilence:
    """Mixed into a view: `listen` tells it how to measure its watch's silence; `judge_stream`
    decides, on the event loop only, and `live` keeps that answer for `trusted`. Read twice
    without an await between (a pass that takes the view if trusted and reads etcd if not), the
    answer must be the same, or a progress answer landing in between would hand the pass an
    empty or stale view as if it were the truth."""

    def __init__(self) -> None:
        # How long the watch's stream has been silent (None: on no stream), and how much of
        # that still counts as live: set by `listen`.
        self._silent: Callable[[], float | None] | None = None
        self._silence_limit = 0.0
        self._stream_live = True

    def listen(self, silent: Callable[[], float | None], limit: float) -> None:
        """The watch's stream has been silent `silent()` seconds (None: it is on no stream
        now); more than `limit` is a stall (`live`)."""
        self._silent, self._silence_limit = silent, limit

    def silent_for(self) -> float | None:
        """Seconds the watch's stream has answered nothing; None when not known (no `listen`,
        or the watch is between streams)."""
        return self._silent() if self._silent is not None else None

    @property
    def live(self) -> bool:
        """Whether the watch's stream answered within the limit when `judge_stream` last
        looked."""
        return self._stream_live

    def judge_stream(self) -> bool:
        """Whether the watch's stream answered (an event, a progress answer) within the limit
        now; kept as `live` until the next call. Called on the event loop. True without
        `listen` (progress requests off: nothing to judge by)."""
        if self._silent is None:
            live = True
        else:
            silent = self._silent()
            live = silent is not None and silent <= self._silence_limit
        self._stream_live = live
        return live
