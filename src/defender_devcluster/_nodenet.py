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

import errno
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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
NETNS_PREFIX = "dfnode-"
HOST_IF_PREFIX = "dfh"
# Every host iptables rule of a node carries `--comment "defender-devcluster <netns>"`.
RULE_COMMENT = "defender-devcluster"
# The tables searched for such rules: the host fence is in filter; nat and mangle are where
# rules of a node would go next (raw is not listed: listing it can load a kernel module).
SWEPT_TABLES = ("filter", "nat", "mangle")
# The suffix shared by a node's netns and host interface (8 hex digits of the run dir's hash for
# the harness; other lowercase letters and digits, e.g. a test's); `dfh` + 12 fits IFNAMSIZ.
_SUFFIX = r"[0-9a-z]{1,12}"
_NETNS_RE = re.compile(rf"{NETNS_PREFIX}{_SUFFIX}")
_HOST_IF_RE = re.compile(rf"{HOST_IF_PREFIX}({_SUFFIX})")


def _run(argv: list[str], *, check: bool = True, timeout: float = 30.0) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NodeSetupError(f"{' '.join(argv)}: {exc}") from exc
    if check and out.returncode != 0:
        raise NodeSetupError(f"{' '.join(argv)} exited {out.returncode}: {out.stderr.strip()}")
    return out.stdout


def run_dir_hash(run_dir: Path) -> str:
    return path_hash(str(Path(run_dir).resolve()))


def path_hash(resolved: str) -> str:
    """The hash that names the node network of the run dir ``resolved`` (an absolute path)."""
    return hashlib.sha256(resolved.encode()).hexdigest()[:8]


def is_node_netns(name: str) -> bool:
    """Whether ``name`` is the harness's name for a node's network namespace."""
    return _NETNS_RE.fullmatch(name) is not None


def host_if_of(netns: str) -> str:
    """The host end of the veth of the node network ``netns``."""
    return HOST_IF_PREFIX + netns.removeprefix(NETNS_PREFIX)


@dataclass(frozen=True)
class NodeNetwork:
    """Names and addresses of one run's node network (see the module docstring)."""

    run_dir: Path
    slot: int

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}{run_dir_hash(self.run_dir)}"

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns

    @property
    def host_if(self) -> str:
        return host_if_of(self.netns)

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
    # Held until remove_network (or this process's end): the sweep of another run leaves alone
    # what this one makes. Taken before anything exists, so nothing of it is ever seen unlocked.
    hold(NodeNetwork(run_dir, 0).netns)
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


@dataclass(frozen=True)
class Rule:
    """One iptables rule of the host, as ``iptables -t <table> -S`` prints it."""

    table: str
    spec: str

    def delete_argv(self) -> list[str]:
        """``iptables -D`` of exactly this rule (`-S` quotes the comment; shlex reads it back)."""
        words = shlex.split(self.spec)
        if words[:1] != ["-A"] or len(words) < 2:
            raise ValueError(f"not a rule: {self.spec!r}")
        return ["iptables", "-w", "5", "-t", self.table, "-D", *words[1:]]


def rule_owner(spec: str) -> str | None:
    """The netns a rule belongs to: the ``<netns>`` of its ``--comment "defender-devcluster
    <netns>"``; None for every other rule (whatever else it says)."""
    try:
        words = shlex.split(spec)
    except ValueError:
        return None
    if words[:1] != ["-A"]:
        return None
    for i, word in enumerate(words[:-1]):
        if word == "--comment":
            owner, _, netns = words[i + 1].partition(" ")
            if owner == RULE_COMMENT and is_node_netns(netns):
                return netns
    return None


def harness_rules(netns: str | None = None) -> list[Rule]:
    """The host's iptables rules of node networks (of ``netns`` only, when given), in every
    table the harness may use."""
    if shutil.which("iptables") is None:
        return []
    found: list[Rule] = []
    for table in SWEPT_TABLES:
        out = _run(["iptables", "-w", "5", "-t", table, "-S"], check=False)
        for line in out.splitlines():
            owner = rule_owner(line)
            if owner is not None and (netns is None or owner == netns):
                found.append(Rule(table, line))
    return found


