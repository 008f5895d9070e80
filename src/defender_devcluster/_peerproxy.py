"""A user-space network partition for etcd members: one TCP proxy per member's peer port.

Member i listens for peers on its real port but advertises the proxy's port, so every raft
connection between members crosses one of these proxies. etcd's peer traffic is HTTP and the
first request of every raft connection names the member that dialed it: stream GETs end in
``/raft/stream/<type>/<dialer id>`` and every raft request carries ``X-Server-From: <dialer id>``
(ids are etcd's member ids in lower-case hex). The proxy reads that first request head, learns
the dialer, and from then on only copies bytes. Cutting member i closes every connection whose
dialer is i or whose target is i, and refuses such new connections, until it is healed.

Why not iptables or network namespaces: they need privileges CI sandboxes do not grant.

Peer requests that are not raft messages (the leader's ``/version`` probe, a follower
forwarding a lease renewal to the leader, rafthttp's ``/raft/probing``) carry no member id. For
those the proxy asks the kernel which process owns the dialing socket (``/proc/net/tcp`` gives
the socket's inode, ``/proc/<pid>/fd`` which member holds it); where that fails (no /proc) an
anonymous request is refused only at a cut member's proxy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import PortInUseError

log = logging.getLogger(__name__)

# A request head larger than this is not etcd's: rafthttp heads are a few hundred bytes.
MAX_HEAD_BYTES = 16 * 1024
# A dialer that has not sent its request head within this time is dropped (it holds a thread).
HEAD_TIMEOUT_SECONDS = 5.0
_ACCEPT_POLL_SECONDS = 0.2
_CHUNK = 64 * 1024

_REQUEST_LINE = re.compile(rb"^([A-Z]+) (/\S*) HTTP/1\.[01]$")
_HEX_ID = re.compile(r"^[0-9a-f]{1,16}$")
_STREAM_PATH = re.compile(r"^/raft/stream/[a-z0-9]+/([0-9a-f]{1,16})$")


class MalformedRequestError(ValueError):
    """The first bytes of a peer connection are not an HTTP/1.x request head."""


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    path: str
    headers: Mapping[str, str]

    @property
    def dialer_id(self) -> str | None:
        """The etcd member id (hex) of the member that opened the connection, if it says so."""
        stream = _STREAM_PATH.match(self.path)
        if stream is not None:
            return stream.group(1)
        sender = self.headers.get("x-server-from", "").strip().lower()
        return sender if _HEX_ID.match(sender) else None


def parse_request_head(head: bytes) -> RequestHead:
    """Parse an HTTP/1.x request head (request line + headers, without the blank line)."""
    lines = head.split(b"\r\n")
    match = _REQUEST_LINE.match(lines[0])
    if match is None:
        raise MalformedRequestError(f"not an HTTP/1.x request line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise MalformedRequestError(f"bad header line: {line[:80]!r}")
        headers[name.decode("latin-1").lower()] = value.decode("latin-1").strip()
    return RequestHead(match.group(1).decode(), match.group(2).decode("latin-1"), headers)


def read_request_head(sock: socket.socket) -> tuple[RequestHead, bytes]:
    """Read until the end of the first request head; return it and every byte read so far
    (the head and any body bytes that came with it, to be forwarded unchanged)."""
    buf = b""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return parse_request_head(buf[:end]), buf
        if len(buf) > MAX_HEAD_BYTES:
            raise MalformedRequestError(f"no end of request head within {MAX_HEAD_BYTES} bytes")
        chunk = sock.recv(4096)
        if not chunk:
            raise MalformedRequestError(f"connection closed after {len(buf)} bytes of head")
        buf += chunk


def _tcp_inode(local_port: int, remote_port: int) -> int | None:
    """Inode of the IPv4 TCP socket with these local and remote ports, from /proc/net/tcp."""
    want = (f"{local_port:04X}", f"{remote_port:04X}")
    try:
        with open("/proc/net/tcp", encoding="ascii") as f:
            next(f)  # the column header
            for line in f:
                fields = line.split()
                local, remote = fields[1].rpartition(":")[2], fields[2].rpartition(":")[2]
                if (local, remote) == want:
                    return int(fields[9])
    except (OSError, IndexError, ValueError, StopIteration):
        return None
    return None


def socket_owner(local_port: int, remote_port: int, pids: Mapping[int, int]) -> int | None:
    """Which key of ``pids`` (member index -> pid) holds the TCP socket that goes from
    ``local_port`` to ``remote_port`` on loopback; None if none of them (or no /proc)."""
    inode = _tcp_inode(local_port, remote_port)
    if inode is None:
        return None
    needle = f"socket:[{inode}]"
    for index, pid in pids.items():
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == needle:
                    return index
            except OSError:
                continue  # closed since listdir
    return None


# (dialer's port, proxy's port) -> member index of the dialing process, or None.
OwnerLookup = Callable[[int, int], int | None]


@dataclass(eq=False)
class _Link:
    """One proxied connection: dialer -> proxy of `target` -> member `target`."""

    target: int
    dialer_id: str | None
    # Set when the dialer named no id and the kernel told us which member it is.
    dialer_index: int | None
    downstream: socket.socket
    upstream: socket.socket
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for s in (self.downstream, self.upstream):
            # shutdown first: it wakes a thread blocked in recv() on the same socket.
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


@dataclass
class ProxyStats:
    """Counters for tests and logs (read under the proxy's lock via `PeerProxy.stats()`)."""

    accepted: int = 0
    forwarded: int = 0
    refused: int = 0
    cut: int = 0
    malformed: int = 0
    by_dialer: dict[str, int] = field(default_factory=dict)


class PeerProxy:
    """Proxies ``listen_ports[i]`` -> ``target_ports[i]`` on ``host``, one per member.

    ``partition(i)`` / ``heal(i)`` cut and restore member i. Member ids are learned with
    ``set_member_ids`` once the cluster is up; before that a connection still records the id
    its dialer announced, so a later partition finds it.
    """

    def __init__(
        self,
        listen_ports: Sequence[int],
        target_ports: Sequence[int],
        host: str = "127.0.0.1",
        *,
        run_dir: Path | None = None,
        owner: OwnerLookup | None = None,
    ) -> None:
        if len(listen_ports) != len(target_ports):
            raise ValueError("one listen port per target port")
        self.host = host
        self.listen_ports = list(listen_ports)
        self.target_ports = list(target_ports)
        # Named in errors only: the proxy logs through `logging`, it has no file of its own.
        self.run_dir = run_dir or Path.cwd()
        self._owner = owner
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}
        self._cut: set[int] = set()
        self._links: set[_Link] = set()
        self._stats = ProxyStats()
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    # --- life cycle -------------------------------------------------------------------------
    def start(self) -> PeerProxy:
        """Bind every listen port (PortInUseError if one is taken) and start accepting."""
        self._stop.clear()
        try:
            for i, port in enumerate(self.listen_ports):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((self.host, port))
                except OSError as exc:
                    s.close()
                    raise PortInUseError(
                        f"peer proxy {i}", self.run_dir, f"cannot bind {self.host}:{port}: {exc}"
                    ) from exc
                s.listen(64)
                s.settimeout(_ACCEPT_POLL_SECONDS)
                self._listeners.append(s)
        except BaseException:
            self.stop()
            raise
        for i, s in enumerate(self._listeners):
            t = threading.Thread(
                target=self._accept_loop, args=(i, s), name=f"peer-proxy-{i}", daemon=True
            )
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for s in self._listeners:
            # On Linux shutdown() wakes a thread blocked in accept(); close() alone does not.
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        for s in self._listeners:
            with contextlib.suppress(OSError):
                s.close()
        self._listeners.clear()
        with self._lock:
            links = list(self._links)
            self._links.clear()
        for link in links:
            link.close()

    # --- partitions -------------------------------------------------------------------------
    def set_member_ids(self, ids: Mapping[int, str]) -> None:
        """Member index -> etcd member id (hex, any case)."""
        with self._lock:
            self._ids = {member_id.lower(): i for i, member_id in ids.items()}

    def partition(self, i: int) -> int:
        """Cut member i from every other member, both ways. Returns the connections closed."""
        self._check_index(i)
        with self._lock:
            self._cut.add(i)
            doomed = [
                link
                for link in self._links
                if self._is_cut(link.target, link.dialer_id, link.dialer_index)
            ]
            self._links.difference_update(doomed)
            self._stats.cut += len(doomed)
        for link in doomed:
            link.close()
        log.info("peer proxy: member %d partitioned, %d connections cut", i, len(doomed))
        return len(doomed)

    def heal(self, i: int) -> None:
        self._check_index(i)
        with self._lock:
            self._cut.discard(i)
        log.info("peer proxy: member %d healed", i)

    @property
    def partitioned(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._cut)

    def stats(self) -> ProxyStats:
        with self._lock:
            s = self._stats
            return ProxyStats(
                s.accepted, s.forwarded, s.refused, s.cut, s.malformed, dict(s.by_dialer)
            )

    def open_links(self, i: int) -> int:
        """Connections open right now that touch member i (as dialer or target)."""
        with self._lock:
            return sum(
                1
                for link in self._links
                if i in (link.target, self._dialer(link.dialer_id, link.dialer_index))
            )

    # --- internals --------------------------------------------------------------------------
    def _check_index(self, i: int) -> None:
        if not 0 <= i < len(self.listen_ports):
            raise IndexError(f"no member {i}: the proxy fronts {len(self.listen_ports)} members")

    def _dialer(self, dialer_id: str | None, dialer_index: int | None) -> int | None:
        # Caller holds the lock.
        if dialer_index is not None:
            return dialer_index
        return self._ids.get(dialer_id) if dialer_id is not None else None

    def _is_cut(self, target: int, dialer_id: str | None, dialer_index: int | None) -> bool:
        # Caller holds the lock.
        if target in self._cut:
            return True
        dialer = self._dialer(dialer_id, dialer_index)
        return dialer is not None and dialer in self._cut

    def _accept_loop(self, target: int, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                log.warning("peer proxy %d: accept failed", target, exc_info=True)
                continue
            conn.settimeout(None)
            with self._lock:
                self._stats.accepted += 1
            threading.Thread(
                target=self._serve, args=(target, conn), name=f"peer-link-{target}", daemon=True
            ).start()

    def _serve(self, target: int, downstream: socket.socket) -> None:
        try:
            downstream.settimeout(HEAD_TIMEOUT_SECONDS)
            head, pending = read_request_head(downstream)
            downstream.settimeout(None)
        except (MalformedRequestError, OSError) as exc:
            with self._lock:
                self._stats.malformed += 1
            log.info("peer proxy %d: dropped a connection: %s", target, exc)
            _close(downstream)
            return
        dialer = head.dialer_id
        index: int | None = None
        if dialer is None and self._owner is not None:
            try:
                index = self._owner(downstream.getpeername()[1], self.listen_ports[target])
            except OSError:
                index = None  # the dialer is gone already; nothing to forward for
        with self._lock:
            refused = self._is_cut(target, dialer, index)
            if refused:
                self._stats.refused += 1
        if refused:
            _close(downstream)
            return
        try:
            upstream = socket.create_connection(
                (self.host, self.target_ports[target]), timeout=HEAD_TIMEOUT_SECONDS
            )
            upstream.settimeout(None)
            upstream.sendall(pending)
        except OSError as exc:
            # The member is down (killed by a test): its dialer sees what it would without us.
            log.debug("peer proxy %d: member unreachable: %s", target, exc)
            _close(downstream)
            return
        link = _Link(target, dialer, index, downstream, upstream)
        with self._lock:
            # Re-checked under the lock that partition() takes: a cut that came while we
            # connected upstream must not miss this link.
            if self._is_cut(target, dialer, index):
                self._stats.refused += 1
                admitted = False
            else:
                self._links.add(link)
                self._stats.forwarded += 1
                key = dialer or ("unknown" if index is None else f"member {index}")
                self._stats.by_dialer[key] = self._stats.by_dialer.get(key, 0) + 1
                admitted = True
        if not admitted:
            link.close()
            return
        back = threading.Thread(
            target=self._pump, args=(link, upstream, downstream), name="peer-pump", daemon=True
        )
        back.start()
        self._pump(link, downstream, upstream)
        back.join()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        # Either side ending ends the link: rafthttp never half-closes a connection.
        with self._lock:
            self._links.discard(link)
        link.close()


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()
