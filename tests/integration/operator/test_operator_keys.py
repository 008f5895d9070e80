"""The keyring Secrets against a real kube-apiserver: generate once, copy, keep in sync, and
fail with a typed error (never key material) when Kubernetes says no."""

from __future__ import annotations

import base64
import logging
import uuid

import pytest
from kubernetes import client as k8s

from defender_config import REGISTRATIONS_FILE, Keyring, contract, parse_registrations
from defender_operator._api import RotationStage
from defender_operator._decisions.rotation import RotationState
from defender_operator._errors import KeyDropRefusedError, KeySecretError
from defender_operator._keys import A_DIGEST, MANAGED_BY, MEMORY, KeyringSecrets, keyring_digest
from defender_operator._kube import Kube, ObjectRef

pytestmark = [pytest.mark.cluster]
NAME = "ml-defender-keyring"


@pytest.fixture
def core(k8s_api: k8s.ApiClient) -> k8s.CoreV1Api:
    return k8s.CoreV1Api(k8s_api)


def _other_namespace(core: k8s.CoreV1Api) -> str:
    name = f"copy-{uuid.uuid4().hex[:8]}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    return name


def test_generated_once_and_kept(core: k8s.CoreV1Api, namespace: str) -> None:
    # What `_keyguard.settle` writes on a first install (Generate): create-only.
    secrets = KeyringSecrets(core, namespace, NAME)
    assert secrets.load() is None
    first, created = secrets.create(Keyring.generate())
    again, created_again = KeyringSecrets(core, namespace, NAME).create(Keyring.generate())
    assert created and not created_again
    assert again.keyring == first.keyring
    assert first.rotation.stage is RotationStage.IDLE
    secret = core.read_namespaced_secret(NAME, namespace)
    assert secret.metadata.labels["app.kubernetes.io/managed-by"] == MANAGED_BY
    assert secret.type == "Opaque"


def test_deleted_source_is_restored_from_memory_not_regenerated(
    core: k8s.CoreV1Api, namespace: str
) -> None:
    # `_keyguard.settle` writing back a Secret deleted since a pass read it.
    secrets = KeyringSecrets(core, namespace, NAME)
    known = secrets.create(Keyring.generate())[0].keyring
    _annotate_source(core, namespace, {contract.EXPORTED_ANNOTATION: "2026-12-01T00:00:00Z"})
    seen = secrets.load()  # the operator's pass reads the stamp
    assert seen is not None and seen.exported is not None
    core.delete_namespaced_secret(NAME, namespace)
    restored, created = secrets.restore(known, MEMORY)
    assert created
    assert restored.keyring == known
    assert restored.kept == {
        contract.RESTORED_ANNOTATION: MEMORY,
        contract.EXPORTED_ANNOTATION: "2026-12-01T00:00:00Z",
    }


def test_copy_created_updated_and_left_alone_when_in_sync(
    core: k8s.CoreV1Api, namespace: str
) -> None:
    secrets = KeyringSecrets(core, namespace, NAME)
    keyring = secrets.create(Keyring.generate())[0].keyring
    other = _other_namespace(core)
    try:
        assert secrets.fan_out(keyring, other) is True
        assert secrets.fan_out(keyring, other) is False  # in sync: no write
        assert secrets.copy_digest(other) == keyring_digest(keyring)
        copy = core.read_namespaced_secret(NAME, other)
        assert Keyring.from_secret_data(dict(copy.data)) == keyring
        rotated = keyring.with_new_decrypt_only()
        assert secrets.fan_out(rotated, other) is True
        copy = core.read_namespaced_secret(NAME, other)
        assert Keyring.from_secret_data(dict(copy.data)) == rotated
        assert copy.metadata.annotations[A_DIGEST] == keyring_digest(rotated)
    finally:
        core.delete_namespace(other)


def test_copy_digest_reused_within_max_age_and_read_again_after(
    core: k8s.CoreV1Api, namespace: str
) -> None:
    secrets = KeyringSecrets(core, namespace, NAME)
    keyring = secrets.create(Keyring.generate())[0].keyring
    other = _other_namespace(core)
    try:
        assert secrets.copy_digest(other, max_age=60) is None  # absent, and remembered so
        assert not secrets.copy_is_current(keyring, other, max_age=60)
        assert secrets.fan_out(keyring, other) is True
        digest = keyring_digest(keyring)
        assert secrets.copy_digest(other, max_age=60) == digest
        # Answered from memory (a reconcile then needs no thread), the source's namespace always.
        assert secrets.copy_is_current(keyring, other, max_age=60)
        assert not secrets.copy_is_current(keyring, other, max_age=0)
        assert not secrets.copy_is_current(keyring.with_new_decrypt_only(), other, max_age=60)
        assert secrets.copy_is_current(keyring.with_new_decrypt_only(), namespace, max_age=0)
        # Someone deletes the copy: within max_age the remembered digest stands, and a
        # reconcile's fan-out with max_age trusts it; without max_age both look again.
        core.delete_namespaced_secret(NAME, other)
        assert secrets.copy_digest(other, max_age=60) == digest
        assert secrets.fan_out(keyring, other, max_age=60) is False
        assert secrets.copy_digest(other) is None
        assert secrets.fan_out(keyring, other, max_age=60) is True  # the read said absent
        assert secrets.copy_digest(other, max_age=60) == digest
        # A rotated keyring never matches what was remembered: written at once.
        rotated = keyring.with_new_decrypt_only()
        assert secrets.fan_out(rotated, other, max_age=60) is True
        assert core.read_namespaced_secret(NAME, other).metadata.annotations[A_DIGEST] == (
            keyring_digest(rotated)
        )
    finally:
        core.delete_namespace(other)


