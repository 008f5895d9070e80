"""The status patch a reconcile awaits on the event loop (`Kube.patch_status_soon`): through
kopf's own session under kopf, the blocking client elsewhere, and the same typed answers for
every bad answer an API server (or something posing as one) can give."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import kopf
import pytest
from aiohttp import web
from kopf._cogs.clients import auth as kopf_auth
from kopf._cogs.structs.credentials import ConnectionInfo, Vault
from kubernetes import client as k8s

from defender_config.contract import API_GROUP, API_VERSION, PLURAL
from defender_operator._errors import KubeError
from defender_operator._kube import Kube

PATH = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/default/{PLURAL}/sniffer/status"
SECRETISH = "the server's own words: status.conditions[0].message Invalid value"


def _status_error(code: int) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code}
    return web.json_response({**body, "message": SECRETISH, "reason": "Invalid"}, status=code)


ANSWERS: dict[str, Callable[[dict[str, Any]], web.Response]] = {
    "ok": lambda sent: web.json_response({"kind": "X", "status": {**sent["status"], "a": 1}}),
    "gone": lambda _: _status_error(404),
    "refused": lambda _: _status_error(422),
    "broken": lambda _: _status_error(500),
    "text": lambda _: web.Response(text="hello", content_type="text/plain"),
    "not-json": lambda _: web.Response(text="{nope", content_type="application/json"),
    "list": lambda _: web.json_response([1, 2]),
    "status-list": lambda _: web.json_response({"status": [1]}),
    "no-status": lambda _: web.json_response({"kind": "X"}),
}


class Server:
    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.requests: list[tuple[str, str, str, dict[str, Any]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        sent = json.loads(await request.read())
        self.requests.append(
            (
                request.method,
                request.path,
                request.headers.get("Content-Type", ""),
                sent,
            )
        )
        self.agents = request.headers.get("User-Agent", "")
        return ANSWERS[self.answer](sent)


@asynccontextmanager
async def serving(answer: str) -> AsyncIterator[tuple[Server, str]]:
    server = Server(answer)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _blocking_client(url: str) -> k8s.ApiClient:
    conf = k8s.Configuration()
    conf.host = url
    return k8s.ApiClient(conf)


async def _under_kopf(url: str, call: Callable[[], Awaitable[Any]]) -> Any:
    """`call` with kopf's credentials in the context, as in a handler."""
    vault = Vault()
    await vault.populate({"test": ConnectionInfo(server=url)})
    token = kopf_auth.vault_var.set(vault)
    try:
        return await call()
    finally:
        kopf_auth.vault_var.reset(token)
        async for _, _, context in vault.extended(kopf_auth.APIContext, "contexts"):
            await context.session.close()


def patch(answer: str, *, under_kopf: bool = True) -> tuple[Server, Any]:
    async def go() -> tuple[Server, Any]:
        async with serving(answer) as (server, url):
            kube = Kube(_blocking_client(url), kopf.OperatorSettings())

            def call() -> Awaitable[Any]:
                return kube.patch_status_soon("default", "sniffer", {"phase": "Ready"})

            try:
                got = await (_under_kopf(url, call) if under_kopf else call())
            except KubeError as exc:
                return server, exc
            return server, got

    return asyncio.run(go())


def test_under_kopf_the_patch_goes_through_kopfs_session_as_a_merge_patch() -> None:
    server, stored = patch("ok")
    assert stored == {"phase": "Ready", "a": 1}  # the status as the server stored it
    [(method, path, content_type, sent)] = server.requests
    assert (method, path, sent) == ("PATCH", PATH, {"status": {"phase": "Ready"}})
    assert content_type == "application/merge-patch+json"
    assert "kopf" in server.agents.lower()


def test_outside_kopf_the_blocking_client_patches_in_a_thread() -> None:
    server, stored = patch("ok", under_kopf=False)
    assert stored == {"phase": "Ready", "a": 1}
    [(method, path, _, sent)] = server.requests
    assert (method, path, sent) == ("PATCH", PATH, {"status": {"phase": "Ready"}})
    assert "kopf" not in server.agents.lower()


def test_without_kopf_settings_the_blocking_client_patches_even_under_kopf() -> None:
    async def go() -> Server:
        async with serving("ok") as (server, url):
            kube = Kube(_blocking_client(url))
            await _under_kopf(url, lambda: kube.patch_status_soon("default", "sniffer", {}))
            return server

    assert "kopf" not in asyncio.run(go()).agents.lower()


def test_a_deleted_object_is_none() -> None:
    _, got = patch("gone")
    assert got is None


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ("refused", r"\(422 Unprocessable (Entity|Content)\)"),
        ("broken", r"\(500 Internal Server Error\)"),
        ("text", r"\(answer not JSON\)"),
        ("not-json", r"\(answer not JSON\)"),
        ("list", r"\(answer not an object\)"),
        ("status-list", r"\(status not an object\)"),
    ],
)
def test_a_bad_answer_is_a_kube_error_with_status_and_reason_only(
    answer: str, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        server, got = patch(answer)
    assert isinstance(got, KubeError)
    assert got.args[0].startswith("cannot patch status of default/sniffer")
    assert __import__("re").search(said, str(got))
    assert SECRETISH not in str(got)
    assert SECRETISH not in caplog.text  # kopf's helper logs the server's answer: not here
    assert len(server.requests) == 1  # no retry of its own: kopf retries the handler


def test_an_answer_without_status_is_an_empty_status() -> None:
    _, got = patch("no-status")
    assert got == {}


def test_no_api_server_is_a_kube_error_saying_so() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused

        async def go() -> Any:
            kube = Kube(_blocking_client(url), kopf.OperatorSettings())
            try:
                await _under_kopf(url, lambda: kube.patch_status_soon("default", "sniffer", {}))
            except KubeError as exc:
                return exc
            return None

        got = asyncio.run(go())
    assert isinstance(got, KubeError)
    assert "no answer from the API server" in str(got)
