"""A real node for the local cluster: containerd + kubelet + kube-proxy + CoreDNS + kube-router's
firewall (NetworkPolicy) in the node's network namespace (``_nodenet.py``), static
PersistentVolumes for PVCs.

Everything lives in ``<run dir>/node``:

    containerd.toml  containerd/{root,state}  c.sock   containerd's own root, state and socket
    runc/            runc's state (``runc --root``): how a crashed run's containers are found
    cni/net.d/       the bridge + host-local + portmap network; cni/ipam/ its leases
    kubelet.yaml  kubelet/  pod-logs/            KubeletConfiguration, root dir, pod logs
    Corefile  volumes/pv-*/                      CoreDNS; the PersistentVolumes' directories
    *.log *.pid *.kubeconfig                     like every other harness process

``stop()`` (and ``teardown_node`` for a crashed run) removes containers (runc), shims,
containerd, every mount under the dir, the network namespace, its veth and the host rules.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ._errors import NodeSetupError, ProcessStartError
from ._http import get_text, http_ok
from ._mounts import mounts_under, unmount_under
from ._nodenet import (
    Liveness,
    NodeNetwork,
    create_network,
    holds,
    leftovers,
    observe,
    owner_alive,
    plan_sweep,
    registered_networks,
    release_lock,
    remove_dead,
    remove_network,
    try_lock,
)
from ._oci import OciError, read_index
from ._procs import ManagedProcess, PidFile, pid_matches, read_cmdline, reap_stale, stop_pid
from ._tools import tool
from ._wait import poll

if TYPE_CHECKING:
    from ._kube import ControlPlane

log = logging.getLogger(__name__)

NODE_NAME = "defender-node"
CLUSTER_DOMAIN = "cluster.local"
DNS_SERVICE_IP = "10.0.0.10"
# containerd runs this image as every pod's sandbox; it must be among the imported archives
# (`make images` writes it, tagged with the TAG of Kubernetes' build/pause/Makefile).
PAUSE_REPOSITORY = "registry.k8s.io/pause"
STORAGE_CLASS = "defender-local"
PERSISTENT_VOLUMES = 12
PV_SIZE = "2Gi"
NODE_BINARIES = (
    "containerd",
    "runc",
    "kubelet",
    "kube-proxy",
    "coredns",
    "kube-router",
    "ctr",
)
_KUBELET_PORT = 10250
_KUBELET_HEALTHZ_PORT = 10248
_PROXY_HEALTHZ_PORT = 10256
_COREDNS_READY_PORT = 8181
_ROUTER_HEALTH_PORT = 20244


def default_node_images() -> list[Path]:
    """The pause image (built now if missing: it takes a second) and every other archive
    `make images` left in the images cache (``images.json``)."""
    from ._images import BuildContext, build_image, default_cache_dir, write_index

    cache = default_cache_dir()
    pause = build_image(BuildContext(cache_dir=cache, progress=log.info), "pause")
    index = Path(write_index(cache, [pause]))
    try:
        listed = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NodeSetupError(f"{index}: unreadable ({exc})") from exc
    archives = [Path(str(entry["archive"])) for entry in listed.values() if "archive" in entry]
    return [a for a in archives if a.is_file()]


def node_dir(run_dir: Path) -> Path:
    return Path(run_dir).resolve() / "node"


class Node:
    """One node (kubelet ``defender-node``) joined to a :class:`ControlPlane`.

    ``prepare()`` makes the network before the control plane starts (kube-apiserver listens on
    its host end); ``start(control_plane)`` starts the processes and waits for the Node to be
    Ready, kube-proxy healthy and CoreDNS ready.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        images: Sequence[Path] | None = None,
        die_with_parent: bool = False,
        start_timeout: float = 180.0,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.dir = node_dir(self.run_dir)
        # None: the pause image and whatever `make images` built (default_node_images).
        self.images = [Path(p) for p in images] if images is not None else None
        self.die_with_parent = die_with_parent
        self.start_timeout = start_timeout
        self.network: NodeNetwork | None = None
        self.containerd: ManagedProcess | None = None
        self.kubelet: ManagedProcess | None = None
        self.kube_proxy: ManagedProcess | None = None
        self.coredns: ManagedProcess | None = None
        self.kube_router: ManagedProcess | None = None
        self.service_cidr: str | None = None
        self.start_seconds: float | None = None

    # ------------------------------------------------------------------ paths
    @property
    def socket(self) -> Path:
        return self.dir / "c.sock"

    @property
    def runc_root(self) -> Path:
        return self.dir / "runc"

    @property
    def node_ip(self) -> str:
        assert self.network is not None
        return self.network.node_ip

    def processes(self) -> list[ManagedProcess]:
        """Started processes, in the order they should be stopped."""
        procs = [self.kubelet, self.kube_router, self.kube_proxy, self.coredns, self.containerd]
        return [p for p in procs if p is not None]

    # ------------------------------------------------------------------ lifecycle
    def prepare(self, service_cidr: str) -> NodeNetwork:
        """Clear what a crashed run left (this one's and any other dead node's), then make the
        network. Call before the control plane starts."""
        bins = {b: tool(b) for b in NODE_BINARIES}
        del bins  # fail before touching the network when a binary is missing
        tool("cni/bridge")
        recover_stale_nodes(keep=None)
        teardown_node(self.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        clear_volumes(self.dir / "volumes")
        self.network = create_network(self.run_dir, service_cidr)
        self.service_cidr = service_cidr
        return self.network

    def start(self, control_plane: ControlPlane) -> Node:
        if self.network is None:
            raise NodeSetupError("Node.prepare() must run before the control plane starts")
        t0 = time.monotonic()
        deadline = t0 + self.start_timeout
        cp = control_plane
        assert cp.pki is not None
        if self.images is None:
            self.images = default_node_images()
        try:
            self._write_cni()
            self.containerd = self._start(
                "containerd",
                [str(tool("containerd")), "--config", str(self._write_containerd_config())],
                lambda: self.socket.exists() and self._ctr("version") is not None,
                deadline,
            )
            self.import_images(self.images)
            kubelet_kc = self._kubeconfig(cp, "kubelet")
            self.kubelet = self._start(
                "kubelet",
                [
                    str(tool("kubelet")),
                    f"--config={self._write_kubelet_config(cp)}",
                    f"--kubeconfig={kubelet_kc}",
                    f"--root-dir={self.dir / 'kubelet'}",
                    f"--cert-dir={self.dir / 'kubelet-pki'}",
                    f"--hostname-override={NODE_NAME}",
                    f"--node-ip={self.node_ip}",
                    "--v=1",
                ],
                lambda: self._node_ready(cp),
                deadline,
            )
            self.kube_proxy = self._start(
                "kube-proxy",
                [
                    str(tool("kube-proxy")),
                    f"--kubeconfig={self._kubeconfig(cp, 'kube-proxy')}",
                    "--proxy-mode=iptables",
                    f"--hostname-override={NODE_NAME}",
                    f"--cluster-cidr={self.network.pod_cidr}",
                    f"--bind-address={self.node_ip}",
                    f"--healthz-bind-address={self.node_ip}:{_PROXY_HEALTHZ_PORT}",
                    "--metrics-bind-address=127.0.0.1:10249",
                    # conntrack limits are machine-wide: leave them as the host has them.
                    "--conntrack-max-per-core=0",
                    "--conntrack-min=0",
                    "--conntrack-tcp-timeout-established=0",
                    "--conntrack-tcp-timeout-close-wait=0",
                    "--v=1",
                ],
                lambda: http_ok(f"http://{self.node_ip}:{_PROXY_HEALTHZ_PORT}/healthz"),
                deadline,
            )
            self._apply_cluster_objects(cp)
            # NetworkPolicy enforced, as on a default k3s (kube-router's firewall, nothing else
            # of it): the chart's etcd policy is a security claim (docs/security.md), tested on
            # real pods only where it holds.
            self.kube_router = self._start(
                "kube-router",
                [
                    str(tool("kube-router")),
                    f"--kubeconfig={self._kubeconfig(cp, 'kube-router')}",
                    f"--hostname-override={NODE_NAME}",
                    f"--service-cluster-ip-range={self.service_cidr}",
                    "--run-firewall=true",
                    "--run-router=false",
                    "--run-service-proxy=false",
                    "--run-loadbalancer=false",
                    # The bridge CNI and kube-proxy own the pod network and its masquerading.
                    "--enable-cni=false",
                    "--enable-pod-egress=false",
                    f"--health-port={_ROUTER_HEALTH_PORT}",
                    "--v=1",
                ],
                lambda: http_ok(f"http://{self.node_ip}:{_ROUTER_HEALTH_PORT}/healthz"),
                deadline,
            )
            self.coredns = self._start(
                "coredns",
                [str(tool("coredns")), "-conf", str(self._write_corefile(cp))],
                lambda: http_ok(f"http://{self.node_ip}:{_COREDNS_READY_PORT}/ready"),
                deadline,
            )
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        log.info("node %s Ready in %.1fs (node IP %s)", NODE_NAME, self.start_seconds, self.node_ip)
        return self

    def stop(self) -> None:
        errors: list[BaseException] = []
        for p in self.processes():
            if p is self.containerd:
                # Containers and shims first: they outlive containerd otherwise.
                stop_containers(self.dir)
            try:
                p.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        try:
            teardown_node(self.run_dir)
        except Exception as exc:
            errors.append(exc)
        self.network = None
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ helpers
    def _start(
        self, name: str, argv: list[str], ready: Callable[[], bool], deadline: float
    ) -> ManagedProcess:
        assert self.network is not None
        proc = ManagedProcess(
            name,
            self.network.in_netns(argv),
            self.dir,
            marker=str(self.dir),
            die_with_parent=self.die_with_parent,
        )
        proc.start()

        def probe() -> bool:
            if ready():
                return True
            if not proc.running():
                raise ProcessStartError(
                    name, proc.log_path, f"exited with code {proc.exit_code()}", proc.tail(30)
                )
            return False

        done, _ = poll(probe, deadline - time.monotonic(), 0.5)
        if done is None:
            tail = proc.tail(30)
            proc.stop(timeout=5.0)
            raise ProcessStartError(
                name, proc.log_path, f"not ready after {self.start_timeout:.0f}s", tail
            )
        return proc

    def _ctr(self, *args: str, timeout: float = 60.0) -> str | None:
        argv = [str(tool("ctr")), "--address", str(self.socket), "--namespace", "k8s.io", *args]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        return out.stdout if out.returncode == 0 else None

    def import_images(self, archives: Sequence[Path]) -> None:
        """Import OCI image archives into containerd's ``k8s.io`` namespace (what the kubelet
        sees); pods use them with ``imagePullPolicy: IfNotPresent`` or ``Never``."""
        from ._images import import_archives

        import_archives(self.socket, list(archives), ctr=str(tool("ctr")), progress=log.info)

    def _kubeconfig(self, cp: ControlPlane, user: str) -> Path:
        from ._kube import write_kubeconfig

        assert cp.pki is not None
        path = self.dir / f"{user}.kubeconfig"
        write_kubeconfig(path, cp.api_url, cp.pki, user)
        return path

    def _write_cni(self) -> None:
        assert self.network is not None
        net = self.network
        conf_dir = self.dir / "cni" / "net.d"
        conf_dir.mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0",
            "name": "defender",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "dfbr0",
                    "isGateway": True,
                    # Never masquerade pod traffic to the world: the node netns has no route
                    # out, and its only NAT (to the host) is set up by _nodenet.
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": net.pod_cidr, "gateway": net.pod_gateway}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.dir / "cni" / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (conf_dir / "10-defender.conflist").write_text(json.dumps(conflist, indent=2))

    def _sandbox_image(self) -> str:
        refs: list[str] = []
        for archive in self.images or []:
            try:
                index = read_index(archive)
            except OciError as exc:
                raise NodeSetupError(str(exc)) from exc
            manifests = index.get("manifests")
            for m in manifests if isinstance(manifests, list) else []:
                ref = (m.get("annotations") or {}).get("io.containerd.image.name")
                if isinstance(ref, str):
                    refs.append(ref)
        pauses = sorted(r for r in refs if r.startswith(f"{PAUSE_REPOSITORY}:"))
        if not pauses:
            raise NodeSetupError(
                f"no {PAUSE_REPOSITORY} image among the node's images "
                f"({', '.join(refs) or 'none'}): pods cannot start without it; `make images`"
            )
        return pauses[-1]

    def _write_containerd_config(self) -> Path:
        d = self.dir
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        text = f"""version = 2
root = "{d / "containerd" / "root"}"
state = "{d / "containerd" / "state"}"
# Only what a CRI node needs; these would look for host devices or pools.
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{d / "c.ttrpc.sock"}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d / "containerd" / "opt"}"

[{cri}]
  sandbox_image = "{self._sandbox_image()}"
  # This machine refuses a negative oom_score_adj; without this runc fails with
  # "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  BinaryName = "{tool("runc")}"
  Root = "{self.runc_root}"
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "{tool("cni/bridge").parent}"
  conf_dir = "{d / "cni" / "net.d"}"
  max_conf_num = 1
"""
        path = d / "containerd.toml"
        path.write_text(text, encoding="utf-8")
        return path

    def _write_kubelet_config(self, cp: ControlPlane) -> Path:
        assert cp.pki is not None
        conf: dict[str, Any] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.node_ip,
            "port": _KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzBindAddress": self.node_ip,
            "healthzPort": _KUBELET_HEALTHZ_PORT,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(cp.pki.ca_cert)},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            # The host has the cgroup v1/v2 hybrid layout; kubelet >= 1.35 refuses v1 unless
            # told otherwise. No QoS cgroup tree: nothing here enforces allocatable.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failSwapOn": False,
            "clusterDNS": [DNS_SERVICE_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            # Pods learn no DNS server of the host: cluster names only.
            "resolvConf": "",
            "podLogsDir": str(self.dir / "pod-logs"),
            "volumePluginDir": str(self.dir / "volume-plugins"),
            "registerNode": True,
            "serializeImagePulls": False,
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "maxPods": 110,
        }
        path = self.dir / "kubelet.yaml"
        path.write_text(yaml.safe_dump(conf, sort_keys=False), encoding="utf-8")
        return path

    def _write_corefile(self, cp: ControlPlane) -> Path:
        kc = self._kubeconfig(cp, "coredns")
        # No `forward`: names outside the cluster are not resolved (nothing leaves the machine).
        text = f""".:53 {{
    bind {self.node_ip}
    errors
    ready {self.node_ip}:{_COREDNS_READY_PORT}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kc} defender-devcluster
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
    loadbalance
}}
"""
        path = self.dir / "Corefile"
        path.write_text(text, encoding="utf-8")
        return path

    def _node_ready(self, cp: ControlPlane) -> bool:
        node = _api_get_json(cp, f"/api/v1/nodes/{NODE_NAME}")
        if node is None:
            return False
        conds = node.get("status", {}).get("conditions", [])
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)

    def _apply_cluster_objects(self, cp: ControlPlane) -> None:
        from ._system import kubectl

        volumes = self.dir / "volumes"
        docs: list[dict[str, Any]] = [
            *_cluster_reader(
                "coredns",
                [
                    {
                        "apiGroups": [""],
                        "resources": ["endpoints", "services", "pods", "namespaces"],
                    },
                    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"]},
                ],
            ),
            *_cluster_reader(
                "kube-router",
                [
                    {
                        "apiGroups": [""],
                        "resources": ["pods", "namespaces", "nodes", "services", "endpoints"],
                    },
                    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"]},
                    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"]},
                ],
            ),
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": "kube-dns",
                    "namespace": "kube-system",
                    "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"},
                },
                # No selector: CoreDNS runs as a process of the node, at the node IP.
                "spec": {
                    "clusterIP": DNS_SERVICE_IP,
                    "ports": [
                        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                    ],
                },
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "kube-dns-node",
                    "namespace": "kube-system",
                    "labels": {
                        "kubernetes.io/service-name": "kube-dns",
                        "endpointslice.kubernetes.io/managed-by": "defender-devcluster",
                    },
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [self.node_ip], "conditions": {"ready": True}}],
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                ],
            },
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "StorageClass",
                "metadata": {
                    "name": STORAGE_CLASS,
                    "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
                },
                "provisioner": "kubernetes.io/no-provisioner",
                "reclaimPolicy": "Retain",
                "volumeBindingMode": "Immediate",
            },
        ]
        for i in range(PERSISTENT_VOLUMES):
            path = volumes / f"pv-{i}"
            path.mkdir(parents=True, exist_ok=True)
            # Containers may run as any user (the chart's etcd does not run as root).
            os.chmod(path, 0o777)
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolume",
                    "metadata": {
                        "name": f"defender-pv-{i}",
                        "labels": {"defender/node": NODE_NAME},
                    },
                    "spec": {
                        "capacity": {"storage": PV_SIZE},
                        "accessModes": ["ReadWriteOnce"],
                        "persistentVolumeReclaimPolicy": "Retain",
                        "storageClassName": STORAGE_CLASS,
                        "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                    },
                }
            )
        stream = yaml.safe_dump_all(docs, sort_keys=False)
        kubectl(cp.kubeconfig, "apply", "-f", "-", stdin=stream)