def test_foreign_secret_with_the_same_name_is_not_overwritten(
    core: k8s.CoreV1Api, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    other = _other_namespace(core)
    try:
        core.create_namespaced_secret(
            other,
            k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=NAME), string_data={"x": "mine"}),
        )
        secrets = KeyringSecrets(core, namespace, NAME)
        keyring = secrets.create(Keyring.generate())[0].keyring
        with caplog.at_level(logging.DEBUG), pytest.raises(KeySecretError) as info:
            secrets.fan_out(keyring, other)
        assert "not managed by the operator" in str(info.value)
        material = keyring.primary.material
        assert material.hex() not in str(info.value) + caplog.text
        assert core.read_namespaced_secret(NAME, other).data == {"x": "bWluZQ=="}
    finally:
        core.delete_namespace(other)


def test_api_refusals_are_typed_and_hold_no_key_material(
    core: k8s.CoreV1Api, namespace: str
) -> None:
    secrets = KeyringSecrets(core, namespace, NAME)
    keyring = secrets.create(Keyring.generate())[0].keyring
    with pytest.raises(KeySecretError) as info:
        secrets.fan_out(keyring, f"missing-{uuid.uuid4().hex[:8]}")
    assert info.value.status == 404
    text = str(info.value) + repr(info.value)
    assert keyring.to_secret_data()["keyring.json"] not in text
    assert info.value.__cause__ is None  # the API body (which echoes the Secret) is dropped


def test_save_refuses_a_stale_version(core: k8s.CoreV1Api, namespace: str) -> None:
    secrets = KeyringSecrets(core, namespace, NAME)
    stored = secrets.create(Keyring.generate())[0]
    moved = secrets.save(
        stored.keyring.with_new_decrypt_only(),
        RotationState(RotationStage.DISTRIBUTING),
        None,
        stored.resource_version,
    )
    assert moved.rotation.stage is RotationStage.DISTRIBUTING
    with pytest.raises(KeySecretError) as info:
        secrets.save(stored.keyring, RotationState(), None, stored.resource_version)
    assert info.value.status == 409
    assert secrets.load().keyring == moved.keyring  # type: ignore[union-attr]


def test_copy_never_replaced_by_a_keyring_that_drops_a_used_key(
    core: k8s.CoreV1Api, namespace: str
) -> None:
    """The deleted-source hole: a new keyring must not overwrite the last holder of a key that
    stored values use. Only when no value uses the dropped key is the copy replaced."""
    secrets = KeyringSecrets(core, namespace, NAME)
    old = secrets.create(Keyring.generate())[0].keyring
    other = _other_namespace(core)
    try:
        assert secrets.fan_out(old, other) is True
        stranger = Keyring.generate()
        used = frozenset({old.primary.key_id})
        looked: list[int] = []

        def referenced() -> frozenset[str]:
            looked.append(1)
            return used

        with pytest.raises(KeyDropRefusedError) as info:
            secrets.fan_out(stranger, other, referenced=referenced)
        assert info.value.key_ids == (old.primary.key_id,)
        assert looked  # the store was consulted, not guessed
        assert Keyring.from_secret_data(dict(core.read_namespaced_secret(NAME, other).data)) == old
        # Without a way to look, a drop is refused too.
        with pytest.raises(KeyDropRefusedError):
            secrets.fan_out(stranger, other)
        # A superset (rotation stage 1) needs no look-up at all.
        staged = old.with_new_decrypt_only()
        looked.clear()
        assert secrets.fan_out(staged, other, referenced=referenced) is True
        assert not looked
        # Rotation finished: the old key is used by nothing any more, the copy follows.
        new_id = staged.keys[-1].key_id
        finished = staged.promote(new_id).retire(old.primary.key_id).remove(old.primary.key_id)
        assert secrets.fan_out(finished, other, referenced=lambda: frozenset({new_id})) is True
        found = secrets.read_copy(other)
        assert found is not None and found[0] == finished
    finally:
        core.delete_namespace(other)


