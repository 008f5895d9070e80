"""A source keyring Secret the operator writes back after a delete keeps the last-export stamp
it had: the export exists whether or not the Secret does, so an operator started later does not
warn NoKeyringExport (docs/key-rotation.md, "What the operator does to protect the key")."""

from __future__ import annotations

import asyncio
from typing import Any

from operator_core_support import FakeSecretsApi, Harness

from defender_config import Keyring
from defender_config.contract import EXPORTED_ANNOTATION, RESTORED_ANNOTATION
from defender_operator import _keyguard, _rotation
from defender_operator._keys import (
    MEMORY,
    ExportSeen,
    KeyringSecrets,
    keyring_digest,
    restore_annotations,
)
from defender_operator._kube import ObjectRef
from defender_operator._memory_backend import MemoryBackend

NS, NAME = "ml-defender", "ml-defender-keyring"
SOURCE = (NS, NAME)
STAMP = "2026-11-02T08:15:00+00:00"


def test_a_restore_carries_the_stamp_seen_with_the_same_keyring_only() -> None:
    keyring, other = Keyring.generate(), Keyring.generate()
    seen = ExportSeen(keyring_digest(keyring), STAMP)
    assert restore_annotations(MEMORY, keyring, seen) == {
        RESTORED_ANNOTATION: MEMORY,
        EXPORTED_ANNOTATION: STAMP,
    }
    # Never stamped, or stamped while the Secret held another keyring: no export of this one.
    assert restore_annotations("copy a/b", keyring, None) == {RESTORED_ANNOTATION: "copy a/b"}
    assert restore_annotations(MEMORY, other, seen) == {RESTORED_ANNOTATION: MEMORY}


def _operator(api: FakeSecretsApi, backend: MemoryBackend) -> Harness:
    """An operator process on the Secrets of `api`; components only in its own namespace."""
    h = Harness(backend=backend)
    h.rt.secrets = KeyringSecrets(api, NS, NAME)  # type: ignore[arg-type]
    h.kube.namespaces = {NS}
    component = ObjectRef("mldefender.io/v1alpha1", "DefenderComponent", NS, "sniffer")
    h.kube.components = lambda watched=None: [component]  # type: ignore[method-assign]
    return h


def test_a_deleted_exported_secret_is_restored_with_its_stamp_and_no_export_is_asked_again() -> (
    None
):
    api, backend = FakeSecretsApi(), MemoryBackend()
    h = _operator(api, backend)
    keyring = h.rt.keyring.current()
    h.backend.record_keyring(keyring)
    h.rt.secrets.create(keyring)
    # `kubectl defender keyring export` stamps the Secret; the operator's next pass reads it.
    api.stored[SOURCE].metadata.annotations[EXPORTED_ANNOTATION] = STAMP
    assert asyncio.run(_keyguard.settle(h.rt)) is True
    # A careless `kubectl delete secret`: written back from memory, with the stamp.
    del api.stored[SOURCE]
    assert asyncio.run(_keyguard.settle(h.rt)) is True
    annotations: dict[str, Any] = api.stored[SOURCE].metadata.annotations
    assert annotations[RESTORED_ANNOTATION] == MEMORY
    assert annotations[EXPORTED_ANNOTATION] == STAMP
    # The operator restarts: the restored Secret tells it an export was taken.
    restarted = _operator(api, backend)
    restarted.rt.keyring.set(None)
    restarted.rt.keyring_ready = False
    assert asyncio.run(_keyguard.settle(restarted.rt)) is True
    assert restarted.rt.keyring.current() == keyring
    assert "NoKeyringExport" not in [reason for _, reason in restarted.kube.posted]


def test_a_secret_deleted_between_settle_and_the_rotation_step_is_written_back_and_reported() -> (
    None
):
    # The rotation step runs right after settle judged the Secret: one deleted in between is
    # written back as settle does it (KeyringRestored: Event and alert), not quietly.
    api, backend = FakeSecretsApi(), MemoryBackend()
    h = _operator(api, backend)
    keyring = h.rt.keyring.current()
    h.backend.record_keyring(keyring)
    h.rt.secrets.create(keyring)
    api.stored[SOURCE].metadata.annotations[EXPORTED_ANNOTATION] = STAMP
    assert asyncio.run(_keyguard.settle(h.rt)) is True
    del api.stored[SOURCE]
    asyncio.run(_rotation.step(h.rt))
    annotations: dict[str, Any] = api.stored[SOURCE].metadata.annotations
    assert annotations[RESTORED_ANNOTATION] == MEMORY
    assert annotations[EXPORTED_ANNOTATION] == STAMP
    assert "KeyringRestored" in [reason for _, reason in h.kube.posted]
    assert Keyring.from_secret_data(api.stored[SOURCE].data, source="test") == keyring
