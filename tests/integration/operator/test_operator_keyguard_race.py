"""`_keyguard.settle` losing the create race for the source Secret, against the real
kube-apiserver and etcd: someone else (another operator replica, a person's import, an
attacker with Secret access) creates the Secret between the operator's read and its create.
The operator never overwrites it: it re-reads and decides again on what is there.

The race is made deterministic by a KeyringSecrets whose `create` first lets "someone else"
write the Secret through the real API server; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client as k8s

from defender_config import Keyring, LibrarySettings
from defender_devcluster import EtcdCluster, etcd_client_settings, tools_bin
from defender_operator import _keyguard
from defender_operator._keys import A_RESTORED, KeyringSecrets, MutableKeyringSource, StoredKeyring
from defender_operator._kube import Kube
from defender_operator._library_backend import LibraryBackend
from defender_operator._runtime import Runtime
from defender_operator._settings import OperatorSettings

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]

NAME = "ml-defender-keyring"
CRD = Path(__file__).resolve().parents[3] / "crds" / "defendercomponents.yaml"
CONFIG = {"node_id": "fw-01", "version": "1.0.0", "default_policy": "deny", "rules": []}


class CreateRace(KeyringSecrets):
    """The source Secret's create, with `before_create` run once just before it: the moment
    another writer gets there first."""

    def __init__(
        self, core: k8s.CoreV1Api, namespace: str, before_create: Callable[[], None]
    ) -> None:
        super().__init__(core, namespace, NAME)
        self._before: Callable[[], None] | None = before_create
        self.created: list[bool] = []

    def create(
        self, keyring: Keyring, annotations: Mapping[str, str] | None = None
    ) -> tuple[StoredKeyring, bool]:
        hook, self._before = self._before, None
        if hook is not None:
            hook()
        stored, created = super().create(keyring, annotations)
        self.created.append(created)
        return stored, created


@dataclass
class Scene:
    rt: Runtime
    core: k8s.CoreV1Api
    namespace: str
    backend: LibraryBackend

    def secret(self) -> k8s.V1Secret:
        found: k8s.V1Secret = self.core.read_namespaced_secret(NAME, self.namespace)
        return found

    def source_keyring(self) -> Keyring:
        return Keyring.from_secret_data(dict(self.secret().data))


@pytest.fixture(scope="module")
def crd(kubeconfig_path: Path) -> None:
    """Refusals post an Event on every DefenderComponent: listing them needs the CRD."""
    kubectl = [str(tools_bin() / "kubectl"), "--kubeconfig", str(kubeconfig_path)]
    subprocess.run([*kubectl, "apply", "-f", str(CRD)], check=True, capture_output=True)
    subprocess.run(
        [*kubectl, "wait", "--for=condition=Established", "--timeout=60s",
         "crd/defendercomponents.mldefender.io"],
        check=True,
        capture_output=True,
    )  # fmt: skip


def _scene(
    k8s_api: k8s.ApiClient,
    etcd: EtcdCluster,
    prefix: str,
    namespace: str,
    before_create: Callable[[], None],
) -> Scene:
    library = LibrarySettings(etcd=etcd_client_settings(etcd.endpoints), prefix=prefix.rstrip("/"))
    keyring = MutableKeyringSource(None)
    backend = LibraryBackend(library, keyring, "race-test")
    core = k8s.CoreV1Api(k8s_api)
    settings = OperatorSettings(namespace=namespace, watch_namespaces=[namespace])
    secrets = CreateRace(core, namespace, before_create)
    rt = Runtime(settings, backend, Kube(k8s_api), secrets, keyring, "race-test")
    return Scene(rt, core, namespace, backend)


@pytest.fixture
def make_scene(
    crd: None, k8s_api: k8s.ApiClient, defender_etcd: EtcdCluster, etcd_prefix: str, namespace: str
) -> Iterator[Callable[[Callable[[], None]], Scene]]:
    made: list[Scene] = []

    def make(before_create: Callable[[], None]) -> Scene:
        scene = _scene(k8s_api, defender_etcd, etcd_prefix, namespace, before_create)
        made.append(scene)
        return scene

    yield make
    for scene in made:
        scene.backend.close()


def _store_sealed_with(scene: Scene, keyring: Keyring) -> None:
    """MASTER/ACTIVE/history sealed with `keyring`, and its ids recorded: what an operator that
    ran before left in etcd."""
    scene.rt.keyring.set(keyring)
    scene.backend.seed("firewall", "firewall", CONFIG, json_schema=None, modified_by="test")
    scene.backend.record_keyring(keyring)
    scene.rt.keyring.set(None)


def test_a_restore_that_loses_the_race_to_a_stranger_never_overwrites_it(
    make_scene: Callable[[Callable[[], None]], Scene],
) -> None:
    ours, stranger = Keyring.generate(), Keyring.generate()
    scene: Scene | None = None

    def someone_else() -> None:
        assert scene is not None
        KeyringSecrets(scene.core, scene.namespace, NAME).create(stranger)

    scene = make_scene(someone_else)
    _store_sealed_with(scene, ours)
    # The operator runs with the verified keyring in memory; the source Secret is gone.
    scene.rt.keyring.set(ours)
    scene.rt.keyring_ready = True

    assert asyncio.run(_keyguard.settle(scene.rt)) is False
    assert scene.rt.secrets.created == [False]  # type: ignore[attr-defined]
    written = scene.secret()
    assert scene.source_keyring() == stranger  # not overwritten with ours
    assert A_RESTORED not in (written.metadata.annotations or {})

    # Decided again on what is there: a keyring that opens nothing stored is refused, and
    # nothing is written (the Secret is a person's to replace).
    assert asyncio.run(_keyguard.settle(scene.rt)) is False
    refused = scene.rt.keyring_refused
    assert refused is not None and refused.reason == "SourceLacksKeys"
    assert "the operator's memory opens everything" in refused.message
    assert scene.rt.keyring.peek() is None  # nothing is sealed under the stranger's key
    again = scene.secret()
    assert again.metadata.resource_version == written.metadata.resource_version
    assert scene.source_keyring() == stranger


def test_a_restore_that_loses_the_race_to_the_same_keyring_uses_it_as_written(
    make_scene: Callable[[Callable[[], None]], Scene],
) -> None:
    ours = Keyring.generate()
    scene: Scene | None = None
    competitor = {"mldefender.io/restored-from": "another replica"}

    def other_replica() -> None:
        assert scene is not None
        KeyringSecrets(scene.core, scene.namespace, NAME).create(ours, competitor)

    scene = make_scene(other_replica)
    _store_sealed_with(scene, ours)
    scene.rt.keyring.set(ours)
    scene.rt.keyring_ready = True

    asyncio.run(_keyguard.first_settle(scene.rt))  # loses, re-reads, decides again
    assert scene.rt.secrets.created == [False]  # type: ignore[attr-defined]
    assert scene.rt.keyring_ready and scene.rt.keyring_refused is None
    assert scene.rt.keyring.peek() == ours
    written = scene.secret()
    assert written.metadata.annotations[A_RESTORED] == "another replica"  # the winner's write


def test_a_first_install_that_loses_the_race_takes_the_winners_keyring_not_its_own(
    make_scene: Callable[[Callable[[], None]], Scene],
) -> None:
    winner = Keyring.generate()
    scene: Scene | None = None

    def other_replica_generates() -> None:
        # The winning replica writes its keyring and records its ids in etcd (`_keyguard._use`).
        assert scene is not None
        KeyringSecrets(scene.core, scene.namespace, NAME).create(winner)
        scene.backend.record_keyring(winner)

    scene = make_scene(other_replica_generates)
    asyncio.run(_keyguard.first_settle(scene.rt))
    assert scene.rt.secrets.created == [False]  # type: ignore[attr-defined]
    assert scene.rt.keyring_ready and scene.rt.keyring.peek() == winner
    assert scene.source_keyring() == winner