def _cluster_reader(user: str, reads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A ClusterRole that reads, lists and watches `reads`, bound to the node process `user` (its
    client certificate's CN is `system:<user>`, _pki.CLIENTS)."""
    name = f"defender-devcluster:{user}"
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": [{**r, "verbs": ["get", "list", "watch"]} for r in reads],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": f"system:{user}"}
            ],
        },
    ]


def _api_get_json(cp: ControlPlane, path: str) -> dict[str, Any] | None:
    from ._kube import admin_ssl_context

    assert cp.pki is not None
    try:
        status, body = get_text(f"{cp.api_url}{path}", context=admin_ssl_context(cp.pki), timeout=5)
    except (OSError, ssl.SSLError):
        return None
    if status != 200:
        return None
    data: dict[str, Any] = json.loads(body)
    return data


# ---------------------------------------------------------------------- teardown
def stop_containers(directory: Path) -> list[str]:
    """Remove every container runc knows under ``directory/runc`` and stop their shims.

    Works without containerd (a crashed run): runc's state is on disk.
    """
    removed: list[str] = []
    runc = _runc_binary()
    root = directory / "runc"
    for ns_root in sorted(root.iterdir()) if root.is_dir() else []:
        for state in sorted(p for p in ns_root.iterdir() if p.is_dir()):
            if runc is not None:
                subprocess.run(
                    [runc, "--root", str(ns_root), "delete", "--force", state.name],
                    capture_output=True,
                    check=False,
                    timeout=30,
                )
            removed.append(state.name)
    # containerd 1.6 records no shim PID on disk; a shim names its containerd's socket on its
    # command line (`-address <run dir>/node/c.sock`), which no other process shares.
    for pid in _shim_pids(directory / "c.sock"):
        stop_pid(pid, str(directory), "containerd-shim", timeout=5.0)
    _remove_empty_cgroup_parents()
    return removed


