"""Errors raised by the local cluster harness.

DevClusterError
├── ToolNotFoundError(binary, bindir)     a binary is not built yet (run `make tools`)
├── PortInUseError(name, log_path)        a process could not bind its port (lost a race)
├── ProcessStartError(name, log_path)     a process exited or never became healthy
├── StaleProcessError(pid, name)          a process from an earlier run would not die
├── OciError                              an image archive could not be written or read
├── ImageBuildError(name, detail)         `make images` could not build an image
│   └── ImageInputMissing                 what it is made from is not there (binary, package)
├── StateError(path)                      the run dir has no (valid) state file
├── PeerProxyError                        partition/heal on a cluster without peer_proxy=True
├── LeaderTransferError(member, log_path) etcd did not hand leadership to the member asked
└── NodeSetupError                       a node (netns, mounts, containerd, kubelet) failed
"""

from __future__ import annotations

from pathlib import Path


class DevClusterError(Exception):
    """Root of every error the harness raises."""


class ToolNotFoundError(DevClusterError):
    """A required binary is missing from the tools directory."""

    def __init__(self, binary: str, bindir: Path | None, detail: str = "") -> None:
        self.binary = binary
        self.bindir = bindir
        where = f"in {bindir}" if bindir is not None else "(no tools directory could be resolved)"
        msg = (
            f"{binary} not found {where}; build the tools with `make tools` "
            f"or point DEFENDER_TOOLS_BIN at a directory that has it"
        )
        if detail:
            msg = f"{msg} ({detail})"
        super().__init__(msg)


class ProcessStartError(DevClusterError):
    """A managed process exited early or did not become healthy in time."""

    def __init__(self, name: str, log_path: Path, detail: str, log_tail: str = "") -> None:
        self.name = name
        self.log_path = log_path
        self.log_tail = log_tail
        msg = f"{name} did not start: {detail}; see {log_path}"
        if log_tail:
            msg = f"{msg}\n--- last lines of {log_path.name} ---\n{log_tail}"
        super().__init__(msg)


class PortInUseError(ProcessStartError):
    """The port picked for a process was taken before the process could bind it."""


class StaleProcessError(DevClusterError):
    """A process left over from an earlier run could not be stopped."""

    def __init__(self, pid: int, name: str) -> None:
        self.pid = pid
        self.name = name
        super().__init__(
            f"{name} (pid {pid}) from an earlier run did not stop after SIGKILL; "
            f"check `ps -p {pid}` and stop it by hand"
        )


class StateError(DevClusterError):
    """The run directory holds no usable state file."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path = path
        super().__init__(f"{path}: {detail}")


class OciError(DevClusterError):
    """An image could not be written: bad reference, bad entry, unreadable source."""


class ImageBuildError(DevClusterError):
    """An image could not be built; the message says which and what to do."""

    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        self.detail = detail
        super().__init__(f"image {name}: {detail}")


class ImageInputMissing(ImageBuildError):
    """What the image is made from is not there yet (a binary not built, a package missing)."""


class PeerProxyError(DevClusterError):
    """A partition was asked of a cluster that runs without its peer proxy."""


class LeaderTransferError(DevClusterError):
    """``EtcdCluster.move_leader`` could not make the member leader."""

    def __init__(self, member: str, log_path: Path, detail: str) -> None:
        self.member = member
        self.log_path = log_path
        super().__init__(
            f"could not make {member} the etcd leader: {detail}; is it running and reachable "
            f"by its peers (not partitioned)? see {log_path}"
        )


class NodeSetupError(DevClusterError):
    """The node could not be set up or torn down: a command failed, root or a tool is missing."""
