"""A local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

Alone, no kubelet runs: pods are created and scheduled nowhere (there are no nodes), never
started. With a node (``_node.py``) the apiserver listens on the host end of the node's veth
(``address``) instead of 127.0.0.1, so pods reach it through the ``kubernetes`` Service.
"""

from __future__ import annotations

import base64
import logging
import os
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import yaml

from ._errors import PortInUseError, ProcessStartError
from ._etcd import EtcdCluster
from ._http import get_text
from ._pki import Pki, make_pki
from ._procs import ManagedProcess, free_ports, reap_stale
from ._tools import tool
from ._wait import poll

log = logging.getLogger(__name__)

SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # first address of SERVICE_CIDR: the `kubernetes` Service
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
KUBE_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
_PORT_ATTEMPTS = 3


def write_kubeconfig(path: Path, server: str, pki: Pki, user: str) -> None:
    """A kubeconfig with the CA and client credentials embedded, so the file is self-contained."""
    crt, key = pki.client(user)

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "defender-devcluster",
                "cluster": {"server": server, "certificate-authority-data": b64(pki.ca_cert)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate-data": b64(crt), "client-key-data": b64(key)},
            }
        ],
        "contexts": [
            {
                "name": "defender-devcluster",
                "context": {"cluster": "defender-devcluster", "user": user},
            }
        ],
        "current-context": "defender-devcluster",
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(doc, f, sort_keys=False)


def admin_ssl_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    crt, key = pki.client("admin")
    ctx.load_cert_chain(str(crt), str(key))
    return ctx