def _shim_pids(socket: Path) -> list[int]:
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = read_cmdline(int(entry.name))
        if argv and "-address" in argv[:-1] and argv[argv.index("-address") + 1] == str(socket):
            pids.append(int(entry.name))
    return pids


def _remove_empty_cgroup_parents() -> None:
    # containerd puts pod containers under a `k8s.io` cgroup in each v1 hierarchy; runc removes
    # each container's own cgroup, the parent stays. rmdir only succeeds on an empty one, so a
    # node of another run that still has containers there keeps it.
    for parent in Path("/sys/fs/cgroup").glob("*/k8s.io"):
        with contextlib.suppress(OSError):
            parent.rmdir()


def _runc_binary() -> str | None:
    try:
        return str(tool("runc"))
    except Exception:
        return None


# kubelet links every container's log here (a fixed path); the links point into the run dir.
CONTAINER_LOG_LINKS = Path("/var/log/containers")


def _remove_log_links(directory: Path) -> None:
    for link in CONTAINER_LOG_LINKS.glob("*.log") if CONTAINER_LOG_LINKS.is_dir() else []:
        with contextlib.suppress(OSError):
            if link.is_symlink() and Path(os.readlink(link)).is_relative_to(directory):
                link.unlink()


def clear_volumes(volumes: Path) -> None:
    """Empty what the PersistentVolumes of an earlier run in this run dir held. Each start
    registers its volumes afresh (a new API server), so a claim binds to any of them: one that
    kept an earlier run's etcd member made the new member rejoin a cluster that no longer
    exists (raft panic, CrashLoopBackOff) on the second `make up` after a `make down`."""
    if not volumes.is_dir():
        return
    # rmtree would descend into a mount (teardown_node unmounted everything it could).
    held = mounts_under(volumes)
    if held:
        raise NodeSetupError(
            f"cannot clear {volumes} of an earlier run: still mounted there: "
            + ", ".join(map(str, held))
        )
    shutil.rmtree(volumes)


