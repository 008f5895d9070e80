"""The peer proxy behind EtcdCluster(peer_proxy=True), against plain TCP echo members (no etcd):
it forwards bytes both ways, learns the dialing member from the first request head, cuts and
refuses a partitioned member's connections both ways, heals, and survives garbage."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from defender_devcluster import EtcdCluster, PeerProxyError, PortInUseError, free_ports, wait_for
from defender_devcluster._peerproxy import (
    MAX_HEAD_BYTES,
    MalformedRequestError,
    PeerProxy,
    parse_request_head,
    socket_owner,
)

IDS = ["a1", "b2", "c3"]  # member ids, hex as etcd writes them


class EchoMember:
    """Stands in for an etcd peer port: echoes every byte, counts connections."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def members() -> Iterator[list[EchoMember]]:
    ms = [EchoMember() for _ in range(3)]
    yield ms
    for m in ms:
        m.close()


@pytest.fixture
def proxy(members: list[EchoMember]) -> Iterator[PeerProxy]:
    p = PeerProxy(free_ports(3), [m.port for m in members]).start()
    p.set_member_ids(dict(enumerate(IDS)))
    yield p
    p.stop()


def stream_head(dialer: str) -> bytes:
    return (
        f"GET /raft/stream/msgappv2/{dialer} HTTP/1.1\r\nHost: x\r\nX-Server-From: {dialer}\r\n\r\n"
    ).encode()