def test_read_copy_ignores_foreign_secrets_and_reports_broken_ones(
    core: k8s.CoreV1Api, namespace: str
) -> None:
    secrets = KeyringSecrets(core, namespace, NAME)
    other = _other_namespace(core)
    try:
        assert secrets.read_copy(other) is None
        core.create_namespaced_secret(
            other, k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=NAME), string_data={"x": "y"})
        )
        assert secrets.read_copy(other) is None  # not labelled as ours: not a candidate
        core.delete_namespaced_secret(NAME, other)
        core.create_namespaced_secret(
            other,
            k8s.V1Secret(
                metadata=k8s.V1ObjectMeta(
                    name=NAME, labels={"app.kubernetes.io/managed-by": MANAGED_BY}
                ),
                string_data={"keyring.json": "{broken"},
            ),
        )
        found = secrets.read_copy(other)
        assert found is not None and found[0] is None and "not valid JSON" in str(found[1])
    finally:
        core.delete_namespace(other)


def _annotate_source(core: k8s.CoreV1Api, namespace: str, annotations: dict[str, str]) -> None:
    """What `kubectl defender keyring export` (or a person) adds to the source Secret."""
    core.patch_namespaced_secret(NAME, namespace, {"metadata": {"annotations": annotations}})


def test_create_is_create_only_and_keeps_annotations(core: k8s.CoreV1Api, namespace: str) -> None:
    secrets = KeyringSecrets(core, namespace, NAME)
    first, created = secrets.create(Keyring.generate(), {contract.RESTORED_ANNOTATION: "x"})
    assert created
    second, created_again = secrets.create(Keyring.generate())
    assert not created_again and second.keyring == first.keyring
    assert first.kept == {contract.RESTORED_ANNOTATION: "x"}
    _annotate_source(core, namespace, {contract.EXPORTED_ANNOTATION: "2026-12-01T00:00:00Z"})
    stored = secrets.load()
    assert stored is not None and stored.exported is not None
    # The operator's own rewrites carry the export time over.
    saved = secrets.save(
        stored.keyring.with_new_decrypt_only(),
        RotationState(RotationStage.DISTRIBUTING),
        None,
        stored.resource_version,
        stored.kept,
    )
    assert saved.exported == stored.exported


def test_an_event_that_cannot_be_posted_is_logged_not_raised(
    k8s_api: k8s.ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    kube = Kube(k8s_api)
    ref = ObjectRef("v1", "Secret", f"missing-{uuid.uuid4().hex[:8]}", NAME)
    with caplog.at_level(logging.WARNING):
        kube.post_event(ref, "Warning", "KeyUnavailable", "test")
    assert "could not post Event KeyUnavailable" in caplog.text


def test_unreadable_time_annotations_read_as_absent(core: k8s.CoreV1Api, namespace: str) -> None:
    secrets = KeyringSecrets(core, namespace, NAME)
    secrets.create(Keyring.generate())
    _annotate_source(core, namespace, {contract.EXPORTED_ANNOTATION: "last tuesday"})
    stored = secrets.load()
    assert stored is not None and stored.exported is None


def _registrations_on_file(core: k8s.CoreV1Api, namespace: str) -> dict[str, int] | None:
    raw = (core.read_namespaced_secret(NAME, namespace).data or {}).get(REGISTRATIONS_FILE)
    return None if raw is None else parse_registrations(base64.b64decode(raw), source="test")


def test_registrations_published_beside_the_keyring_and_carried_by_its_rewrites(
    core: k8s.CoreV1Api, namespace: str
) -> None:
    # The real API server's update (the verb the chart's RBAC grants on the keyring Secret):
    # the keyring entry kept, a stale resourceVersion refused, rewrites carry the file.
    secrets = KeyringSecrets(core, namespace, NAME)
    keyring = secrets.create(Keyring.generate())[0].keyring
    other = _other_namespace(core)
    try:
        secrets.fan_out(keyring, other)
        for ns in (other, namespace):
            assert secrets.publish_registrations(ns, {"sniffer": 100, "rag": 7}) is True
            assert _registrations_on_file(core, ns) == {"sniffer": 100, "rag": 7}
            assert (
                Keyring.from_secret_data(dict(core.read_namespaced_secret(NAME, ns).data))
                == keyring
            )
        version = core.read_namespaced_secret(NAME, other).metadata.resource_version
        assert secrets.publish_registrations(other, {"sniffer": 100}) is False
        assert core.read_namespaced_secret(NAME, other).metadata.resource_version == version
        rotated = keyring.with_new_decrypt_only()
        assert secrets.fan_out(rotated, other) is True
        assert _registrations_on_file(core, other) == {"sniffer": 100, "rag": 7}
        stored = secrets.load()
        assert stored is not None
        secrets.save(rotated, RotationState(), None, stored.resource_version)
        assert _registrations_on_file(core, namespace) == {"sniffer": 100, "rag": 7}
        assert secrets.publish_registrations(other, {"sniffer": 200}, {"rag"}) is True
        assert _registrations_on_file(core, other) == {"sniffer": 200}
    finally:
        core.delete_namespace(other)
