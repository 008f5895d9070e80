"""Invalid DefenderComponents refused by the REAL kube-apiserver with the CRD from crds/.

Each case starts from a valid sample (manifests/samples/firewall.yaml, which the API server
accepts: checked first), breaks one thing, and asserts the API server says which field and why.
Unknown fields are refused with server-side strict field validation (what `kubectl apply`
does by default since 1.27). spec.config is opaque to the API server: bad configs are refused
by the library, see test_bad_input_configs.py.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from reliability_support import HYGIENE

from defender_config import contract
from defender_devcluster import LocalCluster
from defender_devcluster._system import apply_crds

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = contract.API_GROUP, contract.API_VERSION, contract.PLURAL

Mutation = Callable[[dict[str, Any]], None]


def sample() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "manifests/samples/firewall.yaml").read_text())
    return doc


def set_path(path: str, value: Any) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    return mutate


def drop(path: str) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = doc
        for p in parents:
            node = node[p]
        del node[leaf]

    return mutate


DROP = object()


def bad(
    case: str, path: str, value: Any, *phrases: str, where: str | None = None
) -> tuple[str, Mutation, tuple[str, ...]]:
    """A case: set `path` to `value` (or delete it with DROP); the API server's message must
    name `where` (default: `path`) and contain every phrase."""
    mutate = drop(path) if value is DROP else set_path(path, value)
    return case, mutate, (where if where is not None else path, *phrases)


GE, LE = "greater than or equal to", "less than or equal to"
# (case id, mutation, substrings the API server's message must contain)
CASES: list[tuple[str, Mutation, tuple[str, ...]]] = [
    bad("type-unknown", "spec.componentType", "scanner", "Unsupported value", '"scanner"'),
    bad("type-int", "spec.componentType", 123, "must be of type string"),
    bad("type-missing", "spec.componentType", DROP, "Required value"),
    bad("config-missing", "spec.config", DROP, "Required value"),
    bad("config-string", "spec.config", "deny all", "must be of type object"),
    bad("config-list", "spec.config", [1, 2], "must be of type object"),
    bad("selector-missing", "spec.selector", DROP, "Required value"),
    bad("selector-no-labels", "spec.selector", {}, "Required value", where="matchLabels"),
    bad("selector-empty-labels", "spec.selector.matchLabels", {}, "at least 1"),
    bad("label-int", "spec.selector.matchLabels", {"app": 7}, "must be of type string"),
    bad("hb-interval-0", "spec.heartbeat.intervalSeconds", 0, f"{GE} 1"),
    bad("hb-interval-2h", "spec.heartbeat.intervalSeconds", 7200, f"{LE} 3600"),
    bad("hb-interval-text", "spec.heartbeat.intervalSeconds", "30s", "must be of type integer"),
    bad("hb-misses-101", "spec.heartbeat.missedBeforeRestart", 101, f"{LE} 100"),
    bad("hb-misses-1", "spec.heartbeat.missedBeforeRestart", 1, f"{GE} 2"),
    bad("hb-grace-negative", "spec.heartbeat.startupGraceSeconds", -1, f"{GE} 0"),
    bad("zstd-level-23", "spec.storage.compression.level", 23, f"{LE} 22"),
    bad("zstd-level-0", "spec.storage.compression.level", 0, f"{GE} 1"),
    bad("threshold-2MiB", "spec.storage.compression.thresholdBytes", 2 << 20, f"{LE} 1048576"),
    bad("encryption-yes", "spec.storage.encryption.enabled", "yes", "must be of type boolean"),
    bad("unhealthy-101pct", "spec.rollout.maxUnhealthyPercent", 101, f"{LE} 100"),
    bad("invalid-policy", "spec.rollout.onInvalidConfig", "Ignore", "Unsupported", '"Reject"'),
    bad("history-0", "spec.rollout.historyLimit", 0, f"{GE} 1"),
    bad("restarts-0", "spec.restartBudget.maxRestarts", 0, f"{GE} 1"),
    bad("budget-window-30s", "spec.restartBudget.windowSeconds", 30, f"{GE} 60"),
    bad("retention-delete", "spec.retention", "Delete", "Unsupported value", '"Purge"'),
    bad("version-65", "spec.version", "1." * 32 + "0", "Too long", "64"),
    bad("node-id-254", "spec.nodeId", "n" * 254, "Too long", "253"),
    bad("capabilities-65", "spec.capabilities", [f"c{i}" for i in range(65)], "Too many", "64"),
    bad("capability-int", "spec.capabilities", [1, 2], "must be of type string"),
    bad("custom-no-schema", "spec.componentType", "custom", "needs customSchema", where="spec:"),
    bad(
        "schema-not-custom",
        "spec.customSchema",
        {},
        "only allowed with componentType custom",
        where="spec:",
    ),
    bad("unknown-spec-field", "spec.replicas", 3, "unknown field"),
    bad("unknown-nested-field", "spec.heartbeat.intervalSecs", 5, "unknown field"),
    bad("spec-missing", "spec", DROP, "Required value"),
    bad("heartbeat-string", "spec.heartbeat", "30s", "must be of type object"),
    bad("name-uppercase", "metadata.name", "Firewall_1", "RFC 1123"),
]


@pytest.fixture(scope="module")
def crd_installed(local_cluster: LocalCluster) -> LocalCluster:
    apply_crds(local_cluster.kubeconfig, REPO / "crds")
    return local_cluster


@pytest.fixture
def objects(k8s_api: k8s.ApiClient, crd_installed: LocalCluster) -> k8s.CustomObjectsApi:
    return k8s.CustomObjectsApi(k8s_api)


@pytest.fixture(scope="module")
def refusals_namespace(k8s_api: k8s.ApiClient, crd_installed: LocalCluster) -> Iterator[str]:
    """One namespace for every refused create (nothing gets created in it)."""
    core = k8s.CoreV1Api(k8s_api)
    name = f"t-bad-input-{uuid.uuid4().hex[:8]}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


def create(api: k8s.CustomObjectsApi, namespace: str, doc: dict[str, Any]) -> Any:
    return api.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, doc, field_validation="Strict"
    )


def refusal(api: k8s.CustomObjectsApi, namespace: str, doc: dict[str, Any]) -> str:
    """The API server's message for a refused create; fails if it was accepted."""
    try:
        create(api, namespace, doc)
    except k8s.ApiException as exc:
        assert exc.status in (400, 422), f"unexpected HTTP {exc.status}: {exc.body}"
        body = json.loads(exc.body)
        HYGIENE.add_text(f"apiserver refusal {doc['metadata'].get('name')}", exc.body)
        return str(body.get("message", ""))
    raise AssertionError(f"the API server accepted an invalid object: {json.dumps(doc)[:300]}")


