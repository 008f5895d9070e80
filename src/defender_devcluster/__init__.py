"""Local control plane for development and tests: real etcd and Kubernetes processes on 127.0.0.1.

See docs/local-cluster.md. The pytest fixtures live in ``defender_devcluster.pytest_plugin``.
"""

from ._cluster import ClusterState, LocalCluster, stop_run_dir
from ._errors import (
    DevClusterError,
    LeaderTransferError,
    PeerProxyError,
    PortInUseError,
    ProcessStartError,
    StaleProcessError,
    StateError,
    ToolNotFoundError,
)
from ._etcd import EtcdCluster, etcd_client_settings, etcd_member_healthy, etcd_status
from ._kube import ControlPlane
from ._procs import free_ports, popen_dying_with_parent
from ._tools import tool, tools_bin
from ._wait import wait_for

__all__ = [
    "ClusterState",
    "ControlPlane",
    "DevClusterError",
    "EtcdCluster",
    "LeaderTransferError",
    "LocalCluster",
    "PeerProxyError",
    "PortInUseError",
    "ProcessStartError",
    "StaleProcessError",
    "StateError",
    "ToolNotFoundError",
    "etcd_client_settings",
    "etcd_member_healthy",
    "etcd_status",
    "free_ports",
    "popen_dying_with_parent",
    "stop_run_dir",
    "tool",
    "tools_bin",
    "wait_for",
]
