"""An operator without a cluster: the real reconcile and monitor steps, the in-memory Backend,
and recording stand-ins for the Kubernetes API (status patches, annotation removals, pod
deletes, keyring copies). Imported by name (pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import kopf
import urllib3.exceptions
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from defender_config import Keyring
from defender_operator import _monitor, _reconcile
from defender_operator._backend import EtcdHealth, InstanceRecord
from defender_operator._decisions.ownership import Claim, holder_entry
from defender_operator._decisions.registration import registrations_to_publish
from defender_operator._keys import MutableKeyringSource, keyring_digest
from defender_operator._kube import ObjectRef, Pod
from defender_operator._memory_backend import MemoryBackend
from defender_operator._outcome import Event
from defender_operator._runtime import ComponentMemory, Runtime, utcnow
from defender_operator._settings import OperatorSettings

NAMESPACE = "default"
NAME = "sniffer"
LABELS = {"app": "sniffer"}
LOG = logging.getLogger("test.operator.core")


@dataclass
class FakeKube:
    """The calls reconcile and the monitor make on `_kube.Kube`, recorded."""

    status: dict[str, Any] = field(default_factory=dict)
    patches: list[dict[str, Any]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    # (namespace, name) of DefenderComponents the API server no longer holds; and every
    # existence lookup made.
    gone: set[tuple[str, str]] = field(default_factory=set)
    lookups: list[tuple[str, str, str]] = field(default_factory=list)
    # Namespaces holding DefenderComponents (where keyring copies go); Events posted.
    namespaces: set[str] = field(default_factory=lambda: {NAMESPACE})
    posted: list[tuple[str, str]] = field(default_factory=list)
    # DefenderComponents the API server holds besides the one reconciled (whole objects, as
    # kopf's watch sees them: the Harness files them in its holder index).
    others: list[dict[str, Any]] = field(default_factory=list)
    # Every request made to the API server, by method name.
    requests: list[str] = field(default_factory=list)

    def component_namespaces(self, watched: Iterable[str] | None = None) -> set[str]:
        self.requests.append("component_namespaces")
        return set(self.namespaces)

    def components(self, watched: Iterable[str] | None = None) -> list[ObjectRef]:
        self.requests.append("components")
        return []

    def post_event(self, ref: ObjectRef, type_: str, reason: str, message: str) -> None:
        self.requests.append("post_event")
        self.posted.append((type_, reason))

    def component_exists(self, namespace: str, name: str, uid: str) -> bool:
        self.requests.append("component_exists")
        self.lookups.append((namespace, name, uid))
        return (namespace, name) not in self.gone

    def patch_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        self.requests.append("patch_status")
        self.patches.append(dict(status))
        self.status.update(status)
        return dict(self.status)

    async def patch_status_soon(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        return self.patch_status(namespace, name, status)

    def remove_annotation(self, namespace: str, name: str, key: str) -> None:
        self.requests.append("remove_annotation")
        self.removed.append(key)

    def delete_pod(self, namespace: str, pod: Pod) -> bool:
        self.requests.append("delete_pod")
        self.deleted.append(pod.name)
        return True


@dataclass
class FakeSecrets:
    """The keyring copies (`_keys.KeyringSecrets`), always current."""

    keyring: MutableKeyringSource
    namespace: str = "ml-defender"
    fanned_out: list[str] = field(default_factory=list)
    # namespace -> its registrations.json as `publish_registrations` left it
    published: dict[str, dict[str, int]] = field(default_factory=dict)

    def copy_is_current(self, keyring: Keyring, namespace: str, *, max_age: float) -> bool:
        return False  # every reconcile calls `fan_out`, which records the namespace

    def fan_out(self, keyring: Keyring, namespace: str, **_: Any) -> bool:
        self.fanned_out.append(namespace)
        return False

    def copy_digest(self, namespace: str, *, max_age: float = 0.0) -> str | None:
        return keyring_digest(self.keyring.current())

    def known_copy_digest(self, namespace: str, *, max_age: float) -> tuple[str | None, bool]:
        return keyring_digest(self.keyring.current()), True

    def known_copy_digests(self) -> dict[str, str | None]:
        held = self.keyring.peek()
        digest = keyring_digest(held) if held is not None else None
        return {namespace: digest for namespace in self.fanned_out}

    def publish_registrations(
        self,
        namespace: str,
        known: Mapping[str, int],
        removed: Iterable[str] = (),
        *,
        max_age: float = 0.0,
    ) -> bool:
        held = self.published.get(namespace, {})
        self.published[namespace] = registrations_to_publish(held, known, set(removed))
        return self.published[namespace] != held


def unanswered() -> urllib3.exceptions.MaxRetryError:
    """What the kubernetes client raises while the API server is unreachable or restarting."""
    refused = urllib3.exceptions.NewConnectionError(None, "Connection refused")  # type: ignore[arg-type]
    return urllib3.exceptions.MaxRetryError(None, "/api/v1/secrets", refused)  # type: ignore[arg-type]


@dataclass
class FakeSecretsApi:
    """The Secret calls of `kubernetes.client.CoreV1Api`, kept in a dict. While `down` holds
    an exception, every call raises it (an API server that does not answer)."""

    stored: dict[tuple[str, str], client.V1Secret] = field(default_factory=dict, repr=False)
    down: Exception | None = None
    calls: int = 0
    version: int = 0

    def _answer(self) -> None:
        self.calls += 1
        if self.down is not None:
            raise self.down

    def _keep(self, namespace: str, body: client.V1Secret) -> client.V1Secret:
        self.version += 1
        body.metadata.namespace = namespace
        body.metadata.resource_version = str(self.version)
        self.stored[(namespace, body.metadata.name)] = body
        return body

    def read_namespaced_secret(self, name: str, namespace: str) -> client.V1Secret:
        self._answer()
        if (namespace, name) not in self.stored:
            raise ApiException(status=404, reason="Not Found")
        return self.stored[(namespace, name)]

    def create_namespaced_secret(self, namespace: str, body: client.V1Secret) -> client.V1Secret:
        self._answer()
        if (namespace, body.metadata.name) in self.stored:
            raise ApiException(status=409, reason="AlreadyExists")
        return self._keep(namespace, body)

    def replace_namespaced_secret(
        self, name: str, namespace: str, body: client.V1Secret
    ) -> client.V1Secret:
        self._answer()
        held = self.stored.get((namespace, name))
        if held is None or held.metadata.resource_version != body.metadata.resource_version:
            raise ApiException(status=409, reason="Conflict")
        return self._keep(namespace, body)


def spec(config: Mapping[str, Any] | None = None, **over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "componentType": "sniffer",
        "config": dict(
            config or {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth0"}
        ),
        "selector": {"matchLabels": dict(LABELS)},
    }
    out.update(over)
    return out


@dataclass
class Harness:
    """One operator, one DefenderComponent: drive it a step at a time."""

    backend: MemoryBackend = field(default_factory=MemoryBackend)
    kube: FakeKube = field(default_factory=FakeKube)
    events: list[Event] = field(default_factory=list)
    generation: int = 0
    spec_shown: dict[str, Any] | None = None
    uid: str = "uid-1"
    pods: dict[str, Pod] = field(default_factory=dict)
    rt: Runtime = field(init=False)

    def __post_init__(self) -> None:
        keyring = MutableKeyringSource(Keyring.generate())
        secrets: Any = FakeSecrets(keyring)
        kube: Any = self.kube
        self.rt = Runtime(OperatorSettings(), self.backend, kube, secrets, keyring, "op-0")
        self.rt.keyring_ready = True
        self.rt.post_event = lambda body, event: self.events.append(event)
        self.rt.etcd.record(utcnow() - timedelta(hours=1), EtcdHealth(True, True))

    @property
    def mem(self) -> ComponentMemory:
        return self.rt.memory(NAMESPACE, NAME)

    def reasons(self) -> list[str]:
        return [e.reason for e in self.events]

    def condition(self, ctype: str) -> dict[str, Any]:
        found = [c for c in self.kube.status.get("conditions", []) if c["type"] == ctype]
        assert found, f"no {ctype} condition in {self.kube.status}"
        return dict(found[0])

    def body(self, raw_spec: Mapping[str, Any], annotations: Mapping[str, str]) -> dict[str, Any]:
        return {
            "metadata": {
                "namespace": NAMESPACE,
                "name": NAME,
                "uid": self.uid,
                "generation": self.generation,
                "annotations": dict(annotations),
            },
            "spec": dict(raw_spec),
            "status": dict(self.kube.status),
        }

    def index(self) -> dict[tuple[str, str, str], list[Pod]]:
        """The pods as kopf's pod index files them."""
        index: dict[tuple[str, str, str], list[Pod]] = {}
        for pod in self.pods.values():
            for key, value in LABELS.items():
                index.setdefault((NAMESPACE, key, value), []).append(pod)
        return index

    def holder_index(self, body: Mapping[str, Any]) -> dict[str, list[Claim]]:
        """Who holds each name by status, as kopf's index of DefenderComponents files them
        (`holder_entry`): the body handled (kopf indexes it before its handler runs) and the
        others the API server holds."""
        index: dict[str, list[Claim]] = {}
        for obj in [body, *self.kube.others]:
            for name, holder in holder_entry(obj).items():
                index.setdefault(name, []).append(holder)
        return index

    async def reconcile(
        self,
        raw_spec: Mapping[str, Any],
        annotations: Mapping[str, str] | None = None,
        *,
        first_pass: bool = False,
    ) -> None:
        """What kopf's create/update handler does with a new generation of the resource
        (with `first_pass`, as `handlers` wires it: the first monitor pass included)."""
        self.generation += 1
        self.spec_shown = dict(raw_spec)
        body = self.body(raw_spec, annotations or {})
        visit = _reconcile.Visit(
            rt=self.rt,
            body=body,
            namespace=NAMESPACE,
            name=NAME,
            generation=self.generation,
            status=dict(self.kube.status),
            annotations=dict(annotations or {}),
            logger=LOG,
            holders=self.holder_index(body),
            pods=self.index(),
        )
        then = None
        if first_pass:
            then = functools.partial(
                _monitor.after_reconcile, self.rt, visit.body, NAMESPACE, NAME, LOG, self.index()
            )
        await _reconcile.reconcile(visit, raw_spec, then)

    def reconcile_refused_twin(self, namespace: str, raw_spec: Mapping[str, Any]) -> dict[str, Any]:
        """A resource of the same name in `namespace`, reconciled once while this harness's
        component holds the name: refused (Conflict); returns its body. FakeKube keeps one
        status, so the twin's patch lands there; the owner's is put back afterwards."""
        body: dict[str, Any] = {
            "metadata": {"namespace": namespace, "name": NAME, "uid": "uid-b", "generation": 1},
            "spec": dict(raw_spec),
            "status": {},
        }
        owner_status = dict(self.kube.status)
        visit = _reconcile.Visit(
            rt=self.rt,
            body=body,
            namespace=namespace,
            name=NAME,
            generation=1,
            status={},
            annotations={},
            logger=LOG,
            holders=self.holder_index(body),
            pods=self.index(),
        )
        with contextlib.suppress(kopf.PermanentError, kopf.TemporaryError):
            asyncio.run(_reconcile.reconcile(visit, raw_spec))
        self.kube.status = owner_status
        assert self.rt.memory(namespace, NAME).conflict is not None
        return body

    async def monitor(self, raw_spec: Mapping[str, Any]) -> datetime | None:
        """One pass of the monitor daemon (as `_monitor.run` makes it). A spec other than the
        last one shown is a new generation, not reconciled yet, as the API server numbers it."""
        if raw_spec != self.spec_shown:
            self.generation += 1
            self.spec_shown = dict(raw_spec)
        return await _monitor._pass(
            self.rt, self.body(raw_spec, {}), NAMESPACE, NAME, LOG, self.index()
        )

    def inform(self) -> None:
        """Feed `rt.changes` from the backend's change watch as `_loops.change_watch` does (but
        delivered at once, on the writer's thread) and resync it: passes may reuse views."""
        view = self.rt.changes
        self.backend.watch_changes(view.apply, lambda exc: view.watch_failed())
        view.watching = True
        assert view.resync(view.begin_resync(), self.backend.revision())

    def add_pod(self, name: str, age: timedelta = timedelta(hours=1)) -> None:
        self.pods[name] = Pod(name, f"uid-{name}", utcnow() - age, deleting=False)

    def beat(self, pod: str, *, error: str | None = None) -> None:
        """An instance in `pod` beats now (reporting `error` as its last error)."""
        self.backend.add_instance(
            NAME,
            InstanceRecord(
                instance=f"{pod}-0",
                pod=pod,
                time=utcnow(),
                status="RUNNING",
                key_fingerprint=self.rt.keyring.current().primary_fingerprint,
                last_error_reason=error,
                last_error_detail=f"{error} (reported by the instance)" if error else "",
                verified=True,
            ),
        )


