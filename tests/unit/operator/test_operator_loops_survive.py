"""The operator-wide loops outlive what they do not expect: Kubernetes calls that get no answer
fail with the operator's typed errors, a round failing otherwise is counted, logged and retried
after a pause, and a loop that ends all the same fails the liveness probe."""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
from kubernetes import client as k8s
from operator_core_support import FakeSecretsApi, Harness, spec, unanswered, until

from defender_config import Keyring
from defender_operator import _keyguard, _loops, _webhook_setup, _webhook_tls, handlers
from defender_operator._errors import (
    UNANSWERED,
    AdmissionSetupError,
    KeySecretError,
    KubeError,
)
from defender_operator._keys import KeyringSecrets
from defender_operator._kube import Kube, ObjectRef
from defender_operator._metrics import ERRORS, LOOP_FAILURES
from defender_operator._settings import OperatorSettings

SOURCE = ("ml-defender", "ml-defender-keyring")
COPY = ("default", "ml-defender-keyring")


@pytest.fixture
def nobody_listening() -> Iterator[k8s.ApiClient]:
    """A client of an API server that refuses every connection (a port nothing listens on)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The client's default retries, as the operator's: a refused connection ends as
    # MaxRetryError.
    api = k8s.ApiClient(k8s.Configuration(host=f"http://127.0.0.1:{port}"))
    yield api
    api.close()


async def stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- no answer: the typed errors ----------------------------------------------------------


def test_keyring_secret_calls_without_an_answer_raise_key_secret_error(
    nobody_listening: k8s.ApiClient,
) -> None:
    secrets = KeyringSecrets(k8s.CoreV1Api(nobody_listening), *SOURCE)
    with pytest.raises(KeySecretError) as info:
        secrets.load()
    assert info.value.status == UNANSWERED
    message = str(info.value)
    assert "no answer from the API server (MaxRetryError: NewConnectionError)" in message
    assert "RBAC" not in message and "HTTP" not in message  # nothing to fix in the rules
    with pytest.raises(KeySecretError):
        secrets.fan_out(Keyring.generate(), "elsewhere")


def test_other_kubernetes_calls_without_an_answer_raise_kube_error(
    nobody_listening: k8s.ApiClient,
) -> None:
    kube = Kube(nobody_listening)
    with pytest.raises(KubeError, match="no answer from the API server"):
        kube.component_namespaces()
    with pytest.raises(KubeError, match="no answer from the API server"):
        kube.components(["default"])
    with pytest.raises(KubeError, match="no answer from the API server"):
        kube.patch_status("default", "sniffer", {"phase": "Ready"})


def test_posting_an_event_without_an_answer_does_not_raise(
    nobody_listening: k8s.ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    ref = ObjectRef("v1", "Secret", *SOURCE)
    with caplog.at_level(logging.WARNING, "defender_operator.kube"):
        Kube(nobody_listening).post_event(ref, "Warning", "NoKeyringExport", "take an export")
    assert "could not post Event NoKeyringExport" in caplog.text
    assert "no answer from the API server" in caplog.text


def test_admission_setup_without_an_answer_raises_admission_setup_error(
    nobody_listening: k8s.ApiClient,
) -> None:
    with pytest.raises(AdmissionSetupError, match="no answer from the API server") as info:
        _webhook_tls.ensure(
            k8s.CoreV1Api(nobody_listening),
            "ml-defender",
            "ml-defender-admission",
            hosts=["127.0.0.1"],
            cert_dir=None,
        )
    assert "RBAC" not in str(info.value)
    with pytest.raises(AdmissionSetupError, match="no answer from the API server"):
        _webhook_setup.fill_ca_bundle(nobody_listening, "ml-defender", b"ca")


# --- the key-rotation loop ----------------------------------------------------------------


def keyring_harness(api: FakeSecretsApi) -> Harness:
    """An operator holding a verified keyring whose source Secret lives in `api`."""
    h = Harness()
    h.rt.settings = OperatorSettings(rotation_interval_seconds=0.01)
    keyring = h.rt.keyring.current()
    h.backend.record_keyring(keyring)  # the store knows its keys: restored, never regenerated
    secrets: Any = KeyringSecrets(api, *SOURCE)  # type: ignore[arg-type]
    h.rt.secrets = secrets
    secrets.create(keyring)
    return h


def test_the_key_rotation_loop_restores_the_secret_once_the_api_server_answers_again() -> None:
    api = FakeSecretsApi()
    h = keyring_harness(api)
    # A component this replica manages, holding its name: its namespace gets the copy.
    asyncio.run(h.reconcile(spec()))
    h.mem.monitors = 1
    unexpected = LOOP_FAILURES.labels("key-rotation")._value.get()
    typed = ERRORS.labels("rotation")._value.get()

    async def scenario() -> None:
        task = asyncio.create_task(_loops.key_rotation(h.rt))
        try:
            # The API server restarts; meanwhile someone deletes the keyring Secret and the copy.
            api.down = unanswered()
            del api.stored[SOURCE]
            del api.stored[COPY]
            calls = api.calls
            await until("several failed rounds", lambda: api.calls >= calls + 3)
            assert not task.done()
            api.down = None
            await until("the Secret restored", lambda: SOURCE in api.stored)
            await until("copied where components live", lambda: COPY in api.stored)
        finally:
            await stopped(task)

    asyncio.run(scenario())
    restored = api.stored[SOURCE]
    assert Keyring.from_secret_data(restored.data) == h.rt.keyring.current()
    # Each failed round was a typed, expected failure: not one reached the last-resort net.
    assert ERRORS.labels("rotation")._value.get() >= typed + 3
    assert LOOP_FAILURES.labels("key-rotation")._value.get() == unexpected


def test_a_copy_the_api_server_did_not_answer_for_ends_the_settle_instead_of_being_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = FakeSecretsApi()
    h = keyring_harness(api)
    h.rt.secrets.fan_out(h.rt.keyring.current(), COPY[0])
    # The source is gone and the operator holds no verified keyring: only the copy can restore.
    del api.stored[SOURCE]
    h.rt.keyring_ready = False
    h.rt.keyring.set(None)
    answered = api.read_namespaced_secret

    def read(name: str, namespace: str) -> Any:
        if namespace == COPY[0]:
            raise unanswered()
        return answered(name, namespace)

    monkeypatch.setattr(api, "read_namespaced_secret", read)
    with pytest.raises(KeySecretError, match="no answer from the API server"):
        asyncio.run(_keyguard.settle(h.rt))
    assert h.rt.keyring_refused is None  # nothing refused on what could not be read


# --- the net for everything else ----------------------------------------------------------


class Boom(Exception):
    """An error nobody typed; its text stands for whatever such a text might hold."""


SECRET_TEXT = "key material 6b6579"


def test_a_loop_survives_an_unexpected_error_counts_it_and_logs_no_message(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_loops, "_UNEXPECTED_PAUSE_SECONDS", 0.01)
    api = FakeSecretsApi()
    h = keyring_harness(api)
    before = LOOP_FAILURES.labels("key-rotation")._value.get()

    async def scenario() -> None:
        api.down = Boom(SECRET_TEXT)
        del api.stored[SOURCE]
        task = asyncio.create_task(_loops.key_rotation(h.rt))
        try:
            await until(
                "two unexpected failures",
                lambda: LOOP_FAILURES.labels("key-rotation")._value.get() >= before + 2,
            )
            assert not task.done()
            api.down = None
            await until("the Secret restored", lambda: SOURCE in api.stored)
        finally:
            await stopped(task)

    with caplog.at_level(logging.ERROR, "defender_operator"):
        asyncio.run(scenario())
    failures = [r for r in caplog.records if getattr(r, "loop", None) == "key-rotation"]
    assert failures, caplog.text
    first = failures[0]
    assert first.error_type.endswith("Boom")  # type: ignore[attr-defined]
    assert any("_keys.py" in frame for frame in first.at)  # type: ignore[attr-defined]
    assert first.exc_info is None
    assert SECRET_TEXT not in caplog.text


def test_unexpected_failures_in_a_row_double_the_pause_up_to_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr(_loops.asyncio, "sleep", sleep)
    monkeypatch.setattr(_loops, "_UNEXPECTED_PAUSE_MAX_SECONDS", 5.0)

    async def rounds(outcomes: list[bool]) -> None:
        survive = _loops._Survive("test")
        for fails in outcomes:
            async with survive:
                if fails:
                    raise Boom()

    asyncio.run(rounds([True, True, True, True, False, True]))
    assert pauses == [1.0, 2.0, 4.0, 5.0, 1.0]


def test_cancellation_passes_through_the_net() -> None:
    async def round_cancelled() -> None:
        async with _loops._Survive("test"):
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(round_cancelled())


def test_the_etcd_health_loop_survives_an_unexpected_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_loops, "_UNEXPECTED_PAUSE_SECONDS", 0.01)
    h = Harness()
    h.rt.settings = OperatorSettings(etcd_health_interval_seconds=0.01)
    healthy = h.backend.health
    failing = [Boom(), Boom()]

    def health() -> Any:
        if failing:
            raise failing.pop()
        return healthy()

    monkeypatch.setattr(h.backend, "health", health)
    before = LOOP_FAILURES.labels("etcd-health")._value.get()

    async def scenario() -> None:
        task = asyncio.create_task(_loops.etcd_health(h.rt))
        try:
            await until(
                "a health check after the failures", lambda: h.backend.calls.count("health") >= 3
            )
            assert not task.done()
        finally:
            await stopped(task)

    asyncio.run(scenario())
    assert LOOP_FAILURES.labels("etcd-health")._value.get() == before + 2


def test_a_health_check_that_fails_unexpectedly_leaves_etcd_unhealthy_not_as_last_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Harness()
    asyncio.run(_loops._etcd_health_round(h.rt))
    assert h.rt.etcd.last.reachable and h.rt.etcd.last.quorum

    def health() -> Any:
        raise Boom()

    monkeypatch.setattr(h.backend, "health", health)
    with pytest.raises(Boom):
        asyncio.run(_loops._etcd_health_round(h.rt))
    assert not h.rt.etcd.last.reachable and not h.rt.etcd.last.quorum
    assert h.rt.etcd.last.detail == "the health check failed"


# --- a loop that ends: the liveness probe ---------------------------------------------------


def test_the_probe_fails_when_a_loop_has_ended_and_names_how(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async def forever() -> None:
            await asyncio.Event().wait()

        async def dies() -> None:
            raise Boom(SECRET_TEXT)

        running = asyncio.create_task(forever(), name="etcd-health")
        memo = kopf.Memo(tasks=[running])
        assert handlers.loops_probe(memo=memo) == {"running": 1}
        dead = asyncio.create_task(dies(), name="key-rotation")
        dead.add_done_callback(_loops._report_end)
        memo["tasks"].append(dead)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        with pytest.raises(kopf.PermanentError, match=r"key-rotation \(.*Boom\)") as info:
            handlers.loops_probe(memo=memo)
        assert "etcd-health" not in str(info.value) and SECRET_TEXT not in str(info.value)
        # Stopping the operator: stopped loops fail nothing.
        await handlers.cleanup(memo=memo)
        assert running.cancelled()
        assert handlers.loops_probe(memo=memo) == {"running": 0}

    with caplog.at_level(logging.ERROR, "defender_operator"):
        asyncio.run(scenario())
    assert "background loop key-rotation ended" in caplog.text
    assert SECRET_TEXT not in caplog.text


def test_started_loops_run_until_stopped() -> None:
    h = keyring_harness(FakeSecretsApi())
    names = [
        "etcd-health",
        "key-rotation",
        "heartbeat-watch",
        "change-watch",
        "registrations",
        "crd-deletion",
    ]
    before = [LOOP_FAILURES.labels(name)._value.get() for name in names]

    async def scenario() -> None:
        tasks = _loops.start(h.rt)
        assert [t.get_name() for t in tasks] == names
        await asyncio.sleep(0.1)
        assert _loops.ended(tasks) == []
        await _loops.stop(tasks)
        assert all(t.cancelled() for t in tasks)

    asyncio.run(scenario())
    assert [LOOP_FAILURES.labels(name)._value.get() for name in names] == before


class _NotFound(http.server.BaseHTTPRequestHandler):
    """An API server without the DefenderComponent CRD: every list is a 404."""

    def do_GET(self) -> None:
        body = json.dumps({"kind": "Status", "code": 404, "reason": "NotFound"}).encode()
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_listing_components_without_the_crd_says_it_is_not_installed() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = k8s.ApiClient(k8s.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}"))
    try:
        kube = Kube(api)
        for call in (kube.component_namespaces, kube.components, kube.component_items):
            with pytest.raises(KubeError, match=r"the CRD defendercomponents\.mldefender\.io is"):
                call()
        with pytest.raises(KubeError, match="not installed"):
            kube.component_namespaces(["default"])
    finally:
        api.close()
        server.shutdown()
        server.server_close()
