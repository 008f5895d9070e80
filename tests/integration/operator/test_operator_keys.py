"""The keyring Secrets against a real kube-apiserver: generate once, copy, keep in sync, and
fail with a typed error (never key material) when Kubernetes says no."""

from __future__ import annotations

import logging
import uuid

import pytest
from kubernetes import client as k8s

from defender_config import Keyring
from defender_operator._api import RotationStage
from defender_operator._decisions.rotation import RotationState
from defender_operator._errors import KeySecretError
from defender_operator._keys import A_DIGEST, MANAGED_BY, KeyringSecrets, keyring_digest

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
    secrets = KeyringSecrets(core, namespace, NAME)
    assert secrets.load() is None
    first = secrets.ensure()
    again = KeyringSecrets(core, namespace, NAME).ensure()
    assert again.keyring == first.keyring
    assert first.rotation.stage is RotationStage.IDLE
    secret = core.read_namespaced_secret(NAME, namespace)
    assert secret.metadata.labels["app.kubernetes.io/managed-by"] == MANAGED_BY
    assert secret.type == "Opaque"


def test_deleted_source_is_restored_from_memory_not_regenerated(
    core: k8s.CoreV1Api, namespace: str
) -> None:
    secrets = KeyringSecrets(core, namespace, NAME)
    known = secrets.ensure().keyring
    core.delete_namespaced_secret(NAME, namespace)
    assert secrets.ensure(known).keyring == known


def test_copy_created_updated_and_left_alone_when_in_sync(
    core: k8s.CoreV1Api, namespace: str
) -> None:
    secrets = KeyringSecrets(core, namespace, NAME)
    keyring = secrets.ensure().keyring
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
    keyring = secrets.ensure().keyring
    other = _other_namespace(core)
    try:
        assert secrets.copy_digest(other, max_age=60) is None  # absent, and remembered so
        assert secrets.fan_out(keyring, other) is True
        digest = keyring_digest(keyring)
        assert secrets.copy_digest(other, max_age=60) == digest
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
        keyring = secrets.ensure().keyring
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
    keyring = secrets.ensure().keyring
    with pytest.raises(KeySecretError) as info:
        secrets.fan_out(keyring, f"missing-{uuid.uuid4().hex[:8]}")
    assert info.value.status == 404
    text = str(info.value) + repr(info.value)
    assert keyring.to_secret_data()["keyring.json"] not in text
    assert info.value.__cause__ is None  # the API body (which echoes the Secret) is dropped


def test_save_refuses_a_stale_version(core: k8s.CoreV1Api, namespace: str) -> None:
    secrets = KeyringSecrets(core, namespace, NAME)
    stored = secrets.ensure()
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
