"""The agent's status endpoint: `GET /status` (JSON) and `GET /healthz`.

`/status` answers 200 while the component passes its health check and the lease is renewed,
503 otherwise, so it can serve as the component's readiness probe; `/healthz` answers 200 while
the agent itself runs (its liveness probe).
"""

from __future__ import annotations

import http.server
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ._errors import AgentSettingsError

__all__ = ["StatusServer"]

log = logging.getLogger("defender_agent")


# A probe sends its request at once. Without a socket timeout a client that connects and sends
# nothing (or half a request) holds its handler thread for ever, and enough of them exhaust the
# agent: the endpoint may listen on every address.
REQUEST_TIMEOUT_SECONDS = 5.0


class _RequestDeadline(io.RawIOBase):
    """The socket as the handler's ``rfile``, with one deadline for the whole request. A
    socket timeout alone bounds each read: a client that sends a byte just inside it every time
    (the request line, then header after header) held its thread for ever."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self._sock = sock
        self._seconds = seconds
        self._deadline = time.monotonic() + seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request was not complete in time")
        self._sock.settimeout(remaining)
        try:
            return self._sock.recv_into(buffer)
        finally:
            # The answer is written with the whole timeout, not what was left of the request's.
            self._sock.settimeout(self._seconds)


# Each open connection holds a thread for up to REQUEST_TIMEOUT_SECONDS. One client (a pod that
# reaches the port) may hold a few; all of them together a bounded number, so a flood costs a
# bounded amount of memory, and the kubelet's probes, from another address, still get in.
CONNECTIONS_PER_SOURCE = 8
CONNECTIONS_TOTAL = 64
# The kernel's queue of connections not accepted yet (Python's default is 5): under a burst
# a probe waits in it rather than being refused.
LISTEN_BACKLOG = 128


class _BoundedServer(http.server.ThreadingHTTPServer):
    """A connection beyond its source's share or the total is closed at once, unanswered."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], handler: type[Any]) -> None:
        self._open: dict[str, int] = {}
        self._open_lock = threading.Lock()
        self.refused = 0
        super().__init__(address, handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        source = str(client_address[0])
        with self._open_lock:
            if (
                self._open.get(source, 0) >= CONNECTIONS_PER_SOURCE
                or sum(self._open.values()) >= CONNECTIONS_TOTAL
            ):
                self.refused += 1
                return False
            self._open[source] = self._open.get(source, 0) + 1
            return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            source = str(client_address[0])
            with self._open_lock:
                left = self._open.get(source, 1) - 1
                if left:
                    self._open[source] = left
                else:
                    self._open.pop(source, None)


class StatusServer:
    def __init__(
        self,
        address: str,
        port: int,
        snapshot: Callable[[], dict[str, Any]],
        *,
        request_timeout_seconds: float = REQUEST_TIMEOUT_SECONDS,
    ) -> None:
        snap = snapshot

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = request_timeout_seconds

            def setup(self) -> None:
                super().setup()
                self.rfile.close()  # the plain socket file it made; replaced by the bounded one
                self.rfile = io.BufferedReader(
                    _RequestDeadline(self.connection, request_timeout_seconds)
                )

            def do_GET(self) -> None:
                # A probe may add a query (a cache buster, a token its tool always sends):
                # the endpoint is the path alone.
                path = self.path.partition("?")[0]
                if path == "/healthz":
                    self._send(200, {"ok": True})
                elif path == "/status":
                    body = snap()
                    self._send(200 if body.get("healthy") else 503, body)
                else:
                    self._send(404, {"error": "use /status or /healthz"})

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body, default=str).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # probes every few seconds would flood the log

        self._started = False
        try:
            self._server = _BoundedServer((address, port), Handler)
        except OSError as exc:
            raise AgentSettingsError(
                f"cannot serve the status endpoint on {address}:{port}: {exc.strerror or exc}"
            ) from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="defender-agent-status", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def refused(self) -> int:
        """Connections closed unanswered: over their source's share or the total."""
        return self._server.refused

    def start(self) -> StatusServer:
        self._started = True
        self._thread.start()
        log.info("status endpoint on port %s", self.port)
        return self

    def stop(self) -> None:
        if self._started:  # shutdown() waits for serve_forever, which never ran otherwise
            self._server.shutdown()
        self._server.server_close()
