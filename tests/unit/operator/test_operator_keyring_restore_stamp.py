"""A source keyring Secret the operator writes back after a delete keeps the last-export stamp
it had: the export exists whether or not the Secret does, so an operator started later does not
warn NoKeyringExport (docs/key-rotation.md, "What the operator does to protect the key")."""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from operator_core_support import FakeSecretsApi, Harness

from defender_cli._keyring_commands import export_stamp
from defender_config import Keyring
from defender_config.contract import EXPORTED_ANNOTATION, RESTORED_ANNOTATION
from defender_operator import _keyguard, _rotation
from defender_operator._api import ROTATE_ANNOTATION
from defender_operator._decisions.keyring import export_lacks
from defender_operator._decisions.rotation import RotationAction
from defender_operator._errors import KeySecretError
from defender_operator._keys import (
    MEMORY,
    ExportSeen,
    KeyringSecrets,
    StoredKeyring,
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


def _exported_and_settled(
    api: FakeSecretsApi, backend: MemoryBackend, *, listed: bool = False
) -> tuple[Harness, Keyring]:
    """An operator whose keyring Secret was exported (`kubectl defender keyring export`
    stamps it; with `listed`, as the current plugin does, with the key ids), after a pass."""
    h = _operator(api, backend)
    keyring = h.rt.keyring.current()
    h.backend.record_keyring(keyring)
    h.rt.secrets.create(keyring)
    stamp = export_stamp(STAMP, keyring) if listed else {EXPORTED_ANNOTATION: STAMP}
    api.stored[SOURCE].metadata.annotations.update(stamp)
    assert asyncio.run(_keyguard.settle(h.rt)) is True
    return h, keyring


def test_a_deleted_exported_secret_is_restored_with_its_stamp_and_no_export_is_asked_again() -> (
    None
):
    api, backend = FakeSecretsApi(), MemoryBackend()
    h, keyring = _exported_and_settled(api, backend)
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


def _edited_by_hand(
    api: FakeSecretsApi, data: dict[str, str] | None = None, **annotations: str
) -> None:
    """`kubectl edit` of the source Secret: replaced whole, so its resourceVersion changes."""
    edited = copy.deepcopy(api.stored[SOURCE])
    if data is not None:
        edited.data = data
    edited.metadata.annotations.update(annotations)
    api.replace_namespaced_secret(NAME, NS, edited)


def _judged_with_a_rotation_request(api: FakeSecretsApi, h: Harness) -> StoredKeyring:
    """A person asks for a rotation; the next pass's settle judges the Secret holding it."""
    _edited_by_hand(api, **{ROTATE_ANNOTATION: "now"})
    judged = asyncio.run(_keyguard.settle_source(h.rt))
    assert judged is not None and judged.request_pending
    return judged


def test_a_secret_deleted_between_settle_and_the_rotation_step_is_written_back_and_reported() -> (
    None
):
    # The rotation step acts on the Secret settle judged and reads none: its write for one
    # deleted in between fails; the next pass's settle writes it back as settle does it
    # (KeyringRestored: Event and alert), not the step quietly.
    api, backend = FakeSecretsApi(), MemoryBackend()
    h, keyring = _exported_and_settled(api, backend)
    judged = _judged_with_a_rotation_request(api, h)
    del api.stored[SOURCE]
    with pytest.raises(KeySecretError):
        asyncio.run(_rotation.step(h.rt, judged))
    assert SOURCE not in api.stored
    assert h.rt.keyring.current() == keyring
    assert asyncio.run(_keyguard.settle(h.rt)) is True
    annotations: dict[str, Any] = api.stored[SOURCE].metadata.annotations
    assert annotations[RESTORED_ANNOTATION] == MEMORY
    assert annotations[EXPORTED_ANNOTATION] == STAMP
    assert "KeyringRestored" in [reason for _, reason in h.kube.posted]
    assert Keyring.from_secret_data(api.stored[SOURCE].data, source="test") == keyring


def test_a_secret_replaced_between_settle_and_the_rotation_step_is_not_rotated() -> None:
    # A stranger's keyring with a rotation request, put in right after settle judged the old
    # one (which had one too): the step's write conflicts, so none of it is acted on; the next
    # settle judges it (and refuses it).
    api, backend = FakeSecretsApi(), MemoryBackend()
    h, keyring = _exported_and_settled(api, backend)
    judged = _judged_with_a_rotation_request(api, h)
    stranger = Keyring.generate()
    _edited_by_hand(api, stranger.to_secret_data())
    before = dict(api.stored[SOURCE].metadata.annotations)
    with pytest.raises(KeySecretError) as conflict:
        asyncio.run(_rotation.step(h.rt, judged))
    assert conflict.value.status == 409
    assert Keyring.from_secret_data(api.stored[SOURCE].data, source="test") == stranger
    assert api.stored[SOURCE].metadata.annotations == before  # the request not acted on
    assert h.rt.keyring.current() == keyring
    assert asyncio.run(_keyguard.settle(h.rt)) is False


def test_the_rotation_step_writes_only_the_secret_settle_judged() -> None:
    """The step reads the Secret no more: it writes with the resourceVersion settle judged, so
    a Secret changed in between, even with the same keyring, makes the write conflict (it
    used to read the Secret again and act on what nobody judged); the next pass judges the
    Secret as it is now and takes the step."""
    api, backend = FakeSecretsApi(), MemoryBackend()
    h, keyring = _exported_and_settled(api, backend)
    judged = _judged_with_a_rotation_request(api, h)
    _edited_by_hand(api, **{"example.com/note": "edited after the judgment"})
    with pytest.raises(KeySecretError) as conflict:
        asyncio.run(_rotation.step(h.rt, judged))
    assert conflict.value.status == 409
    assert Keyring.from_secret_data(api.stored[SOURCE].data, source="test") == keyring
    rejudged = asyncio.run(_keyguard.settle_source(h.rt))
    assert rejudged is not None and rejudged.request_pending
    taken = asyncio.run(_rotation.step(h.rt, rejudged))
    assert taken.action is RotationAction.ADD_KEY
    rotated = Keyring.from_secret_data(api.stored[SOURCE].data, source="test")
    assert len(rotated.keys) == 2 and rotated.primary == keyring.primary
    assert h.rt.keyring.current() == rotated


def test_export_lacks_names_the_keys_a_rotation_added_since() -> None:
    t = datetime(2026, 11, 2, 8, 15, tzinfo=UTC)
    keys = {"k1": t - timedelta(days=30), "k2": t + timedelta(days=1)}
    # The export lists what it holds: that decides, whatever the clocks say.
    assert export_lacks(keys, t, frozenset({"k1"})) == ("k2",)
    assert export_lacks(keys, t, frozenset({"k1", "k2"})) == ()
    assert export_lacks(keys, t + timedelta(days=9), frozenset({"k1"})) == ("k2",)
    # A stamp without the list (by hand, an older plugin): a key created after it is not in it.
    assert export_lacks(keys, t, None) == ("k2",)
    assert export_lacks(keys, t + timedelta(days=2), None) == ()
    # No export at all is NoKeyringExport's business.
    assert export_lacks(keys, None, frozenset()) == ()


def _export_warnings(h: Harness) -> list[str]:
    return [r for _, r in h.kube.posted if r in ("NoKeyringExport", "KeyringExportStale")]


def test_an_export_taken_before_a_rotation_is_reported_stale_once_until_a_new_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api, backend = FakeSecretsApi(), MemoryBackend()
    h, keyring = _exported_and_settled(api, backend, listed=True)
    assert _export_warnings(h) == []
    # A rotation adds a key (the operator's own step writes the Secret and holds the keyring).
    rotated = keyring.with_new_decrypt_only()
    before = h.rt.secrets.load()
    assert before is not None
    h.rt.secrets.save(rotated, before.rotation, None, before.resource_version, keep=before.kept)
    h.rt.keyring.set(rotated)
    h.backend.record_keyring(rotated)
    for _ in range(3):  # every pass judges it; one Event for this gap
        assert asyncio.run(_keyguard.settle(h.rt)) is True
    assert _export_warnings(h) == ["KeyringExportStale"]
    added = rotated.keys[-1].key_id
    message = next(r.getMessage() for r in caplog.records if "lacks key(s)" in r.getMessage())
    assert added in message and "kubectl defender keyring export" in message
    assert rotated.keys[-1].fingerprint not in message  # ids name keys; nothing more
    # A new export, listing both keys: nothing more to say.
    api.stored[SOURCE].metadata.annotations.update(export_stamp(STAMP, rotated))
    assert asyncio.run(_keyguard.settle(h.rt)) is True
    assert _export_warnings(h) == ["KeyringExportStale"]
