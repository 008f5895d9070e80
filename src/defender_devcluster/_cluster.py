"""The whole local system: control plane + 3-member defender etcd, and a state file describing it.

``state.json`` in the run dir lets another process (``status``, ``down``, ``system-up``) find
every PID, port and path without guessing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from pydantic import BaseModel, ValidationError

from ._errors import StateError
from ._etcd import EtcdCluster, etcd_member_healthy
from ._kube import SERVICE_CIDR, ControlPlane
from ._node import Node, teardown_node
from ._procs import ManagedProcess, pid_matches, reap_stale, stop_pid

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


class ProcessRecord(BaseModel):
    name: str
    pid: int
    marker: str
    log: str
    health_url: str | None = None


class ClusterState(BaseModel):
    """What ``state.json`` holds. Paths are absolute."""

    run_dir: str
    api_url: str
    kubeconfig: str
    etcd_endpoints: list[str]
    kube_etcd_endpoints: list[str]
    processes: list[ProcessRecord]
    started_at: float
    start_seconds: float
    # Set when a node runs (LocalCluster(node=True), `up --node`).
    node_ip: str | None = None
    node_netns: str | None = None
    pod_cidr: str | None = None

    def write(self, run_dir: Path) -> None:
        path = run_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def read(cls, run_dir: Path) -> ClusterState:
        path = Path(run_dir).resolve() / STATE_FILE
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise StateError(
                path, "no state file: the local cluster is not running here (make cluster-up)"
            ) from exc
        except (OSError, ValidationError) as exc:
            raise StateError(path, f"unreadable state file ({exc.__class__.__name__})") from exc


def _record(p: ManagedProcess) -> ProcessRecord:
    assert p.pid is not None
    return ProcessRecord(name=p.name, pid=p.pid, marker=p.marker, log=str(p.log_path))


class LocalCluster:
    """ControlPlane + a 3-member defender EtcdCluster in one run dir.

    Pass ``etcd`` to reuse a defender etcd that is already running (the pytest session does);
    it is then left running by ``stop()``. ``node=True`` adds a real node (containerd, kubelet,
    kube-proxy, CoreDNS; ``_node.py``) into which ``images`` (OCI archives; default: the pause
    image and what `make images` built) are imported.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        etcd: EtcdCluster | None = None,
        die_with_parent: bool = False,
        start_timeout: float = 240.0,
        node: bool = False,
        images: Sequence[Path] | None = None,
        apiserver_args: Sequence[str] = (),
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.control_plane = ControlPlane(
            self.run_dir,
            die_with_parent=die_with_parent,
            start_timeout=start_timeout,
            apiserver_args=apiserver_args,
        )
        self._owns_etcd = etcd is None
        if etcd is not None and etcd.dir.is_relative_to(self.run_dir):
            # start() sweeps run_dir for stale processes and would kill the etcd handed to us.
            raise ValueError(f"pass an etcd that lives outside {self.run_dir}, not in it")
        self.etcd = etcd or EtcdCluster(
            self.run_dir, members=3, name="defender", die_with_parent=die_with_parent
        )
        self.node = (
            Node(self.run_dir, images=images, die_with_parent=die_with_parent) if node else None
        )
        self.start_seconds: float | None = None

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    @property
    def api_url(self) -> str:
        return self.control_plane.api_url

    @property
    def etcd_endpoints(self) -> list[str]:
        return self.etcd.endpoints

    def start(self) -> LocalCluster:
        t0 = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / STATE_FILE).unlink(missing_ok=True)
        # A crashed run leaves processes and pid files behind; clear them all before starting.
        reap_stale(self.run_dir)
        # Containers, mounts and the network of a crashed node run here outlive its pid files.
        teardown_node(self.run_dir)
        try:
            if self._owns_etcd:
                self.etcd.start()
            if self.node is not None:
                # kube-apiserver listens on the host end of the node's veth (pods reach it).
                self.control_plane.address = self.node.prepare(SERVICE_CIDR).host_ip
            self.control_plane.start()
            if self.node is not None:
                self.node.start(self.control_plane)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        self.state().write(self.run_dir)
        log.info("local cluster up in %.1fs (run dir %s)", self.start_seconds, self.run_dir)
        return self

    def state(self) -> ClusterState:
        cp = self.control_plane
        node = self.node
        procs = [*(node.processes() if node else []), *cp.processes(), *cp.etcd._procs]
        if self._owns_etcd:
            procs += self.etcd._procs
        net = node.network if node is not None else None
        return ClusterState(
            run_dir=str(self.run_dir),
            api_url=cp.api_url,
            kubeconfig=str(cp.kubeconfig),
            etcd_endpoints=self.etcd.endpoints,
            kube_etcd_endpoints=cp.etcd.endpoints,
            processes=[_record(p) for p in procs if p.running()],
            started_at=time.time(),
            start_seconds=self.start_seconds or 0.0,
            node_ip=net.node_ip if net else None,
            node_netns=net.netns if net else None,
            pod_cidr=net.pod_cidr if net else None,
        )

    def stop(self) -> None:
        try:
            if self.node is not None:
                self.node.stop()
            self.control_plane.stop()
        finally:
            if self._owns_etcd:
                self.etcd.stop()
            (self.run_dir / STATE_FILE).unlink(missing_ok=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def stop_run_dir(run_dir: Path) -> list[str]:
    """Stop everything recorded in ``run_dir`` from any process. Returns the names stopped.

    The state file gives the order (operator, scheduler, controller-manager, apiserver, etcd);
    then every remaining pid file is swept, so a half-written state still cleans up.
    """
    run_dir = Path(run_dir).resolve()
    stopped: list[str] = []
    try:
        state: ClusterState | None = ClusterState.read(run_dir)
    except StateError:
        state = None
    if state is not None:
        for rec in state.processes:
            if stop_pid(rec.pid, rec.marker, rec.name):
                stopped.append(rec.name)
    stopped += [rec.name for rec in reap_stale(run_dir)]
    # A node leaves containers, mounts and a network namespace besides its processes.
    teardown_node(run_dir)
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped


def process_alive(rec: ProcessRecord) -> bool:
    return pid_matches(rec.pid, rec.marker)


def etcd_health(endpoints: list[str]) -> dict[str, bool]:
    return {ep: etcd_member_healthy(ep) for ep in endpoints}