def post_head(dialer: str, body: bytes = b"") -> bytes:
    return (
        f"POST /raft HTTP/1.1\r\nHost: x\r\nX-Server-From: {dialer}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def dial(proxy: PeerProxy, target: int, first: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy.listen_ports[target]), timeout=5)
    s.sendall(first)
    return s


def read_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def is_closed(s: socket.socket) -> bool:
    """True when the proxy closed `s` (EOF or reset), False when it still forwards."""
    try:
        s.sendall(b"ping")
        return s.recv(4) != b"ping"
    except OSError:
        return True


def hung_up(s: socket.socket) -> bool:
    """True when the other end closed `s` (EOF, or a reset when our bytes were left unread)."""
    try:
        return s.recv(10) == b""
    except ConnectionResetError:
        return True


def open_link(proxy: PeerProxy, target: int, dialer: str) -> socket.socket:
    head = stream_head(dialer)
    s = dial(proxy, target, head)
    assert read_exactly(s, len(head)) == head, "the head must reach the member unchanged"
    return s


# --- parsing ---------------------------------------------------------------------------------


def test_dialer_comes_from_the_stream_path_or_x_server_from() -> None:
    stream = parse_request_head(b"GET /raft/stream/message/8e9e05c52164694d HTTP/1.1\r\nHost: h")
    assert stream.dialer_id == "8e9e05c52164694d"
    post = parse_request_head(b"POST /raft HTTP/1.1\r\nX-Server-From: 8E9E05C52164694D")
    assert post.dialer_id == "8e9e05c52164694d"
    assert parse_request_head(b"GET /version HTTP/1.1\r\nHost: h").dialer_id is None
    bad_id = parse_request_head(b"POST /raft HTTP/1.1\r\nX-Server-From: not-hex")
    assert bad_id.dialer_id is None


@pytest.mark.parametrize(
    "head",
    [b"\x16\x03\x01 tls hello", b"GET /raft\r\n", b"POST /raft HTTP/1.1\r\nno colon here"],
)
def test_malformed_heads_are_refused(head: bytes) -> None:
    with pytest.raises(MalformedRequestError):
        parse_request_head(head)


# --- forwarding ------------------------------------------------------------------------------


def test_forwards_bytes_both_ways_and_learns_the_dialer(
    proxy: PeerProxy, members: list[EchoMember]
) -> None:
    body = bytes(range(256)) * 400  # larger than one recv: must arrive whole and in order
    first = post_head("b2", body)
    with dial(proxy, 0, first) as s:
        assert read_exactly(s, len(first)) == first
        s.sendall(b"more after the head")
        assert read_exactly(s, 19) == b"more after the head"
    with open_link(proxy, 2, "a1"):
        pass
    stats = proxy.stats()
    assert stats.by_dialer == {"b2": 1, "a1": 1}
    assert stats.forwarded == 2 and stats.refused == 0
    assert [m.connections for m in members] == [1, 0, 1]


def test_partition_cuts_both_ways_refuses_new_links_and_heal_restores(
    proxy: PeerProxy, members: list[EchoMember]
) -> None:
    from_cut = open_link(proxy, 1, "a1")  # dialed by member 0
    to_cut = open_link(proxy, 0, "c3")  # arriving at member 0
    unrelated = open_link(proxy, 2, "b2")  # between members 1 and 2
    assert proxy.open_links(0) == 2
    try:
        assert proxy.partition(0) == 2
        assert proxy.partitioned == frozenset({0})
        assert is_closed(from_cut) and is_closed(to_cut)
        assert not is_closed(unrelated), "a link between the other members must survive"
        assert proxy.open_links(0) == 0

        before = [m.connections for m in members]
        for target, dialer in ((1, "a1"), (0, "b2"), (0, "zz-unknown")):
            with dial(proxy, target, stream_head(dialer)) as s:
                assert hung_up(s), f"{dialer}->{target} must be refused"
        with dial(proxy, 0, b"GET /version HTTP/1.1\r\n\r\n") as s:
            assert hung_up(s), "an anonymous request to the cut member must be refused"
        assert [m.connections for m in members] == before, "refused links reached a member"
        assert proxy.stats().refused == 4

        proxy.heal(0)
        assert proxy.partitioned == frozenset()
        with open_link(proxy, 1, "a1"), open_link(proxy, 0, "c3"):
            pass
    finally:
        for s in (from_cut, to_cut, unrelated):
            s.close()


def test_ids_announced_before_the_id_map_count_once_it_is_known(
    members: list[EchoMember],
) -> None:
    # Members dial each other while the cluster forms, before the harness knows their ids.
    proxy = PeerProxy(free_ports(3), [m.port for m in members]).start()
    try:
        early = open_link(proxy, 1, "a1")
        proxy.set_member_ids({0: "A1", 1: "B2", 2: "C3"})
        assert proxy.partition(0) == 1
        assert is_closed(early)
        early.close()
    finally:
        proxy.stop()


def test_garbage_is_dropped_and_the_proxy_keeps_serving(
    proxy: PeerProxy, members: list[EchoMember]
) -> None:
    for garbage in (b"\x16\x03\x01\x02\x00 not http\r\n\r\n", b"G" * (MAX_HEAD_BYTES + 4096)):
        with dial(proxy, 1, garbage) as s:
            assert hung_up(s), "garbage must not be forwarded"
    # A dialer that connects and closes without a word.
    socket.create_connection(("127.0.0.1", proxy.listen_ports[1]), timeout=5).close()
    wait_for("three drops counted", lambda: proxy.stats().malformed == 3, timeout=5)
    assert members[1].connections == 0
    with open_link(proxy, 1, "c3"):
        pass


def test_a_member_that_is_down_closes_its_dialers(members: list[EchoMember]) -> None:
    dead_port = free_ports(1)[0]  # nothing listens there
    proxy = PeerProxy(free_ports(2), [members[0].port, dead_port]).start()
    try:
        with dial(proxy, 1, stream_head("a1")) as s:
            assert hung_up(s)
        with open_link(proxy, 0, "b2"):
            pass
    finally:
        proxy.stop()


def test_stop_closes_open_links(members: list[EchoMember]) -> None:
    proxy = PeerProxy(free_ports(3), [m.port for m in members]).start()
    link = open_link(proxy, 0, "b2")
    proxy.stop()
    assert is_closed(link)
    link.close()


# --- dialers that name no member id (/version, /leases, /raft/probing) -------------------------


def test_socket_owner_finds_the_process_holding_a_loopback_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server_port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", server_port), timeout=5) as c:
            client_port = c.getsockname()[1]
            me = {7: os.getpid()}
            assert socket_owner(client_port, server_port, me) == 7
            # The server's end belongs to no process until it is accepted.
            assert socket_owner(server_port, client_port, me) is None
            accepted, _ = server.accept()
            with accepted:
                assert socket_owner(server_port, client_port, me) == 7
            assert socket_owner(client_port, server_port, {}) is None
            gone = free_ports(1)[0]
            assert socket_owner(client_port, gone, me) is None, "no such connection"
            # A pid whose fds we may not read (or that does not exist) is skipped.
            assert socket_owner(client_port, server_port, {1: 1, 2: 2**22 + 1}) is None


def test_an_anonymous_dialer_is_identified_by_the_kernel_and_cut(
    members: list[EchoMember],
) -> None:
    # This test process is "member 0": every connection it dials is one of its sockets.
    def owner(dialer_port: int, proxy_port: int) -> int | None:
        return socket_owner(dialer_port, proxy_port, {0: os.getpid()})

    proxy = PeerProxy(free_ports(3), [m.port for m in members], owner=owner).start()
    version = b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        link = dial(proxy, 1, version)
        assert read_exactly(link, len(version)) == version
        assert proxy.stats().by_dialer == {"member 0": 1}
        assert proxy.open_links(0) == 1
        assert proxy.partition(0) == 1
        assert is_closed(link)
        link.close()
        with dial(proxy, 2, version) as s:
            assert hung_up(s), "an anonymous request from the cut member must be refused"
        proxy.heal(0)
        with dial(proxy, 2, version) as s:
            assert read_exactly(s, len(version)) == version
    finally:
        proxy.stop()


def test_without_an_owner_lookup_anonymous_dialers_pass_except_to_a_cut_member(
    proxy: PeerProxy,
) -> None:
    version = b"GET /version HTTP/1.1\r\n\r\n"
    proxy.partition(0)
    with dial(proxy, 1, version) as s:
        assert read_exactly(s, len(version)) == version
    with dial(proxy, 0, version) as s:
        assert hung_up(s)
    assert proxy.stats().by_dialer == {"unknown": 1}


# --- errors ----------------------------------------------------------------------------------


def test_a_taken_listen_port_is_a_port_race(members: list[EchoMember]) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"cannot bind 127.0.0.1:{port}"):
            PeerProxy([free_ports(1)[0], port], [members[0].port, members[1].port]).start()
    finally:
        taken.close()


def test_unknown_member_index_is_refused(proxy: PeerProxy) -> None:
    with pytest.raises(IndexError, match="no member 3"):
        proxy.partition(3)
    with pytest.raises(IndexError):
        proxy.heal(-1)


def test_partition_needs_a_cluster_started_with_the_proxy(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path, name="noproxy")
    with pytest.raises(PeerProxyError, match="peer_proxy=True"):
        cluster.partition(0)
    with pytest.raises(PeerProxyError):
        cluster.heal(0)
    assert cluster.partitioned == frozenset()
