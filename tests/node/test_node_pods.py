"""Pods really run on the harness's node: Ready, logs, exec, Services through kube-proxy, names
through CoreDNS, PVCs bound to the harness's PersistentVolumes, and no way out of the machine."""

from __future__ import annotations

import errno
import ipaddress
import socket
import subprocess
from pathlib import Path

import pytest
from node_support import Kubectl, busybox_pod, tcp_connects, wait_pod_ready

from defender_devcluster import LocalCluster, wait_for
from defender_devcluster._kube import SERVICE_CIDR
from defender_devcluster._nodenet import host_fence_rules


def test_the_node_is_ready_with_a_non_loopback_internal_ip(
    node_cluster: LocalCluster, node_kubectl: Kubectl
) -> None:
    node = node_kubectl.get("node", "defender-node")
    conds = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert conds["Ready"] == "True"
    internal = [a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"]
    assert internal == [node_cluster.state().node_ip]
    assert not ipaddress.ip_address(internal[0]).is_loopback


def test_a_pod_runs_to_ready_and_gets_an_ip_in_the_pod_cidr(
    node_cluster: LocalCluster, node_kubectl: Kubectl, node_namespace: str, busybox_image: str
) -> None:
    node_kubectl.apply(
        busybox_pod(busybox_image, "sleeper", node_namespace, "echo started; sleep 3600")
    )
    pod = wait_pod_ready(node_kubectl, node_namespace, "sleeper")
    assert pod["spec"]["nodeName"] == "defender-node"
    pod_cidr = node_cluster.state().pod_cidr
    assert pod_cidr is not None
    assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(pod_cidr)


def test_kubectl_logs_and_exec_reach_the_container(
    node_kubectl: Kubectl, node_namespace: str, busybox_image: str
) -> None:
    node_kubectl.apply(
        busybox_pod(busybox_image, "talker", node_namespace, "echo hello-from-the-pod; sleep 3600")
    )
    wait_pod_ready(node_kubectl, node_namespace, "talker")

    def logged() -> bool:
        return "hello-from-the-pod" in node_kubectl("-n", node_namespace, "logs", "talker")

    wait_for("the pod's log line", logged, timeout=30, every=0.5)
    out = node_kubectl("-n", node_namespace, "exec", "talker", "--", "sh", "-c", "echo $((6*7))")
    assert out.strip() == "42"
    assert node_kubectl("-n", node_namespace, "exec", "talker", "--", "hostname").strip() == (
        "talker"
    )


def test_a_service_name_resolves_through_coredns_and_answers_through_kube_proxy(
    node_kubectl: Kubectl, node_namespace: str, busybox_image: str
) -> None:
    ns = node_namespace
    www = "/tmp/www"
    serve = f"mkdir -p {www} && echo served-by-web > {www}/index.html && httpd -f -p 8080 -h {www}"
    node_kubectl.apply(busybox_pod(busybox_image, "web", ns, serve))
    node_kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": ns},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
        }
    )
    node_kubectl.apply(busybox_pod(busybox_image, "client", ns, "sleep 3600"))
    wait_pod_ready(node_kubectl, ns, "web")
    wait_pod_ready(node_kubectl, ns, "client")
    cluster_ip = node_kubectl.get("-n", ns, "service", "web")["spec"]["clusterIP"]
    fqdn = f"web.{ns}.svc.cluster.local"

    def resolved() -> str | None:
        out = node_kubectl.run("-n", ns, "exec", "client", "--", "nslookup", fqdn, check=False)
        return out.stdout if cluster_ip in out.stdout else None

    wait_for(f"{fqdn} -> {cluster_ip}", resolved, timeout=60, every=1.0)

    def answered() -> str | None:
        # busybox-static's wget crashes in this image (static glibc); nc speaks HTTP well enough.
        request = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {cluster_ip} 80"
        out = node_kubectl.run("-n", ns, "exec", "client", "--", "sh", "-c", request, check=False)
        return out.stdout if "served-by-web" in out.stdout else None

    wait_for(f"http://{cluster_ip}/ through the Service", answered, timeout=60, every=1.0)


