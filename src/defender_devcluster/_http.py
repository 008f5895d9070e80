"""Tiny HTTP helpers for health probes against 127.0.0.1 (never through a proxy)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

# Health probes target loopback: an http_proxy from the environment must not intercept them.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get_json(url: str, timeout: float = 2.0) -> Any:
    with _opener.open(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def post_json(url: str, body: dict[str, Any], timeout: float = 2.0) -> Any:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with _opener.open(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def get_text(
    url: str, *, context: ssl.SSLContext | None = None, timeout: float = 2.0
) -> tuple[int, str]:
    """Status and body; HTTP errors are returned, connection errors raise OSError."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when a plain-HTTP GET answers 200 (liveness probes on 127.0.0.1)."""
    try:
        status, _ = get_text(url, timeout=timeout)
    except OSError:
        return False
    return status == 200
