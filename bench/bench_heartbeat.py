"""Missed-heartbeat detection: lease-bound keys (this design) vs polled timestamps (the old one).

This design: a child process runs the library's Heartbeater (lease TTL = interval x allowed
misses) and is SIGKILLed; the parent watches the instance prefix through the library
(Registry.watch_instances) and records when etcd deletes the key on lease expiry. Latency =
delete event - kill, both on this process's time.perf_counter().

Old design, simulated: an instance writes `{"last_heartbeat": <wall time>}` every heartbeat
interval with a plain put; a monitor lists the prefix every poll interval and declares an
instance dead when its timestamp is older than `misses` intervals. The instance "dies" (stops
writing) at a random phase; latency = detection - death, on the same perf_counter clock.
SCALE: the old design beat and polled every 30 s; here both run at 1 s (30x faster), so its
measured latencies are also reported multiplied by 30 (`*_scaled_to_30s`) for a real-time
comparison. Polling latency scales linearly with the interval, so the scaling is exact up to
the list call's own cost.

Stopped component: a real defender-agent (`--health-check process`) runs beside a component
process that is SIGSTOPped while the agent stays healthy; latency = the lease's delete event
minus the SIGSTOP. The agent checks once per beat and stops renewing, so detection is bounded
by the lease TTL after the last renewal before the stop.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from bench_support import etcd_cluster, settings_for, summary, write_result
from defender_config import (
    DefenderClient,
    EnvelopeOptions,
    InstanceEvent,
    LibrarySettings,
    Registry,
)

CHILD = Path(__file__).with_name("heartbeat_child.py")
# (heartbeat interval s, allowed misses) -> lease TTL = product; etcd's minimum TTL with the
# harness's 2 s election timeout is 3 s.
SETTINGS = [(1.0, 3), (1.0, 5), (2.0, 5)]
OLD_SCALE = 30.0  # the old design's 30 s interval, run at 1 s
TARGET_SLACK_SECONDS = 1.0


def lease_trials(endpoints: list[str], interval: float, misses: int, trials: int) -> list[dict]:
    settings = LibrarySettings(
        etcd=settings_for(endpoints),
        prefix="/bench-hb",
        envelope=EnvelopeOptions(compress=False, encrypt=False),
    )
    client = DefenderClient(settings, None, registry=CollectorRegistry(), alert_sinks=[])
    registry = Registry(client)
    out = []
    try:
        for trial in range(trials):
            component, instance = f"hb-{int(interval * misses)}", f"i{trial}"
            deleted = threading.Event()
            last_put: list[float] = []
            deleted_at: list[float] = []

            def on_event(
                ev: InstanceEvent,
                inst: str = instance,
                puts: list[float] = last_put,
                deletes: list[float] = deleted_at,
                done: threading.Event = deleted,
            ) -> None:
                if ev.instance != inst:
                    return
                now = time.perf_counter()
                if ev.kind == "put":
                    puts.append(now)
                else:
                    deletes.append(now)
                    done.set()

            watch = registry.watch_instances(on_event, component=component)
            child = subprocess.Popen(
                [
                    sys.executable,
                    str(CHILD),
                    json.dumps(endpoints),
                    settings.prefix,
                    component,
                    instance,
                    str(interval),
                    str(misses),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert child.stdout is not None
                assert child.stdout.readline().strip() == "READY", "child failed to start"
                # Run a few beats, then die at a random phase of the interval.
                time.sleep(2 * interval + random.uniform(0, interval))
                killed = time.perf_counter()
                os.kill(child.pid, signal.SIGKILL)
            finally:
                child.wait(timeout=30)
            ttl = max(2, int(interval * misses + 0.999))
            if not deleted.wait(ttl + 30):
                raise RuntimeError(f"no delete event within {ttl + 30}s of the kill")
            watch.cancel()
            beats_before = [t for t in last_put if t <= killed]
            row = {
                "interval_seconds": interval,
                "misses": misses,
                "lease_ttl_seconds": ttl,
                "detection_after_death_seconds": deleted_at[0] - killed,
                "detection_after_last_beat_seconds": deleted_at[0] - beats_before[-1]
                if beats_before
                else None,
                "beats_seen": len(beats_before),
            }
            out.append(row)
            print(
                f"lease TTL {ttl:>2d}s: detected {row['detection_after_death_seconds']:.2f}s "
                f"after death"
            )
    finally:
        client.close()
    return out


# The stand-in component: it only has to exist, and to be stopped.
SLEEPER = "import time\nwhile True:\n    time.sleep(0.2)\n"


def stopped_component_trials(
    endpoints: list[str], interval: float, misses: int, trials: int, workdir: Path
) -> list[dict]:
    settings = LibrarySettings(
        etcd=settings_for(endpoints),
        prefix="/bench-stop",
        envelope=EnvelopeOptions(compress=False, encrypt=False),
    )
    client = DefenderClient(settings, None, registry=CollectorRegistry(), alert_sinks=[])
    registry = Registry(client)
    # Plaintext values: the agent needs no keyring here.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFENDER_")}
    env.update(DEFENDER_ENVELOPE__ENCRYPT="false", DEFENDER_ENVELOPE__COMPRESS="false")
    ttl = max(2, int(interval * misses + 0.999))
    out = []
    try:
        for trial in range(trials):
            component, instance = f"stop-{ttl}", f"s{trial}"
            name = f"bench-comp-{os.getpid() % 10000}-{trial}"
            puts: list[float] = []
            deleted = threading.Event()
            deleted_at: list[float] = []

            def on_event(
                ev: InstanceEvent,
                inst: str = instance,
                puts: list[float] = puts,
                deletes: list[float] = deleted_at,
                done: threading.Event = deleted,
            ) -> None:
                if ev.instance != inst:
                    return
                (puts if ev.kind == "put" else deletes).append(time.perf_counter())
                if ev.kind == "delete":
                    done.set()

            watch = registry.watch_instances(on_event, component=component)
            agent_log = workdir / f"agent-{instance}.log"
            comp = subprocess.Popen([name, "-c", SLEEPER], executable=sys.executable)
            agent = subprocess.Popen(
                [
                    sys.executable, "-m", "defender_agent",
                    "--component", component,
                    "--output-path", str(workdir / f"{instance}.json"),
                    "--etcd-endpoints", ",".join(endpoints),
                    "--prefix", settings.prefix,
                    "--reload-method", "none",
                    "--heartbeat-interval-seconds", str(interval),
                    "--heartbeat-misses", str(misses),
                    "--health-check", "process",
                    "--health-process", name,
                    "--health-start-grace-seconds", "0",
                ],
                env={**env, "POD_NAME": instance},
                stdout=subprocess.DEVNULL,
                stderr=agent_log.open("wb"),
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 30
                # Its record is put once (a steady beat is a lease keep-alive, no put).
                while not puts:
                    if time.monotonic() > deadline or agent.poll() is not None:
                        tail = agent_log.read_text(errors="replace")[-2000:]
                        raise RuntimeError(f"the agent did not start heartbeating:\n{tail}")
                    time.sleep(0.05)
                time.sleep(2 * interval + random.uniform(0, interval))
                stopped = time.perf_counter()
                os.kill(comp.pid, signal.SIGSTOP)
                if not deleted.wait(ttl + 30):
                    raise RuntimeError(f"no delete event within {ttl + 30}s of the SIGSTOP")
            finally:
                watch.cancel()
                os.kill(comp.pid, signal.SIGCONT)
                comp.kill()
                comp.wait(timeout=10)
                agent.terminate()
                agent.wait(timeout=30)
            row = {
                "interval_seconds": interval,
                "misses": misses,
                "lease_ttl_seconds": ttl,
                "detection_after_stop_seconds": deleted_at[0] - stopped,
            }
            out.append(row)
            print(
                f"stopped component, lease TTL {ttl:>2d}s: detected "
                f"{row['detection_after_stop_seconds']:.2f}s after SIGSTOP"
            )
    finally:
        client.close()
    return out


def old_design_trials(endpoints: list[str], interval: float, misses: int, trials: int) -> list:
    """Polled timestamps, run in this process with the library's store (plain JSON puts)."""
    settings = LibrarySettings(
        etcd=settings_for(endpoints),
        prefix="/bench-old",
        envelope=EnvelopeOptions(compress=False, encrypt=False),
    )
    client = DefenderClient(settings, None, registry=CollectorRegistry(), alert_sinks=[])
    prefix = "/bench-old/heartbeats/"
    out = []
    try:
        for trial in range(trials):
            key = f"{prefix}i{trial}"
            alive = threading.Event()
            alive.set()
            stop = threading.Event()
            died: list[float] = []
            detected: list[float] = []

            def beat(k: str = key, a: threading.Event = alive) -> None:
                while a.is_set():
                    stamp = datetime.now(UTC).isoformat()
                    client.put_json(k, {"last_heartbeat": stamp})
                    time.sleep(interval)

            def monitor(
                k: str = key,
                s: threading.Event = stop,
                died: list[float] = died,
                detected: list[float] = detected,
            ) -> None:
                # The old monitor woke on its own schedule, independent of the instances.
                time.sleep(random.uniform(0, interval))
                while not s.is_set():
                    for sv in client.store.list_prefix(prefix):
                        if sv.key != k:
                            continue
                        stamp = datetime.fromisoformat(json.loads(sv.value)["last_heartbeat"])
                        age = (datetime.now(UTC) - stamp).total_seconds()
                        if age > interval * misses and died:
                            detected.append(time.perf_counter())
                            s.set()
                    s.wait(interval)

            writer = threading.Thread(target=beat, daemon=True)
            poller = threading.Thread(target=monitor, daemon=True)
            writer.start()
            poller.start()
            time.sleep(2 * interval + random.uniform(0, interval))
            alive.clear()
            died.append(time.perf_counter())
            writer.join()
            poller.join(timeout=interval * (misses + 3) + 30)
            stop.set()
            if not detected:
                raise RuntimeError("the simulated old monitor never detected the death")
            latency = detected[0] - died[0]
            out.append(
                {
                    "interval_seconds": interval,
                    "poll_seconds": interval,
                    "misses": misses,
                    "threshold_seconds": interval * misses,
                    "detection_after_death_seconds": latency,
                    "detection_after_death_scaled_to_30s": latency * OLD_SCALE,
                }
            )
            print(f"old design (x1/30): detected {latency:.2f}s after death")
    finally:
        client.close()
    return out


