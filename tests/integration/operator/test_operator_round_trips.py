"""etcd round trips of a reconcile on the real 3-member etcd (issue 17): every one is a request
to a remote cluster, a write a replicated one. Counted at the library's one etcd access point
(`EtcdStore._call`), while the real reconcile and first monitor pass run through
`LibraryBackend` (the stand-ins of the unit harness play the Kubernetes API)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest

from defender_config import Keyring, LibrarySettings
from defender_devcluster import EtcdCluster, etcd_client_settings
from defender_operator._decisions.ownership import Claim
from defender_operator._keys import MutableKeyringSource
from defender_operator._library_backend import LibraryBackend

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


def owner(library: LibraryBackend) -> Claim | None:
    return library.read_claim(NAME)[0]


def test_a_new_component_is_claimed_and_seeded_in_two_round_trips(library: LibraryBackend) -> None:
    counted = Counted(library)
    h = Harness(backend=library)  # type: ignore[arg-type]
    asyncio.run(h.reconcile(spec()))
    # One read: the owner record, and whether etcd holds the component. One create-only
    # write: the owner record with MASTER, ACTIVE, metadata and history, its response saying
    # what etcd holds. Six before: the owner record read and written, an existence check, the
    # state, the seed, the state again.
    assert counted.take() == ["txn", "txn"]
    assert h.kube.status["activeVersion"] == 1 and h.kube.status["masterDigest"]
    assert owner(library) == Claim(NAMESPACE, NAME, h.uid)
    state = library.state(NAME)
    assert state.active_version == 1 and state.master_digest == h.kube.status["masterDigest"]


def after_the_claim_read(library: LibraryBackend, then: Callable[[], Any]) -> None:
    """Run `then` right after the reconcile's first read of the owner record."""
    read = library.read_claim_holds

    def read_then(component: str) -> tuple[Claim | None, int, bool]:
        seen = read(component)
        then()
        return seen

    library.read_claim_holds = read_then  # type: ignore[method-assign]


def test_a_new_name_claimed_by_another_resource_meanwhile_is_refused_and_nothing_written(
    library: LibraryBackend,
) -> None:
    other = Claim("tenant-b", NAME, "uid-9")
    after_the_claim_read(library, lambda: library.write_claim(NAME, other, revision=0))
    h = Harness(backend=library)  # type: ignore[arg-type]
    asyncio.run(h.reconcile(spec()))
    assert h.condition("Conflict")["reason"] == "NameClaimedElsewhere"
    assert owner(library) == other
    assert not library.client.store.list_prefix(library.layout.component_dir(NAME))


def test_a_master_written_under_a_new_name_meanwhile_is_claimed_first_never_overwritten(
    library: LibraryBackend,
) -> None:
    theirs = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth9"}
    after_the_claim_read(
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
    counted = Counted(library)
    h = Harness(backend=library)  # type: ignore[arg-type]
    with pytest.raises(kopf.PermanentError, match="cannot be rebuilt"):
        asyncio.run(h.reconcile(spec()))
    assert counted.take()[:2] == ["txn", "txn"]  # the claim read, the claim written
    assert owner(library) == Claim(NAMESPACE, NAME, h.uid)
    assert h.condition("ConfigSynced")["reason"] == "RecordUnauthenticated"
    planted = store.get(layout.master_config(NAME))
    assert planted is not None and planted.value == b'{"node_id": "evil", "version": "6.6.6"}'
    assert store.get(layout.metadata(NAME)) is None


def test_reconciling_an_existing_component_reads_five_times(library: LibraryBackend) -> None:
    h = Harness(backend=library)  # type: ignore[arg-type]
    asyncio.run(h.reconcile(spec()))
    counted = Counted(library)
    asyncio.run(h.reconcile(spec()))
    # The owner record; one read for existence, the repair's and the schema's record (was
    # three: an existence check, then the repair and the schema check each read the record);
    # the repair's history and ACTIVE; the state. Seven before.
    assert counted.take() == ["get", "txn", "list", "get", "txn"]
    assert h.kube.status["activeVersion"] == 1 and h.kube.status["observedGeneration"] == 2
