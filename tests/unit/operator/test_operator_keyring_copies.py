"""The keyring fan-out (`_rotation.fan_out_everywhere`, every sixth key-rotation tick and after
each rotation step) copies into the namespaces of components that hold their name, never into
one whose only DefenderComponent is refused: not from a restarted operator before its
reconciles ran, not from a replica paused by peering."""

from __future__ import annotations

import asyncio
from typing import Any

from operator_core_support import NAME, NAMESPACE, FakeSecrets, Harness, spec

from defender_operator import _rotation
from defender_operator._runtime import Runtime
from defender_operator._settings import OperatorSettings

TWIN = "tenant-b"


def reconcile_twin(h: Harness) -> None:
    """tenant-b/sniffer, refused the name default/sniffer holds (Conflict)."""
    h.reconcile_refused_twin(TWIN, spec())


def daemons_run(rt: Runtime) -> None:
    """The monitor daemons of both resources run in `rt` (`_monitor.run` counts itself)."""
    for namespace, uid in ((NAMESPACE, "uid-1"), (TWIN, "uid-b")):
        mem = rt.memory(namespace, NAME)
        mem.monitors, mem.uid = 1, uid


def fanned_out(rt: Runtime) -> list[str]:
    secrets: Any = rt.secrets
    secrets.fanned_out.clear()
    asyncio.run(_rotation.fan_out_everywhere(rt, rt.keyring.current()))
    return sorted(secrets.fanned_out)


def test_a_refused_namespace_gets_no_copy_before_or_after_a_restart() -> None:
    h = Harness()
    h.kube.namespaces = {NAMESPACE, TWIN}
    asyncio.run(h.reconcile(spec()))
    reconcile_twin(h)
    daemons_run(h.rt)
    assert fanned_out(h.rt) == [NAMESPACE]

    # The operator restarts: its daemons run, no reconcile has yet (the key-rotation loop's
    # tick 0). Nothing it knows tells the refused resource from the owner: no copy anywhere.
    rt = Runtime(
        OperatorSettings(), h.backend, h.kube, FakeSecrets(h.rt.keyring), h.rt.keyring, "op-1"
    )  # type: ignore[arg-type]
    rt.keyring_ready = True
    rt.post_event, rt.etcd = h.rt.post_event, h.rt.etcd
    daemons_run(rt)
    assert fanned_out(rt) == []

    # The owner's resume reconcile (its status holds the name): its namespace only.
    h.rt = rt
    asyncio.run(h.reconcile(spec()))
    assert fanned_out(rt) == [NAMESPACE]
    reconcile_twin(h)
    assert fanned_out(rt) == [NAMESPACE]


def test_a_replica_paused_by_peering_copies_nothing() -> None:
    h = Harness()
    h.kube.namespaces = {NAMESPACE, TWIN}
    asyncio.run(h.reconcile(spec()))
    reconcile_twin(h)
    daemons_run(h.rt)
    # Paused: kopf stops its daemons; its memory stays, and goes stale.
    for mem in h.rt.components.values():
        mem.monitors = 0
    asked = len(h.kube.requests)
    assert fanned_out(h.rt) == []
    assert h.kube.requests[asked:] == []  # not even the list of namespaces
