"""Local control plane for development and tests: real etcd and Kubernetes processes on 127.0.0.1.

See docs/local-cluster.md. The pytest fixtures live in ``defender_devcluster.pytest_plugin``.
"""

from ._cluster import ClusterState, LocalCluster, stop_run_dir
from ._errors import (
    DevClusterError,
    ImageBuildError,
    ImageInputMissing,
    LeaderTransferError,
    NodeSetupError,
    OciError,
    PeerProxyError,
    PortInUseError,
    ProcessStartError,
    StaleProcessError,
    StateError,
    ToolNotFoundError,
)
from ._etcd import (
    EtcdCluster,
    etcd_client_settings,
    etcd_member_healthy,
    etcd_status,
    etcd_watch_counts,
)
from ._images import (
    BuildContext,
    BuiltImage,
    build_image,
    default_cache_dir,
    import_archives,
    write_index,
)
from ._kube import ControlPlane
from ._leaks import key_forms
from ._node import Node, node_alive, node_leftovers, recover_stale_nodes, teardown_node
from ._procs import free_ports, popen_dying_with_parent
from ._tools import tool, tools_bin
from ._wait import wait_for

__all__ = [
    "BuildContext",
    "BuiltImage",
    "ClusterState",
    "ControlPlane",
    "DevClusterError",
    "EtcdCluster",
    "ImageBuildError",
    "ImageInputMissing",
    "LeaderTransferError",
    "LocalCluster",
    "Node",
    "NodeSetupError",
    "OciError",
    "PeerProxyError",
    "PortInUseError",
    "ProcessStartError",
    "StaleProcessError",
    "StateError",
    "ToolNotFoundError",
    "build_image",
    "default_cache_dir",
    "etcd_client_settings",
    "etcd_member_healthy",
    "etcd_status",
    "etcd_watch_counts",
    "free_ports",
    "import_archives",
    "key_forms",
    "node_alive",
    "node_leftovers",
    "popen_dying_with_parent",
    "recover_stale_nodes",
    "stop_run_dir",
    "teardown_node",
    "tool",
    "tools_bin",
    "wait_for",
    "write_index",
]
