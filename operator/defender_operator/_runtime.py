"""The operator's state in one object: settings, clients, and what it remembers per component.

Memory is an optimisation, never the truth: everything here can be lost on restart and is
rebuilt from the cluster and etcd (heartbeat absence is only judged after watching for a full
threshold again, see `_decisions.restarts.stale_pods`).
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar

from defender_config import Cadence, Keyring
from defender_operator._api import DefenderComponentSpec
from defender_operator._backend import Backend, EtcdHealth, Observation
from defender_operator._changes import ChangeView
from defender_operator._decisions.breaker import ActiveChange
from defender_operator._decisions.conditions import Cond, ConfigState
from defender_operator._decisions.etcd import NOSPACE, EtcdFacts, etcd_condition
from defender_operator._decisions.keyring import KeyringPlan, keyring_condition
from defender_operator._decisions.ownership import Remembered, copy_namespaces
from defender_operator._decisions.reads import ViewRead
from defender_operator._decisions.registration import anchored_registration
from defender_operator._decisions.restarts import EtcdView
from defender_operator._heartbeats import HeartbeatView
from defender_operator._keys import KeyringSecrets, MutableKeyringSource
from defender_operator._kube import Kube
from defender_operator._metrics import ETCD_AVAILABLE
from defender_operator._outcome import EventPoster, kopf_post
from defender_operator._settings import OperatorSettings

P = ParamSpec("P")
_GONE_KEPT_SECONDS = 3600.0
T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


def spec_key(body: Any) -> object:
    """What tells one spec of an object from another without comparing the specs: the API
    server raises metadata.generation at every change of the spec (the CRD has a status
    subresource), and an object created again has another uid. A body without a generation
    (one no API server handed over) is keyed by a copy of its spec."""
    meta = body.get("metadata") or {}
    generation = meta.get("generation")
    if generation:
        return (meta.get("uid"), int(generation))
    return copy.deepcopy(dict(body.get("spec") or {}))


@dataclass
class ComponentMemory:
    watch_started: datetime = field(default_factory=utcnow)
    last_seen: dict[str, datetime] = field(default_factory=dict)
    # The lease TTL each pod's instance last advertised: judged no sooner than that.
    lease_ttls: dict[str, int] = field(default_factory=dict)
    # The heartbeat cadence as last published or read for this component.
    cadence: Cadence | None = None
    cadence_condition: Cond | None = None
    restart_times: list[datetime] = field(default_factory=list)
    # Restart times, conditions and the announced budget are taken from the status once
    # (`_reconcile.recall`): a new operator, restarted or a standby taking over, carries on.
    history_loaded: bool = False
    # last_change is taken from etcd (ACTIVE's metadata) once, on the first monitor pass.
    change_recovered: bool = False
    unhealthy_since: dict[str, datetime] = field(default_factory=dict)
    last_change: ActiveChange | None = None
    config_state: ConfigState = ConfigState.UNKNOWN
    config_message: str = ""
    config_reason: str = ""  # for ConfigState.REFUSED: the library error's reason
    # The generation the config verdict above was judged on (`conditions.config_generations`);
    # None before any reconcile gave one.
    config_generation: int | None = None
    heartbeat: Cond | None = None
    key: Cond | None = None
    misconfig: Cond | None = None
    # Set while another DefenderComponent owns this name in etcd: nothing is written or judged.
    conflict: Cond | None = None
    degraded_reported: bool = False
    # The message of the KeyringCopyBlocked Warning Event posted last (`_decisions.keycopy`):
    # once per cause, not once per retry; None once the copy is written.
    copy_block_announced: str | None = None
    # The scrub (`_scrub`): when it last ran, its condition, the failures already announced.
    scrubbed_at: datetime | None = None
    # Bytes the component keeps in etcd, for its namespace's storage budget (`_storage_budget`):
    # None until this process measured it or wrote it. Set through `stored_bytes`, which keeps
    # its namespace's sum (`Runtime.storage_used`) with it.
    _stored_bytes: int | None = field(default=None, repr=False)
    # What a spec.customSchema judged by the budget but not recorded by the declare (ACTIVE is
    # not valid under it) adds to the metadata record when the commit of spec.config records
    # it: counted by that commit's judgment (`_storage_budget.check_commit`).
    schema_unrecorded: int = 0
    _usage: tuple[dict[str, int], str] | None = field(default=None, repr=False, compare=False)
    corrupt: Cond | None = None
    scrub_announced: frozenset[tuple[str, str]] = frozenset()
    # The canary rollout (`_canary`): its condition, and since when its canaries are healthy
    # on the candidate (keyed by its digest, so a new candidate starts the hold again).
    rollout_condition: Cond | None = None
    canary_healthy: tuple[str, datetime] | None = None
    # The pod each canary was last seen in: its record goes when its agent revokes its lease
    # on the way out, and a canary whose pod left is replaced, not judged failed.
    canary_pods: dict[str, str] = field(default_factory=dict)
    # Instance records naming no selected pod (`_decisions.backing`): since when each has,
    # and those already reported (an Event each, once).
    unbacked_since: dict[str, datetime] = field(default_factory=dict)
    unbacked_reported: frozenset[str] = frozenset()
    unverified_reported: frozenset[str] = frozenset()
    # The last monitor pass's read of the component (`_monitor.observe`) and when, at which
    # revision: reused while the change watch says nothing it read changed
    # (`_decisions.reads`). The same objects the pass judged, no copies; None after a read
    # that failed.
    observation: Observation | None = None
    observed: ViewRead | None = None
    # The spec last parsed (by a reconcile or a pass), under its `spec_key`.
    spec: tuple[object, DefenderComponentSpec] | None = None
    # The last pass that completed: when it began (time.monotonic) and when it said the next
    # one is due. A daemon pass that waited while a reconcile's pass began is skipped.
    last_pass: tuple[float, datetime | None] | None = None
    # The status as this operator last wrote it (the patch response): fresher than kopf's body
    # of the object, which lags our own writes by a watch event.
    status: dict[str, Any] | None = None
    # Held by every reader and writer of this memory: reconcile (a kopf handler) and the
    # monitor pass (a kopf daemon) run beside each other in the same loop.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Monitor daemons running for it in this process: none in a replica peering paused (its
    # memory stays, and goes stale, while another replica manages the component).
    monitors: int = 0
    # The uid of the object its reconcile or monitor daemon last handled. Memory is keyed by
    # namespace/name, and kopf handles each uid in its own worker: after a delete and re-create
    # the new object may be reconciled before the old one's DELETED event is handled, which
    # must not forget the successor's memory (`Runtime.forget`).
    uid: str = ""

    @property
    def stored_bytes(self) -> int | None:
        return self._stored_bytes

    @stored_bytes.setter
    def stored_bytes(self, size: int | None) -> None:
        # The namespace's sum moves with each component's: a seed judged against its
        # namespace reads one number, not every component's (a thousand created at once).
        if self._usage is not None:
            used, namespace = self._usage
            delta = (size or 0) - (self._stored_bytes or 0)
            if delta:
                used[namespace] = used.get(namespace, 0) + delta
        self._stored_bytes = size


class EtcdTracker:
    """etcd health over time: since when it is healthy, since when it is not."""

    def __init__(self) -> None:
        self.last = EtcdHealth(reachable=False, quorum=False, detail="not measured yet")
        self.healthy_since: datetime | None = None
        self.unhealthy_since: datetime | None = utcnow()
        self.measured = False
        # Since when writes are accepted again after a NOSPACE alarm (None: never refused).
        # Not part of healthy_since: the liveness probe must not restart the operator for a
        # full database, which a restart cannot fix.
        self.writable_since: datetime | None = None

    def record(self, now: datetime, health: EtcdHealth) -> None:
        ok = health.reachable and health.quorum
        self.measured = True
        if ok and self.healthy_since is None:
            self.healthy_since, self.unhealthy_since = now, None
        elif not ok and self.unhealthy_since is None:
            self.healthy_since, self.unhealthy_since = None, now
        if NOSPACE in health.alarms:
            self.writable_since = None
        elif NOSPACE in self.last.alarms:
            self.writable_since = now
        self.last = health
        ETCD_AVAILABLE.set(1 if ok else 0)

    def condition(self) -> Cond | None:
        """EtcdHealthy, once a full health check has run (None before)."""
        last = self.last
        if not self.measured or last.healthy_members is None or last.cluster_size is None:
            if self.measured and not (last.reachable and last.quorum):
                facts = EtcdFacts(last.reachable, last.quorum, 0, 0, last.alarms, last.detail)
                return etcd_condition(facts)
            return None
        return etcd_condition(
            EtcdFacts(
                last.reachable,
                last.quorum,
                last.healthy_members,
                last.cluster_size,
                last.alarms,
                last.detail,
            )
        )

    def view(self) -> EtcdView:
        since = self.healthy_since
        if since is not None and self.writable_since is not None:
            # After NOSPACE ends, instances need a full threshold to write heartbeats again.
            since = max(since, self.writable_since)
        return EtcdView(
            reachable=self.last.reachable,
            quorum=self.last.quorum,
            healthy_since=since,
            writable=NOSPACE not in self.last.alarms,
        )

    def unavailable_for(self, now: datetime) -> timedelta:
        return now - self.unhealthy_since if self.unhealthy_since else timedelta(0)


class Runtime:
    def __init__(
        self,
        settings: OperatorSettings,
        backend: Backend,
        kube: Kube,
        secrets: KeyringSecrets,
        keyring: MutableKeyringSource,
        identity: str,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.kube = kube
        self.secrets = secrets
        self.keyring = keyring
        self.identity = identity
        self.etcd = EtcdTracker()
        self.heartbeats = HeartbeatView(utcnow())
        self.changes = ChangeView()
        self.changes.on_change = self.changed
        self.components: dict[tuple[str, str], ComponentMemory] = {}
        # The namespaces of each remembered name, and the names of each namespace: a change
        # in etcd (by name) or to a pod (by namespace) wakes only the monitors it concerns.
        self._namespaces_of: dict[str, set[str]] = {}
        self._names_in: dict[str, set[str]] = {}
        # uid -> when its deletion was seen: a resource without a finalizer (retention Keep)
        # goes at once and kopf forgets it without stopping its daemon; the daemon ends itself.
        self._gone: dict[str, float] = {}
        # Objects whose same-named successor has been handled (its DELETED event may not have
        # been yet): their handlers stop, their memory is not the successor's.
        self._superseded: dict[str, float] = {}
        self.rotation_stage = "Idle"
        # Set by `_keyguard.settle`: ready once a keyring was checked against the store; while
        # `keyring_refused` is set, commits, rotations, copies and restarts wait.
        self.keyring_ready = False
        self.keyring_refused: KeyringPlan | None = None
        # While refused: the keyring this process last verified, set aside. Nothing is sealed
        # with it (`keyring` stays empty, so commits, rotations and copies wait), but it is
        # still offered to `settle` as the operator's memory: a refused source that is then
        # deleted (the runbook) or fixed is judged against it, and the Secret is written back
        # from it. Dropping it would leave the source Secret's bad edit as the end of the key.
        self.keyring_kept: Keyring | None = None
        self.keyring_announced: str | None = None
        # What the last export warning was about (`_keyguard._judge_export`): each gap once.
        self.export_warned: str | None = None
        # How Events reach the resource: kopf's poster; unit tests record them instead.
        self.post_event: EventPoster = kopf_post
        # Set by `_webhook_setup.start` when admission is on: verifies who changed spec.config.
        self.stamp_key: bytes | None = None
        # namespace -> components deleted since their registrations were last published
        # (`_loops.registrations`): dropped from the namespace's registrations.json.
        self.registrations_removed: dict[str, set[str]] = {}
        # etcd name -> (namespace, bytes) of a component deleted with retention Keep: its data
        # stays in etcd and counts against that namespace's storage budget (`_storage_budget`).
        self.storage_retained: dict[str, tuple[str, int]] = {}
        # namespace -> the sum of its remembered components' stored_bytes (kept by each).
        self.storage_used: dict[str, int] = {}
        # Namespaces whose etcd data this process measured (`_storage_budget.measure_namespace`):
        # what a restart forgot (Keep deletions, components not reconciled yet) is charged.
        self.storage_measured: set[str] = set()
        # namespace -> the components its owner records named when this process first read
        # them (None: not read yet). Read once: every owner record written since is this
        # process's own claim, whose bytes it counts (`ComponentMemory.stored_bytes`).
        self.storage_owners: dict[str, list[str]] | None = None
        # Components purged while a namespace is being measured: their bytes, read before the
        # purge, are not charged (None: no measurement under way).
        self.storage_purged: set[str] | None = None
        # One measurement at a time: a burst of creates after a restart measures once.
        self.storage_lock = asyncio.Lock()

    async def write(
        self, component: str, call: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """`call(*args, **kwargs)`, a backend call that writes `component`'s records, in a
        worker thread. Counted as the operator's own write even when it fails (it may have
        landed): the component's next monitor pass reads etcd instead of reusing a view from
        before it, whether or not the change watch has delivered the write yet."""
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        finally:
            self.changes.wrote(component)

    def keyring_condition(self) -> Cond:
        return keyring_condition(self.keyring_ready, self.keyring_refused)

    def memory(self, namespace: str, name: str) -> ComponentMemory:
        # Not setdefault: it would build (and throw away) a whole ComponentMemory, a clock
        # read and a lock on every call, several times per monitor pass.
        mem = self.components.get((namespace, name))
        if mem is None:
            mem = self.components[namespace, name] = self._fresh(namespace)
            self._namespaces_of.setdefault(name, set()).add(namespace)
            self._names_in.setdefault(namespace, set()).add(name)
        return mem

    def _fresh(self, namespace: str) -> ComponentMemory:
        return ComponentMemory(_usage=(self.storage_used, namespace))

    def memory_of(self, namespace: str, name: str, uid: str) -> ComponentMemory | None:
        """The memory of object `uid` of namespace/name; None when that object has ended
        (deleted, or superseded by a same-named successor).

        Memory is kept by namespace/name, and kopf handles each uid in its own worker: after a
        delete and re-create the new object may be handled before the old one's DELETED event.
        Two objects of one name never exist in the API server at once, so the first handler of
        another uid means the one remembered is gone: the successor starts from a fresh memory
        (no restart history, canary or status of its predecessor), and the predecessor's
        handlers (a monitor pass still due, a late event) find it ended."""
        if self.ended(uid):
            return None
        mem = self.memory(namespace, name)
        if uid and mem.uid and mem.uid != uid:
            self._superseded[mem.uid] = time.monotonic()
            mem.stored_bytes = None  # out of the namespace's sum with the memory
            mem = self.components[namespace, name] = self._fresh(namespace)
        if uid:
            mem.uid = uid
        return mem

    def adopt_status(self, namespace: str, name: str, status: Any) -> None:
        """A watch event brought `status` (the dict kopf keeps in the component's body): when it
        equals the status this operator last wrote, keep kopf's dict instead of ours. One copy
        per component rather than two (~7 KiB each); ours stays while the body lags our write.
        Neither is changed in place (statuses are replaced, never edited)."""
        mem = self.components.get((namespace, name))
        if mem is None or mem.status is None or mem.status is status:
            return
        if isinstance(status, dict) and status == mem.status:
            mem.status = status

    def forget(self, namespace: str, name: str, uid: str) -> bool:
        """The object `uid` of `namespace/name` was deleted: drop its memory, and its name from
        its namespace's registrations.json, unless the memory is a same-named successor's
        (another uid handled since). True when the per-component metric series recorded under
        `name` were this object's to drop: its memory was its own and it held its name (a
        refused resource records none: `_reconcile.publish_status`)."""
        mem = self.components.get((namespace, name))
        if mem is not None and mem.uid and uid and mem.uid != uid:
            return False
        if mem is not None:
            mem.stored_bytes = None  # out of the namespace's sum with the memory
        self.components.pop((namespace, name), None)
        _drop(self._namespaces_of, name, namespace)
        _drop(self._names_in, namespace, name)
        self.registrations_removed.setdefault(namespace, set()).add(name)
        return mem is not None and mem.uid == uid and bool(uid) and mem.conflict is None

    # --- waking monitor passes ------------------------------------------------------------------
    # A monitor pass runs when something it judges changed, and at the latest every
    # monitor_interval_seconds (a bound on what no event announces: windows that age, the scrub).

    def wake(self, name: str, reason: str, namespace: str | None = None) -> None:
        """`name`'s monitor runs a pass now rather than at its interval (`reason`, what asked,
        is counted: `MONITOR_WAKES`). With `namespace` (a wake about that namespace's objects:
        its pods, its resource), only that namespace's monitor of the name; without (a wake
        about the name's data in etcd), every monitor of the name (`HeartbeatView.wake`)."""
        self.heartbeats.wake(name, reason, namespace)

    def wake_all(self, reason: str) -> None:
        self.heartbeats.wake_all(reason)

    def counts_stored(self, name: str) -> bool:
        """Whether a resource named `name` (in any namespace: one adopted since owns it in
        another than its owner record named before) has what its component keeps measured or
        written by this process (`_storage_budget`)."""
        return any(
            mem.stored_bytes is not None
            for namespace in self._namespaces_of.get(name, ())
            if (mem := self.components.get((namespace, name))) is not None
        )

    def changed(self, name: str, revision: int) -> None:
        """The change watch saw a put or delete, at `revision`, of a key `name`'s view reads:
        a pass judges it unless the last pass read at or after it, or no pass has read the
        component yet (the one coming reads anyway: a new component's own seed wakes nothing)."""
        for namespace in self._namespaces_of.get(name, ()):
            mem = self.components.get((namespace, name))
            if mem is not None and mem.observed is not None and revision > mem.observed.revision:
                self.wake(name, "etcd-change")
                return

    def pod_changed(self, namespace: str | None, labels: Mapping[str, str]) -> None:
        """A pod was added or changed (a deletion first shows as a change: its
        deletionTimestamp): the monitors of the components it matches run a pass (their
        instance count, restarts and startup grace depend on their pods)."""
        if namespace is None or not labels:
            return
        for name in self._names_in.get(namespace, ()):
            mem = self.components.get((namespace, name))
            if mem is None or mem.spec is None:
                continue
            wanted = mem.spec[1].selector.match_labels
            if wanted and all(labels.get(k) == v for k, v in wanted.items()):
                self.wake(name, "pod", namespace)

    def anchored_registrations(self) -> dict[str, dict[str, int]]:
        """namespace -> {component: the registration its status anchors}, for the components
        this operator monitors that hold their name (a refused one writes nothing: its status
        anchors nothing of the name's data). Not those it only remembers: a replica paused by
        peering would publish what it knew before another replica took over."""
        found: dict[str, dict[str, int]] = {}
        for (namespace, name), mem in list(self.components.items()):
            if mem.monitors <= 0 or mem.conflict is not None or mem.status is None:
                continue
            registration = anchored_registration(mem.status)
            if registration is not None:
                found.setdefault(namespace, {})[name] = registration
        return found

    def mark_gone(self, uid: str) -> None:
        """The resource with this uid was deleted: its monitor daemon stops at its next wake."""
        now = time.monotonic()
        # A daemon sees the mark within a pass; one never spawned would leave it forever.
        for marks in (self._gone, self._superseded):
            for old in [u for u, at in marks.items() if now - at > _GONE_KEPT_SECONDS]:
                del marks[old]
        self._gone[uid] = now

    def is_gone(self, uid: str) -> bool:
        """Whether the DELETED event (or the finalizer's handler) of `uid` was handled."""
        return bool(uid) and uid in self._gone

    def ended(self, uid: str) -> bool:
        """Whether `uid` is gone or superseded by a same-named successor (`memory_of`): its
        handlers judge and write nothing more."""
        return bool(uid) and (uid in self._gone or uid in self._superseded)

    def keyring_namespaces(self) -> set[str]:
        """Namespaces whose keyring copy the fan-out keeps current (`copy_namespaces`)."""
        return copy_namespaces(
            Remembered(
                namespace, name, mem.uid, mem.monitors > 0, mem.conflict is not None, mem.status
            )
            for (namespace, name), mem in list(self.components.items())
        )


def _drop(sets: dict[str, set[str]], key: str, member: str) -> None:
    """`member` out of `sets[key]`, and the key with its set once empty (names come and go:
    a set per name ever seen would only grow)."""
    found = sets.get(key)
    if found is not None:
        found.discard(member)
        if not found:
            del sets[key]