def test_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


def test_the_unbroken_sample_is_accepted(objects: k8s.CustomObjectsApi, namespace: str) -> None:
    created = create(objects, namespace, sample())
    assert created["spec"]["componentType"] == "firewall"
    # Defaults from the schema were applied by the API server.
    assert created["spec"]["heartbeat"]["intervalSeconds"] == 30


@pytest.mark.parametrize(("case", "mutate", "expected"), CASES, ids=[c[0] for c in CASES])
def test_invalid_component_is_refused_with_a_clear_message(
    objects: k8s.CustomObjectsApi,
    refusals_namespace: str,
    case: str,
    mutate: Mutation,
    expected: tuple[str, ...],
) -> None:
    doc = copy.deepcopy(sample())
    doc["metadata"]["name"] = f"bad-{case}"
    mutate(doc)
    message = refusal(objects, refusals_namespace, doc)
    for part in expected:
        assert part in message, f"{case}: {part!r} not in the API server's message: {message}"


def test_component_type_cannot_change(objects: k8s.CustomObjectsApi, namespace: str) -> None:
    created = create(objects, namespace, sample())
    created["spec"]["componentType"] = "rag"
    with pytest.raises(k8s.ApiException) as info:
        objects.replace_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, created["metadata"]["name"], created
        )
    assert info.value.status == 422
    assert "componentType is immutable" in json.loads(info.value.body)["message"]
