"""The pod index behind monitor passes: filing pods by label and selecting by matchLabels."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from defender_operator._kube import Pod
from defender_operator._monitor import heartbeat_time_field
from defender_operator._pods import PodKey, index_keys, pod_record, select_pods

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def meta(uid: str, labels: dict[str, str] | None, **extra: Any) -> dict[str, Any]:
    m: dict[str, Any] = {"uid": uid, "creationTimestamp": "2026-11-25T12:00:00Z", **extra}
    if labels is not None:
        m["labels"] = labels
    return m


def build(*pods: tuple[str, str, dict[str, Any]]) -> dict[PodKey, list[Pod]]:
    """What kopf's index holds: per key, the values every pod returned for it."""
    index: dict[PodKey, list[Pod]] = defaultdict(list)
    for namespace, name, m in pods:
        for key, pod in index_keys(namespace, name, m).items():
            index[key].append(pod)
    return dict(index)


def test_one_entry_per_label() -> None:
    keys = index_keys("ns", "fw-1", meta("u1", {"app": "fw", "tier": "edge"}))
    assert set(keys) == {("ns", "app", "fw"), ("ns", "tier", "edge")}
    pod = keys[("ns", "app", "fw")]
    assert pod == Pod("fw-1", "u1", T0, deleting=False)


def test_unlabelled_or_incomplete_pods_are_not_indexed() -> None:
    assert index_keys("ns", "a", meta("u", None)) == {}
    assert index_keys("ns", "a", meta("u", {})) == {}
    assert index_keys(None, "a", meta("u", {"app": "x"})) == {}
    assert index_keys("ns", "a", {"labels": {"app": "x"}}) == {}
    assert pod_record("a", {"uid": "u"}) is None


def test_deleting_pod_is_flagged() -> None:
    pod = pod_record("a", meta("u", {"app": "x"}, deletionTimestamp="2026-11-25T12:01:00Z"))
    assert pod is not None and pod.deleting


def _status(phase: str, *containers: dict[str, Any]) -> dict[str, Any]:
    return {
        "phase": phase,
        "startTime": "2026-11-25T12:00:01Z",
        "containerStatuses": list(containers),
    }


def _running(at: str) -> dict[str, Any]:
    return {"state": {"running": {"startedAt": at}}}


def test_started_is_the_latest_start_of_all_running_containers() -> None:
    status = _status("Running", _running("2026-11-25T12:01:00Z"), _running("2026-11-25T12:02:00Z"))
    pod = pod_record("a", meta("u", {"app": "x"}), status)
    assert pod is not None
    assert pod.started == T0 + timedelta(minutes=2) and not pod.starting


def test_a_pod_whose_containers_are_being_created_is_starting() -> None:
    waiting = {"state": {"waiting": {"reason": "ContainerCreating"}}}
    pod = pod_record("a", meta("u", {"app": "x"}), _status("Pending", waiting))
    assert pod is not None and pod.starting and pod.started is None
    # Init containers still running: no containerStatuses beyond waiting ones yet.
    pod = pod_record("a", meta("u", {"app": "x"}), _status("Pending"))
    assert pod is not None and pod.starting


def test_a_crashed_container_is_not_starting_and_has_no_start() -> None:
    crashed = {
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 1}},
    }
    status = _status("Running", _running("2026-11-25T12:01:00Z"), crashed)
    pod = pod_record("a", meta("u", {"app": "x"}), status)
    assert pod is not None and pod.started is None and not pod.starting


def test_a_pod_no_kubelet_reports_on_is_judged_from_its_creation() -> None:
    # The kubelet-less control plane of the e2e tests: no startTime, no container statuses.
    pod = pod_record("a", meta("u", {"app": "x"}), {"phase": "Pending"})
    assert pod is not None and pod.started is None and not pod.starting
    done = pod_record("a", meta("u", {"app": "x"}), _status("Failed"))
    assert done is not None and not done.starting


def test_select_is_the_intersection_of_all_labels() -> None:
    index = build(
        ("ns", "fw-1", meta("u1", {"app": "fw", "tier": "edge"})),
        ("ns", "fw-2", meta("u2", {"app": "fw", "tier": "core"})),
        ("ns", "rag-1", meta("u3", {"app": "rag", "tier": "edge"})),
        ("other", "fw-9", meta("u9", {"app": "fw", "tier": "edge"})),
    )
    assert [p.name for p in select_pods(index, "ns", {"app": "fw"})] == ["fw-1", "fw-2"]
    assert [p.name for p in select_pods(index, "ns", {"app": "fw", "tier": "edge"})] == ["fw-1"]
    assert [p.name for p in select_pods(index, "other", {"app": "fw"})] == ["fw-9"]
    assert select_pods(index, "ns", {"app": "fw", "tier": "none"}) == []
    assert select_pods(index, "ns", {"app": "sniffer"}) == []
    assert select_pods(index, "ns", {}) == []


def test_heartbeat_time_is_kept_while_fresh_enough() -> None:
    shown = "2026-11-25T12:00:00Z"
    # Less than the refresh behind: keep what status shows (no status write for it).
    assert heartbeat_time_field(shown, T0 + timedelta(seconds=10), 30) == shown
    # As far behind as the refresh: publish the newest.
    assert heartbeat_time_field(shown, T0 + timedelta(seconds=30), 30).startswith(
        "2026-11-25T12:00:30"
    )
    # Refresh 0, nothing published yet, garbage, or a published time ahead of the newest
    # (a component re-created): publish the newest.
    assert heartbeat_time_field(shown, T0 + timedelta(seconds=1), 0).startswith(
        "2026-11-25T12:00:01"
    )
    assert heartbeat_time_field(None, T0, 30).startswith("2026-11-25T12:00:00")
    assert heartbeat_time_field("yesterday", T0, 30).startswith("2026-11-25T12:00:00")
    assert heartbeat_time_field(shown, T0 - timedelta(seconds=5), 30).startswith(
        "2026-11-25T11:59:55"
    )
