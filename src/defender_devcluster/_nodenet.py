"""The node's network: its own network namespace, a veth to the host, a CNI bridge and a fence.

containerd, kubelet, kube-proxy and CoreDNS run inside a network namespace made for the run
(``dfnode-<hash of the run dir>``), so their iptables chains, ports and bridge never meet the
host's or another run's. The only link is a veth pair:

    host  dfh<hash> 10.253.<k>.1/30   <->   uplink0 10.253.<k>.2/30  node netns (the node IP)
                                            dfbr0   10.244.<k>.1/24  CNI bridge (pod CIDR)

kube-apiserver listens on the host end, so pods reach it through the ``kubernetes`` Service and
the host reaches the kubelet (``kubectl logs/exec``) at the node IP. The node netns has no
default route: pods can reach the pod CIDR, the service CIDR (kube-proxy DNATs it to pods or to
the apiserver) and the host end of the veth, nothing else. Pod traffic to the host is
masqueraded to the node IP, so the host needs no route back and never answers through eth0.
A fence (mangle table, before kube-proxy's filter rules) drops any other forwarded packet, and
the host drops anything forwarded to or from the veth (the host does not route for the node).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ._errors import NodeSetupError

log = logging.getLogger(__name__)

# Free on this machine (`ip route`: only 192.0.2.0/24 and the default route), and away from the
# usual Docker/kind/containerd ranges (172.17/16, 10.88/16, 10.96/12).
POD_CIDR_PREFIX = "10.244"  # 10.244.<slot>.0/24
LINK_PREFIX = "10.253"  # 10.253.<slot>.0/30
NODE_UPLINK = "uplink0"
NODE_BRIDGE = "dfbr0"
FENCE_CHAIN = "DEFENDER-FENCE"
# Survives pytest's rotation of its temporary directories: the next run finds crashed nodes here.
REGISTRY = Path("/run/defender-devcluster/nodes")
NETNS_DIR = Path("/run/netns")


def _run(argv: list[str], *, check: bool = True, timeout: float = 30.0) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NodeSetupError(f"{' '.join(argv)}: {exc}") from exc
    if check and out.returncode != 0:
        raise NodeSetupError(f"{' '.join(argv)} exited {out.returncode}: {out.stderr.strip()}")
    return out.stdout


def run_dir_hash(run_dir: Path) -> str:
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class NodeNetwork:
    """Names and addresses of one run's node network (see the module docstring)."""

    run_dir: Path
    slot: int

    @property
    def netns(self) -> str:
        return f"dfnode-{run_dir_hash(self.run_dir)}"

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns

    @property
    def host_if(self) -> str:
        return f"dfh{run_dir_hash(self.run_dir)}"

    @property
    def host_ip(self) -> str:
        return f"{LINK_PREFIX}.{self.slot}.1"

    @property
    def node_ip(self) -> str:
        return f"{LINK_PREFIX}.{self.slot}.2"

    @property
    def pod_cidr(self) -> str:
        return f"{POD_CIDR_PREFIX}.{self.slot}.0/24"

    @property
    def pod_gateway(self) -> str:
        return f"{POD_CIDR_PREFIX}.{self.slot}.1"

    def in_netns(self, argv: list[str]) -> list[str]:
        """argv run inside the node's network namespace (and only that: same mounts as the host,
        so kubelet's volume mounts are seen by containerd)."""
        return ["nsenter", f"--net={self.netns_path}", "--", *argv]

    def record(self) -> dict[str, object]:
        # The creator is recorded so that another run does not take a node that is still
        # starting (no node process yet) for a crashed one.
        pid = os.getpid()
        return {
            "run_dir": str(self.run_dir),
            "slot": self.slot,
            "netns": self.netns,
            "owner_pid": pid,
            "owner_start": process_start_time(pid),
        }


