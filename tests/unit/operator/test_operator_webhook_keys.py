"""The admission webhook's private key and stamp key stay where they belong: out of reprs and
error chains, and on disk only while an operator process serves with them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kopf
import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from defender_operator import _webhook_setup, _webhook_tls, handlers
from defender_operator._errors import AdmissionSetupError
from defender_operator.etcd_access import _Role

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def test_objects_holding_keys_show_none_in_their_repr() -> None:
    cert = _webhook_tls.self_signed(["127.0.0.1"], NOW)
    stamp_key = os.urandom(32)
    shown = repr(_webhook_tls.AdmissionSecrets(stamp_key, cert))
    assert "PRIVATE KEY" not in shown and repr(cert.key_pem) not in shown
    assert repr(stamp_key) not in shown
    assert "cert_pem" in shown  # the public parts still say what it is
    assert "hunter2-password" not in repr(_Role("operator", "hunter2-password", None))


class EchoingSecretsApi:
    """An API server that refuses the admission Secret with an error whose body echoes the
    Secret sent, as a validation or admission failure may."""

    def __init__(self, read_status: int = 404) -> None:
        self.read_status = read_status
        self.sent: dict[str, str] = {}

    def read_namespaced_secret(self, name: str, namespace: str) -> Any:
        error = ApiException(status=self.read_status, reason="Refused")
        error.body = json.dumps({"message": "internal error", "object": "n/a"})
        raise error

    def create_namespaced_secret(self, namespace: str, body: k8s.V1Secret) -> Any:
        self.sent = dict(body.data)
        error = ApiException(status=422, reason="Unprocessable Entity")
        error.body = json.dumps({"message": "invalid", "object": {"data": self.sent}})
        raise error


def everything_shown(exc: BaseException) -> str:
    """What a log line or error report with the traceback would show."""
    return "".join(traceback.format_exception(exc)) + repr(exc)


def test_a_refused_admission_secret_write_leaves_the_api_body_out_of_the_error() -> None:
    api = EchoingSecretsApi()
    with pytest.raises(AdmissionSetupError, match="HTTP 422") as info:
        _webhook_tls.ensure(
            api,  # type: ignore[arg-type]
            "ml-defender",
            "ml-defender-admission",
            hosts=["127.0.0.1"],
            cert_dir=None,
        )
    error = info.value
    assert error.__cause__ is None and error.__suppress_context__
    shown = everything_shown(error)
    assert api.sent and all(value not in shown for value in api.sent.values())
    assert "HTTP response body" not in shown


def test_a_refused_admission_secret_read_leaves_the_api_body_out_of_the_error() -> None:
    with pytest.raises(AdmissionSetupError, match="HTTP 500") as info:
        _webhook_tls.ensure(
            EchoingSecretsApi(read_status=500),  # type: ignore[arg-type]
            "ml-defender",
            "ml-defender-admission",
            hosts=["127.0.0.1"],
            cert_dir=None,
        )
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "HTTP response body" not in everything_shown(info.value)


# --- the key files ----------------------------------------------------------------------------


class Closing:
    def __init__(self, fails: bool) -> None:
        self.fails = fails
        self.closed = False

    def close(self) -> None:
        self.closed = True
        if self.fails:
            raise RuntimeError("etcd client close failed")


def cleanup_with(task_fails: bool, close_fails: bool) -> tuple[Path, Closing]:
    """Write the key files, then run the cleanup handler with a loop and a backend as given.
    Returns the key file and the backend."""
    _, keyfile = _webhook_setup._write_files(_webhook_tls.self_signed(["127.0.0.1"], NOW))
    backend = Closing(close_fails)

    async def scenario() -> None:
        async def loop() -> None:
            if task_fails:
                raise RuntimeError("loop died")
            await asyncio.Event().wait()

        task = asyncio.create_task(loop(), name="key-rotation")
        await asyncio.sleep(0)
        rt: Any = type("Rt", (), {"backend": backend})()
        await handlers.cleanup(memo=kopf.Memo(tasks=[task], runtime=rt))

    asyncio.run(scenario())
    return keyfile, backend


def test_cleanup_removes_the_key_files_after_a_loop_that_died() -> None:
    keyfile, backend = cleanup_with(task_fails=True, close_fails=False)
    assert not keyfile.exists() and not keyfile.parent.exists()
    assert backend.closed


def test_cleanup_removes_the_key_files_when_closing_the_backend_fails() -> None:
    with pytest.raises(RuntimeError, match="close failed"):
        cleanup_with(task_fails=False, close_fails=True)
    assert not _webhook_setup._folders
    assert not list(Path(tempfile.gettempdir()).glob(f"{_webhook_setup._PREFIX}{os.getpid()}-*"))


def ended_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_key_folders_a_killed_process_left_are_removed_when_files_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    prefix = _webhook_setup._PREFIX
    dead = tmp_path / f"{prefix}{ended_pid()}-a1"
    same_pid = tmp_path / f"{prefix}{os.getpid()}-b2"  # a restarted container's new process
    alive = tmp_path / f"{prefix}{os.getppid()}-c3"  # another operator on this host
    unknown = tmp_path / f"{prefix}c4"  # not named as ours: who wrote it is unknown
    for folder in (dead, same_pid, alive, unknown):
        folder.mkdir()
        (folder / "tls.key").write_bytes(b"-----BEGIN PRIVATE KEY-----")
    not_a_folder = tmp_path / f"{prefix}{ended_pid()}-d5"
    not_a_folder.write_bytes(b"")
    try:
        certfile, _ = _webhook_setup._write_files(_webhook_tls.self_signed(["127.0.0.1"], NOW))
        assert certfile.parent.parent == tmp_path
        assert not dead.exists() and not same_pid.exists()
        assert alive.exists() and unknown.exists() and not_a_folder.exists()
        # Its own folder is never stale to the process that wrote it.
        assert _webhook_setup.remove_stale(tmp_path) == []
        assert certfile.exists()
    finally:
        _webhook_setup.stop()
