"""Monitor passes come when something changes, not on a clock: with monitor_interval_seconds
far away (300 s), a new pod, a pod deleted outright, an instance's error and its end, and a
write to the component's keys in etcd are each judged within seconds (`Runtime.wake`)."""

from __future__ import annotations

import pytest
from kubernetes import client as k8s
from operator_e2e_support import FAST_RESTARTS, SNIFFER_LABELS, OperatorRun, wait_for

from defender_config import UnknownKeyError

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]

# Far beyond every wait below: a pass that comes in time was woken.
FAR = "300"
SOON = 20.0


def _summary(run: OperatorRun) -> str | None:
    return run.get("sniffer").get("status", {}).get("instanceSummary")


def _extra_pod(run: OperatorRun) -> None:
    """A bare pod the sniffer's selector matches, beside its Deployment's (never scheduled)."""
    run.core.create_namespaced_pod(
        run.namespace,
        k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(name="sniffer-extra", labels=dict(SNIFFER_LABELS)),
            spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="c", image="none.invalid/x:0")]),
        ),
    )


def test_every_change_is_judged_at_once_with_the_interval_far_away(
    operator_run: OperatorRun,
) -> None:
    run = operator_run
    run.start(DEFENDER_OPERATOR_MONITOR_INTERVAL_SECONDS=FAR)
    run.apply_sample("sniffer", **FAST_RESTARTS)
    run.wait_active_version("sniffer", 1)
    run.deployment("sniffer", SNIFFER_LABELS, replicas=1)
    (pod,) = wait_for("the pod", lambda: [p.metadata.name for p in run.pods(SNIFFER_LABELS)])
    wait_for("0/1: the pod is seen", lambda: _summary(run) == "0/1", timeout=SOON)
    hb = run.heartbeat("sniffer", pod)
    wait_for("1/1: the instance is seen", lambda: _summary(run) == "1/1", timeout=SOON)
    run.wait_condition("sniffer", "Heartbeating", status="True", timeout=SOON)

    # A second pod: a pod event wakes the pass.
    _extra_pod(run)
    wait_for("1/2: the new pod is seen", lambda: _summary(run) == "1/2", timeout=SOON)

    # An instance reports an error, then recovers: its record changed, no new instance.
    hb.update(last_error=UnknownKeyError("k9", ["k1"]))
    run.wait_condition("sniffer", "Misconfigured", status="True", timeout=SOON)
    hb.update(last_error=None)
    run.wait_condition("sniffer", "Misconfigured", status="False", timeout=SOON)

    # Someone with etcd access deletes the published heartbeat cadence: the change watch wakes
    # the pass, which writes it again.
    store = run.client().store
    key = run.client().layout.cadence("sniffer")
    saved = store.get(key)
    assert saved is not None
    store.delete(key)
    wait_for("the cadence written again", lambda: store.get(key) is not None, timeout=SOON)


def test_a_pod_deleted_outright_is_judged_at_once(operator_run: OperatorRun) -> None:
    # No deadline comes within the wait either: the pods' startup grace and the interval are
    # both far away, so only the deletion's own event can wake the pass.
    run = operator_run
    run.start(DEFENDER_OPERATOR_MONITOR_INTERVAL_SECONDS=FAR)
    run.apply_sample(
        "sniffer",
        heartbeat={"intervalSeconds": 30, "missedBeforeRestart": 3, "startupGraceSeconds": 300},
    )
    run.wait_active_version("sniffer", 1)
    run.deployment("sniffer", SNIFFER_LABELS, replicas=1)
    _extra_pod(run)
    wait_for("0/2: both pods are seen", lambda: _summary(run) == "0/2", timeout=SOON)
    # kopf drops a deleted pod from its index without calling the index handler; the API
    # server shows the deletion first as a change setting the pod's deletionTimestamp (even at
    # grace period 0, for a pod no node runs), and that change wakes the pass.
    run.core.delete_namespaced_pod("sniffer-extra", run.namespace, grace_period_seconds=0)
    wait_for("0/1: the deleted pod is gone", lambda: _summary(run) == "0/1", timeout=SOON)