def process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks): with the PID, it names one
    process even after the PID is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def owner_alive(netns: str) -> bool:
    """Whether the process that created ``netns`` (per its registry record) still runs."""
    try:
        data = json.loads((REGISTRY / f"{netns}.json").read_text(encoding="utf-8"))
        pid, start = int(data["owner_pid"]), data["owner_start"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return start is not None and process_start_time(pid) == start


def _require_root_tools() -> None:
    if os.geteuid() != 0:
        raise NodeSetupError("the node needs root (network namespaces, mounts, iptables)")
    for binary in ("ip", "iptables", "nsenter", "umount"):
        if shutil.which(binary) is None:
            raise NodeSetupError(f"{binary} not found on PATH (make tools installs iptables)")


def _used_slots() -> set[int]:
    used: set[int] = set()
    for entry in REGISTRY.glob("*.json") if REGISTRY.is_dir() else []:
        try:
            used.add(int(json.loads(entry.read_text(encoding="utf-8"))["slot"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    taken = [
        ipaddress.ip_network(net, strict=False)
        for net in _run(["ip", "-4", "-o", "route", "show", "table", "all"]).split()
        if "/" in net and net[0].isdigit()
    ]
    taken += [
        ipaddress.ip_network(word, strict=False)
        for word in _run(["ip", "-4", "-o", "addr", "show"]).split()
        if "/" in word and word[0].isdigit()
    ]
    for slot in range(1, 255):
        pods = ipaddress.ip_network(f"{POD_CIDR_PREFIX}.{slot}.0/24")
        link = ipaddress.ip_network(f"{LINK_PREFIX}.{slot}.0/30")
        if any(n.overlaps(pods) or n.overlaps(link) for n in taken if n.prefixlen > 0):
            used.add(slot)
    return used


def _free_slot() -> int:
    used = _used_slots()
    for slot in range(1, 255):
        if slot not in used:
            return slot
    raise NodeSetupError(f"no free {POD_CIDR_PREFIX}.x.0/24 pod range left for a node")


def create_network(run_dir: Path, service_cidr: str) -> NodeNetwork:
    """Make the netns, veth, bridge, routes, sysctls and fences of a node for ``run_dir``."""
    _require_root_tools()
    run_dir = Path(run_dir).resolve()
    REGISTRY.mkdir(parents=True, exist_ok=True)
    net = NodeNetwork(run_dir, _free_slot())
    # Registered first, so a crash half-way through is still cleaned up by the next run.
    (REGISTRY / f"{net.netns}.json").write_text(json.dumps(net.record()), encoding="utf-8")
    ns = ["ip", "-n", net.netns]
    steps: list[list[str]] = [
        ["ip", "netns", "add", net.netns],
        ["ip", "link", "add", net.host_if, "type", "veth", "peer", "name", NODE_UPLINK],
        ["ip", "link", "set", NODE_UPLINK, "netns", net.netns],
        ["ip", "addr", "add", f"{net.host_ip}/30", "dev", net.host_if],
        ["ip", "link", "set", net.host_if, "up"],
        [*ns, "link", "set", "lo", "up"],
        [*ns, "addr", "add", f"{net.node_ip}/30", "dev", NODE_UPLINK],
        [*ns, "link", "set", NODE_UPLINK, "up"],
        [*ns, "link", "add", NODE_BRIDGE, "type", "bridge"],
        [*ns, "addr", "add", f"{net.pod_gateway}/24", "dev", NODE_BRIDGE],
        [*ns, "link", "set", NODE_BRIDGE, "up"],
        # Services only: no default route, so nothing in the node can address the outside.
        [*ns, "route", "add", service_cidr, "via", net.host_ip],
        # The host reaches pods (apiserver proxy) through the node, never through eth0.
        ["ip", "route", "add", net.pod_cidr, "via", net.node_ip, "dev", net.host_if],
    ]
    for argv in steps:
        _run(argv)
    # Per-netns sysctls: forwarding between the bridge and the uplink; bridged pod-to-pod
    # traffic through iptables, which kube-proxy's Service rules need.
    _run(
        net.in_netns(
            [
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
                "net.bridge.bridge-nf-call-iptables=1",
            ]
        )
    )
    _fence(net, service_cidr)
    log.info(
        "node network %s: node IP %s, pod CIDR %s, host end %s",
        net.netns,
        net.node_ip,
        net.pod_cidr,
        net.host_ip,
    )
    return net


def _fence(net: NodeNetwork, service_cidr: str) -> None:
    ipt = net.in_netns(["iptables", "-w", "5"])
    allowed = [
        ("-s", net.pod_cidr, "-d", net.pod_cidr),
        ("-s", net.pod_cidr, "-d", service_cidr),
        ("-s", net.pod_cidr, "-d", net.host_ip),
        ("-s", net.host_ip, "-d", net.pod_cidr),
    ]
    _run([*ipt, "-t", "mangle", "-N", FENCE_CHAIN])
    for rule in allowed:
        _run([*ipt, "-t", "mangle", "-A", FENCE_CHAIN, *rule, "-j", "RETURN"])
    _run([*ipt, "-t", "mangle", "-A", FENCE_CHAIN, "-j", "DROP"])
    _run([*ipt, "-t", "mangle", "-I", "FORWARD", "1", "-j", FENCE_CHAIN])
    # Only onto the veth to the host, whose far end does not forward.
    _run(
        [
            *ipt,
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            net.pod_cidr,
            "-o",
            NODE_UPLINK,
            "-j",
            "MASQUERADE",
        ]
    )
    host = ["iptables", "-w", "5"]
    comment = ["-m", "comment", "--comment", f"defender-devcluster {net.netns}"]
    for direction in ("-i", "-o"):
        _run([*host, "-I", "FORWARD", "1", direction, net.host_if, *comment, "-j", "DROP"])
    # The host itself has no route to the service range but its default one, off the machine:
    # a host process dialing a ClusterIP (the API server calling a webhook by its Service, say)
    # is refused here instead of leaving through eth0.
    _run(
        [*host, "-I", "OUTPUT", "1", "-d", service_cidr, "!", "-o", net.host_if, *comment,
         "-j", "REJECT", "--reject-with", "icmp-net-unreachable"]
    )  # fmt: skip


_HOST_CHAINS = ("FORWARD", "OUTPUT")


def host_fence_rules(netns: str) -> list[str]:
    """The host's FORWARD and OUTPUT rules that belong to ``netns`` (as ``iptables -S`` prints
    them)."""
    if shutil.which("iptables") is None:
        return []
    found: list[str] = []
    for chain in _HOST_CHAINS:
        out = _run(["iptables", "-w", "5", "-S", chain], check=False)
        found += [line for line in out.splitlines() if f"defender-devcluster {netns}" in line]
    return found


def remove_network(netns: str, host_if: str) -> None:
    """Undo ``create_network``: host rules, the netns (with its veths, bridge and iptables)."""
    for rule in host_fence_rules(netns):
        # `iptables -S` quotes the comment; shlex reads it back as one argument.
        chain = rule.split()[1]
        argv = ["iptables", "-w", "5", *shlex.split(rule.replace(f"-A {chain}", f"-D {chain}", 1))]
        _run(argv, check=False)
    if (NETNS_DIR / netns).exists():
        _run(["ip", "netns", "del", netns], check=False)
    # Deleting the netns destroys the veth pair; a netns that failed half-way may not own it.
    if Path(f"/sys/class/net/{host_if}").exists():
        _run(["ip", "link", "del", host_if], check=False)
    (REGISTRY / f"{netns}.json").unlink(missing_ok=True)


def registered_networks() -> list[NodeNetwork]:
    """Every node network recorded in the registry (live ones and crashed ones)."""
    nets: list[NodeNetwork] = []
    for entry in sorted(REGISTRY.glob("*.json")) if REGISTRY.is_dir() else []:
        try:
            data = json.loads(entry.read_text(encoding="utf-8"))
            nets.append(NodeNetwork(Path(str(data["run_dir"])), int(data["slot"])))
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable node record %s", entry)
    return nets


def leftovers(netns: str, host_if: str) -> list[str]:
    """What of a node network still exists on this machine (empty when fully removed)."""
    found: list[str] = []
    if (NETNS_DIR / netns).exists():
        found.append(f"network namespace {netns}")
    if Path(f"/sys/class/net/{host_if}").exists():
        found.append(f"interface {host_if}")
    found += [f"host iptables rule: {r}" for r in host_fence_rules(netns)]
    return found
