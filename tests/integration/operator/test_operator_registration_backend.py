"""`LibraryBackend` on the real etcd after a purge and a new registration of the same name:
the operator's own reader holds the registration its seed wrote from the seed on, so a record,
ACTIVE, MASTER and history of the earlier registration put back are refused by its very next
read (the monitor pass's `observe`) and repaired from the new registration, without waiting
for a reconcile to pass it the status's anchor (docs/security.md, "Replays across a record's
lifetime")."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import kopf
import pytest

from defender_config import (
    Alert,
    Cadence,
    CallableSink,
    ConfigStore,
    EnvelopeOptions,
    Keyring,
    LibrarySettings,
    RegistrationReplayError,
    StoragePolicy,
    config_digest,
    inspect,
    validate_config,
)
from defender_devcluster import EtcdCluster, etcd_client_settings
from defender_operator import _reconcile
from defender_operator._decisions.ownership import Claim
from defender_operator._keys import MutableKeyringSource
from defender_operator._library_backend import LibraryBackend
from defender_operator._runtime import utcnow

# The operator harness of the unit tests (fake Kubernetes API, real reconcile and monitor).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "operator"))
from operator_core_support import LOG, NAME, NAMESPACE, Harness, spec

pytestmark = pytest.mark.etcd

BY = "operator:registration"
FW = {"node_id": "fw-01", "version": "1.0.0", "default_policy": "deny", "rules": []}
CADENCE = Cadence(interval_seconds=5, allowed_misses=2, by=BY)


@pytest.fixture
def backend(defender_etcd: EtcdCluster, etcd_prefix: str) -> Iterator[LibraryBackend]:
    settings = LibrarySettings(
        etcd=etcd_client_settings(defender_etcd.endpoints), prefix=etcd_prefix.rstrip("/")
    )
    library = LibraryBackend(settings, MutableKeyringSource(Keyring.generate()), "registration")
    try:
        yield library
    finally:
        library.close()


def claim_and_seed(backend: LibraryBackend, uid: str, config: dict[str, Any]) -> Any:
    return backend.claim_and_seed(
        "firewall",
        "firewall",
        config,
        claim=Claim("ns", "firewall", uid),
        json_schema=None,
        modified_by=BY,
        cadence=CADENCE,
        alerts_since=utcnow(),
    )


def commit(backend: LibraryBackend, config: dict[str, Any]) -> int:
    return backend.commit(
        "firewall", "firewall", config, json_schema=None, modified_by=BY, history_limit=10
    )


def test_a_purged_registrations_values_put_back_are_repaired_by_the_next_observe(
    backend: LibraryBackend,
) -> None:
    alerts: list[Alert] = []
    backend.client.alerter.add_sink(CallableSink(alerts.append))
    assert claim_and_seed(backend, "uid-1", FW) is not None
    commit(backend, {**FW, "block_ttl_seconds": 7})
    commit(backend, {**FW, "block_ttl_seconds": 11})
    store, lay = backend.client.store, backend.layout
    saved = {sv.key: sv.value for sv in store.list_prefix(lay.component_dir("firewall"))}
    backend.purge("firewall")
    time.sleep(0.01)  # registrations are stamped from the clock in ms
    allow = {**FW, "default_policy": "allow"}
    seen = claim_and_seed(backend, "uid-2", allow)
    assert seen is not None
    registration = seen.state.registration
    assert registration is not None
    assert backend.configs.held_registration("firewall") == registration
    old = inspect(saved[lay.active_config("firewall")]).registration
    assert old is not None and old != registration

    # History above the new record, then the record, ACTIVE and MASTER (version 3).
    for key in (
        lay.history("firewall", 2),
        lay.history("firewall", 3),
        lay.metadata("firewall"),
        lay.active_config("firewall"),
        lay.master_config("firewall"),
    ):
        store.put(key, saved[key])
    state = backend.observe("firewall", utcnow()).state
    expected = config_digest(validate_config("firewall", allow))
    assert (state.active_version, state.active_digest, state.master_digest) == (
        1,
        expected,
        expected,
    )
    assert state.registration == registration and state.master_error is None
    assert backend.state("firewall") == state  # MASTER verifies again: no tolerance needed
    keys = {sv.key: sv.value for sv in store.list_prefix(lay.component_dir("firewall"))}
    assert lay.history("firewall", 2) not in keys and lay.history("firewall", 3) not in keys
    for key in (lay.master_config("firewall"), lay.active_config("firewall")):
        assert inspect(keys[key]).registration == registration, key
    kinds = [a.kind for a in alerts]
    for kind in ("RegistrationReplayed", "RegistrationReplayRemoved", "MasterRestored"):
        assert kind in kinds, kind
    # And the next commit is version 2 of the new registration.
    assert commit(backend, {**allow, "block_ttl_seconds": 9}) == 2


def test_a_seed_after_etcd_lost_the_data_moves_the_repairs_to_the_new_registration(
    backend: LibraryBackend,
) -> None:
    seen = claim_and_seed(backend, "uid-1", FW)
    assert seen is not None
    old = seen.state.registration
    store, lay = backend.client.store, backend.layout
    store.delete_prefix(lay.component_dir("firewall"))  # etcd lost the data
    time.sleep(0.01)
    # The next reconcile: the declare with the status's anchor (the lost registration), then
    # the seed of the empty name, whose registration the status anchors from now on.
    digest = config_digest(validate_config("firewall", FW))
    policy = StoragePolicy.from_options(EnvelopeOptions())
    declared = backend.declare(
        "firewall",
        "firewall",
        json_schema=None,
        storage=policy,
        digest=digest,
        modified_by=BY,
        registration=old,
    )
    assert declared.state is not None and declared.state.active_version is None
    new = backend.seed("firewall", "firewall", FW, json_schema=None, modified_by=BY).registration
    assert new is not None and new != old
    # The record stops verifying (its MAC removed): the monitor's read re-signs it for the
    # registration just seeded, not the lost one (nothing of which is left).
    meta_key = lay.metadata("firewall")
    stored = store.get(meta_key)
    assert stored is not None
    doc = json.loads(stored.value)
    del doc["auth"]
    store.put(meta_key, json.dumps(doc).encode())
    state = backend.observe("firewall", utcnow()).state
    assert (state.registration, state.active_version, state.active_digest) == (new, 1, digest)


# --- the reconcile on the real etcd (the unit harness's fake Kubernetes API) -----------------


def _harness(backend: LibraryBackend, uid: str) -> Harness:
    return Harness(backend=backend, uid=uid)  # type: ignore[arg-type]


SNIFFER = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth0"}


def _restored_from_before_a_purge(backend: LibraryBackend) -> tuple[Harness, int, int]:
    """A resource at version 3, its keys saved (the snapshot), deleted with retention Purge and
    created again (registration two), then the snapshot's keys put back in place of its own.
    Returns the new resource's harness, the older and the anchored registration."""
    store, lay = backend.client.store, backend.layout
    first = _harness(backend, "uid-1")
    for n in range(3):
        asyncio.run(first.reconcile(spec({**SNIFFER, "snaplen": 100 + n})))
    saved = [
        (sv.key, sv.value)
        for prefix in (lay.component_dir(NAME), lay.owner(NAME))
        for sv in store.list_prefix(prefix)
    ]
    asyncio.run(
        _reconcile.apply_retention(
            first.rt, first.body(spec(SNIFFER), {}), NAMESPACE, NAME, "Purge", LOG
        )
    )
    time.sleep(0.01)  # registrations are stamped from the clock in ms
    h = _harness(backend, "uid-2")
    asyncio.run(h.reconcile(spec(SNIFFER)))
    anchored = h.kube.status["registration"]
    old = inspect(dict(saved)[lay.active_config(NAME)]).registration
    assert old is not None and old < anchored
    store.delete_prefix(lay.component_dir(NAME))
    for key, value in saved:
        store.put(key, value)
    return h, old, anchored


