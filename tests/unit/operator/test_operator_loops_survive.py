"""Kubernetes calls that get no answer (API server restarting or unreachable) fail with the
operator's typed errors, which every caller already handles."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest
from kubernetes import client as k8s

from defender_config import Keyring
from defender_operator import _webhook_setup, _webhook_tls
from defender_operator._errors import (
    UNANSWERED,
    AdmissionSetupError,
    KeySecretError,
    KubeError,
)
from defender_operator._keys import KeyringSecrets
from defender_operator._kube import Kube, ObjectRef

SOURCE = ("ml-defender", "ml-defender-keyring")


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
