"""The user's journey on the harness's node, as `make up NODE=1` sets it up (_journey.py): the
chart installed with the local images and `agent.components` for the samples' namespace, the
four sample DefenderComponents, and one workload per component (the stand-in as the main
container, the `defender-agent` sidecar rendered by the chart's own agent helper through
charts/ml-defender/examples/agent-sidecar). Each component must become Ready with its one
instance alive and heartbeating; a config edit must reach the running process; a deleted pod
must come back, register, and the component be Ready again. Then what goes wrong in a running
system: a crashed agent (kubelet restarts it, the pod re-registers), a hung agent (heartbeats
stop, the operator deletes the pod, the ReplicaSet brings a new one), a deleted etcd member pod
(it rejoins on its PVC, no acknowledged write lost), a deleted etcd member PVC and pod (a new
member replaces it, learner then voter, no write refused or lost), a key rotation (every
sidecar reports the new key, nothing fails to decode), `helm upgrade` (the operator rolls,
nothing else) and `helm uninstall` (the CRD, the components and the etcd PVCs stay).

Phase times are printed as they happen and again in the terminal summary; no time is asserted.

Runs in `make test` (about 7 minutes on this 2-core machine when nothing else runs). Under heavy
contention (load average ~50) the agents can take longer to start than the samples' 60 s startup
grace, so the operator restarts them before they register (docs/local-cluster.md).
"""

from __future__ import annotations

import json
import os
import signal
from datetime import UTC, datetime
from typing import Any

import pytest
from journey_support import (
    ETCD,
    ChartEtcd,
    EtcdctlError,
    Phases,
    agent_pid,
    etcd_admits_only_its_clients,
    parse_time,
    process_gone,
    remove_release_leftovers,
    stand_in_versions,
)
from node_support import Kubectl, build_images

from defender_devcluster import LocalCluster, wait_for
from defender_devcluster._journey import (
    CHART,
    NAMESPACE,
    RELEASE,
    SAMPLES_NAMESPACE,
    Journey,
    helm,
)