def host_fence_rules(netns: str) -> list[str]:
    """The host's rules that belong to ``netns`` (as ``iptables -S`` prints them)."""
    return [rule.spec for rule in harness_rules(netns)]


# ---------------------------------------------------------------------- who owns a node network
# A run holds an exclusive flock on REGISTRY/<netns>.lock from before it makes the network until
# it removes it; the kernel drops the lock when the process dies, however it dies (SIGKILL too).
# A sweep takes the lock before it removes anything, so it never removes a live run's network,
# and a run that starts meanwhile waits for the sweep instead of making what the sweep removes.
_HELD: dict[str, int] = {}


def lock_path(netns: str) -> Path:
    return REGISTRY / f"{netns}.lock"


def try_lock(netns: str) -> int | None:
    """Take the lock of ``netns`` without waiting: its file descriptor, or None when another
    open of it (a live run, or a sweep) holds it."""
    REGISTRY.mkdir(parents=True, exist_ok=True)
    path = lock_path(netns)
    while True:
        # Not inherited by the node's processes (PEP 446): a containerd-shim that outlives a
        # crash must not keep the crashed run's network looking alive.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        # A sweep unlinks the file of a network it removed, while holding it: a lock taken on
        # that unlinked file guards nothing, so take the new file's.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def release_lock(netns: str, fd: int, *, remove: bool) -> None:
    """Let go of a lock taken with ``try_lock``; ``remove``: the network is gone, so is its file
    (unlinked while still held, see ``try_lock``)."""
    if remove:
        lock_path(netns).unlink(missing_ok=True)
    os.close(fd)


def hold(netns: str, wait: float = 60.0) -> None:
    """Hold the lock of ``netns`` for this process until ``remove_network``. Waits for a sweep
    that holds it for a moment; a live run that holds it (the same run dir in use by another
    process) is an error."""
    if netns in _HELD:
        return
    deadline = time.monotonic() + wait
    while (fd := try_lock(netns)) is None:
        if time.monotonic() > deadline:
            raise NodeSetupError(
                f"the node network {netns} belongs to a live run (it holds {lock_path(netns)}); "
                "is this run dir in use by another process?"
            )
        time.sleep(0.5)
    _HELD[netns] = fd


def holds(netns: str) -> bool:
    """Whether this process holds the lock of ``netns`` (it made that node network)."""
    return netns in _HELD


def let_go(netns: str) -> None:
    """Stop holding the lock of ``netns`` (as if this process had died); the file stays."""
    fd = _HELD.pop(netns, None)
    if fd is not None:
        os.close(fd)


def remove_network(netns: str, host_if: str) -> None:
    """Undo ``create_network``: host rules, the netns (with its veths, bridge and iptables)."""
    # A deletion can fail when the xtables lock stays busy past `-w` (every node's kube-proxy
    # takes that same lock): try again, and say so if a rule stays (the next sweep finds it).
    for _ in range(3):
        rules = harness_rules(netns)
        for rule in rules:
            _run(rule.delete_argv(), check=False)
        if not rules:
            break
    else:
        for rule in harness_rules(netns):
            log.warning("host iptables rule of %s not removed: %s", netns, rule.spec)
    if (NETNS_DIR / netns).exists():
        _run(["ip", "netns", "del", netns], check=False)
    # Deleting the netns destroys the veth pair; a netns that failed half-way may not own it.
    if Path(f"/sys/class/net/{host_if}").exists():
        _run(["ip", "link", "del", host_if], check=False)
    (REGISTRY / f"{netns}.json").unlink(missing_ok=True)
    fd = _HELD.pop(netns, None)
    if fd is None:
        # Removed by another process than the one that made it (`make down` after `make up`):
        # its lock file goes too, unless a live run holds it; left, the next sweep took it for
        # a dead run's and warned.
        fd = try_lock(netns)
    if fd is not None:
        release_lock(netns, fd, remove=True)


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


