"""kopf's connection to the API server, with a bounded connection pool.

kopf's own session opens a new connection for every concurrent request and never caps them:
a burst of a thousand new DefenderComponents opened several hundred TLS connections, each with
a 256 KiB read buffer in asyncio's SSL layer (about 160 MiB of the operator's memory at 1,000
components). With a cap, a burst waits briefly for a free connection instead.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import kopf


def connection_limit(base: int, namespaces: int) -> int:
    """Pool size: `base` for requests, plus room for kopf's long-lived watch streams (one per
    watched resource per namespace, two resources) so watches never starve requests."""
    return base + 2 * max(1, namespaces) + 4


async def pooled_login(limit: int, **kwargs: Any) -> kopf.AiohttpSession | None:
    """The credentials kopf would find itself (in-cluster or kubeconfig, via the kubernetes
    client), on a session with at most `limit` connections."""
    info = kopf.login_via_client(**kwargs)
    if info is None:
        return None
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        auth=info.as_aiohttp_basic_auth(),
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )
    return kopf.AiohttpSession(
        aiohttp_session=session,
        server=info.server,
        default_namespace=info.default_namespace,
        expiration=info.expiration,
        priority=info.priority,
    )
