"""The operator's garbage collector settings.

At a thousand components the operator holds a few hundred thousand container objects, and
CPython's full collection scans every one whenever the heap grew by a quarter since the last:
while components are created that is every few seconds, each a stall of 0.1-0.5 s for every
reconcile in flight (measured with docs/bench's 1,000 components: p99 create -> Ready 1.3-1.8 s
with the defaults, 0.6-0.7 s with these). What start-up loaded (modules, classes, clients)
lives as long as the process, so it is frozen out of every collection; young collections run
on larger batches, and a full one is considered less often. Cycles still go: every young
collection and every full one frees them as before.
"""

from __future__ import annotations

import gc

# (young batch, young collections per middle one, middle collections per full-collection check)
GC_THRESHOLDS = (10_000, 5, 50)


def settle_heap() -> None:
    """Once start-up is done: collect what it left, freeze the rest, set the thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
