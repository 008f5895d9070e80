"""A local etcd cluster of N members on 127.0.0.1, each a real etcd process."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
import urllib.error
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from ._errors import (
    DevClusterError,
    LeaderTransferError,
    PeerProxyError,
    PortInUseError,
    ProcessStartError,
)
from ._http import get_json, get_text, post_json
from ._peerproxy import PeerProxy, socket_owner
from ._procs import ManagedProcess, free_ports, reap_stale
from ._tools import tool
from ._wait import poll

log = logging.getLogger(__name__)

_PORT_ATTEMPTS = 3


def etcd_member_healthy(endpoint: str, timeout: float = 2.0) -> bool:
    """etcd's /health is true only when the member sees a leader and has no alarm."""
    try:
        body = get_json(f"{endpoint}/health", timeout=timeout)
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and body.get("health") == "true"


def etcd_status(endpoint: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """The maintenance Status of one member through etcd's JSON gateway, or None."""
    try:
        body = post_json(f"{endpoint}/v3/maintenance/status", {}, timeout=timeout)
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def etcd_status_needs_login(endpoint: str, timeout: float = 2.0) -> bool:
    """True when a member refuses Status for want of a user: authentication is on (a test
    enabled it), and the harness, which holds no credentials, cannot ask who leads."""
    try:
        post_json(f"{endpoint}/v3/maintenance/status", {}, timeout=timeout)
    except urllib.error.HTTPError as exc:
        return "user name is empty" in exc.read().decode(errors="replace")
    except (OSError, ValueError):
        return False
    return False


_WATCHERS = "etcd_debugging_mvcc_watcher_total"
_WATCH_STREAMS = "etcd_debugging_mvcc_watch_stream_total"


def etcd_watch_counts(endpoint: str, timeout: float = 2.0) -> tuple[int, int]:
    """(watchers, watch streams) one member holds open now, from its /metrics: how a test sees
    that a client let go of its watches there. OSError when the member does not answer."""
    status, body = get_text(f"{endpoint}/metrics", timeout=timeout)
    if status != 200:
        raise OSError(f"{endpoint}/metrics answered HTTP {status}")
    return parse_watch_counts(body)


def parse_watch_counts(metrics: str) -> tuple[int, int]:
    """(watchers, watch streams) from etcd's Prometheus text; ValueError when either is
    missing (an etcd that renamed them must not read as zero)."""
    found: dict[str, int] = {}
    for line in metrics.splitlines():
        name, _, value = line.partition(" ")
        if name in (_WATCHERS, _WATCH_STREAMS):
            found[name] = int(float(value))
    missing = {_WATCHERS, _WATCH_STREAMS} - set(found)
    if missing:
        raise ValueError(f"etcd metrics lack {sorted(missing)}")
    return found[_WATCHERS], found[_WATCH_STREAMS]


def etcd_client_settings(endpoints: Iterable[str]) -> dict[str, Any]:
    """Client settings that suit this harness's etcd, as plain data named like the fields of
    ``defender_config.EtcdSettings``: tests and benchmarks build their settings with
    ``EtcdSettings.model_validate({**etcd_client_settings(endpoints), **overrides})``, and the
    harness stays free of the library it tests."""
    return {
        "endpoints": list(endpoints),
        # Members run with a 2 s election timeout (EtcdCluster._process): a write during an
        # election can take that long, so the deadline leaves room for one, and the retries
        # outlast a leader change.
        "timeout_seconds": 5.0,
        "retries": 6,
        "backoff_base_seconds": 0.05,
        "backoff_max_seconds": 1.0,
    }


class EtcdCluster:
    """``members`` etcd processes forming one cluster; logs and data under ``run_dir/name``.

    Ports are picked at start time. ``start()`` always forms a fresh cluster (old data is
    wiped, stale processes of an earlier crashed run in the same directory are stopped);
    ``restart_member`` keeps a member's data dir and ports.

    With ``peer_proxy=True`` every member advertises a peer URL served by a ``PeerProxy`` in
    this process that forwards to its real peer port, so ``partition(i)`` can cut member i
    off from the others (both ways) and ``heal(i)`` can restore it. Client ports are never
    proxied: a cut member still answers clients, it just has no quorum.
    """

    def __init__(
        self,
        run_dir: Path,
        members: int = 3,
        name: str = "defender",
        *,
        start_timeout: float = 60.0,
        die_with_parent: bool = False,
        peer_proxy: bool = False,
        extra_args: Iterable[str] = (),
    ) -> None:
        if members < 1:
            raise ValueError("an etcd cluster needs at least one member")
        self.run_dir = Path(run_dir).resolve()
        self.members = members
        self.name = name
        self.start_timeout = start_timeout
        self.die_with_parent = die_with_parent
        self.dir = self.run_dir / f"etcd-{name}"
        self.client_ports: list[int] = []
        self.peer_ports: list[int] = []
        self.peer_proxy = peer_proxy
        # Ports the members advertise to each other: the proxy's, or the real peer ports.
        self.advertised_peer_ports: list[int] = []
        self._proxy: PeerProxy | None = None
        self._member_ids: list[str] = []
        self._procs: list[ManagedProcess] = []
        # More etcd flags for every member, e.g. a small --quota-backend-bytes to reach NOSPACE.
        self.extra_args = tuple(extra_args)

    # ----------------------------------------------------------------- public face
    @property
    def endpoints(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.client_ports]

    @property
    def member_pids(self) -> list[int | None]:
        """PID per member; None for a member that is not running."""
        return [p.pid if p.running() else None for p in self._procs]

    def member_at(self, endpoint: str) -> int:
        """The index of the member serving `endpoint` (`127.0.0.1:port`, with or without a
        scheme: what a client reports as the endpoint its stream is on)."""
        address = endpoint.split("://")[-1]
        return [e.split("://")[-1] for e in self.endpoints].index(address)

    @contextlib.contextmanager
    def frozen(self, i: int) -> Iterator[int]:
        """Member i stopped (SIGSTOP) for the block, continued after it: its connections stay
        open and nothing answers, what no error or closed stream tells a client (a wedged
        member, a proxy holding the stream). Yields its PID."""
        pids = self.member_pids
        pid = pids[i] if 0 <= i < len(pids) else None
        if pid is None:
            raise DevClusterError(f"etcd member {i} is not running: nothing to freeze")
        os.kill(pid, signal.SIGSTOP)
        try:
            yield pid
        finally:
            os.kill(pid, signal.SIGCONT)

    @property
    def cluster_token(self) -> str:
        return f"defender-devcluster-{self.name}"

    def peer_url(self, i: int) -> str:
        """The peer URL member i advertises (what a restore's --initial-cluster names)."""
        return f"http://127.0.0.1:{self.advertised_peer_ports[i]}"

    def wipe_member_data(self) -> None:
        """Delete every member's data directory (all members must be stopped): what a restore
        starts from. `restart_members()` then starts them on whatever the directories hold."""
        running = [self.member_name(i) for i, p in enumerate(self._procs) if p.running()]
        if running:
            raise ProcessStartError(
                f"etcd cluster {self.name}", self.dir, f"members still running: {running}"
            )
        self._wipe_data()
        self._member_ids = []

    def member_name(self, i: int) -> str:
        return f"{self.name}-{i}"

    def data_dir(self, i: int) -> Path:
        return self.dir / f"{self.member_name(i)}.data"

    def log_path(self, i: int) -> Path:
        return self.dir / f"{self.member_name(i)}.log"

    def start(self) -> EtcdCluster:
        self.dir.mkdir(parents=True, exist_ok=True)
        reap_stale(self.dir)
        etcd = tool("etcd")
        t0 = time.monotonic()
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self._wipe_data()
            n = self.members
            ports = free_ports((3 if self.peer_proxy else 2) * n)
            self.client_ports = ports[:n]
            self.peer_ports = ports[n : 2 * n]
            self.advertised_peer_ports = ports[2 * n :] if self.peer_proxy else self.peer_ports
            self._procs = [self._process(etcd, i) for i in range(n)]
            try:
                if self.peer_proxy:
                    self._proxy = PeerProxy(
                        self.advertised_peer_ports,
                        self.peer_ports,
                        run_dir=self.dir,
                        owner=self._peer_socket_owner,
                    ).start()
                for p in self._procs:
                    p.start()
                self._wait_ready(range(self.members), time.monotonic() + self.start_timeout)
                if self._proxy is not None:
                    self._member_ids = self._fetch_member_ids()
                    self._proxy.set_member_ids(dict(enumerate(self._member_ids)))
            except PortInUseError:
                self._stop_all(timeout=2.0)
                self._stop_proxy()
                if attempt == _PORT_ATTEMPTS:
                    raise
                log.info("etcd %s lost a port race, retrying with new ports", self.name)
                continue
            except BaseException:
                self._stop_all(timeout=2.0)
                self._stop_proxy()
                raise
            break
        log.info(
            "etcd cluster %s up in %.1fs: %s", self.name, time.monotonic() - t0, self.endpoints
        )
        return self

    def stop(self) -> None:
        try:
            self._stop_all()
        finally:
            self._stop_proxy()

    @property
    def member_ids(self) -> list[str]:
        """etcd's member id of each member, lower-case hex (as etcd logs and rafthttp send it)."""
        if not self._member_ids:
            self._member_ids = self._fetch_member_ids()
        return list(self._member_ids)

    @property
    def proxy(self) -> PeerProxy:
        """The peer proxy (PeerProxyError without ``peer_proxy=True`` or before start)."""
        if self._proxy is None:
            raise PeerProxyError(
                f"etcd cluster {self.name} has no peer proxy: create it with "
                f"EtcdCluster(..., peer_proxy=True) and start it before partitioning"
            )
        return self._proxy

    def partition(self, i: int) -> int:
        """Cut member i from every other member, both ways: its open peer connections are
        closed and new ones refused until ``heal(i)``. Returns the connections closed."""
        return self.proxy.partition(i)

    def heal(self, i: int) -> None:
        """Let member i reach the others again (it catches up through raft)."""
        self.proxy.heal(i)

    @property
    def partitioned(self) -> frozenset[int]:
        return self._proxy.partitioned if self._proxy is not None else frozenset()

    def kill_member(self, i: int) -> int:
        """SIGKILL member ``i`` by PID (a crash, not a shutdown). Returns the killed PID."""
        proc = self._procs[i]
        pid = proc.pid
        if pid is None or not proc.running():
            raise ProcessStartError(self.member_name(i), proc.log_path, "member is not running")
        proc.kill()
        return pid

    def stop_member(self, i: int) -> None:
        self._procs[i].stop()

    def restart_member(self, i: int) -> None:
        """(Re)start member ``i`` on its old data dir and ports; wait until it is healthy."""
        proc = self._procs[i]
        if proc.running():
            proc.stop()
        proc.start()
        self._wait_ready([i], time.monotonic() + self.start_timeout)

    def restart_members(self, indices: Iterable[int] | None = None) -> list[int]:
        """(Re)start several members at once (default: every member that is down), then wait.

        Needed after losing quorum: one member restarted alone cannot become healthy, so
        restarting them one by one would never finish. Returns the indices restarted.
        """
        if indices is None:
            chosen = [i for i, p in enumerate(self._procs) if not p.running()]
        else:
            chosen = sorted(set(indices))
        for i in chosen:
            if self._procs[i].running():
                self._procs[i].stop()
        for i in chosen:
            self._procs[i].start()
        if chosen:
            self._wait_ready(chosen, time.monotonic() + self.start_timeout)
        return chosen

    def leader_endpoint(self) -> str | None:
        """Client URL of the member that is leader right now, if any answers."""
        for ep in self._live_endpoints():
            st = etcd_status(ep)
            if (
                st is not None
                and st.get("leader")
                and st.get("leader") == st.get("header", {}).get("member_id")
            ):
                return ep
        return None

    def wait_for_leader(self, timeout: float = 30.0) -> str:
        """Block until a running member reports itself leader (after a kill, an election runs)."""
        leader, _ = poll(self.leader_endpoint, timeout, 0.2)
        if leader is not None:
            return leader
        raise ProcessStartError(
            f"etcd cluster {self.name}", self.dir, f"no leader elected within {timeout:.0f}s"
        )

    def move_leader(self, i: int, timeout: float = 30.0) -> None:
        """Make member i the leader (etcd's leadership transfer), then wait until it leads.

        Tests use it to put the leader where a client is connected. LeaderTransferError when
        etcd refuses or does not finish the transfer within ``timeout`` (etcd itself gives up
        after its request timeout, 9 s with this harness' settings)."""
        target = self.member_ids[i]
        leader = self.wait_for_leader(timeout)
        if leader != self.endpoints[i]:
            try:
                post_json(
                    f"{leader}/v3/maintenance/transfer-leadership",
                    {"targetID": str(int(target, 16))},
                    timeout=timeout,
                )
            except (OSError, ValueError) as exc:
                raise LeaderTransferError(
                    self.member_name(i),
                    self.log_path(i),
                    f"leader {leader} did not hand over to member id {target} ({exc})",
                ) from exc
        done, _ = poll(lambda: self.leader_endpoint() == self.endpoints[i], timeout, 0.1)
        if done is None:
            raise LeaderTransferError(
                self.member_name(i),
                self.log_path(i),
                f"transfer accepted but no member reported it as leader within {timeout:.0f}s",
            )

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"EtcdCluster(name={self.name!r}, members={self.members}, endpoints={self.endpoints})"
        )

    # ----------------------------------------------------------------- internals
    def _live_endpoints(self) -> list[str]:
        return [ep for ep, p in zip(self.endpoints, self._procs, strict=True) if p.running()]

    def _wipe_data(self) -> None:
        for i in range(self.members):
            shutil.rmtree(self.data_dir(i), ignore_errors=True)

    def _process(self, etcd: Path, i: int) -> ManagedProcess:
        peers = ",".join(
            f"{self.member_name(j)}=http://127.0.0.1:{self.advertised_peer_ports[j]}"
            for j in range(self.members)
        )
        client = f"http://127.0.0.1:{self.client_ports[i]}"
        peer = f"http://127.0.0.1:{self.peer_ports[i]}"
        advertised_peer = f"http://127.0.0.1:{self.advertised_peer_ports[i]}"
        data_dir = self.data_dir(i)
        argv = [
            str(etcd),
            f"--name={self.member_name(i)}",
            f"--data-dir={data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={advertised_peer}",
            f"--initial-cluster={peers}",
            f"--initial-cluster-token={self.cluster_token}",
            "--initial-cluster-state=new",
            # The machine is shared with builds; etcd's 100 ms/1 s defaults flap under load.
            "--heartbeat-interval=200",
            "--election-timeout=2000",
            "--log-level=warn",
            *self.extra_args,
        ]
        # etcd also reads ETCD_* variables: one left in a shell would change the cluster.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        return ManagedProcess(
            self.member_name(i),
            argv,
            self.dir,
            marker=str(data_dir),
            env=env,
            die_with_parent=self.die_with_parent,
        )

    def _wait_ready(self, indices: range | list[int], deadline: float) -> None:
        pending = set(indices)

        def ready() -> bool:
            for i in sorted(pending):
                proc = self._procs[i]
                if not proc.running():
                    tail = proc.tail()
                    cls = PortInUseError if "address already in use" in tail else ProcessStartError
                    raise cls(
                        self.member_name(i),
                        proc.log_path,
                        f"exited with code {proc.exit_code()}",
                        tail,
                    )
                if etcd_member_healthy(self.endpoints[i]):
                    pending.discard(i)
            if pending:
                return False
            # With authentication on, Status names no leader for the harness; /health, true on
            # every restarted member, says each of them sees one.
            return self.leader_endpoint() is not None or all(
                etcd_status_needs_login(self.endpoints[i]) for i in indices
            )

        done, _ = poll(ready, deadline - time.monotonic(), 0.2)
        if done is None:
            i = min(pending) if pending else 0
            raise ProcessStartError(
                self.member_name(i),
                self.log_path(i),
                f"no healthy member with a leader after {self.start_timeout:.0f}s "
                f"(waiting for {sorted(self.member_name(j) for j in pending) or 'a leader'})",
                self._procs[i].tail(),
            )

    def _fetch_member_ids(self) -> list[str]:
        """Member ids by member name, from the cluster API of any running member."""
        last: Exception | None = None
        for ep in self._live_endpoints():
            try:
                body = post_json(f"{ep}/v3/cluster/member/list", {}, timeout=5.0)
                by_name = {m["name"]: format(int(m["ID"]), "x") for m in body["members"]}
                return [by_name[self.member_name(i)] for i in range(self.members)]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                last = exc
        raise ProcessStartError(
            f"etcd cluster {self.name}",
            self.dir,
            f"could not read the member list to learn member ids: {last!r}",
        )

    def _peer_socket_owner(self, dialer_port: int, proxy_port: int) -> int | None:
        pids = {i: pid for i, pid in enumerate(self.member_pids) if pid is not None}
        return socket_owner(dialer_port, proxy_port, pids)

    def _stop_proxy(self) -> None:
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None

    def _stop_all(self, timeout: float = 10.0) -> None:
        errors: list[BaseException] = []
        for p in self._procs:
            try:
                p.stop(timeout=timeout)
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        if errors:
            raise errors[0]