def _pods(kubectl: Kubectl, component: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/name={component}"
    items: list[dict[str, Any]] = kubectl.get("-n", SAMPLES_NAMESPACE, "pods", "-l", selector)[
        "items"
    ]
    return items


def _pod_state(pod: dict[str, Any]) -> tuple[str, dict[str, int]]:
    """UID and restart count per container: what changes when anything restarts."""
    counts = {c["name"]: c["restartCount"] for c in pod["status"].get("containerStatuses", [])}
    return pod["metadata"]["uid"], counts


def _ready(pod: dict[str, Any]) -> bool:
    conds = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def _heartbeat_after(etcd: ChartEtcd, component: str, pod: str, since: datetime) -> bool:
    beat = etcd.heartbeats(component).get(pod)
    return beat is not None and parse_time(beat["time"]) > since


def _admission_in_cluster(kubectl: Kubectl) -> None:
    """The chart's webhooks, served by the operator pod through its Service with the certificate
    it made: an invalid edit is refused by kubectl itself, a valid one is committed in the name
    of who made it."""
    user = json.loads(kubectl("auth", "whoami", "-o", "json"))["status"]["userInfo"]["username"]
    bad = {"spec": {"config": {"snaplen": 7, "colour": "red"}}}
    out = kubectl.run("-n", SAMPLES_NAMESPACE, "patch", "dfc", "sniffer", "--type=merge",
                      "-p", json.dumps(bad), check=False)  # fmt: skip
    assert out.returncode != 0, "an invalid spec.config was admitted"
    assert 'admission webhook "validate.defendercomponents.mldefender.io" denied' in out.stderr
    assert "spec.config.snaplen" in out.stderr and "spec.config.colour" in out.stderr, out.stderr
    config = kubectl.get("-n", SAMPLES_NAMESPACE, "dfc", "sniffer")["spec"]["config"]
    assert config["snaplen"] == 256 and "colour" not in config

    def committed_by_user() -> bool:
        selector = "involvedObject.name=sniffer,reason=Committed"
        events = kubectl.get("-n", SAMPLES_NAMESPACE, "events", "--field-selector", selector)
        return any(f"committed by {user}" in e.get("message", "") for e in events["items"])

    wait_for(f"a Committed Event naming {user}", committed_by_user, timeout=60, every=1.0)


def _agent_crash(kubectl: Kubectl, etcd: ChartEtcd, journey: Journey) -> None:
    """SIGKILL of the agent: kubelet restarts the container in the same pod (restartPolicy
    Always), the new agent process registers the same instance (the pod name) and beats; the
    operator has no reason to delete the pod."""
    (pod,) = _pods(kubectl, "rag")
    name = pod["metadata"]["name"]
    uid, counts = _pod_state(pod)
    killed = datetime.now(UTC)
    os.kill(agent_pid(name), signal.SIGKILL)

    def restarted() -> bool:
        (now,) = _pods(kubectl, "rag")
        now_uid, now_counts = _pod_state(now)
        assert now_uid == uid, f"the pod {name} was replaced, not its agent container restarted"
        return now_counts["defender-agent"] == counts["defender-agent"] + 1 and _ready(now)

    wait_for("kubelet restarted the rag agent container", restarted, timeout=120, every=0.5)
    wait_for(
        f"the restarted agent of {name} heartbeats",
        lambda: _heartbeat_after(etcd, "rag", name, killed),
        timeout=120,
        every=1.0,
        ignore=(EtcdctlError,),
    )
    journey.wait_ready(timeout=120, names=["rag"])
    (after,) = _pods(kubectl, "rag")
    assert _pod_state(after)[0] == uid
    assert _pod_state(after)[1]["rag"] == counts["rag"], "the component container restarted"


def _agent_hang(kubectl: Kubectl, etcd: ChartEtcd, journey: Journey, phases: Phases) -> None:
    """SIGSTOP of the agent while its container lives (kubelet sees nothing wrong): heartbeats
    stop, the lease expires, the operator deletes the pod, the ReplicaSet creates a new one
    whose agent registers, and the component is Ready again."""
    (pod,) = _pods(kubectl, "ml-detector")
    name = pod["metadata"]["name"]
    # The cadence patched at the start (5 s x 3) must be the one the agent runs.
    wait_for(
        f"{name} beats with a 15 s lease",
        lambda: (etcd.heartbeats("ml-detector").get(name) or {}).get("lease_ttl_seconds") == 15,
        timeout=120,
        every=2.0,
        ignore=(EtcdctlError,),
    )
    pid = agent_pid(name)
    phases.restart()
    os.kill(pid, signal.SIGSTOP)
    try:

        def deleted() -> bool:
            pods = _pods(kubectl, "ml-detector")
            old = [p for p in pods if p["metadata"]["name"] == name]
            return not old or bool(old[0]["metadata"].get("deletionTimestamp"))

        wait_for(f"the operator deletes {name}", deleted, timeout=180, every=0.5)
        gone = datetime.now(UTC)
        phases.mark("agent hung (SIGSTOP) -> operator deleted the pod")

        def new_pod_ready() -> str | None:
            fresh = [
                p for p in _pods(kubectl, "ml-detector")
                if p["metadata"]["name"] != name and not p["metadata"].get("deletionTimestamp")
            ]  # fmt: skip
            return fresh[0]["metadata"]["name"] if len(fresh) == 1 and _ready(fresh[0]) else None

        new = wait_for("a new ml-detector pod Ready", new_pod_ready, timeout=180, every=0.5)
        phases.mark("deleted -> new pod Ready (ReplicaSet)")
        wait_for(
            f"{new} registers",
            lambda: _heartbeat_after(etcd, "ml-detector", new, gone),
            timeout=120,
            every=1.0,
            ignore=(EtcdctlError,),
        )
        phases.mark("new pod Ready -> registered (heartbeat in etcd)")
        journey.wait_ready(
            timeout=180,
            names=["ml-detector"],
            also=lambda d: parse_time(d["status"]["lastHeartbeatTime"]) > gone,
        )
        phases.mark("registered -> component Ready 1/1")
        # The operator says it restarted the pod (its alert record names it and the reason).
        alerts = etcd.get_prefix(0, "/ml-defender/alerts/ml-detector/").values()
        restarts = [json.loads(a) for a in alerts if json.loads(a).get("kind") == "PodRestarted"]
        assert any(name in a["detail"] for a in restarts), restarts
    finally:
        # A failed wait leaves no frozen process behind (the pod's deletion kills it anyway).
        if not process_gone(pid):
            os.kill(pid, signal.SIGCONT)


def _etcd_member_replaced(kubectl: Kubectl, etcd: ChartEtcd, phases: Phases) -> None:
    """Delete the etcd leader's pod (or etcd-1 when the leader is etcd-0, where etcdctl runs)
    while writing: the StatefulSet recreates it on its PVC, the same member rejoins, and every
    acknowledged write is there, also in the rejoined member's own data."""
    status = etcd.run(0, "endpoint", "status", "--cluster", "-w", "json")
    assert status.returncode == 0, status.stderr
    members = json.loads(status.stdout)
    leader = next(
        int(m["Endpoint"].split(f"{ETCD}-")[1].split(".")[0])
        for m in members
        if m["Status"]["header"]["member_id"] == m["Status"]["leader"]
    )
    victim = leader if leader != 0 else 1
    pod_name = f"{ETCD}-{victim}"
    listed = json.loads(etcd.run(0, "member", "list", "-w", "json").stdout)["members"]
    member_ids = {m["name"]: m["ID"] for m in listed}
    pvc = kubectl.get("-n", NAMESPACE, "pvc", f"data-{pod_name}")
    old_uid = kubectl.get("-n", NAMESPACE, "pod", pod_name)["metadata"]["uid"]

    acked: dict[str, str] = {}

    def put(key: str) -> None:
        value = f"v-{key}"
        if etcd.run(0, "put", f"/journey-test/{key}", value).returncode == 0:
            acked[f"/journey-test/{key}"] = value

    for i in range(5):
        put(f"before-{i}")
    assert len(acked) == 5, "writes before the deletion failed"
    phases.restart()
    kubectl("-n", NAMESPACE, "delete", "pod", pod_name, "--wait=false")

    def back() -> bool:
        # Between the old pod's end and the StatefulSet's new one there is no pod of that name.
        out = kubectl.run("-n", NAMESPACE, "get", "pod", pod_name, "-o", "json", check=False)
        if out.returncode != 0:
            assert "NotFound" in out.stderr, out.stderr
            return False
        pod = json.loads(out.stdout)
        return bool(pod["metadata"]["uid"] != old_uid and _ready(pod))

    n = 0
    while not back():
        put(f"during-{n}")
        n += 1
        assert n < 300, f"{pod_name} not back Ready after {n} writes"
    phases.mark(f"etcd pod {pod_name} (leader {leader}) deleted -> recreated Ready")
    for i in range(5):
        put(f"after-{i}")
    print(f"[journey] etcd: {len(acked)} writes acknowledged, {n} during the outage", flush=True)

    pod = kubectl.get("-n", NAMESPACE, "pod", pod_name)
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
              if "persistentVolumeClaim" in v]  # fmt: skip
    assert claims == [f"data-{pod_name}"]
    pvc_now = kubectl.get("-n", NAMESPACE, "pvc", f"data-{pod_name}")
    assert pvc_now["metadata"]["uid"] == pvc["metadata"]["uid"]
    assert pvc_now["spec"]["volumeName"] == pvc["spec"]["volumeName"]
    # The same members (ids unchanged: the member rejoined on its data, not as a new member).
    listed = json.loads(etcd.run(0, "member", "list", "-w", "json").stdout)["members"]
    assert {m["name"]: m["ID"] for m in listed} == member_ids
    # Ready (its /readyz) comes before the rejoined member answers a quorum read at once.
    wait_for(
        "all three members healthy",
        lambda: etcd.run(0, "endpoint", "health", "--cluster").stdout.count("is healthy") == 3,
        timeout=120,
        every=2.0,
    )
    # Every acknowledged write, read linearizably and from the rejoined member's own store.
    assert etcd.get_prefix(0, "/journey-test/") == acked
    wait_for(
        f"{pod_name} holds every acknowledged write",
        lambda: etcd.get_prefix(victim, "/journey-test/", own=True) == acked,
        timeout=60,
        every=1.0,
        ignore=(EtcdctlError,),
    )
    phases.mark("member rejoined, every acknowledged write read back")


