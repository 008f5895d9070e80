"""One HTTP request to the component beside the agent, for the reload call and the health check.

Both talk to an endpoint in the pod, and both must get the component's own answer within their
timeout, so the request is deliberately plainer than ``urllib.request.urlopen``:

* no proxy: ``http_proxy``/``HTTP_PROXY`` in the agent's environment (often set cluster-wide)
  would send ``http://127.0.0.1:...`` to the proxy, whose answer — about its own localhost —
  would then count as the component's;
* no redirects: a redirect is the component's answer, not a reason to call another address;
* one deadline for the whole exchange: a socket timeout bounds each read only, so an endpoint
  that sends a header byte now and then could hold the heartbeat thread for ever;
* the body is never read.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import urllib.parse
from dataclasses import dataclass

__all__ = ["HttpAnswer", "http_request", "shown_url"]


def shown_url(url: str) -> str:
    """``url`` as logs, the status endpoint, heartbeats and alerts may show it: without
    credentials (``user:password@``) or the query, where a component's reload or health
    endpoint may expect a token."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    query = "?..." if parts.query else ""
    return f"{parts.scheme}://{host}{parts.path}{query}"


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    reason: str
    location: str | None


def http_request(url: str, method: str, timeout_seconds: float) -> HttpAnswer:
    """Send ``method url`` and return the status line, all within ``timeout_seconds``.

    Raises ``ValueError`` for a URL that is not http(s)://host[:port]/..., ``TimeoutError``
    when the deadline passes, and ``OSError`` for any other failure (a malformed answer too).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http:// or https:// URL with a host: {url!r}")
    port = parts.port  # ValueError for a port that is not a number or out of range
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    conn = connection_class(parts.hostname, port, timeout=timeout_seconds)
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
