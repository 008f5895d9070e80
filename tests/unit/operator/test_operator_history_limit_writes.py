"""Every write of a new ACTIVE version the operator makes besides a commit (the rollback
command, the onInvalidConfig revert, the breaker's revert, a canary's abort) prunes the history
to spec.rollout.historyLimit as the spec holds it then, not the backend's default. Each case
runs with the spec below the backend's limit and above it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from operator_core_support import NAME, Harness, spec

from defender_config import ChangeKind, contract
from defender_operator import _api

BASE = {"node_id": "sniffer-01", "version": "1.0.0"}
ETH0 = {**BASE, "interface": "eth0"}
ETH1 = {**BASE, "interface": "eth1"}
ETH2 = {**BASE, "interface": "eth2"}
BAD = {**BASE, "interface": "not a valid interface name"}
PODS = ("sniffer-a", "sniffer-b", "sniffer-c")

# (spec.rollout.historyLimit, the backend's own limit): the spec's must win either way.
LIMITS = [(2, 10), (5, 1)]


def limited(config: dict[str, str], history_limit: int, **rollout: Any) -> dict[str, Any]:
    return spec(config, rollout={"historyLimit": history_limit, **rollout})


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def kept(h: Harness) -> list[int]:
    return sorted(h.backend.components[NAME].history)


def three_versions(limit: int, backend_limit: int, **rollout: Any) -> Harness:
    """Versions 1-3 committed under the spec's `limit`; the backend's own is `backend_limit`."""
    h = Harness()
    h.backend.history_limit = backend_limit
    for config in (ETH0, ETH1, ETH2):
        run(h.reconcile(limited(config, limit, **rollout)))
    assert h.backend.state(NAME).active_version == 3
    return h


@pytest.mark.parametrize(("limit", "backend_limit"), LIMITS)
def test_the_rollback_command_keeps_the_spec_history_limit(limit: int, backend_limit: int) -> None:
    h = three_versions(limit, backend_limit)
    run(h.reconcile(limited(ETH2, limit), {_api.ROLLBACK_ANNOTATION: "master"}))
    assert h.reasons()[-1] == "RolledBack"
    assert h.backend.state(NAME).active_version == 4
    assert kept(h) == list(range(max(1, 5 - limit), 5))


@pytest.mark.parametrize(("limit", "backend_limit"), LIMITS)
def test_the_revert_to_master_keeps_the_spec_history_limit(limit: int, backend_limit: int) -> None:
    policy = _api.InvalidConfigPolicy.REVERT_TO_MASTER.value
    h = three_versions(limit, backend_limit, onInvalidConfig=policy)
    run(h.reconcile(limited(BAD, limit, onInvalidConfig=policy)))
    assert h.reasons()[-1] == "RevertedToMaster"
    assert h.backend.components[NAME].change is ChangeKind.INVALID_REVERT
    assert kept(h) == list(range(max(1, 5 - limit), 5))


@pytest.mark.parametrize(("limit", "backend_limit"), LIMITS)
def test_the_breakers_revert_keeps_the_spec_history_limit(limit: int, backend_limit: int) -> None:
    h = three_versions(limit, backend_limit)
    for pod in PODS:
        h.add_pod(pod)
        h.beat(pod)
    asyncio.run(h.monitor(limited(ETH2, limit)))
    run(h.reconcile(limited(ETH1, limit)))  # version 4, which the breaker then guards
    for pod in PODS[:2]:
        h.beat(pod, error="UnknownKey")  # more than maxUnhealthyInstances (1)
    asyncio.run(h.monitor(limited(ETH1, limit)))
    assert "BlastRadiusExceeded" in h.reasons()
    assert h.backend.components[NAME].change is ChangeKind.BREAKER_REVERT
    assert h.backend.state(NAME).active_version == 5
    assert kept(h) == list(range(max(1, 6 - limit), 6))


def canary(config: dict[str, str], limit: int) -> dict[str, Any]:
    return limited(config, limit, canary={"instances": 1, "holdSeconds": 3600})


def canary_started(limit: int, backend_limit: int) -> Harness:
    """Versions 1-3 on three beating instances, then ETH0 under a one-instance canary."""
    h = three_versions(limit, backend_limit)
    for pod in PODS:
        h.add_pod(pod)
        h.beat(pod)
    asyncio.run(h.monitor(canary(ETH2, limit)))
    run(h.reconcile(canary(ETH0, limit)))
    assert NAME in h.backend.rollouts
    return h


@pytest.mark.parametrize(("limit", "backend_limit"), LIMITS)
def test_the_abort_command_keeps_the_spec_history_limit(limit: int, backend_limit: int) -> None:
    h = canary_started(limit, backend_limit)
    run(h.reconcile(canary(ETH0, limit), {contract.ABORT_ANNOTATION: "now"}))
    assert h.reasons()[-1] == "CanaryAborted"
    assert h.backend.components[NAME].change is ChangeKind.CANARY_ABORT
    assert kept(h) == list(range(max(1, 5 - limit), 5))


@pytest.mark.parametrize(("limit", "backend_limit"), LIMITS)
def test_a_failing_canarys_abort_keeps_the_spec_history_limit(
    limit: int, backend_limit: int
) -> None:
    h = canary_started(limit, backend_limit)
    h.beat("sniffer-a", error="HealthCheckFailed")
    asyncio.run(h.monitor(canary(ETH0, limit)))
    assert h.reasons()[-1] == "CanaryAborted"
    assert h.backend.components[NAME].change is ChangeKind.CANARY_ABORT
    assert kept(h) == list(range(max(1, 5 - limit), 5))