def test_a_restored_older_registration_on_another_cluster_is_reseeded_by_the_reconcile(
    backend: LibraryBackend,
) -> None:
    h, old, anchored = _restored_from_before_a_purge(backend)
    # The anchor was taken on another cluster than the one answering now: a restore (one
    # etcd plays both; only its members could make a new id).
    assert h.kube.status["registrationCluster"] == f"{backend.cluster_id:x}"
    h.kube.status["registrationCluster"] = f"{backend.cluster_id ^ 0xFFFF:x}"
    h.events.clear()
    asyncio.run(h.reconcile(spec({**SNIFFER, "interface": "eth1"})))
    state = backend.state(NAME)
    assert state.registration is not None and state.registration > anchored > old
    assert state.active_version == 1
    assert h.kube.status["registration"] == state.registration
    assert h.kube.status["registrationCluster"] == f"{backend.cluster_id:x}"
    assert "ReseededAfterRestore" in h.reasons() and "RegistrationReplayed" not in h.reasons()
    assert backend.read_claim(NAME)[0] == Claim("default", NAME, "uid-2")
    lay, store = backend.layout, backend.client.store
    for sv in store.list_prefix(lay.component_dir(NAME)):
        if not sv.key.endswith("/metadata"):
            assert inspect(sv.value).registration == state.registration, sv.key
    # A reader that held the anchored registration takes the new one.
    reader = ConfigStore(backend.client)
    reader.hold_registration(NAME, anchored)
    assert reader.get_active(NAME).version == 1


