"""etcd round trips of a reconcile on the real 3-member etcd (issue 17): every one is a request
to a remote cluster, a write a replicated one. Counted at the library's one etcd access point
(`EtcdStore._call`), while the real reconcile and first monitor pass run through
`LibraryBackend` (the stand-ins of the unit harness play the Kubernetes API)."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import kopf
import pytest
from prometheus_client import CollectorRegistry

from defender_config import (
    ConfigStore,
    DefenderClient,
    Heartbeater,
    Keyring,
    LibrarySettings,
    StoreUnavailableError,
)
from defender_devcluster import EtcdCluster, etcd_client_settings, wait_for
from defender_operator import _api, _reconcile, _storage_budget
from defender_operator._decisions.ownership import Claim
from defender_operator._keys import MutableKeyringSource
from defender_operator._library_backend import LibraryBackend
from defender_operator._runtime import utcnow

# The operator harness of the unit tests (fake Kubernetes API, real reconcile and monitor).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "operator"))
from operator_core_support import NAME, NAMESPACE, Harness, spec

pytestmark = pytest.mark.etcd


class Counted:
    """The etcd requests a LibraryBackend makes, by the library's name for each."""

    def __init__(self, backend: LibraryBackend) -> None:
        self.ops: list[str] = []
        store: Any = backend.client.store
        call: Callable[..., Any] = store._call

        def counted(op: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
            self.ops.append(op)
            return call(op, fn, **kwargs)

        store._call = counted

    def take(self) -> list[str]:
        ops, self.ops = self.ops, []
        return ops


@pytest.fixture
def library(defender_etcd: EtcdCluster, etcd_prefix: str) -> Iterator[LibraryBackend]:
    settings = LibrarySettings(
        etcd=etcd_client_settings(defender_etcd.endpoints), prefix=etcd_prefix.rstrip("/")
    )
    backend = LibraryBackend(settings, MutableKeyringSource(Keyring.generate()), "round-trips")
    try:
        yield backend
    finally:
        backend.close()


def measured(library: LibraryBackend) -> Harness:
    """The operator on `library`, its namespace measured as by its first budget decision there
    since its start (`test_the_first_decision_in_a_namespace_since_a_start_measures_it_once`):
    a new component's create path, as for every one after that decision."""
    h = Harness(backend=library)  # type: ignore[arg-type]
    asyncio.run(_storage_budget.measure_namespace(h.rt, NAMESPACE))
    return h


def owner(library: LibraryBackend) -> Claim | None:
    return library.read_claim(NAME)[0]


def watched(h: Harness, listing: Mapping[str, Any] | None = None) -> None:
    """Both views a running operator keeps, trusted, as `_loops` makes them: the change watch
    (really watching etcd) and the heartbeats, resynced from `listing` (no instance by default)."""
    h.inform()
    beats = h.rt.heartbeats
    beats.watching = True
    beats.resync(utcnow(), beats.begin_resync(), listing or {})


def test_a_new_component_is_claimed_seeded_and_judged_in_one_round_trip(
    library: LibraryBackend,
) -> None:
    h = measured(library)
    watched(h)
    counted = Counted(library)
    asyncio.run(h.reconcile(spec(), first_pass=True))
    # One create-only transaction: the owner record with MASTER, ACTIVE, metadata, history and
    # the heartbeat cadence, and in it the read of what the first monitor pass judges on
    # (overview, cadence, rollout, alerts). Eleven before issue 17's work: the owner record
    # read and written, an existence check, the state, the seed, the state again; the pass's
    # view read, the cadence written, the scrub's read, and two more reads of what changed.
    assert counted.take() == ["txn"]
    assert h.kube.status["activeVersion"] == 1 and h.kube.status["masterDigest"]
    assert h.condition("Heartbeating")["reason"] == "NoPods"  # judged by the pass
    assert owner(library) == Claim(NAMESPACE, NAME, h.uid)
    state = library.state(NAME)
    assert state.active_version == 1 and state.master_digest == h.kube.status["masterDigest"]
    cadence = library.cadence(NAME)
    want = _reconcile.wanted_cadence(h.rt, _api.parse_spec(spec()))
    assert cadence is not None and want.same_rhythm(cadence)
    # Nothing the pass reused hides a later change: the next write is read by the next pass.
    library.publish_cadence(NAME, cadence.model_copy(update={"interval_seconds": 7.0}))
    written = library.revision()
    wait_for(
        "the change watch delivered the write",
        lambda: h.rt.changes.facts(NAME).changed_at >= written,
        timeout=10,
    )
    counted.take()
    asyncio.run(h.monitor(spec()))
    assert "txn" in counted.take()  # the view read again
    assert h.condition("HeartbeatCadence")  # and the cadence put back as spec.heartbeat says
    assert want.same_rhythm(library.cadence(NAME))


@pytest.fixture
def beating(library: LibraryBackend) -> Iterator[Heartbeater]:
    """An instance of NAME beating before its component exists, from a client of its own
    (its requests are not the operator's)."""
    keyring = library.client.envelope.keyring()
    assert keyring is not None
    pod = DefenderClient(library.client.settings, keyring, registry=CollectorRegistry())
    hb = Heartbeater(pod, NAME, "pod-0", interval_seconds=1, allowed_misses=10, pod="pod-0")
    hb.start()
    try:
        yield hb
    finally:
        hb.stop()
        pod.close()


def seen_beating(library: LibraryBackend) -> Harness:
    h = measured(library)
    # Its pod, selected: only an instance of one counts as alive.
    h.add_pod("pod-0")
    watched(h, library.all_instances())
    assert h.rt.heartbeats.instances(NAME)
    return h


def test_instances_beating_before_their_component_are_asked_beside_the_seed(
    library: LibraryBackend, beating: Heartbeater
) -> None:
    """Pods often beat before their DefenderComponent exists (a Helm install): when each last
    beat is read from its lease while the seed's transaction runs, and the first pass judges
    on that answer instead of asking again after it."""
    h = seen_beating(library)
    asked_meanwhile = threading.Event()
    ask, seed = library.last_seen, library.claim_and_seed

    def asking(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("ask", True):
            asked_meanwhile.set()
        return ask(*args, **kwargs)

    def seeding(*args: Any, **kwargs: Any) -> Any:
        # The seed's transaction ends only once the lease was asked (or after 5 s: too late).
        asked_meanwhile.wait(5)
        return seed(*args, **kwargs) if asked_meanwhile.is_set() else None

    library.last_seen = asking  # type: ignore[method-assign]
    library.claim_and_seed = seeding  # type: ignore[method-assign]
    counted = Counted(library)
    asyncio.run(h.reconcile(spec(), first_pass=True))
    assert asked_meanwhile.is_set()
    assert sorted(counted.take()) == ["lease_ttl", "txn"]
    # Judged by the first pass on that sighting.
    assert h.kube.status["instances"]["alive"] == 1
    assert library.last_seen(NAME, h.rt.heartbeats.instances(NAME), ask=False) is not None


def test_a_failed_sighting_is_asked_again_by_the_pass(
    library: LibraryBackend, beating: Heartbeater
) -> None:
    h = seen_beating(library)
    asked = library.last_seen
    failures = [StoreUnavailableError(["etcd"], "lease read refused (injected)")]

    def fails_once(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("ask", True) and failures:
            raise failures.pop()
        return asked(*args, **kwargs)

    library.last_seen = fails_once  # type: ignore[method-assign]
    counted = Counted(library)
    asyncio.run(h.reconcile(spec(), first_pass=True))
    assert not failures  # the early ask failed, and said nothing
    # The pass asked itself. The instance may have moved to a new lease meanwhile, on adopting
    # the cadence the seed published: the pass then follows it (its record read again, the new
    # lease asked), which a loaded machine made happen in a run of the whole directory.
    assert sorted(counted.take()) in (
        ["lease_ttl", "txn"],
        ["get", "lease_ttl", "lease_ttl", "txn"],
    )
    assert h.kube.status["activeVersion"] == 1
    assert h.kube.status["instances"]["alive"] == 1


def before_the_seed(library: LibraryBackend, then: Callable[[], Any]) -> None:
    """Run `then` right before the reconcile's seed transaction (with the claim in it)."""
    seed = library._seed

    def then_seed(*args: Any, **kwargs: Any) -> Any:
        then()
        return seed(*args, **kwargs)

    library._seed = then_seed  # type: ignore[method-assign]


def test_a_new_name_claimed_by_another_resource_meanwhile_is_refused_and_nothing_written(
    library: LibraryBackend,
) -> None:
    other = Claim("tenant-b", NAME, "uid-9")
    before_the_seed(library, lambda: library.write_claim(NAME, other, revision=0))
    h = Harness(backend=library)  # type: ignore[arg-type]
    asyncio.run(h.reconcile(spec()))
    assert h.condition("Conflict")["reason"] == "NameClaimedElsewhere"
    assert owner(library) == other
    assert not library.client.store.list_prefix(library.layout.component_dir(NAME))


def test_a_master_written_under_a_new_name_meanwhile_is_claimed_first_never_overwritten(
    library: LibraryBackend,
) -> None:
    theirs = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth9"}
    before_the_seed(
        library,
        lambda: library.configs.seed(NAME, theirs, "sniffer", by="someone"),
    )
    h = Harness(backend=library)  # type: ignore[arg-type]
    asyncio.run(h.reconcile(spec()))
    assert owner(library) == Claim(NAMESPACE, NAME, h.uid)
    assert library.configs.get_master(NAME)["interface"] == "eth9"  # create-only
    active = library.configs.get_active(NAME)
    assert (active.version, active.config["interface"]) == (2, "eth0")  # the spec, committed


def test_a_master_planted_under_a_new_name_is_claimed_by_its_own_write_and_refused(
    library: LibraryBackend,
) -> None:
    # Someone with etcd access but no keyring writes MASTER before the resource exists: the
    # claim is written on its own, first, and the planted value is refused, never adopted.
    store, layout = library.client.store, library.layout
    store.put(layout.master_config(NAME), b'{"node_id": "evil", "version": "6.6.6"}')
    h = measured(library)
    counted = Counted(library)
    with pytest.raises(kopf.PermanentError, match="cannot be rebuilt"):
        asyncio.run(h.reconcile(spec()))
    # The seed with the claim (its compares fail: nothing written), the claim read, the claim
    # written on its own.
    assert counted.take()[:3] == ["txn", "get", "txn"]
    assert owner(library) == Claim(NAMESPACE, NAME, h.uid)
    assert h.condition("ConfigSynced")["reason"] == "RecordUnauthenticated"
    planted = store.get(layout.master_config(NAME))
    assert planted is not None and planted.value == b'{"node_id": "evil", "version": "6.6.6"}'
    assert store.get(layout.metadata(NAME)) is None


def test_a_component_sealed_with_another_keyring_is_claimed_then_refused_by_name(
    library: LibraryBackend,
) -> None:
    # Data from another cluster (another keyring) under a new resource's name: the seed with
    # the claim finds it and writes nothing, the claim is decided and written on its own, and
    # the record that does not verify is refused, named, as it always was.
    elsewhere = DefenderClient(
        library.client.settings, Keyring.generate(), registry=CollectorRegistry()
    )
    theirs = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth9"}
    try:
        ConfigStore(elsewhere).seed(NAME, theirs, "sniffer", by="elsewhere")
    finally:
        elsewhere.close()
    h = measured(library)
    counted = Counted(library)
    with pytest.raises(kopf.PermanentError, match="cannot be rebuilt"):
        asyncio.run(h.reconcile(spec()))
    # The seed's read of what is there raised the alert (a lease and a put) on its way.
    ops = [op for op in counted.take() if op not in ("lease_grant", "put")]
    assert ops[:3] == ["txn", "get", "txn"]
    assert owner(library) == Claim(NAMESPACE, NAME, h.uid)
    synced = h.condition("ConfigSynced")
    assert synced["reason"] == "RecordUnauthenticated" and "metadata" in synced["message"]


def test_metadata_planted_under_a_new_name_is_not_overwritten_by_a_seed_with_a_claim(
    library: LibraryBackend,
) -> None:
    # Metadata without MASTER (written by someone with etcd access): the seed with the claim
    # compares it absent, so the claim is decided and written on its own first, as for any
    # name that holds something, and the planted record is refused, never adopted.
    store, layout = library.client.store, library.layout
    planted = b'{"version": 9, "digest": "00", "type": "sniffer"}'
    store.put(layout.metadata(NAME), planted)
    h = measured(library)
    counted = Counted(library)
    with pytest.raises(kopf.PermanentError):
        asyncio.run(h.reconcile(spec()))
    assert counted.take()[:3] == ["txn", "get", "txn"]
    assert owner(library) == Claim(NAMESPACE, NAME, h.uid)
    assert store.get(layout.master_config(NAME)) is None
    kept = store.get(layout.metadata(NAME))
    assert kept is not None and kept.value == planted


def component_keys(library: LibraryBackend) -> dict[str, tuple[bytes, int]]:
    found = library.client.store.list_prefix(library.layout.component_dir(NAME))
    return {sv.key: (sv.value, sv.mod_revision) for sv in found}


@pytest.mark.parametrize(
    ("also_gone", "holds"),
    [((), "metadata (version 3)"), (("metadata", "owner"), "ACTIVE, history/1")],
)
def test_master_deleted_after_a_breaker_rollback_is_reported_and_nothing_reseeded(
    library: LibraryBackend, also_gone: tuple[str, ...], holds: str
) -> None:
    # Someone with etcd write access (no keyring) deletes MASTER after the breaker rolled the
    # spec's config back and froze commits. The reconcile must not seed that spec again as
    # MASTER and version 1: nothing written, ACTIVE as it was, a person told. With the
    # metadata and owner record gone too, a fresh visit seeds with its claim: the library's
    # compares refuse that as well.
    h = Harness(backend=library)  # type: ignore[arg-type]
    asyncio.run(h.reconcile(spec()))
    rejected = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth9"}
    asyncio.run(h.reconcile(spec(rejected)))
    library.rollback(NAME, 1, modified_by="breaker", history_limit=10)
    library.freeze(NAME, "breaker tripped")
    store, layout = library.client.store, library.layout
    since = utcnow()
    store.delete(layout.master_config(NAME))
    keys = {"metadata": layout.metadata(NAME), "owner": layout.owner(NAME)}
    for what in also_gone:
        store.delete(keys[what])
    if also_gone:
        h = Harness(backend=library)  # type: ignore[arg-type]
    before = component_keys(library)
    with pytest.raises(kopf.PermanentError, match="MASTER of 'sniffer' is missing"):
        asyncio.run(h.reconcile(spec(rejected)))
    assert component_keys(library) == before  # ACTIVE, history, metadata as they were
    if not also_gone:
        active = library.configs.get_active(NAME)
        assert (active.version, active.config["interface"]) == (3, "eth0")
    synced = h.condition("ConfigSynced")
    assert (synced["status"], synced["reason"]) == ("False", "MasterMissing")
    assert f"still holds its {holds}:" in synced["message"]  # the operator's plan, the seed's
    assert "Purge" in synced["message"] and "snapshot" in synced["message"]
    assert h.condition("Ready")["reason"] == "MasterMissing"
    assert [e.type for e in h.events if e.reason == "MasterMissing"] == ["Warning"]
    # Once: the seed with the claim, refused too, leaves the alert to the visit that owns it.
    assert [a.reason for a in library.alerts(NAME, since)].count("MasterMissing") == 1


def test_reconciling_an_existing_component_reads_four_times(library: LibraryBackend) -> None:
    h = Harness(backend=library)  # type: ignore[arg-type]
    asyncio.run(h.reconcile(spec()))
    counted = Counted(library)
    asyncio.run(h.reconcile(spec()))
    # The owner record; one read for existence, the repair's and the schema's record and the
    # state (was four: an existence check, the repair's and the schema's record, the state);
    # the repair's history and ACTIVE (its replay check). Seven before.
    assert counted.take() == ["get", "txn", "list", "get"]
    assert h.kube.status["activeVersion"] == 1 and h.kube.status["observedGeneration"] == 2
    # A record the declare changes is read again: the state is never from before a write.
    schema = {"type": "object", "properties": {"interface": {"type": "string"}}}
    library.configs.set_schema(NAME, schema, "someone")  # the spec will put its own back
    counted.take()
    asyncio.run(h.reconcile(spec()))
    ops = counted.take()
    # The same four, the schema check's reads of ACTIVE (as `get_active`) and its write, then
    # the state read again.
    assert ops == ["get", "txn", "list", "get", "get", "get", "txn", "txn"]
    assert library.configs.get_metadata(NAME).json_schema is None  # type: ignore[union-attr]


def test_etcd_failing_the_seed_with_a_claim_is_an_error_not_a_name_held(
    library: LibraryBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only what etcd holds sends the visit to the claim read; an etcd that does not answer is
    # the reconcile's retryable error, as for every other etcd call.
    def unavailable(*_: Any, **__: Any) -> Any:
        raise StoreUnavailableError(["127.0.0.1:1"], "txn: injected")

    monkeypatch.setattr(library.client.store, "txn", unavailable)
    claim_reads: list[str] = []
    read_claim = library.read_claim
    monkeypatch.setattr(
        library,
        "read_claim",
        lambda component: claim_reads.append(component) or read_claim(component),
    )
    h = Harness(backend=library)  # type: ignore[arg-type]
    with pytest.raises(kopf.TemporaryError):
        asyncio.run(h.reconcile(spec()))
    assert h.condition("ConfigSynced")["reason"] == "StoreUnavailable"
    assert claim_reads == []  # not taken for a name that holds something


def test_a_deleted_newest_history_entry_does_not_make_the_reconcile_roll_active_back(
    library: LibraryBackend,
) -> None:
    # `etcdctl del …/history/<newest>` by someone without the keyring: the operator's repair
    # (run on every reconcile) keeps the verified record and ACTIVE instead of rebuilding them
    # from the older entry.
    h = Harness(backend=library)  # type: ignore[arg-type]
    asyncio.run(h.reconcile(spec()))
    configs, layout = library.configs, library.layout
    interface = {"node_id": "sniffer-01", "version": "1.0.0"}
    for n in range(2, 5):
        configs.commit(NAME, {**interface, "interface": f"eth{n}"}, by="rag")
    running = ConfigStore(library.client)
    assert running.get_active(NAME).version == 4
    assert library.client.store.delete(layout.history(NAME, 4))
    asyncio.run(h.reconcile(spec()))
    active = ConfigStore(library.client).get_active(NAME)
    assert (active.version, active.config["interface"]) == (4, "eth4")
    assert "MetadataResigned" not in h.reasons()
    assert configs.commit(NAME, {**interface, "interface": "eth9"}, by="rag") == 5
    assert running.get_active(NAME).config["interface"] == "eth9"


def test_a_growing_custom_schema_is_judged_by_one_range_read_and_declared_again(
    library: LibraryBackend,
) -> None:
    h = Harness(backend=library)  # type: ignore[arg-type]
    # A budget applies, whatever the caller's environment says.
    h.rt.settings = h.rt.settings.model_copy(
        update={"namespace_storage_budget_bytes": 1 << 20, "namespace_storage_budgets": {}}
    )
    schema: dict[str, Any] = {"type": "object", "properties": {"rate": {"type": "integer"}}}

    def custom(schema: dict[str, Any]) -> dict[str, Any]:
        return spec({"rate": 1}, componentType="custom", customSchema=schema)

    asyncio.run(h.reconcile(custom(schema)))
    counted = Counted(library)
    asyncio.run(h.reconcile(custom({**schema, "description": "larger"})))
    ops = counted.take()
    # The first two of every reconcile's four (the declare, capped before the repair's reads
    # of history and ACTIVE: a re-sign would record the schema too); what the component keeps
    # (one range read) for the budget's judgment; the declare again (its read, the repair's
    # history and ACTIVE), the schema check's reads of ACTIVE and its write; the state read
    # again. The same schema again: the four of every reconcile of an existing component.
    four = ["get", "txn", "list", "get"]
    assert ops == [*four[:2], "list", "txn", "list", "get", "get", "get", "txn", "txn"]
    asyncio.run(h.reconcile(custom({**schema, "description": "larger"})))
    assert counted.take() == four
    meta = library.configs.get_metadata(NAME)
    assert meta is not None and meta.json_schema == {**schema, "description": "larger"}


def test_a_commit_under_a_storage_budget_costs_one_range_read_of_the_component(
    library: LibraryBackend,
) -> None:
    h = Harness(backend=library)  # type: ignore[arg-type]
    asyncio.run(h.reconcile(spec()))

    def commit_ops(interface: str, budget: int) -> list[str]:
        h.rt.settings = h.rt.settings.model_copy(update={"namespace_storage_budget_bytes": budget})
        counted = Counted(library)
        config = {"node_id": "sniffer-01", "version": "1.0.0", "interface": interface}
        asyncio.run(h.reconcile(spec(config)))
        return counted.take()

    unlimited = commit_ops("eth1", 0)
    budgeted = commit_ops("eth2", 1 << 20)
    assert h.kube.status["activeVersion"] == 3
    # What the commit prunes and keeps, read once; nothing else changes.
    assert sorted(budgeted) == sorted([*unlimited, "list"])


def test_the_first_decision_in_a_namespace_since_a_start_measures_it_once(
    library: LibraryBackend,
) -> None:
    # What an earlier run of the operator left: a component of the namespace deleted with
    # retention Keep, and another namespace's.
    config = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth0"}
    for component, owner in (
        ("kept", Claim(NAMESPACE, "kept", "uid-k", released=True)),
        ("elsewhere", Claim("team-b", "elsewhere", "uid-e")),
    ):
        library.seed(component, "sniffer", config, json_schema=None, modified_by="earlier")
        assert library.write_claim(component, owner, revision=0)
    h = Harness(backend=library)  # type: ignore[arg-type]
    watched(h)
    counted = Counted(library)
    asyncio.run(h.reconcile(spec(), first_pass=True))
    # The owner records (one range read), the namespace's component this run does not know
    # (one), then the create's one transaction.
    assert counted.take() == ["list", "list", "txn"]
    assert h.rt.storage_retained == {"kept": (NAMESPACE, library.footprint("kept").total)}
    assert h.kube.status["activeVersion"] == 1