def _etcd_member_volume_lost(kubectl: Kubectl, etcd: ChartEtcd, phases: Phases) -> None:
    """Delete a member's PVC and then its pod while writing (its volume is lost): the
    StatefulSet recreates both, the pod starts on an empty volume, and the chart's `member`
    init container removes the old member and adds this one as a learner, which `member-promote`
    promotes. A NEW member (new id, the old one gone), every write during it acknowledged
    (quorum kept), every acknowledged write read back, also from the new member's own data."""
    victim = 2  # not member 0, where etcdctl runs
    pod_name = f"{ETCD}-{victim}"
    claim = f"data-{pod_name}"

    def members() -> list[dict[str, Any]]:
        out = etcd.run(0, "member", "list", "-w", "json")
        if out.returncode != 0:
            raise EtcdctlError(f"etcdctl member list: {out.stderr}")
        listed: list[dict[str, Any]] = json.loads(out.stdout)["members"]
        return listed

    before = {m["name"]: m["ID"] for m in members()}
    assert len(before) == 3 and all(not m.get("isLearner") for m in members()), before
    old_id = before[pod_name]
    old_pvc = kubectl.get("-n", NAMESPACE, "pvc", claim)
    old_uid = kubectl.get("-n", NAMESPACE, "pod", pod_name)["metadata"]["uid"]

    acked: dict[str, str] = {}
    failed: list[str] = []

    def put(key: str) -> None:
        value = f"v-{key}"
        out = etcd.run(0, "put", f"/journey-volume-lost/{key}", value)
        if out.returncode == 0:
            acked[f"/journey-volume-lost/{key}"] = value
        else:
            failed.append(f"{key}: {out.stderr.strip()}")

    for i in range(5):
        put(f"before-{i}")
    assert not failed, failed
    phases.restart()
    # The claim first: it stays Terminating while the pod uses it, and goes with the pod.
    kubectl("-n", NAMESPACE, "delete", "pvc", claim, "--wait=false")
    kubectl("-n", NAMESPACE, "delete", "pod", pod_name, "--wait=false")

    def replaced() -> bool:
        got = kubectl.run("-n", NAMESPACE, "get", "pod", pod_name, "-o", "json", check=False)
        if got.returncode != 0:
            return False  # deleted, not recreated yet
        pod = json.loads(got.stdout)
        if pod["metadata"]["uid"] == old_uid or not _ready(pod):
            return False
        try:
            listed = members()
        except EtcdctlError:
            return False
        voters = [m for m in listed if not m.get("isLearner")]
        return len(listed) == 3 and len(voters) == 3

    n = 0
    while not replaced():
        put(f"during-{n}")
        n += 1
        assert n < 600, f"{pod_name} not replaced by a promoted member after {n} writes"
    phases.mark(f"etcd PVC + pod {pod_name} deleted -> new member promoted")
    for i in range(5):
        put(f"after-{i}")
    print(f"[journey] etcd volume lost: {len(acked)} writes acknowledged, {n} during", flush=True)
    # Quorum throughout: not one write refused while the member was replaced.
    assert not failed, failed

    new_pvc = kubectl.get("-n", NAMESPACE, "pvc", claim)
    assert new_pvc["metadata"]["uid"] != old_pvc["metadata"]["uid"], "the claim was not replaced"
    assert new_pvc["spec"]["volumeName"] != old_pvc["spec"]["volumeName"], "same volume reused"
    after = {m["name"]: m["ID"] for m in members()}
    assert set(after) == set(before), after
    assert after[pod_name] != old_id, "the member kept its id: it was not replaced"
    assert old_id not in after.values(), "the old member is still listed"
    assert {k: v for k, v in after.items() if k != pod_name} == {
        k: v for k, v in before.items() if k != pod_name
    }
    # How it joined: removed + added as learner by the init container, promoted by the sidecar.
    init_log = kubectl.run("-n", NAMESPACE, "logs", pod_name, "-c", "member").stdout
    assert f"removed member {old_id:x}" in init_log, init_log
    assert f"added {pod_name} as learner {after[pod_name]:x}" in init_log, init_log
    promote_log = kubectl.run("-n", NAMESPACE, "logs", pod_name, "-c", "member-promote").stdout
    assert f"promoted learner {after[pod_name]:x} to voter" in promote_log, promote_log
    wait_for(
        "all three members healthy",
        lambda: etcd.run(0, "endpoint", "health", "--cluster").stdout.count("is healthy") == 3,
        timeout=120,
        every=2.0,
    )
    assert etcd.get_prefix(0, "/journey-volume-lost/") == acked
    wait_for(
        f"the new {pod_name} holds every acknowledged write in its own data",
        lambda: etcd.get_prefix(victim, "/journey-volume-lost/", own=True) == acked,
        timeout=60,
        every=1.0,
        ignore=(EtcdctlError,),
    )
    phases.mark("new member holds every acknowledged write")


