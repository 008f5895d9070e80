"""Shared fixtures for every test folder.

Cluster fixtures come from defender_devcluster.pytest_plugin (see docs/local-cluster.md):
defender_etcd, etcd_prefix, local_cluster, kubeconfig_path, k8s_api, namespace.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator

import pytest

pytest_plugins = ["defender_devcluster.pytest_plugin"]

HandlerClass = type[http.server.BaseHTTPRequestHandler]


@pytest.fixture
def serve_http() -> Iterator[Callable[[HandlerClass], str]]:
    """Start a local HTTP server (127.0.0.1, a free port) answering with a handler class;
    returns its base URL. Every server started is shut down after the test."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(handler: HandlerClass) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
