"""Impossible values stop `helm template` early, with a message that says what to change."""

from __future__ import annotations

import pytest
from packaging_chart import HelmFailed, Render, find


@pytest.mark.parametrize("replicas", [1, 2, 4, 6])
def test_etcd_needs_an_odd_member_count_of_at_least_three(render: Render, replicas: int) -> None:
    with pytest.raises(HelmFailed, match=rf"etcd.replicaCount={replicas}: .*odd number"):
        render("--set", f"etcd.replicaCount={replicas}")


def test_unsafe_member_count_is_allowed_when_asked_for(render: Render) -> None:
    objects = render(
        "--set",
        "etcd.replicaCount=1,etcd.allowUnsafeReplicaCount=true,etcd.pdb.create=false",
    )
    assert find(objects, "StatefulSet")["spec"]["replicas"] == 1


def test_five_members_with_quorum_pdb_render(render: Render) -> None:
    objects = render("--set", "etcd.replicaCount=5,etcd.pdb.minAvailable=3")
    assert find(objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 3


@pytest.mark.parametrize(("members", "quorum"), [(3, 2), (5, 3), (7, 4), (9, 5)])
def test_the_pdb_follows_the_member_count_when_left_unset(
    render: Render, members: int, quorum: int
) -> None:
    # docs/install.md: `etcd.replicaCount=5` alone is enough; the budget keeps the quorum.
    objects = render("--set", f"etcd.replicaCount={members}")
    assert find(objects, "PodDisruptionBudget")["spec"]["minAvailable"] == quorum


def test_a_pdb_set_by_hand_wins(render: Render) -> None:
    objects = render("--set", "etcd.replicaCount=5,etcd.pdb.minAvailable=4")
    assert find(objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 4


def test_one_member_with_a_pdb_is_refused_without_naming_an_unset_value(render: Render) -> None:
    with pytest.raises(HelmFailed, match=r"Set etcd.pdb.create=false") as caught:
        render("--set", "etcd.replicaCount=1,etcd.allowUnsafeReplicaCount=true")
    assert "etcd.pdb.minAvailable=" not in str(caught.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ("etcd.pdb.minAvailable=3", r"no member could ever be evicted"),
        ("etcd.pdb.minAvailable=1", r"below the quorum"),
        (
            "etcd.tls.client.enabled=false,etcd.tls.client.clientCertAuth=true",
            r"only checked on a TLS listener",
        ),
        ("etcd.tls.client.clientCertAuth=true", r"needs etcd.tls.client.clientSecretName"),
        ("etcd.tls.certManager.enabled=true", r"needs etcd.tls.certManager.issuerRef.name"),
        ("etcd.enabled=false", r"needs externalEtcd.endpoints"),
        (
            "operator.serviceAccount.create=false",
            r"needs operator.serviceAccount.name",
        ),
    ],
)
def test_impossible_combinations_fail(render: Render, values: str, message: str) -> None:
    with pytest.raises(HelmFailed, match=message):
        render("--set", values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        # A typo must not be ignored silently.
        ("etcd.replicas=3", r"additional properties 'replicas' not allowed"),
        ("etcd.replicaCount=three", r"/etcd/replicaCount"),
        ("etcd.podAntiAffinityPreset=sometimes", r"value must be one of"),
        ("etcd.persistence.size=lots", r"/etcd/persistence/size"),
        ("operator.logLevel=LOUD", r"/operator/logLevel"),
        ("etcd.ports.client=70000", r"/etcd/ports/client"),
        ("image.digest=md5:abc", r"/image/digest"),
        ("fullnameOverride=" + "x" * 41, r"/fullnameOverride"),
        ("etcd.backup.keep=0", r"/etcd/backup/keep"),
        ("etcd.defrag.schedule=daily", r"/etcd/defrag/schedule"),
        # A lease of one interval expires whenever a beat is late at all.
        ("agent.heartbeatMisses=1", r"/agent/heartbeatMisses"),
        # Beyond the settings' own bounds: refused by helm, not by the pods at start.
        ("agent.heartbeatMisses=101", r"/agent/heartbeatMisses"),
        ("agent.heartbeatIntervalSeconds=3601", r"/agent/heartbeatIntervalSeconds"),
        ("config.etcd.timeoutSeconds=86401", r"/config/etcd/timeoutSeconds"),
        ("config.etcd.backoffMaxSeconds=86401", r"/config/etcd/backoffMaxSeconds"),
        ("operator.rotation.everySeconds=31622401", r"/operator/rotation/everySeconds"),
        ("operator.rotation.graceSeconds=604801", r"/operator/rotation/graceSeconds"),
        (
            "operator.rotation.distributeTimeoutSeconds=86401",
            r"/operator/rotation/distributeTimeoutSeconds",
        ),
    ],
)
def test_schema_rejects_bad_values(render: Render, values: str, message: str) -> None:
    with pytest.raises(HelmFailed, match=message) as info:
        render("--set", values)
    assert "values don't meet the specifications of the schema" in str(info.value)