def _key_rotation(kubectl: Kubectl, etcd: ChartEtcd, journey: Journey) -> None:
    """The operator's rotation trigger: every running sidecar ends up heartbeating with the new
    key as primary, no value fails to decode, no alert is raised."""
    components = journey.components_json()
    (old,) = {d["status"]["keyFingerprint"] for d in components}
    alerts_before = set(etcd.get_prefix(0, "/ml-defender/alerts/"))
    kubectl("-n", NAMESPACE, "annotate", "secret", "ml-defender-keyring",
            f"mldefender.io/rotate-key={datetime.now(UTC).isoformat()}")  # fmt: skip

    def promoted() -> str | None:
        status = [d.get("status") or {} for d in journey.components_json()]
        fps = {s.get("keyFingerprint") for s in status}
        stages = {s.get("rotationStage") for s in status}
        if len(fps) == 1 and old not in fps and stages == {"Grace"}:
            return str(fps.pop())
        return None

    new = wait_for("every component past the rewrap (Grace) on a new key", promoted,
                   timeout=600, every=2.0)  # fmt: skip

    def every_sidecar_on_new_key() -> bool:
        for name in journey.components:
            (pod,) = (p["metadata"]["name"] for p in _pods(kubectl, name)
                      if not p["metadata"].get("deletionTimestamp"))  # fmt: skip
            beat = etcd.heartbeats(name).get(pod)
            if beat is None or beat["key_fingerprint"] != new:
                return False
            assert beat["last_error"] is None, beat
            assert new in beat["key_fingerprints"], beat
        return True

    wait_for("every sidecar heartbeats with the new key", every_sidecar_on_new_key,
             timeout=300, every=2.0, ignore=(EtcdctlError,))  # fmt: skip
    new_alerts = set(etcd.get_prefix(0, "/ml-defender/alerts/")) - alerts_before
    assert not new_alerts, f"alerts during the rotation: {sorted(new_alerts)}"
    for d in journey.components_json():
        misconfigured = [c for c in d["status"]["conditions"] if c["type"] == "Misconfigured"]
        assert all(c["status"] != "True" for c in misconfigured), d["status"]["conditions"]


