"""`kubectl defender rollback --direct` (break-glass: the plugin writes etcd itself) prunes the
history as the operator would, against the real kube-apiserver and 3-member etcd: to the
DefenderComponent's spec.rollout.historyLimit, below the store's default and above it; to
--history-limit when given (the resource then not read); to the store's default when the
resource cannot be read (absent, forbidden), said in one line on stderr, and the rollback done
all the same. The component is seeded with every version kept, more than any limit here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_e2e_support import Result, Store
from kubernetes import client as k8s

from defender_config import contract
from defender_devcluster import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]

REPO = Path(__file__).resolve().parents[3]
NAME = "firewall"
CONFIG = {"default_policy": "deny", "interval": 0}
SEEDED = 15  # versions 1..15 in etcd, every one kept
STORE_DEFAULT = 10  # the library's history_limit: what the plugin kept before, whatever the spec


def seed(store: Store) -> None:
    store.configs.seed(NAME, CONFIG, "custom", by="test", json_schema={"type": "object"})
    for n in range(2, SEEDED + 1):
        store.configs.commit(NAME, {**CONFIG, "interval": n}, by="test", history_limit=1000)
    assert kept(store) == list(range(1, SEEDED + 1))


def kept(store: Store) -> list[int]:
    return [entry.version for entry in store.configs.history(NAME)]


def create_component(k8s_api: k8s.ApiClient, namespace: str, history_limit: int) -> None:
    crd = yaml.safe_load((REPO / "crds" / "defendercomponents.yaml").read_text())
    try:
        k8s.ApiextensionsV1Api(k8s_api).create_custom_resource_definition(crd)
    except k8s.ApiException as exc:
        if exc.status != 409:
            raise
    sample = yaml.safe_load((REPO / "manifests" / "samples" / f"{NAME}.yaml").read_text())
    sample["spec"]["rollout"] = {"historyLimit": history_limit}
    custom = k8s.CustomObjectsApi(k8s_api)

    def created() -> bool:
        try:
            custom.create_namespaced_custom_object(
                contract.API_GROUP, contract.API_VERSION, namespace, contract.PLURAL, sample
            )
        except k8s.ApiException as exc:
            if exc.status != 404:  # the new CRD is not served yet
                raise
            return False
        return True

    wait_for(f"defendercomponent {namespace}/{NAME} created", created, timeout=30)


def rollback(store: Store, kubeconfig: Path, namespace: str, *flags: str) -> Result:
    return store.cli(
        "rollback", NAME, "--direct", "--to", "3", "-n", namespace,
        "--kubeconfig", str(kubeconfig), *flags, keyring=True,
    )  # fmt: skip


def rolled_back(result: Result, store: Store) -> None:
    assert result.code == 0, result.err
    assert store.configs.get_active(NAME).config == {**CONFIG, "interval": 3}


@pytest.mark.parametrize("limit", [3, 12], ids=["below the default", "above the default"])
def test_the_specs_history_limit_is_kept(
    store: Store, kubeconfig_path: Path, k8s_api: k8s.ApiClient, namespace: str, limit: int
) -> None:
    seed(store)
    create_component(k8s_api, namespace, limit)
    result = rollback(store, kubeconfig_path, namespace)
    rolled_back(result, store)
    assert result.err == ""
    # The rollback is version 16: it and the limit - 1 before it.
    assert kept(store) == list(range(SEEDED + 2 - limit, SEEDED + 2))
    assert (
        f"ACTIVE is now version {SEEDED + 1} (a copy of 3); the history keeps {limit} versions"
        " (spec.rollout.historyLimit)." in result.out
    )


def test_the_flag_is_kept_and_the_resource_not_needed(
    store: Store, kubeconfig_path: Path, namespace: str
) -> None:
    seed(store)  # no DefenderComponent: reading it would be a 404 and a warning
    result = rollback(store, kubeconfig_path, namespace, "--history-limit", "5", "-o", "json")
    rolled_back(result, store)
    assert result.err == ""
    assert kept(store) == list(range(SEEDED - 3, SEEDED + 2))
    data: dict[str, Any] = result.json()
    assert (data["historyLimit"], data["historyLimitFrom"]) == (5, "flag")


def test_a_missing_resource_keeps_the_stores_default_and_says_so(
    store: Store, kubeconfig_path: Path, namespace: str
) -> None:
    seed(store)
    result = rollback(store, kubeconfig_path, namespace)
    rolled_back(result, store)
    assert kept(store) == list(range(SEEDED + 2 - STORE_DEFAULT, SEEDED + 2))
    assert result.err == (
        f"kubectl defender rollback: warning: cannot read defendercomponent {namespace}/{NAME}"
        f" (404 Not Found); keeping the store's default history limit, {STORE_DEFAULT} versions:"
        " pass --history-limit N to keep another number (or -n for the component's namespace)\n"
    )
    assert "the history keeps 10 versions (the store's default)." in result.out


def _kubeconfig_of_nobody(k8s_api: k8s.ApiClient, namespace: str, admin: Path, to: Path) -> Path:
    """A ServiceAccount that may do nothing at all: reading the resource is forbidden."""
    core = k8s.CoreV1Api(k8s_api)
    core.create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="nobody"))
    )
    status = core.create_namespaced_service_account_token(
        "nobody",
        namespace,
        k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(audiences=[])),
    ).status
    assert status is not None
    token = status.token
    cluster = yaml.safe_load(admin.read_text())["clusters"][0]["cluster"]
    to.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": cluster}],
                "users": [{"name": "nobody", "user": {"token": token}}],
                "contexts": [{"name": "nobody", "context": {"cluster": "local", "user": "nobody"}}],
                "current-context": "nobody",
            }
        )
    )
    return to


def test_a_forbidden_resource_keeps_the_stores_default_and_says_so(
    store: Store, kubeconfig_path: Path, k8s_api: k8s.ApiClient, namespace: str, tmp_path: Path
) -> None:
    seed(store)
    create_component(k8s_api, namespace, 3)
    nobody = _kubeconfig_of_nobody(k8s_api, namespace, kubeconfig_path, tmp_path / "nobody")
    result = rollback(store, nobody, namespace)
    rolled_back(result, store)
    assert kept(store) == list(range(SEEDED + 2 - STORE_DEFAULT, SEEDED + 2))
    assert result.err.count("\n") == 1, result.err
    assert (
        f"warning: cannot read defendercomponent {namespace}/{NAME} (403 Forbidden); keeping"
        f" the store's default history limit, {STORE_DEFAULT} versions" in result.err
    )
