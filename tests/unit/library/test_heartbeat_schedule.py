"""A heartbeater with a gate (the agent's health check) renews one interval after the previous
beat began, not after it ended: a check that takes part of the interval must not stretch every
period past it, since the lease (interval x misses) is counted in intervals."""

from __future__ import annotations

import itertools
import statistics
import threading
import time

from defender_config import (
    DefenderClient,
    EnvelopeOptions,
    EtcdSettings,
    Heartbeater,
    LibrarySettings,
)

INTERVAL = 0.4
CHECK = 0.3  # what the health check inside each beat takes


def test_beats_start_one_interval_apart_whatever_the_check_takes() -> None:
    settings = LibrarySettings(
        etcd=EtcdSettings(endpoints=["127.0.0.1:1"]),
        envelope=EnvelopeOptions(encrypt=False),
    )
    with DefenderClient(settings, alert_sinks=[]) as client:
        beat = Heartbeater(
            client,
            "rag",
            "rag-0",
            interval_seconds=INTERVAL,
            allowed_misses=2,
            follow_cadence=False,
            gate=lambda: None,  # beats stay on the heartbeater's own thread
        )
        starts: list[float] = []
        enough = threading.Event()

        def slow_beat(*, initial: bool = False) -> None:
            # The beat as the gate and the renewal make it: the check's time, no etcd.
            starts.append(time.monotonic())
            time.sleep(CHECK)
            if len(starts) >= 7:
                enough.set()

        beat._beat = slow_beat  # type: ignore[method-assign]
        thread = threading.Thread(target=beat._run, daemon=True)
        thread.start()
        try:
            assert enough.wait(10)
        finally:
            beat._stopped.set()
            beat._wake.set()
            thread.join(5)
        periods = [b - a for a, b in itertools.pairwise(starts[1:])]
        # Scheduled from the end, no period could be under INTERVAL + CHECK (0.7 s: both are
        # sleeps). The median, not every period: a loaded machine may delay one or two.
        assert statistics.median(periods) < INTERVAL + CHECK / 2, periods