def _helm_upgrade(kubectl: Kubectl, journey: Journey, phases: Phases) -> None:
    """`helm upgrade` with a changed operator value: a new operator pod, and no sample or etcd
    pod restarted or replaced."""

    def snapshot() -> dict[str, tuple[str, dict[str, int]]]:
        pods = kubectl.get("-n", SAMPLES_NAMESPACE, "pods")["items"]
        pods += kubectl.get("-n", NAMESPACE, "pods", "-l", "app.kubernetes.io/component=etcd")[
            "items"
        ]
        return {p["metadata"]["name"]: _pod_state(p) for p in pods}

    def operator_pods() -> list[dict[str, Any]]:
        selector = "app.kubernetes.io/component=operator"
        items: list[dict[str, Any]] = kubectl.get("-n", NAMESPACE, "pods", "-l", selector)["items"]
        return items

    before = snapshot()
    (old_operator,) = (p["metadata"]["name"] for p in operator_pods())
    phases.restart()
    helm(journey.kubeconfig, "upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE,
         "--reuse-values", "--set", "operator.logLevel=DEBUG")  # fmt: skip

    def rolled() -> bool:
        pods = operator_pods()
        return len(pods) == 1 and pods[0]["metadata"]["name"] != old_operator and _ready(pods[0])

    wait_for("the operator rolled to a new pod", rolled, timeout=300, every=1.0)
    upgraded = datetime.now(UTC)
    phases.mark("helm upgrade -> new operator pod Ready")
    # The new operator sees every component Ready from fresh heartbeats.
    journey.wait_ready(
        timeout=180, also=lambda d: parse_time(d["status"]["lastHeartbeatTime"]) > upgraded
    )
    phases.mark("new operator -> every component Ready again")
    assert snapshot() == before