def _insecure_loopback_context() -> ssl.SSLContext:
    # controller-manager and scheduler serve /healthz with a self-signed certificate made at
    # start-up; the probe goes to 127.0.0.1 only and reads no secret.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ControlPlane:
    """Single-member etcd + kube-apiserver + kube-controller-manager + kube-scheduler.

    Everything lives in ``run_dir/kube`` (certificates, kubeconfigs, logs, pid files) and
    ``run_dir/etcd-kube``; ports are chosen when ``start()`` runs.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        start_timeout: float = 240.0,
        die_with_parent: bool = False,
        address: str = "127.0.0.1",
        apiserver_args: Sequence[str] = (),
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.dir = self.run_dir / "kube"
        # Added to kube-apiserver's flags (e.g. the benchmark's audit log).
        self.apiserver_args = tuple(apiserver_args)
        # Where kube-apiserver listens and what it advertises (the `kubernetes` endpoint).
        self.address = address
        self.start_timeout = start_timeout
        self.die_with_parent = die_with_parent
        self.etcd = EtcdCluster(
            self.run_dir, members=1, name="kube", die_with_parent=die_with_parent
        )
        self.api_port = 0
        self.controller_manager_port = 0
        self.scheduler_port = 0
        self.pki: Pki | None = None
        self.apiserver: ManagedProcess | None = None
        self.controller_manager: ManagedProcess | None = None
        self.scheduler: ManagedProcess | None = None

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (user kubernetes-admin in group system:masters): run_dir/kubeconfig."""
        return self.run_dir / "kubeconfig"

    @property
    def api_url(self) -> str:
        return f"https://{self.address}:{self.api_port}"

    def processes(self) -> list[ManagedProcess]:
        """Started processes, in the order they should be stopped."""
        procs = [self.scheduler, self.controller_manager, self.apiserver]
        return [p for p in procs if p is not None]

    def start(self) -> ControlPlane:
        t0 = time.monotonic()
        # Fail before starting anything when a binary is missing.
        bins = {b: tool(b) for b in KUBE_BINARIES}
        self.dir.mkdir(parents=True, exist_ok=True)
        reap_stale(self.dir)
        for stale in [self.kubeconfig, *self.dir.glob("*.kubeconfig")]:
            stale.unlink(missing_ok=True)
        extra = () if self.address == "127.0.0.1" else (self.address,)
        self.pki = make_pki(self.dir / "pki", SERVICE_IP, extra)
        deadline = t0 + self.start_timeout
        try:
            self.etcd.start()
            self.apiserver = self._start_with_retry(
                lambda: self._apiserver(bins["kube-apiserver"]), self._apiserver_ready, deadline
            )
            write_kubeconfig(self.kubeconfig, self.api_url, self.pki, "admin")
            self.controller_manager = self._start_with_retry(
                lambda: self._controller_manager(bins["kube-controller-manager"]),
                lambda: self._healthz(self.controller_manager_port),
                deadline,
            )
            self.scheduler = self._start_with_retry(
                lambda: self._scheduler(bins["kube-scheduler"]),
                lambda: self._healthz(self.scheduler_port),
                deadline,
            )
            # The serviceaccount controller creates `default` in each namespace; pods created
            # before it exists are refused by admission, so tests would flake without this wait.
            self._wait(
                self.apiserver,
                lambda: self._api_get("/api/v1/namespaces/default/serviceaccounts/default"),
                deadline,
                "the default ServiceAccount",
            )
        except BaseException:
            self.stop()
            raise
        log.info("control plane up in %.1fs at %s", time.monotonic() - t0, self.api_url)
        return self

    def stop(self) -> None:
        errors: list[BaseException] = []
        for p in self.processes():
            try:
                p.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        try:
            self.etcd.stop()
        except Exception as exc:
            errors.append(exc)
        if errors:
            raise errors[0]

    def ready(self) -> bool:
        return self.pki is not None and self._apiserver_ready()

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- probes
    def _api_get(self, path: str) -> bool:
        assert self.pki is not None
        try:
            status, _ = get_text(
                f"{self.api_url}{path}", context=admin_ssl_context(self.pki), timeout=5
            )
        except OSError:
            return False
        return status == 200

    def _apiserver_ready(self) -> bool:
        return self._api_get("/readyz")

    def _healthz(self, port: int) -> bool:
        try:
            status, body = get_text(
                f"https://127.0.0.1:{port}/healthz", context=_insecure_loopback_context()
            )
        except OSError:
            return False
        return status == 200 and body.strip() == "ok"

    def _wait(
        self, proc: ManagedProcess, probe: Callable[[], bool], deadline: float, what: str
    ) -> None:
        def ready() -> bool:
            if probe():
                return True
            if not proc.running():
                tail = proc.tail(30)
                cls = PortInUseError if "address already in use" in tail else ProcessStartError
                raise cls(proc.name, proc.log_path, f"exited with code {proc.exit_code()}", tail)
            return False

        done, _ = poll(ready, deadline - time.monotonic(), 0.5)
        if done is None:
            raise ProcessStartError(
                proc.name,
                proc.log_path,
                f"{what} not ready after {self.start_timeout:.0f}s",
                proc.tail(30),
            )

    def _start_with_retry(
        self, make: Callable[[], ManagedProcess], probe: Callable[[], bool], deadline: float
    ) -> ManagedProcess:
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            proc = make()
            proc.start()
            try:
                self._wait(proc, probe, deadline, proc.name)
            except PortInUseError:
                proc.stop(timeout=2.0)
                if attempt == _PORT_ATTEMPTS:
                    raise
                log.info("%s lost a port race, retrying with a new port", proc.name)
                continue
            except BaseException:
                proc.stop(timeout=2.0)
                raise
            return proc
        raise AssertionError("unreachable")

    # ----------------------------------------------------------------- processes
    def _managed(self, name: str, argv: list[str]) -> ManagedProcess:
        return ManagedProcess(
            name,
            argv,
            self.dir,
            # Every command line carries paths under run_dir/kube: the marker for stale cleanup.
            marker=str(self.dir),
            die_with_parent=self.die_with_parent,
        )

    def _apiserver(self, binary: Path) -> ManagedProcess:
        assert self.pki is not None
        (self.api_port,) = free_ports(1, self.address)
        pki = self.pki
        kubelet_crt, kubelet_key = pki.client("apiserver-kubelet-client")
        return self._managed(
            "kube-apiserver",
            [
                str(binary),
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                # logs/exec/port-forward go to the kubelet at its node IP: no DNS lookup of
                # the node name, and a client certificate the kubelet's webhook authorizes.
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-client-certificate={kubelet_crt}",
                f"--kubelet-client-key={kubelet_key}",
                f"--secure-port={self.api_port}",
                f"--cert-dir={self.dir / 'apiserver-certs'}",
                f"--etcd-servers={','.join(self.etcd.endpoints)}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.ca_cert}",
                "--authorization-mode=Node,RBAC",
                f"--requestheader-client-ca-file={pki.front_proxy_ca}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki.front_proxy_client_cert}",
                f"--proxy-client-key-file={pki.front_proxy_client_key}",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # Webhooks and aggregated APIs behind a Service are called at the Service's
                # endpoints (pod IPs, routed to the node), never at its ClusterIP: this host has
                # no route to the service range but its default one, which leads off the machine.
                "--enable-aggregator-routing=true",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
                *self.apiserver_args,
            ],
        )

    def _kubeconfig_for(self, user: str) -> Path:
        assert self.pki is not None
        path = self.dir / f"{user}.kubeconfig"
        write_kubeconfig(path, self.api_url, self.pki, user)
        return path

    def _controller_manager(self, binary: Path) -> ManagedProcess:
        assert self.pki is not None
        (self.controller_manager_port,) = free_ports(1)
        kc = self._kubeconfig_for("controller-manager")
        pki = self.pki
        return self._managed(
            "kube-controller-manager",
            [
                str(binary),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.controller_manager_port}",
                f"--cert-dir={self.dir / 'controller-manager-certs'}",
                "--controllers=*",
                "--use-service-account-credentials=true",
                f"--root-ca-file={pki.ca_cert}",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--cluster-signing-cert-file={pki.ca_cert}",
                f"--cluster-signing-key-file={pki.ca_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # One instance: leader election would only add a lease round-trip at start.
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
        )

    def _scheduler(self, binary: Path) -> ManagedProcess:
        (self.scheduler_port,) = free_ports(1)
        kc = self._kubeconfig_for("scheduler")
        return self._managed(
            "kube-scheduler",
            [
                str(binary),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.scheduler_port}",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
        )