# ---------------------------------------------------------------------- leftovers of dead runs
@dataclass(frozen=True)
class Observed:
    """What of node networks is on the machine (``observe``), before anything is judged."""

    netns: frozenset[str] = frozenset()  # node netns names in /run/netns
    interfaces: frozenset[str] = frozenset()  # host interfaces named dfh<suffix>
    rules: tuple[Rule, ...] = ()  # host iptables rules with the harness's comment
    records: Mapping[str, Path] = field(default_factory=dict)  # registry: netns -> run dir
    locks: frozenset[str] = frozenset()  # netns whose lock file is in the registry
    node_dirs: frozenset[Path] = frozenset()  # `<run dir>/node` dirs with mounts under them

    def names(self) -> set[str]:
        """Every node network of which something is on the machine."""
        names = {n for n in self.netns | self.locks | set(self.records) if is_node_netns(n)}
        for interface in self.interfaces:
            match = _HOST_IF_RE.fullmatch(interface)
            if match is not None:
                names.add(NETNS_PREFIX + match.group(1))
        names.update(owner for r in self.rules if (owner := rule_owner(r.spec)) is not None)
        names.update(NETNS_PREFIX + path_hash(str(d.parent)) for d in self.node_dirs)
        return names

    def run_dirs(self, netns: str) -> tuple[Path, ...]:
        """The run dirs of ``netns``: the registry's, and any whose node dir has mounts."""
        found = [self.records[netns]] if netns in self.records else []
        found += sorted(
            d.parent
            for d in self.node_dirs
            if NETNS_PREFIX + path_hash(str(d.parent)) == netns and d.parent not in found
        )
        return tuple(found)


@dataclass(frozen=True)
class Liveness:
    """What says a node network may still be in use."""

    locked: bool  # its lock is held: by the live run that made it (or by another sweep)
    owner_alive: bool  # the creator named in the registry still runs (a run without the lock)
    node_alive: bool  # a node process recorded under one of its run dirs still runs

    @property
    def dead(self) -> bool:
        return not (self.locked or self.owner_alive or self.node_alive)


@dataclass(frozen=True)
class DeadNetwork:
    """What a dead run left of one node network, all of it the sweep's to remove."""

    netns: str
    host_if: str
    netns_exists: bool
    host_if_exists: bool
    rules: tuple[Rule, ...]
    run_dirs: tuple[Path, ...]  # whose node dirs (containers, mounts) go too


def plan_sweep(
    observed: Observed, liveness: Mapping[str, Liveness], keep: Iterable[str] = ()
) -> list[DeadNetwork]:
    """The node networks to remove: those ``liveness`` calls dead, except ``keep``. A network
    without a liveness verdict is left alone; so is every rule without the harness's comment."""
    kept = set(keep)
    dead: list[DeadNetwork] = []
    for netns in sorted(observed.names() - kept):
        verdict = liveness.get(netns)
        if verdict is None or not verdict.dead:
            continue
        host_if = host_if_of(netns)
        dead.append(
            DeadNetwork(
                netns=netns,
                host_if=host_if,
                netns_exists=netns in observed.netns,
                host_if_exists=host_if in observed.interfaces,
                rules=tuple(r for r in observed.rules if rule_owner(r.spec) == netns),
                run_dirs=observed.run_dirs(netns),
            )
        )
    return dead


def observe(node_dirs: Iterable[Path] = ()) -> Observed:
    """Look for node networks on the machine: netns, host interfaces, host rules, registry
    records and lock files (``node_dirs``: node dirs with mounts, found by the caller)."""
    netns = os.listdir(NETNS_DIR) if NETNS_DIR.is_dir() else []
    interfaces = os.listdir("/sys/class/net")
    records: dict[str, Path] = {}
    for entry in sorted(REGISTRY.glob("*.json")) if REGISTRY.is_dir() else []:
        try:
            records[entry.stem] = Path(str(json.loads(entry.read_text("utf-8"))["run_dir"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    locks = [p.stem for p in REGISTRY.glob("*.lock")] if REGISTRY.is_dir() else []
    return Observed(
        netns=frozenset(n for n in netns if is_node_netns(n)),
        interfaces=frozenset(i for i in interfaces if _HOST_IF_RE.fullmatch(i)),
        rules=tuple(harness_rules()),
        records=records,
        locks=frozenset(n for n in locks if is_node_netns(n)),
        node_dirs=frozenset(node_dirs),
    )


def remove_dead(net: DeadNetwork) -> None:
    """Remove the network part of a dead run's node: its rules, netns, host interface and record
    (the caller holds its lock)."""
    for rule in net.rules:
        _run(rule.delete_argv(), check=False)
    remove_network(net.netns, net.host_if)