def test_a_pvc_binds_to_a_harness_volume_and_keeps_what_a_pod_wrote(
    node_cluster: LocalCluster, node_kubectl: Kubectl, node_namespace: str, busybox_image: str
) -> None:
    ns = node_namespace
    node_kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": ns},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
    )

    def bound() -> str | None:
        pvc = node_kubectl.get("-n", ns, "pvc", "data")
        return pvc["spec"].get("volumeName") if pvc["status"].get("phase") == "Bound" else None

    volume = wait_for("PVC data Bound", bound, timeout=60, every=0.5)
    pod = busybox_pod(
        busybox_image,
        "writer",
        ns,
        f"echo kept-by-{ns} > /data/proof && sleep 3600",
        container={"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
        volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
    )
    node_kubectl.apply(pod)
    wait_pod_ready(node_kubectl, ns, "writer")
    host_path = Path(node_kubectl.get("pv", volume)["spec"]["hostPath"]["path"])
    assert host_path.is_relative_to(node_cluster.run_dir)
    wait_for(
        "the pod's file on the volume",
        lambda: (
            (host_path / "proof").is_file()
            and (host_path / "proof").read_text().strip() == f"kept-by-{ns}"
        ),
        timeout=30,
        every=0.5,
    )


def test_a_network_policy_admits_only_the_pods_it_names(
    node_kubectl: Kubectl, node_namespace: str, busybox_image: str
) -> None:
    """The node enforces NetworkPolicy (kube-router's firewall, as on a default k3s), so the
    chart's etcd policy can be tested on real pods (test_node_chart.py)."""
    ns = node_namespace
    www = "/tmp/www"
    serve = f"mkdir -p {www} && echo served-by-web > {www}/index.html && httpd -f -p 8080 -h {www}"
    node_kubectl.apply(busybox_pod(busybox_image, "web", ns, serve))
    friend = busybox_pod(busybox_image, "friend", ns, "sleep 3600")
    friend["metadata"]["labels"]["role"] = "friend"
    node_kubectl.apply(friend)
    node_kubectl.apply(busybox_pod(busybox_image, "stranger", ns, "sleep 3600"))
    ip = wait_pod_ready(node_kubectl, ns, "web")["status"]["podIP"]
    wait_pod_ready(node_kubectl, ns, "friend")
    wait_pod_ready(node_kubectl, ns, "stranger")
    # Without a policy both get in (once httpd listens): a refusal below is the policy's.
    wait_for(
        "web answering",
        lambda: tcp_connects(node_kubectl, ns, "friend", ip, 8080),
        timeout=60,
        every=0.5,
    )
    assert tcp_connects(node_kubectl, ns, "stranger", ip, 8080)

    node_kubectl.apply(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "web", "namespace": ns},
            "spec": {
                "podSelector": {"matchLabels": {"app": "web"}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "friend"}}}]}],
            },
        }
    )
    wait_for(
        "the stranger shut out",
        lambda: not tcp_connects(node_kubectl, ns, "stranger", ip, 8080),
        timeout=60,
        every=1.0,
    )
    assert tcp_connects(node_kubectl, ns, "friend", ip, 8080)
    assert not tcp_connects(node_kubectl, ns, "stranger", ip, 8080)


def test_a_pod_cannot_reach_anything_outside_the_machine(
    node_cluster: LocalCluster, node_kubectl: Kubectl, node_namespace: str, busybox_image: str
) -> None:
    ns = node_namespace
    assert node_cluster.node is not None and node_cluster.node.network is not None
    netns = node_cluster.node.network.netns
    node_kubectl.apply(busybox_pod(busybox_image, "prisoner", ns, "sleep 3600"))
    wait_pod_ready(node_kubectl, ns, "prisoner")
    # The host's own outside addresses (a packet to them never leaves the machine even if the
    # fence failed): the node has no route to them, only to the pod and service ranges.
    for target in _host_outside_addresses():
        out = node_kubectl.run(
            "-n", ns, "exec", "prisoner", "--", "sh", "-c", f"echo x | nc -w 3 {target} 22",
            check=False,
        )  # fmt: skip
        assert out.returncode != 0, f"a pod reached {target}: {out.stdout!r}"
        # The node answers with ICMP net-unreachable, but the kernel rate-limits those per source
        # and a busy machine may drop one, which nc reports as a timeout (seen once in CI). The
        # proof that nothing left is the node's routing table, read at the same moment.
        assert "Network is unreachable" in out.stderr or "timed out" in out.stderr, out.stderr
        route = subprocess.run(
            ["ip", "-n", netns, "route", "get", target], capture_output=True, text=True
        )
        assert route.returncode != 0, f"the node has a route to {target}: {route.stdout}"
        assert "unreachable" in route.stderr.lower(), route.stderr
    # Names outside the cluster are not resolved either: CoreDNS forwards nowhere.
    out = node_kubectl.run(
        "-n", ns, "exec", "prisoner", "--", "nslookup", "example.com", check=False
    )
    assert "can't find example.com" in out.stdout + out.stderr, out.stdout
    assert "Name:" not in out.stdout


def test_the_host_never_dials_the_service_range_off_the_machine(node_cluster: LocalCluster) -> None:
    """The host has no route to ClusterIPs but its default one, off the machine. The API server
    calls Service-backed webhooks at their endpoints (pod IPs), and anything else on the host
    dialing a ClusterIP is refused at once instead of leaving (seen: the webhook call went out
    and a stranger's TLS answered)."""
    assert node_cluster.node is not None and node_cluster.node.network is not None
    netns = node_cluster.node.network.netns
    rules = [r for r in host_fence_rules(netns) if r.startswith("-A OUTPUT")]
    assert rules and SERVICE_CIDR in rules[0] and "REJECT" in rules[0], rules
    target = str(ipaddress.ip_network(SERVICE_CIDR)[1])  # the `kubernetes` Service's ClusterIP
    with socket.socket() as sock:
        sock.settimeout(5)
        with pytest.raises(OSError) as caught:
            sock.connect((target, 443))
    assert caught.value.errno == errno.ENETUNREACH, caught.value


def _host_outside_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True)
    found = []
    for line in out.stdout.splitlines():
        fields = line.split()
        ifname, addr = fields[1], fields[3].split("/")[0]
        if ifname != "lo" and not ifname.startswith("dfh"):
            found.append(addr)
    assert found, f"no outside address on this machine: {out.stdout}"
    return found