def _helm_uninstall(kubectl: Kubectl, journey: Journey) -> None:
    """`helm uninstall` keeps the CRD, the DefenderComponents and the etcd PVCs (docs/install.md,
    "Uninstalling")."""
    pvcs = {p["metadata"]["name"]: p["spec"]["volumeName"]
            for p in kubectl.get("-n", NAMESPACE, "pvc")["items"]}  # fmt: skip
    assert sorted(pvcs) == [f"data-{ETCD}-{i}" for i in range(3)]
    helm(journey.kubeconfig, "uninstall", RELEASE, "--namespace", NAMESPACE,
         "--wait", "--timeout", "180s")  # fmt: skip
    # --wait covers the workload objects; their pods end through the garbage collector.
    wait_for(
        "the release's pods gone",
        lambda: (
            not kubectl.get("-n", NAMESPACE, "pods", "-l", f"app.kubernetes.io/instance={RELEASE}")[
                "items"
            ]
        ),
        timeout=180,
        every=2.0,
    )
    kubectl("get", "crd", "defendercomponents.mldefender.io")
    assert sorted(d["metadata"]["name"] for d in journey.components_json()) == sorted(
        journey.components
    )
    after = kubectl.get("-n", NAMESPACE, "pvc")["items"]
    assert {p["metadata"]["name"]: p["spec"]["volumeName"] for p in after} == pvcs
    assert {p["status"]["phase"] for p in after} == {"Bound"}


def _helm_reinstall(kubectl: Kubectl, journey: Journey) -> None:
    """Installing again after `helm uninstall` finds the store as it was: the kept PVCs hold
    etcd with authentication on, so the generated etcd Secrets (root password, TLS) must have
    been kept too, or the new operator is locked out (docs/install.md, "Uninstalling")."""
    auth = kubectl.get("-n", NAMESPACE, "secret", f"{RELEASE}-etcd-auth")
    journey.install()
    reinstalled = datetime.now(UTC)
    again = kubectl.get("-n", NAMESPACE, "secret", f"{RELEASE}-etcd-auth")
    assert again["metadata"]["uid"] == auth["metadata"]["uid"]
    assert again["data"] == auth["data"]
    # Ready from heartbeats the new operator judged, on the configs the old one stored.
    journey.wait_ready(
        timeout=600, also=lambda d: parse_time(d["status"]["lastHeartbeatTime"]) > reinstalled
    )


def _published_in_mounts(kubectl: Kubectl, journey: Journey) -> bool:
    """Whether every component's agent reads, in its keyring Secret mount, the registration its
    DefenderComponent's status anchors (registrations.json, published by the operator, put in
    the volume by the kubelet)."""
    for name in journey.components:
        anchored = kubectl.get("-n", SAMPLES_NAMESPACE, "dfc", name)["status"].get("registration")
        pods = [p for p in _pods(kubectl, name) if not p["metadata"].get("deletionTimestamp")]
        if not anchored or not pods:
            return False
        out = kubectl.run(
            "-n", SAMPLES_NAMESPACE, "exec", pods[0]["metadata"]["name"], "-c", "defender-agent",
            "--", "cat", "/var/run/ml-defender/keyring/registrations.json", check=False,
        )  # fmt: skip
        if out.returncode != 0:
            return False
        if json.loads(out.stdout)["registrations"].get(name) != anchored:
            return False
    return True


