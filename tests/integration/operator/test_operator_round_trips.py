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


def test_a_new_component_is_claimed_and_seeded_in_four_round_trips(
    library: LibraryBackend,
) -> None:
    counted = Counted(library)
    h = Harness(backend=library)  # type: ignore[arg-type]
    asyncio.run(h.reconcile(spec()))
    # The owner record read and written; one read for "does it exist, and what does it hold"
    # (was: an existence check, then the state); the create-only seed, whose response says
    # what etcd holds (was: the seed, then the state read again). Six before.
    assert counted.take() == ["get", "txn", "txn", "txn"]
    assert h.kube.status["activeVersion"] == 1 and h.kube.status["masterDigest"]
    assert owner(library) == Claim(NAMESPACE, NAME, h.uid)
    state = library.state(NAME)
    assert state.active_version == 1 and state.master_digest == h.kube.status["masterDigest"]


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
