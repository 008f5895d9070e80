"""Keyring fan-out against the real API server: only watched namespaces, and one namespace that
refuses the copy does not starve the others."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from defender_config import Keyring, contract
from defender_operator._errors import KubeError
from defender_operator._keys import KeyringSecrets
from defender_operator._kube import Kube
from defender_operator._rotation import fan_out_everywhere

pytestmark = [pytest.mark.cluster]
NAME = "ml-defender-keyring"
SAMPLE: dict[str, Any] = yaml.safe_load(
    (Path(__file__).parents[3] / "manifests/samples/firewall.yaml").read_text()
)


def _namespace_with_component(api: k8s.ApiClient) -> str:
    core = k8s.CoreV1Api(api)
    name = f"fan-{uuid.uuid4().hex[:8]}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    body = {**SAMPLE, "metadata": {"name": "firewall", "namespace": name}}
    k8s.CustomObjectsApi(api).create_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, name, contract.PLURAL, body
    )
    return name


def test_fan_out_reaches_every_watched_namespace_despite_one_refusal(
    k8s_api: k8s.ApiClient, namespace: str, crd_installed: None
) -> None:
    core = k8s.CoreV1Api(k8s_api)
    ok, refusing, unwatched = (_namespace_with_component(k8s_api) for _ in range(3))
    try:
        # A Secret the operator does not manage sits where its copy would go.
        core.create_namespaced_secret(
            refusing,
            k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=NAME), string_data={"x": "mine"}),
        )
        secrets = KeyringSecrets(core, namespace, NAME)
        keyring = (secrets.load() or secrets.create(Keyring.generate())[0]).keyring
        # Sorted order puts the refusing namespace first or second; either way `ok` must get
        # its copy, which is what the old loop (stop at the first error) failed to do.
        rt = SimpleNamespace(
            kube=Kube(k8s_api),
            secrets=secrets,
            settings=SimpleNamespace(watch_namespaces=[refusing, ok]),
            # A component holding its name in each: every watched namespace gets a copy (the
            # API server's list of watched namespaces bounds what memory says).
            keyring_namespaces=lambda: {refusing, ok, unwatched},
        )
        with pytest.raises(KubeError, match=refusing):
            asyncio.run(fan_out_everywhere(rt, keyring))  # type: ignore[arg-type]
        assert secrets.copy_digest(ok) is not None
        assert core.read_namespaced_secret(NAME, refusing).data == {"x": "bWluZQ=="}
        with pytest.raises(k8s.ApiException) as info:
            core.read_namespaced_secret(NAME, unwatched)
        assert info.value.status == 404
    finally:
        for ns in (ok, refusing, unwatched):
            core.delete_namespace(ns)