# Every wait inside is bounded; the whole needs more than the suite's 600 s default on the
# shared 2-core machine (a project image rebuild alone takes minutes after a source change).
@pytest.mark.timeout(2400)
def test_the_whole_journey_on_a_node(
    node_cluster: LocalCluster,
    node_kubectl: Kubectl,
    busybox_image: str,
    journey_phases: Phases,
    node_namespace: str,
) -> None:
    assert node_cluster.node is not None
    kubectl = node_kubectl
    phases = journey_phases
    node_cluster.node.import_images(list(build_images(("etcd", "project")).values()))
    phases.mark("images built/found and imported")
    journey = Journey(node_cluster.kubeconfig, busybox_image)
    etcd = ChartEtcd(kubectl)
    try:
        journey.install()
        phases.mark("helm install + samples + workloads applied")
        journey.wait_ready(timeout=600)
        phases.mark("all four components Ready 1/1, fresh heartbeat (cold)")
        print(journey.summary(), flush=True)
        # The node enforces NetworkPolicy: the components above reached etcd through the chart's
        # policy, and a pod without the client label does not.
        etcd_admits_only_its_clients(kubectl, node_namespace, busybox_image)
        phases.mark("etcd's NetworkPolicy: labelled pods in, others out")
        # A short cadence for the component whose agent will hang (a user's spec.heartbeat):
        # the agent follows it within one old interval, by the time that step comes.
        kubectl("-n", SAMPLES_NAMESPACE, "patch", "dfc", "ml-detector", "--type=merge", "-p",
                json.dumps({"spec": {"heartbeat": {"intervalSeconds": 5,
                                                   "missedBeforeRestart": 3}}}))  # fmt: skip
        phases.restart()

        # A config edit reaches the running process: the operator publishes it, the agent
        # writes it to the shared volume and SIGHUPs the stand-in, which logs the version.
        assert stand_in_versions(kubectl, "sniffer")[-1:] == ["1.0.0"]
        patch = {"spec": {"config": {"version": "1.0.1"}}}
        kubectl("-n", SAMPLES_NAMESPACE, "patch", "dfc", "sniffer", "--type=merge",
                "-p", json.dumps(patch))  # fmt: skip
        wait_for(
            "the sniffer's stand-in logs config version 1.0.1",
            lambda: stand_in_versions(kubectl, "sniffer")[-1:] == ["1.0.1"],
            timeout=180,
            every=1.0,
        )
        phases.mark("spec.config edit -> stand-in loaded the new version")
        # Kubelet refreshes Secret volumes on its own period (about a minute): checked once the
        # steps above gave it time.
        wait_for(
            "registrations.json in every agent's keyring mount naming its status.registration",
            lambda: _published_in_mounts(kubectl, journey),
            timeout=240,
            every=5.0,
        )
        phases.mark("registrations published -> in every agent's keyring mount")
        _admission_in_cluster(kubectl)
        phases.mark("invalid edit refused by the in-cluster webhook; commit names its author")

        # A deleted pod: its ReplicaSet recreates it, the new agent registers and beats.
        (old,) = (p["metadata"]["name"] for p in _pods(kubectl, "firewall"))
        kubectl("-n", SAMPLES_NAMESPACE, "delete", "pod", old, "--wait=false")

        def replaced_and_gone() -> bool:
            names = [p["metadata"]["name"] for p in _pods(kubectl, "firewall")]
            return old not in names and len(names) == 1

        wait_for(f"{old} gone and one new firewall pod", replaced_and_gone, timeout=180)
        gone = datetime.now(UTC)
        # Only the new pod's agent can beat after the old pod is gone.
        journey.wait_ready(
            timeout=300,
            names=["firewall"],
            also=lambda d: parse_time(d["status"]["lastHeartbeatTime"]) > gone,
        )
        phases.mark("pod deleted -> recreated, registered, Ready again (warm)")

        _agent_crash(kubectl, etcd, journey)
        phases.mark("agent SIGKILLed -> container restarted, same pod re-registered, Ready")
        _agent_hang(kubectl, etcd, journey, phases)
        # Back to the samples' cadence before etcd loses a member.
        kubectl("-n", SAMPLES_NAMESPACE, "patch", "dfc", "ml-detector", "--type=merge", "-p",
                json.dumps({"spec": {"heartbeat": {"intervalSeconds": 30,
                                                   "missedBeforeRestart": 3}}}))  # fmt: skip
        _etcd_member_replaced(kubectl, etcd, phases)
        journey.wait_ready(timeout=300)
        phases.mark("components Ready after the etcd member came back")
        _etcd_member_volume_lost(kubectl, etcd, phases)
        journey.wait_ready(timeout=300)
        phases.mark("components Ready after the etcd member was replaced")
        _key_rotation(kubectl, etcd, journey)
        phases.mark("key rotation requested -> every sidecar on the new key")
        _helm_upgrade(kubectl, journey, phases)
        print(journey.summary(), flush=True)
        phases.restart()
        _helm_uninstall(kubectl, journey)
        phases.mark("helm uninstall (CRD, components, PVCs, etcd Secrets kept)")
        _helm_reinstall(kubectl, journey)
        phases.mark("helm install again -> every component Ready on the kept store")
    finally:
        journey.uninstall()
        remove_release_leftovers(kubectl, journey.components)