def run(quick: bool = False) -> dict[str, Any]:
    random.seed(3)
    trials = 2 if quick else 5
    with etcd_cluster() as cluster:
        endpoints = cluster.endpoints
        lease: list[dict] = []
        for interval, misses in SETTINGS:
            n = trials if interval * misses <= 5 else max(2, trials - 2)
            lease += lease_trials(endpoints, interval, misses, n)
        old = old_design_trials(endpoints, 1.0, 3, trials)
        with tempfile.TemporaryDirectory() as workdir:
            stopped = stopped_component_trials(endpoints, 1.0, 3, trials, Path(workdir))
    by_ttl: dict[int, list[float]] = {}
    for row in lease:
        by_ttl.setdefault(row["lease_ttl_seconds"], []).append(row["detection_after_death_seconds"])
    worst_over_ttl = max(
        row["detection_after_death_seconds"] - row["lease_ttl_seconds"] for row in lease
    )
    old_lat = [r["detection_after_death_seconds"] for r in old]
    return {
        "description": __doc__,
        "unit": "seconds",
        "target": "detection <= lease TTL + 1 s",
        "old_design_scale": f"1 s standing for {OLD_SCALE:g} s (x{OLD_SCALE:g})",
        "lease": lease,
        "lease_summary": {str(ttl): summary(v) for ttl, v in sorted(by_ttl.items())},
        "old_design": old,
        "old_design_summary": summary(old_lat),
        "old_design_summary_scaled_to_30s": summary([x * OLD_SCALE for x in old_lat]),
        "stopped_component": stopped,
        "stopped_component_summary": summary([r["detection_after_stop_seconds"] for r in stopped]),
        "worst_detection_minus_ttl_seconds": worst_over_ttl,
        "target_met": worst_over_ttl <= TARGET_SLACK_SECONDS,
        "restart_call_latency": "measured by bench_operator.py (restart trials)",
    }


if __name__ == "__main__":
    write_result("heartbeat_detection", run(quick="--quick" in sys.argv))