async def until(
    what: str, check: Callable[[], bool], timeout: float = 5.0, every: float = 0.01
) -> None:
    """Wait in the event loop until `check()` holds; AssertionError naming `what` after
    `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(every)


def changed_after_beats(
    pods: Iterable[str], before: Mapping[str, Any], after: Mapping[str, Any]
) -> Harness:
    """Pods beating on version 1 (`before`), then version 2 (`after`) committed and beaten on:
    the breaker's window open."""
    h = Harness()
    asyncio.run(h.reconcile(spec(before)))
    for pod in pods:
        h.add_pod(pod)
        h.beat(pod)
    asyncio.run(h.monitor(spec(before)))
    asyncio.run(h.reconcile(spec(after)))
    for pod in pods:
        h.beat(pod)
    return h


def plant(
    h: Harness,
    instance: str,
    pod: str | None,
    error: str | None = None,
    *,
    digest: str | None = None,
    unverified: str | None = None,
) -> None:
    """An instance record written with etcd write access alone, naming `pod` (None: no pod),
    claiming to run config `digest` and reporting `error`; with `unverified`, one whose MAC the
    backend found wrong (why)."""
    h.backend.add_instance(
        NAME,
        InstanceRecord(
            instance=instance,
            pod=pod,
            time=utcnow(),
            status="RUNNING",
            config_digest=digest,
            last_error_reason=error,
            last_error_detail="forged" if error else "",
            verified=unverified is None,
            unverified=unverified,
        ),
    )