def teardown_node(run_dir: Path) -> None:
    """Remove everything a node of ``run_dir`` may have left: processes (by pid file),
    containers, shims, mounts, log links, the network. Safe to call when nothing is there."""
    directory = node_dir(run_dir)
    if directory.is_dir():
        reap_stale(directory)
        stop_containers(directory)
        reap_stale(directory)
        unmount_under(directory)
        _remove_log_links(directory)
    for net in registered_networks():
        if net.run_dir == Path(run_dir).resolve():
            remove_network(net.netns, net.host_if)


def node_alive(run_dir: Path) -> bool:
    """Whether any node process recorded under ``run_dir`` still runs."""
    directory = node_dir(run_dir)
    for pid_path in directory.glob("*.pid") if directory.is_dir() else []:
        rec = PidFile.read(pid_path)
        if rec is not None and pid_matches(rec.pid, rec.marker):
            return True
    return False


def recover_stale_nodes(keep: Path | None) -> list[Path]:
    """Remove what dead runs left of their nodes: the network (netns, veth, host iptables rules
    with the harness's comment), and the containers, shims and mounts under their run dirs.

    Found on the machine itself, not only in the registry: a network namespace ``dfnode-*``, a
    host interface ``dfh*``, a rule commented ``defender-devcluster dfnode-*``, a lock or a record
    in the registry, mounts under a harness node dir. A node network is dead when nothing may
    still use it (``Liveness``): no process holds its lock (a live run holds it from before the
    network exists until it removes it), the creator in its record is gone, and no node process
    recorded under its run dirs runs. The sweep holds the lock of what it removes, so a run
    that starts meanwhile waits. ``keep``: a run dir whose node is never touched. Returns the run
    dirs cleaned."""
    if os.geteuid() != 0:
        return []  # nothing of a node can be removed without root (create_network says so)
    keep_names = {NodeNetwork(keep, 0).netns} if keep is not None else set()
    observed = observe(harness_node_dirs())
    taken: dict[str, int] = {}
    removed: set[str] = set()
    cleaned: list[Path] = []
    try:
        liveness: dict[str, Liveness] = {}
        for netns in sorted(observed.names() - keep_names):
            if holds(netns):  # made by this process, still in use
                continue
            fd = try_lock(netns)
            if fd is not None:
                taken[netns] = fd
            liveness[netns] = Liveness(
                locked=fd is None,
                owner_alive=owner_alive(netns),
                node_alive=any(node_alive(d) for d in observed.run_dirs(netns)),
            )
        for dead in plan_sweep(observed, liveness, keep_names):
            parts = [
                *(["netns"] if dead.netns_exists else []),
                *([f"interface {dead.host_if}"] if dead.host_if_exists else []),
                *([f"{len(dead.rules)} iptables rules"] if dead.rules else []),
                *(f"node dir of {d}" for d in dead.run_dirs),
            ]
            log.warning(
                "removing what a dead run left of node network %s: %s",
                dead.netns,
                ", ".join(parts) or "its lock file",
            )
            for run_dir in dead.run_dirs:
                teardown_node(run_dir)
                cleaned.append(run_dir)
            remove_dead(dead)
            removed.add(dead.netns)
    finally:
        for netns, fd in taken.items():
            release_lock(netns, fd, remove=netns in removed)
    return cleaned


