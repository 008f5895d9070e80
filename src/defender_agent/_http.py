"""One HTTP request to the component beside the agent, for the reload call and the health check.

Both talk to an endpoint in the pod, and both must get the component's own answer within their
timeout, so the request is deliberately plainer than ``urllib.request.urlopen``:

* no proxy: ``http_proxy``/``HTTP_PROXY`` in the agent's environment (often set cluster-wide)
  would send ``http://127.0.0.1:...`` to the proxy, whose answer — about its own localhost —
  would then count as the component's;
* no redirects: a redirect is the component's answer, not a reason to call another address;
* one deadline for the whole exchange: a socket timeout bounds each read only, so an endpoint
  that sends a header byte now and then could hold the heartbeat thread for ever;
* the body is never read;
* loopback only, plain http: the endpoint is the component's own, in the pod's network
  namespace. The settings refuse any other host (`loopback_url_problem`), and the address the
  connection actually reached is checked again, because ``localhost`` is looked up in the
  pod's ``/etc/hosts``, a file the containers of the pod may be able to rewrite. TLS over
  loopback protects nothing from the only other parties on that path, the pod's containers.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import threading
import urllib.parse
from dataclasses import dataclass

__all__ = [
    "HttpAnswer",
    "http_request",
    "loopback_host",
    "loopback_peer_problem",
    "loopback_url_problem",
    "shown_url",
]


def loopback_host(host: str) -> bool:
    """``host`` is ``localhost`` or a literal loopback address (127.0.0.0/8, ``::1``).

    Only literals: no name is looked up when settings are read, so a name that happens to
    resolve to loopback (``ip6-localhost``, ``foo.localhost``) is refused rather than trusted,
    and so are the shorthands ``inet_aton`` would accept (``127.1``, ``0x7f.0.0.1``)."""
    text = host.strip("[]").lower()
    if text == "localhost":
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def loopback_url_problem(url: str) -> str | None:
    """Why ``url`` is not ``http://<loopback host>[:port]/...``; None when it is."""
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # ValueError for a port that is not a number in range
    except ValueError:
        return "is not a valid URL"
    if parts.scheme != "http":
        return "must start with http:// (the component's endpoint in its own pod, over loopback)"
    if not parts.hostname or not loopback_host(parts.hostname):
        return (
            "must call the component in its own pod: the host must be localhost, 127.x.x.x or [::1]"
        )
    return None


def loopback_peer_problem(sock: socket.socket, host: str) -> str | None:
    """Why the connected ``sock`` is not talking to a loopback address; None when it is."""
    peer = str(sock.getpeername()[0])
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        address = None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A hosts file may map a name to ::ffff:127.0.0.1: still this pod's loopback.
        address = address.ipv4_mapped
    if address is not None and address.is_loopback:
        return None
    return f"{host} reached {peer}, which is not a loopback address: not the component's pod"


def shown_url(url: str) -> str:
    """``url`` as logs, the status endpoint, heartbeats and alerts may show it: without
    credentials (``user:password@``) or the query, where a component's reload or health
    endpoint may expect a token. A relative URL (a redirect's ``Location``, which may repeat
    the query it was called with) stays relative."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    query = "?..." if parts.query else ""
    scheme = f"{parts.scheme}:" if parts.scheme else ""
    origin = f"//{host}" if parts.netloc or parts.scheme else ""
    return f"{scheme}{origin}{parts.path}{query}"


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    reason: str
    location: str | None


def http_request(url: str, method: str, timeout_seconds: float) -> HttpAnswer:
    """Send ``method url`` and return the status line, all within ``timeout_seconds``.

    Raises ``ValueError`` for a URL that is not http://<loopback host>[:port]/...,
    ``TimeoutError`` when the deadline passes, and ``OSError`` for any other failure (a
    malformed answer, or a connection that reached an address that is not loopback, too).
    """
    problem = loopback_url_problem(url)
    if problem is not None:
        raise ValueError(f"the URL {shown_url(url)} {problem}")
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None  # checked by loopback_url_problem
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_seconds)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        sock = conn.sock
        if sock is not None:
            # Wakes the read that is waiting; the exchange then fails with an OSError.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(timeout_seconds, cut)
    timer.daemon = True
    timer.start()
    try:
        conn.connect()  # bounded by the socket timeout; the deadline is checked right after
        if expired.is_set():
            raise TimeoutError(f"no answer within {timeout_seconds:g}s")
        assert conn.sock is not None  # connect() returned
        wrong_peer = loopback_peer_problem(conn.sock, parts.hostname)
        if wrong_peer is not None:
            raise OSError(wrong_peer)
        conn.request(method, target, body=None if method == "GET" else b"")
        response = conn.getresponse()
        answer = HttpAnswer(response.status, response.reason, response.getheader("Location"))
    except (OSError, http.client.HTTPException) as exc:
        if expired.is_set():
            raise TimeoutError(f"no answer within {timeout_seconds:g}s (timed out)") from exc
        if isinstance(exc, OSError):
            raise
        raise OSError(f"not an HTTP answer: {type(exc).__name__}: {exc}") from exc
    finally:
        timer.cancel()
        conn.close()
    if expired.is_set():
        raise TimeoutError(f"no answer within {timeout_seconds:g}s (timed out)")
    return answer
