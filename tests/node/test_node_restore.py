"""docs/operations.md "Restore" on the harness's node, with the components left running: the
chart and the four samples as `make up` installs them, a snapshot, a `spec.config` edit after
it, the operator and every member stopped, each member's volume restored with the plan's
`etcdutl snapshot restore` line (the PVs are host directories here), the members and then the
operator started again. No component pod is restarted by hand, nor may the operator restart one:
each agent must be back on the restored cluster within seconds (it logs in again: its token was
the old cluster's), beat there, load the edit lost with the restore once the operator commits
it again (`SpecRecommittedAfterRestore`, the only Warning allowed), and deliver a `spec.config`
edit made after the restore.

With the library of e197768 (no new login after a timed-out call) it failed here: the agents
beat again after 27 s (the restored log had reached their tokens' index by then), but the
sniffer never loaded the edit made after the restore. Under `make up` the same library left the
agents silent for two minutes and the operator restarted every pod.

Marked slow: a chart install on the node and a wait past two heartbeat thresholds (the
samples' 30 s x 3), about 5 minutes; the project image is built first when missing.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from journey_support import (
    ETCD,
    ChartEtcd,
    EtcdctlError,
    Phases,
    parse_time,
    remove_release_leftovers,
    stand_in_versions,
)
from node_support import Kubectl, build_images

from defender_cli import main as plugin
from defender_devcluster import LocalCluster, tool, wait_for
from defender_devcluster._journey import NAMESPACE, RELEASE, SAMPLES_NAMESPACE, Journey
from defender_operator._decisions.restore import RECOMMITTED

pytestmark = pytest.mark.slow

OPERATOR = f"{RELEASE}-operator"
# The samples' spec.heartbeat: 30 s x 3. The operator restarts a pod silent for that long.
HEARTBEAT_THRESHOLD_SECONDS = 90
# A member's uid/gid (the chart's etcd.podSecurityContext).
ETCD_UID = 65532


def _pod_states(kubectl: Kubectl) -> dict[str, tuple[str, dict[str, int]]]:
    """pod name -> (UID, restart count per container) of every sample pod."""
    pods = kubectl.get("-n", SAMPLES_NAMESPACE, "pods")["items"]
    return {
        p["metadata"]["name"]: (
            p["metadata"]["uid"],
            {c["name"]: c["restartCount"] for c in p["status"].get("containerStatuses", [])},
        )
        for p in pods
    }


def _volume_dir(kubectl: Kubectl, member: int) -> Path:
    """The host directory of member's PV (the harness's PVs are hostPath directories)."""
    claim = kubectl.get("-n", NAMESPACE, "pvc", f"data-{ETCD}-{member}")
    pv = kubectl.get("pv", claim["spec"]["volumeName"])
    return Path(pv["spec"]["hostPath"]["path"])


def _plugin(*argv: str) -> Any:
    out, err = io.StringIO(), io.StringIO()
    code = plugin([*argv, "-o", "json", "--no-color"], out=out, err=err)
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue())


def _component_warnings(kubectl: Kubectl, since: datetime) -> list[str]:
    """Warning events on the sample DefenderComponents since ``since`` (PodRestarted, a
    breaker's verdict, ...)."""
    events = kubectl.get("-n", SAMPLES_NAMESPACE, "events")["items"]
    return [
        f"{e['involvedObject']['name']}: {e['reason']}: {e.get('message', '')}"
        for e in events
        if e["type"] == "Warning"
        and e["involvedObject"]["kind"] == "DefenderComponent"
        and parse_time(e.get("lastTimestamp") or e.get("eventTime") or "1970-01-01T00:00:00Z")
        >= since
    ]


@pytest.mark.timeout(1800)
def test_agents_run_through_an_etcd_restore_without_a_pod_restart(
    node_cluster: LocalCluster,
    node_kubectl: Kubectl,
    busybox_image: str,
    journey_phases: Phases,
    tmp_path: Path,
) -> None:
    assert node_cluster.node is not None
    kubectl, phases = node_kubectl, journey_phases
    node_cluster.node.import_images(list(build_images(("etcd", "project")).values()))
    journey = Journey(node_cluster.kubeconfig, busybox_image)
    etcd = ChartEtcd(kubectl)
    try:
        journey.install()
        journey.wait_ready(timeout=600)
        phases.mark("chart + samples installed, every component Ready 1/1")

        # Backup: a snapshot by member 0 onto its own volume, then off the node.
        out = etcd.run(0, "snapshot", "save", "/var/lib/etcd/restore-test.db", own=True)
        assert out.returncode == 0, out.stderr
        snapshot = tmp_path / "restore-test.db"
        shutil.move(_volume_dir(kubectl, 0) / "restore-test.db", snapshot)
        # Written after the snapshot: the agents see revisions the restored cluster lacks.
        kubectl("-n", SAMPLES_NAMESPACE, "patch", "dfc", "sniffer", "--type=merge",
                "-p", '{"spec":{"config":{"version":"1.0.1"}}}')  # fmt: skip
        wait_for(
            "the sniffer's stand-in loads 1.0.1",
            lambda: stand_in_versions(kubectl, "sniffer")[-1:] == ["1.0.1"],
            timeout=120,
            every=1.0,
        )
        before = _pod_states(kubectl)
        assert len(before) == len(journey.components), before
        phases.mark("snapshot taken, spec.config edited after it")

        # Step 1: the plan, for the chart's members (their own names and peer URLs).
        env = kubectl.get("-n", NAMESPACE, "configmap", f"{ETCD}-env")["data"]
        members = [f"--member={m}" for m in env["ETCD_INITIAL_CLUSTER"].split(",")]
        plan = _plugin(
            "restore", "--snapshot", str(snapshot), *members, "--data-dir", "/var/lib/etcd/data",
            "--token", f"{ETCD}-restored-1", "--etcdutl", str(tool("etcdutl")),
        )  # fmt: skip
        # Steps 2-3: stop the operator and every member, restore each member's volume.
        stopped = datetime.now(UTC).replace(microsecond=0)
        kubectl("-n", NAMESPACE, "scale", "deploy", OPERATOR, "--replicas=0")
        kubectl("-n", NAMESPACE, "scale", "statefulset", ETCD, "--replicas=0")
        kubectl("-n", NAMESPACE, "wait", "--for=delete", "pod", "-l",
                "app.kubernetes.io/component=etcd", "--timeout=180s", timeout=200)  # fmt: skip
        kubectl("-n", NAMESPACE, "wait", "--for=delete", "pod", "-l",
                "app.kubernetes.io/component=operator", "--timeout=180s", timeout=200)  # fmt: skip
        for step in plan["steps"]:
            volume = _volume_dir(kubectl, int(step["member"].rsplit("-", 1)[1]))
            (volume / "data").rename(volume / "data.before-restore")
            argv = [a.replace(step["dataDir"], str(volume / "data")) for a in step["argv"]]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            for path in [volume / "data", *(volume / "data").rglob("*")]:
                shutil.chown(path, ETCD_UID, ETCD_UID)
        phases.mark("operator and members stopped, every volume restored")

        # Step 4: every member at once, then the operator. No component pod is restarted.
        kubectl("-n", NAMESPACE, "scale", "statefulset", ETCD, "--replicas=3")
        kubectl("-n", NAMESPACE, "rollout", "status", "statefulset", ETCD, "--timeout=300s",
                timeout=320)  # fmt: skip
        kubectl("-n", NAMESPACE, "scale", "deploy", OPERATOR, "--replicas=1")
        started = datetime.now(UTC)
        t0 = time.monotonic()
        phases.mark("members Ready, operator started")

        # Every agent beats on the restored cluster, well within one heartbeat threshold.
        def beating_again() -> bool:
            fresh = []
            for name in journey.components:
                beats = etcd.heartbeats(name)
                fresh.append(any(parse_time(b["time"]) > started for b in beats.values()))
            return all(fresh)

        wait_for(
            "every agent's heartbeat on the restored cluster",
            beating_again,
            timeout=HEARTBEAT_THRESHOLD_SECONDS - 15,
            every=2.0,
            ignore=(EtcdctlError,),
        )
        phases.mark("every agent beating on the restored cluster")
        # The edit made after the snapshot was lost with it; the operator commits it again
        # (its status saw it as spec.config), and the running process loads it.
        wait_for(
            "the lost edit committed again",
            lambda: any(
                w.startswith(f"sniffer: {RECOMMITTED}:")
                for w in _component_warnings(kubectl, stopped)
            ),
            timeout=120,
            every=2.0,
        )
        wait_for(
            "the sniffer's stand-in loads 1.0.1 again",
            lambda: stand_in_versions(kubectl, "sniffer")[-1:] == ["1.0.1"],
            timeout=60,
            every=1.0,
        )
        phases.mark("the edit lost with the restore committed again -> stand-in loaded it")
        # A spec.config edit made now reaches the running process.
        kubectl("-n", SAMPLES_NAMESPACE, "patch", "dfc", "sniffer", "--type=merge",
                "-p", '{"spec":{"config":{"version":"1.0.2"}}}')  # fmt: skip
        wait_for(
            "the sniffer's stand-in loads 1.0.2 from the restored cluster",
            lambda: stand_in_versions(kubectl, "sniffer")[-1:] == ["1.0.2"],
            timeout=60,
            every=1.0,
        )
        phases.mark("spec.config edit after the restore -> stand-in loaded it")
        for name in journey.components:
            logs = kubectl.run(
                "-n", SAMPLES_NAMESPACE, "logs", f"deploy/{name}", "-c", "defender-agent"
            ).stdout  # fmt: skip
            assert "etcd answers as another cluster" in logs, name
            # How it got a valid token: usually its first call after the restore timed out
            # (the old token named an index the new log had not reached), sometimes etcd
            # refused the token outright (the new log got there first). Either way, not asserted.
            how = "after a timeout" if "logged in again" in logs else "when refused"
            print(f"[journey] {name}'s agent logged in again {how}", flush=True)

        # Past the operator's threshold (and its wait of one threshold after etcd is back):
        # still the same pods, nothing restarted, no breaker tripped.
        remaining = 2 * HEARTBEAT_THRESHOLD_SECONDS + 20 - (time.monotonic() - t0)
        if remaining > 0:
            time.sleep(remaining)
        warnings = _component_warnings(kubectl, stopped)
        assert [w for w in warnings if not w.startswith(f"sniffer: {RECOMMITTED}:")] == []
        assert _pod_states(kubectl) == before
        journey.wait_ready(timeout=120)
        phases.mark("past two heartbeat thresholds: no pod restarted, every component Ready")
    finally:
        journey.uninstall()
        remove_release_leftovers(kubectl, journey.components)
