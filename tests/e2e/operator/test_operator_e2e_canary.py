"""Canary rollout end to end: real library instances (Heartbeater + Rollouts.watch), the real
operator, the real 3-member etcd. A good version promotes after the hold; a bad one aborts
with the non-canary instances never having loaded it; a rollout record forged straight into
etcd is ignored."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from operator_e2e_support import FAST_RESTARTS, SNIFFER_LABELS, OperatorRun, wait_for

from defender_cli import main as cli
from defender_config import (
    ActiveConfig,
    CanaryWatch,
    ChangeKind,
    ErrorInfo,
    Heartbeater,
    Rollouts,
    config_digest,
    contract,
)

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]

BAD_SNAPLEN = 9999  # valid for the schema; the instances' health check refuses it
CANARY = {"instances": 1, "holdSeconds": 3, "progressDeadlineSeconds": 60}


@dataclass
class Instance:
    """One component instance played by the library: it runs whatever `Rollouts.watch` hands
    it, records every config it loaded, and reports it (or a failed health check) in its
    heartbeat."""

    name: str
    hb: Heartbeater
    loaded: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    watch: CanaryWatch | None = None

    def load(self, active: ActiveConfig) -> None:
        with self.lock:
            self.loaded.append(dict(active.config))
        healthy = active.config.get("snaplen") != BAD_SNAPLEN
        self.hb.update(
            config_version=active.version,
            config_digest=active.digest,
            last_error=None
            if healthy
            else ErrorInfo(reason="HealthCheckFailed", detail="capture fails at this snaplen"),
        )

    def snaplens(self) -> list[int]:
        with self.lock:
            return [int(c["snaplen"]) for c in self.loaded]


@pytest.fixture
def instances(operator_run: OperatorRun) -> Iterator[list[Instance]]:
    """Three sniffer instances under spec.rollout.canary (1 canary, 3 s hold)."""
    run = operator_run
    run.start()
    run.apply_sample("sniffer", **FAST_RESTARTS)
    run.wait_active_version("sniffer", 1)
    run.patch("sniffer", {"spec": {"rollout": {"canary": CANARY}}})
    run.deployment("sniffer", SNIFFER_LABELS, replicas=3)

    def three_pods() -> set[str] | None:
        names = {p.metadata.name for p in run.pods(SNIFFER_LABELS)}
        return names if len(names) == 3 else None

    pods = wait_for("3 pods", three_pods)
    started: list[Instance] = []
    for pod in sorted(pods):
        inst = Instance(pod, run.heartbeat("sniffer", pod))
        inst.watch = Rollouts(run.configs()).watch("sniffer", pod, inst.load)
        started.append(inst)
    run.wait_condition("sniffer", "Heartbeating", status="True")
    try:
        yield started
    finally:
        for inst in started:
            if inst.watch is not None:
                inst.watch.cancel()


def _cli(kubeconfig: Path, *args: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    code = cli([*args, "--kubeconfig", str(kubeconfig), "--no-color"], out=out, err=err)
    assert code == 0, err.getvalue()
    return out.getvalue()


def _all_on(instances: list[Instance], snaplen: int) -> Callable[[], bool]:
    return lambda: all(i.snaplens() and i.snaplens()[-1] == snaplen for i in instances)


def test_a_good_version_goes_to_the_canary_first_then_to_all(
    operator_run: OperatorRun, instances: list[Instance]
) -> None:
    run = operator_run
    canary, *others = instances
    run.patch("sniffer", {"spec": {"config": {"snaplen": 512}}})
    run.wait_condition("sniffer", "Rollout", reason="Progressing")
    rollout = run.get("sniffer")["status"]["rollout"]
    assert rollout["canaries"] == [canary.name]
    assert (rollout["version"], rollout["baseVersion"]) == (2, 1)
    run.wait_event("sniffer", "CanaryStarted")

    wait_for("the canary runs the candidate", lambda: canary.snaplens()[-1:] == [512])
    # ACTIVE is still version 1 while the canary holds; the others run it.
    run.wait_active_version("sniffer", 2, timeout=60)
    run.wait_event("sniffer", "CanaryPromoted")
    promoted = run.wait_condition("sniffer", "Rollout", status="True", reason="Promoted")
    assert "healthy" in promoted["message"]
    active = run.configs().get_active("sniffer")
    assert (active.version, active.config["snaplen"]) == (2, 512)
    assert active.metadata is not None and active.metadata.change is ChangeKind.COMMIT
    wait_for("every instance on version 2", _all_on(instances, 512))
    for other in others:
        # They went from version 1 straight to the promoted version 2.
        assert other.snaplens() == [256, 512]
    wait_for(
        "status.rollout Promoted",
        lambda: run.get("sniffer")["status"]["rollout"]["phase"] == "Promoted",
    )
    run.wait_condition("sniffer", "ConfigSynced", status="True")
    # Ended, not deleted: an ended record under a higher sequence, so a saved copy put back
    # is refused by the instances that saw it end.
    wait_for(
        "the rollout record ended",
        lambda: (
            (found := Rollouts(run.configs()).record("sniffer", ended=True)) is not None
            and found.ended
        ),
    )
    assert run.configs().client.store.get(run.configs().layout.candidate("sniffer")) is None


def test_a_bad_version_aborts_and_never_reaches_the_others(
    operator_run: OperatorRun, instances: list[Instance]
) -> None:
    run = operator_run
    canary, *others = instances
    run.patch("sniffer", {"spec": {"config": {"snaplen": BAD_SNAPLEN}}})
    wait_for("the canary tried it", lambda: BAD_SNAPLEN in canary.snaplens())

    aborted = run.wait_condition("sniffer", "Rollout", status="False", reason="Aborted")
    assert canary.name in aborted["message"] and "HealthCheckFailed" in aborted["message"]
    run.wait_event("sniffer", "CanaryAborted")
    wait_for("frozen", lambda: run.get("sniffer")["status"].get("frozen") is True)
    run.wait_condition("sniffer", "ConfigSynced", status="False", reason="Frozen")
    # The canary is back on the config it ran before; ACTIVE is that config, written again.
    wait_for("the canary back on 256", lambda: canary.snaplens()[-1:] == [256])
    assert canary.snaplens() == [256, BAD_SNAPLEN, 256]
    active = run.configs().get_active("sniffer")
    assert (active.version, active.config["snaplen"]) == (2, 256)
    assert active.metadata is not None and active.metadata.change is ChangeKind.CANARY_ABORT
    for other in others:
        assert other.snaplens() == [256], f"{other.name} saw the aborted version"
    wait_for(
        "status.rollout Aborted",
        lambda: run.get("sniffer")["status"]["rollout"]["phase"] == "Aborted",
    )
    # Further spec changes wait for a person while frozen.
    run.patch("sniffer", {"spec": {"config": {"snaplen": 1024}}})
    run.wait_condition("sniffer", "ConfigSynced", reason="Frozen")
    assert run.configs().get_active("sniffer").version == 2


def test_a_promote_command_skips_the_hold(
    operator_run: OperatorRun, instances: list[Instance], kubeconfig_path: Path
) -> None:
    run = operator_run
    canary, *_ = instances
    run.patch("sniffer", {"spec": {"rollout": {"canary": {**CANARY, "holdSeconds": 3600}}}})
    run.patch("sniffer", {"spec": {"config": {"snaplen": 640}}})
    wait_for("the canary runs the candidate", lambda: canary.snaplens()[-1:] == [640])
    run.wait_condition("sniffer", "Rollout", reason="Progressing")
    out = _cli(kubeconfig_path, "promote", "sniffer", "-n", run.namespace)
    assert "Asked the operator to promote" in out
    run.wait_active_version("sniffer", 2)
    run.wait_event("sniffer", "CanaryPromoted")
    wait_for("every instance on version 2", _all_on(instances, 640))
    # The operator removes the command's annotation in a patch of its own, after acting on it.
    wait_for(
        "the promote annotation removed",
        lambda: (
            contract.PROMOTE_ANNOTATION
            not in (run.get("sniffer")["metadata"].get("annotations") or {})
        ),
    )
    # Without a rollout in progress the command is refused with an Event, nothing changes.
    _cli(kubeconfig_path, "promote", "sniffer", "-n", run.namespace)
    run.wait_event("sniffer", "RolloutCommandIgnored")
    assert run.configs().get_active("sniffer").version == 2


def test_an_abort_command_ends_a_rollout_and_a_replayed_record_is_stale(
    operator_run: OperatorRun, instances: list[Instance], kubeconfig_path: Path
) -> None:
    run = operator_run
    canary, *others = instances
    run.patch("sniffer", {"spec": {"rollout": {"canary": {**CANARY, "holdSeconds": 3600}}}})
    run.patch("sniffer", {"spec": {"config": {"snaplen": 768}}})
    wait_for("the canary runs the candidate", lambda: canary.snaplens()[-1:] == [768])
    client = run.configs().client
    layout = client.layout
    # What an attacker with etcd access could put back later: the authentic record+candidate.
    saved = [
        client.store.get(layout.rollout("sniffer")),
        client.store.get(layout.candidate("sniffer")),
    ]
    assert "Asked the operator to abort" in _cli(
        kubeconfig_path, "abort", "sniffer", "-n", run.namespace
    )
    run.wait_condition("sniffer", "Rollout", status="False", reason="Aborted")
    run.wait_event("sniffer", "CanaryAborted")
    # Commits are frozen: said so, as after the monitor's abort (the pass that acted on the
    # command used to go on to True/ActiveDiffersFromSpec, and Ready True).
    run.wait_condition("sniffer", "ConfigSynced", status="False", reason="Frozen")
    wait_for("the canary back on 256", lambda: canary.snaplens()[-1:] == [256])
    wait_for(
        "the abort annotation removed",
        lambda: (
            contract.ABORT_ANNOTATION
            not in (run.get("sniffer")["metadata"].get("annotations") or {})
        ),
    )

    for stored in saved:
        assert stored is not None
        client.store.put(stored.key, stored.value)
    rollouts = Rollouts(run.configs())
    # Authentic, but built on version 1; ACTIVE moved on with the abort: ignored.
    assert rollouts.effective("sniffer", canary.name).config["snaplen"] == 256
    for inst in instances:
        assert inst.snaplens()[-1] == 256
    for other in others:
        assert other.snaplens() == [256]


def test_a_forged_rollout_record_is_ignored(
    operator_run: OperatorRun, instances: list[Instance]
) -> None:
    run = operator_run
    client = run.configs().client
    layout = client.layout
    evil = {**run.configs().get_active("sniffer").config, "snaplen": 4096}
    names = [i.name for i in instances]
    # Plaintext candidate and an unsigned record naming every instance.
    client.store.put(layout.candidate("sniffer"), json.dumps(evil).encode())
    client.store.put(
        layout.rollout("sniffer"),
        json.dumps(
            {
                "version": 2,
                "base_version": 1,
                "digest": config_digest(evil),
                "canaries": names,
                "since": "2026-01-01T00:00:00Z",
                "by": "attacker",
            }
        ).encode(),
    )
    rollouts = Rollouts(run.configs())
    assert rollouts.record("sniffer") is None
    for name in names:
        assert rollouts.effective("sniffer", name).config["snaplen"] == 256
    # Alerted as an unauthenticated record, and no instance loaded the forged config.
    wait_for(
        "RecordUnauthenticated alert",
        lambda: any(
            b"RecordUnauthenticated" in sv.value
            for sv in client.store.list_prefix(layout.component_alerts_dir("sniffer"))
        ),
    )
    for inst in instances:
        assert 4096 not in inst.snaplens()
    assert run.configs().get_active("sniffer").version == 1


def _written(run: OperatorRun, pod: str) -> int | None:
    """The snaplen in the config file the real agent of `pod` wrote (None before the first)."""
    path = run.workdir / f"{pod}.json"
    try:
        return int(json.loads(path.read_text())["snaplen"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def _two_agents_on_version_1(run: OperatorRun) -> tuple[str, str]:
    """The sniffer sample with a canary rollout held for an hour, two pods, each with a real
    agent that wrote version 1: (the canary's pod, the other pod)."""
    run.start()
    run.apply_sample("sniffer", **FAST_RESTARTS)
    run.wait_active_version("sniffer", 1)
    run.patch("sniffer", {"spec": {"rollout": {"canary": {**CANARY, "holdSeconds": 3600}}}})
    run.deployment("sniffer", SNIFFER_LABELS, replicas=2)

    def two_pods() -> list[str] | None:
        names = sorted(p.metadata.name for p in run.pods(SNIFFER_LABELS))
        return names if len(names) == 2 else None

    pods = wait_for("2 pods", two_pods)
    for pod in pods:
        run.start_agent("sniffer", pod)
    for pod in pods:
        wait_for(f"{pod} wrote version 1", lambda p=pod: _written(run, p) == 256)
    run.wait_condition("sniffer", "Heartbeating", status="True")
    canary, other = pods
    return canary, other


def test_real_agents_honour_the_rollout(operator_run: OperatorRun) -> None:
    # The agent sidecar runs what `Rollouts.watch` hands it: the canary's agent writes the
    # candidate, the other keeps ACTIVE until a person promotes; an abort takes it back.
    run = operator_run
    canary, other = _two_agents_on_version_1(run)

    run.patch("sniffer", {"spec": {"config": {"snaplen": 512}}})
    wait_for("the canary's agent wrote the candidate", lambda: _written(run, canary) == 512)
    run.wait_condition("sniffer", "Rollout", reason=("Progressing",))
    assert _written(run, other) == 256
    assert run.configs().get_active("sniffer").version == 1
    run.patch("sniffer", {"metadata": {"annotations": {contract.PROMOTE_ANNOTATION: "now"}}})
    wait_for("the other agent on the promoted version", lambda: _written(run, other) == 512)
    assert run.configs().get_active("sniffer").version == 2

    run.patch("sniffer", {"spec": {"config": {"snaplen": 640}}})
    wait_for("the canary's agent wrote the next candidate", lambda: _written(run, canary) == 640)
    run.patch("sniffer", {"metadata": {"annotations": {contract.ABORT_ANNOTATION: "now"}}})
    wait_for("the canary's agent back on ACTIVE", lambda: _written(run, canary) == 512)
    run.wait_condition("sniffer", "Rollout", status="False", reason="Aborted")
    assert _written(run, other) == 512


def _writes(run: OperatorRun, pod: str) -> int:
    """How many times the real agent of `pod` wrote a config file that changed."""
    return run.agent_log(pod).count("written to")


def _logged_writes(run: OperatorRun, pod: str, at_least: int) -> int:
    """`_writes` once the agent has logged at least `at_least` of them: it logs a write after
    the file is in place, so a file just seen can still be missing from the log."""
    wait_for(f"the agent of {pod} logged {at_least} writes", lambda: _writes(run, pod) >= at_least)
    return _writes(run, pod)


def _raw(run: OperatorRun, key: str) -> bytes | None:
    found = run.configs().client.store.get(key)
    return found.value if found is not None else None


def test_a_saved_rollout_put_back_never_runs_and_the_current_one_is_restored(
    operator_run: OperatorRun,
) -> None:
    # The attack of docs/security.md ("Replays across a record's lifetime"): a rollout record
    # and candidate saved earlier, put back with a raw etcd put while ACTIVE still has their
    # base version, first during the next rollout, then after the rollouts ended.
    run = operator_run
    canary, other = _two_agents_on_version_1(run)
    client = run.configs().client
    rollout_key, candidate_key = (
        client.layout.rollout("sniffer"),
        client.layout.candidate("sniffer"),
    )

    run.patch("sniffer", {"spec": {"config": {"snaplen": 512}}})
    wait_for("the canary's agent wrote the candidate", lambda: _written(run, canary) == 512)
    saved = {key: _raw(run, key) for key in (rollout_key, candidate_key)}
    assert all(saved.values())

    # spec.config changes during the rollout: the next one starts on the same base version.
    run.patch("sniffer", {"spec": {"config": {"snaplen": 640}}})
    wait_for("the canary's agent wrote the next candidate", lambda: _written(run, canary) == 640)

    def second_anchored() -> bool:
        record = Rollouts(run.configs()).record("sniffer")
        status = run.get("sniffer")["status"]
        return record is not None and status.get("specConfigDigest") == record.digest

    # The reconcile publishes the rollout's anchor with the spec's digest, in one patch.
    wait_for("status shows the second rollout", second_anchored)
    current = _raw(run, rollout_key)
    status_before = run.get("sniffer")["status"]["rollout"]
    assert status_before["phase"] == "Progressing" and status_before["version"] == 2
    writes = _logged_writes(run, canary, 3)  # version 1, then the candidates 512 and 640

    for key, value in saved.items():
        assert value is not None
        client.store.put(key, value)
    wait_for(
        "the operator took the replayed record away",
        lambda: _raw(run, rollout_key) != saved[rollout_key],
        timeout=30,
    )
    # The running agent refused it and kept the current candidate: no write at all.
    assert _writes(run, canary) == writes, run.agent_log(canary)
    assert (_written(run, canary), _written(run, other)) == (640, 256)
    # The operator wrote the current rollout again (higher sequence), not ended it.
    restored = Rollouts(run.configs()).record("sniffer")
    assert restored is not None and restored.canaries == (canary,)
    assert restored.digest == json.loads(current or b"{}")["digest"]
    assert restored.sequence > status_before["sequence"]
    run.wait_event("sniffer", "RolloutRecordReplayed")
    wait_for(
        "status anchors the restored record",
        lambda: run.get("sniffer")["status"]["rollout"]["sequence"] == restored.sequence,
    )
    shown = run.get("sniffer")["status"]["rollout"]
    assert (shown["phase"], shown["version"], shown["since"]) == (
        "Progressing",
        2,
        status_before["since"],
    )
    assert run.configs().get_active("sniffer").version == 1
    # Not asserted: the agent logging RecordReplayed. It reads the record again when its watch
    # fires, so when the operator has already written the current record back it never sees
    # the replay at all; what matters (the canary's agent wrote nothing) is asserted above.

    # spec.config goes back to ACTIVE's: the rollout ends, ACTIVE keeps version 1, so a saved
    # record still has the current base version. Put back, it is refused and ended again.
    run.patch("sniffer", {"spec": {"config": {"snaplen": 256}}})
    wait_for("the canary's agent back on ACTIVE", lambda: _written(run, canary) == 256)
    run.wait_condition("sniffer", "Rollout", status="False", reason="Superseded")
    ended = _raw(run, rollout_key)
    assert ended is not None and json.loads(ended)["canaries"] == []
    writes = _logged_writes(run, canary, 4)  # and ACTIVE's 256 again
    replays = sum(1 for e in run.events("sniffer") if e.reason == "RolloutRecordReplayed")
    for key, value in saved.items():
        assert value is not None
        client.store.put(key, value)
    wait_for(
        "the replay ended again",
        lambda: (
            (found := _raw(run, rollout_key)) is not None
            and found != saved[rollout_key]
            and json.loads(found)["canaries"] == []
        ),
        timeout=30,
    )
    assert _raw(run, candidate_key) is None
    assert _writes(run, canary) == writes, run.agent_log(canary)
    assert (_written(run, canary), _written(run, other)) == (256, 256)
    wait_for(
        "a second RolloutRecordReplayed event",
        lambda: (
            sum(1 for e in run.events("sniffer") if e.reason == "RolloutRecordReplayed") > replays
        ),
    )
    assert run.configs().get_active("sniffer").version == 1