def test_a_restored_older_registration_on_the_same_cluster_is_refused_by_the_reconcile(
    backend: LibraryBackend,
) -> None:
    h, old, anchored = _restored_from_before_a_purge(backend)
    with pytest.raises(kopf.TemporaryError) as info:
        asyncio.run(h.reconcile(spec({**SNIFFER, "interface": "eth1"})))
    assert isinstance(info.value.__cause__, RegistrationReplayError)
    active = backend.client.store.get(backend.layout.active_config(NAME))
    assert active is not None and inspect(active.value).registration == old  # left as it is
    assert h.kube.status["registration"] == anchored
    assert "ReseededAfterRestore" not in h.reasons()


def _kinds(backend: LibraryBackend) -> list[str]:
    """The kinds of the alerts etcd holds for the component (`kubectl defender alerts`)."""
    return [a.reason for a in backend.alerts(NAME, utcnow() - timedelta(hours=1))]


def test_a_monitor_pass_reseeds_a_restored_older_registration_on_another_cluster(
    backend: LibraryBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator that ran through the restore: kopf sees no change of the resource, so no
    reconcile comes. Its monitor pass meets the library's refusal of the restored record and
    re-seeds, as the reconcile would; the library's alerts of that refusal go with the purge,
    the re-seed's own alert is what is left."""
    h, old, anchored = _restored_from_before_a_purge(backend)
    raised: list[Alert] = []
    backend.client.alerter.add_sink(CallableSink(raised.append))
    # The restored cluster: only its members could make a new id (one etcd plays both here).
    restored = backend.cluster_id ^ 0xFFFF
    monkeypatch.setattr(LibraryBackend, "cluster_id", property(lambda self: restored))
    h.events.clear()
    generation = h.generation
    asyncio.run(h.monitor(spec(SNIFFER)))
    assert h.generation == generation  # no reconcile ran
    state = backend.state(NAME)
    assert state.registration is not None and state.registration > anchored > old
    assert state.active_version == 1
    assert h.kube.status["registration"] == state.registration
    assert h.kube.status["registrationCluster"] == f"{restored:x}"
    assert h.kube.status["activeVersion"] == 1
    assert h.reasons().count("ReseededAfterRestore") == 1
    assert backend.read_claim(NAME)[0] == Claim("default", NAME, "uid-2")
    # The library refused the restored record first (alerted), before the operator decided.
    assert "RegistrationReplayed" in [a.kind for a in raised]
    kinds = _kinds(backend)
    assert kinds.count("ReseededAfterRestore") == 1
    assert "RegistrationReplayed" not in kinds and "RegistrationReplayRemoved" not in kinds
    # A reader that held the anchored registration takes the new one; the next pass keeps it.
    reader = ConfigStore(backend.client)
    reader.hold_registration(NAME, anchored)
    assert reader.get_active(NAME).version == 1
    asyncio.run(h.monitor(spec(SNIFFER)))
    assert backend.state(NAME).registration == state.registration
    assert h.reasons().count("ReseededAfterRestore") == 1


def test_a_monitor_pass_refuses_a_restored_older_registration_on_the_same_cluster(
    backend: LibraryBackend,
) -> None:
    # Put back by etcd write access (the cluster id does not change): the pass fails on it as
    # before, every time, and nothing is purged.
    h, old, anchored = _restored_from_before_a_purge(backend)
    for _ in range(2):
        with pytest.raises(RegistrationReplayError):
            asyncio.run(h.monitor(spec(SNIFFER)))
    active = backend.client.store.get(backend.layout.active_config(NAME))
    assert active is not None and inspect(active.value).registration == old
    assert h.kube.status["registration"] == anchored
    assert "ReseededAfterRestore" not in h.reasons() + _kinds(backend)
