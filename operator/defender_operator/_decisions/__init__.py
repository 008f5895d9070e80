"""Pure decisions of the operator: plain data in, plain data out, no I/O, no clock.

Every choice the operator makes (what to seed, whether to restart a pod, the next key-rotation
stage, whether the breaker trips, which conditions to show) is a function here, so it can be
unit-tested without a cluster and read without the kopf plumbing around it. Callers pass `now`
explicitly; nothing in this package reads the clock.
"""