def node_dirs_among(mount_points: Sequence[Path]) -> set[Path]:
    """The ``node`` dirs that mount points lie under (``<run dir>/node/...``): where a node's
    mounts would be."""
    return {a for p in mount_points for a in (p, *p.parents) if a.name == "node"}


def harness_node_dirs() -> set[Path]:
    """Node dirs of this harness (containerd.toml or runc/ in them) with mounts under them."""
    return {
        d
        for d in node_dirs_among(mounts_under(Path("/")))
        if (d / "containerd.toml").is_file() or (d / "runc").is_dir()
    }


def node_leftovers(run_dir: Path, netns: str, host_if: str) -> list[str]:
    """What a node of ``run_dir`` left on the machine: mounts, log links, shims, netns, veth,
    host rules."""
    directory = node_dir(run_dir)
    found = [f"mount {p}" for p in mounts_under(directory)]
    links = CONTAINER_LOG_LINKS.glob("*.log") if CONTAINER_LOG_LINKS.is_dir() else []
    found += [
        f"log link {link}"
        for link in links
        if link.is_symlink() and Path(os.readlink(link)).is_relative_to(directory)
    ]
    found += [f"containerd-shim pid {pid}" for pid in _shim_pids(directory / "c.sock")]
    return found + leftovers(netns, host_if)
