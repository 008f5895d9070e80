"""One contract, two Backends: the in-memory one the unit tests drive the operator with, and
`LibraryBackend` on the real 3-member etcd. Every test runs against both, so the in-memory one
cannot drift from what the library does without a test here failing."""

from __future__ import annotations

import copy
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from defender_config import (
    Cadence,
    ChangeKind,
    ConfigFrozenError,
    ConfigValidationError,
    EnvelopeOptions,
    Heartbeater,
    Keyring,
    LibrarySettings,
    NotFoundError,
    StoragePolicy,
    ValueTooLargeError,
    canonical_json,
    config_digest,
    validate_config,
)
from defender_devcluster import etcd_client_settings
from defender_operator._backend import Backend, Declared, InstanceRecord
from defender_operator._decisions.ownership import Claim
from defender_operator._decisions.storage_budget import Footprint, after_commit, new_value_bytes
from defender_operator._keys import MutableKeyringSource
from defender_operator._library_backend import LibraryBackend
from defender_operator._memory_backend import MemoryBackend
from defender_operator._runtime import utcnow

pytestmark = pytest.mark.etcd

BY = "operator:contract"
FW = {"node_id": "fw-01", "version": "1.0.0", "default_policy": "deny", "rules": []}
FW_ALLOW = {**FW, "default_policy": "allow"}
FW_TTL = {**FW, "block_ttl_seconds": 7}
SCHEMA = {
    "type": "object",
    "properties": {"threshold": {"type": "integer", "maximum": 10}},
    "required": ["threshold"],
}


def digest(component_type: str, config: dict[str, Any]) -> str:
    return config_digest(validate_config(component_type, config, None))


@pytest.fixture(params=["memory", "library"])
def backend(request: pytest.FixtureRequest, etcd_prefix: str) -> Iterator[Backend]:
    if request.param == "memory":
        yield MemoryBackend()
        return
    cluster = request.getfixturevalue("defender_etcd")
    settings = LibrarySettings(
        etcd=etcd_client_settings(cluster.endpoints), prefix=etcd_prefix.rstrip("/")
    )
    library = LibraryBackend(settings, MutableKeyringSource(Keyring.generate()), "contract")
    try:
        yield library
    finally:
        library.close()


def seed(backend: Backend, config: dict[str, Any] = FW) -> None:
    backend.seed("firewall", "firewall", config, json_schema=None, modified_by=BY)


def commit(backend: Backend, config: dict[str, Any], history_limit: int = 10) -> int:
    return backend.commit(
        "firewall",
        "firewall",
        config,
        json_schema=None,
        modified_by=BY,
        history_limit=history_limit,
    )


def test_a_commit_above_a_version_etcd_no_longer_shows_passes_it(backend: Backend) -> None:
    # The operator's commit of spec.config again after ACTIVE went back (an etcd restore):
    # above the version it saw last, which readers may have accepted.
    seed(backend)
    assert (
        backend.commit(
            "firewall",
            "firewall",
            FW_ALLOW,
            json_schema=None,
            modified_by=BY,
            history_limit=10,
            above=4,
        )
        == 5
    )
    assert backend.state("firewall").active_version == 5
    assert commit(backend, FW_TTL) == 6
    assert backend.rollback("firewall", 5, modified_by=BY, history_limit=10) == 7


def test_an_absent_component_has_nothing(backend: Backend) -> None:
    state = backend.state("firewall")
    assert (state.master_digest, state.active_digest, state.active_version) == (None, None, None)
    assert not state.frozen
    assert backend.read_claim("firewall") == (None, 0)
    assert backend.cadence("firewall") is None
    with pytest.raises(NotFoundError):
        commit(backend, FW)
    with pytest.raises(NotFoundError):
        backend.rollback("firewall", None, modified_by=BY, history_limit=10)


def test_seed_writes_master_once(backend: Backend) -> None:
    seed(backend)
    state = backend.state("firewall")
    assert state.active_version == 1
    assert state.master_digest == state.active_digest == digest("firewall", FW)
    assert not state.active_rollback
    assert state.active_modified is not None
    assert utcnow() - state.active_modified < timedelta(minutes=5)
    # A second seed with another config keeps MASTER and ACTIVE as they are.
    again = backend.seed("firewall", "firewall", FW_ALLOW, json_schema=None, modified_by=BY)
    assert again == backend.state("firewall")
    assert (again.active_version, again.master_digest) == (1, digest("firewall", FW))


def test_an_invalid_seed_writes_nothing(backend: Backend) -> None:
    with pytest.raises(ConfigValidationError):
        seed(backend, {**FW, "default_policy": "maybe"})
    assert backend.state("firewall").active_version is None


def test_commits_make_versions_and_an_unchanged_config_makes_none(backend: Backend) -> None:
    seed(backend)
    assert commit(backend, FW_ALLOW) == 2
    assert commit(backend, FW_ALLOW) == 2  # same config: no new version
    state = backend.state("firewall")
    assert (state.active_version, state.active_digest) == (2, digest("firewall", FW_ALLOW))
    assert state.master_digest == digest("firewall", FW)
    with pytest.raises(ConfigValidationError):
        commit(backend, {**FW, "default_policy": "maybe"})
    assert backend.state("firewall").active_version == 2


def test_rollbacks_are_new_versions(backend: Backend) -> None:
    seed(backend)
    commit(backend, FW_ALLOW)
    commit(backend, FW_TTL)
    assert backend.rollback("firewall", None, modified_by=BY, history_limit=10) == 4
    state = backend.state("firewall")
    assert state.active_digest == digest("firewall", FW) and state.active_rollback
    assert backend.rollback("firewall", 2, modified_by=BY, history_limit=10) == 5
    assert backend.state("firewall").active_digest == digest("firewall", FW_ALLOW)
    with pytest.raises(NotFoundError):
        backend.rollback("firewall", 99, modified_by=BY, history_limit=10)
    assert commit(backend, FW_TTL) == 6
    assert not backend.state("firewall").active_rollback


def test_history_keeps_only_the_newest_versions(backend: Backend) -> None:
    seed(backend)
    for i in range(4):
        commit(backend, {**FW, "block_ttl_seconds": 10 + i}, history_limit=2)
    assert backend.state("firewall").active_version == 5
    with pytest.raises(NotFoundError):
        backend.rollback("firewall", 2, modified_by=BY, history_limit=10)
    assert backend.rollback("firewall", 4, modified_by=BY, history_limit=10) == 6


@pytest.mark.parametrize("limit", [2, 12])
def test_a_promotion_keeps_the_history_limit_the_spec_gives_not_the_default(
    backend: Backend, limit: int
) -> None:
    # Below the default (10) it must prune what was not budgeted; above it, keep the
    # rollback points a person asked for. 11 commits: more versions than either keeps.
    seed(backend)
    for i in range(11):
        commit(backend, {**FW, "block_ttl_seconds": 10 + i}, history_limit=limit)
    before = backend.footprint("firewall")
    assert set(before.history) == set(range(max(1, 13 - limit), 13))
    # What the storage budget judged the canary's start by (`check_commit`, the same limit).
    size = len(canonical_json(validate_config("firewall", FW_ALLOW, None)))
    projected = after_commit(before, new_value_bytes(size), 13, limit)
    backend.start_rollout("firewall", FW_ALLOW, ["fw-0"], by=BY)
    assert backend.promote_rollout("firewall", by=BY, history_limit=limit) == 13
    promoted = backend.footprint("firewall")
    assert set(promoted.history) == set(range(14 - limit, 14))
    assert promoted.total <= projected


def test_a_promotion_with_a_history_limit_below_1_is_refused_with_nothing_written(
    backend: Backend,
) -> None:
    seed(backend)
    record = backend.start_rollout("firewall", FW_ALLOW, ["fw-0"], by=BY)
    with pytest.raises(ValueError, match="history_limit must be at least 1, not 0"):
        backend.promote_rollout("firewall", by=BY, history_limit=0)
    assert backend.rollout("firewall") == record
    assert backend.state("firewall").active_version == 1
    assert set(backend.footprint("firewall").history) == {1}


def eleven_commits(backend: Backend, limit: int) -> None:
    """Versions 1-12 under `limit`: more versions than either limit below keeps."""
    seed(backend)
    for i in range(11):
        commit(backend, {**FW, "block_ttl_seconds": 10 + i}, history_limit=limit)
    assert set(backend.footprint("firewall").history) == set(range(max(1, 13 - limit), 13))


@pytest.mark.parametrize("limit", [2, 12])
def test_a_rollback_keeps_the_history_limit_the_spec_gives_not_the_default(
    backend: Backend, limit: int
) -> None:
    # A rollback is a new version: it prunes like a commit, to the spec's limit, not 10.
    eleven_commits(backend, limit)
    assert backend.rollback("firewall", 12, modified_by=BY, history_limit=limit) == 13
    assert set(backend.footprint("firewall").history) == set(range(14 - limit, 14))
    # To MASTER (the invalid-config policy's revert, the breaker's when it names none).
    change = ChangeKind.INVALID_REVERT
    assert backend.rollback("firewall", None, modified_by=BY, change=change, history_limit=limit)
    assert set(backend.footprint("firewall").history) == set(range(15 - limit, 15))


@pytest.mark.parametrize("limit", [2, 12])
def test_an_abort_keeps_the_history_limit_the_spec_gives_not_the_default(
    backend: Backend, limit: int
) -> None:
    # The base written again is a new version, pruning like the promotion it replaces.
    eleven_commits(backend, limit)
    backend.start_rollout("firewall", FW_ALLOW, ["fw-0"], by=BY)
    assert backend.abort_rollout("firewall", "failed", by=BY, history_limit=limit) == 13
    assert set(backend.footprint("firewall").history) == set(range(14 - limit, 14))
    assert backend.state("firewall").frozen


def test_a_rollback_or_abort_with_a_history_limit_below_1_is_refused_with_nothing_written(
    backend: Backend,
) -> None:
    seed(backend)
    with pytest.raises(ValueError, match="history_limit must be at least 1, not 0"):
        backend.rollback("firewall", None, modified_by=BY, history_limit=0)
    record = backend.start_rollout("firewall", FW_ALLOW, ["fw-0"], by=BY)
    with pytest.raises(ValueError, match="history_limit must be at least 1, not 0"):
        backend.abort_rollout("firewall", "failed", by=BY, history_limit=0)
    # Neither frozen nor ended: a refused abort leaves the rollout to be judged again.
    assert backend.rollout("firewall") == record
    state = backend.state("firewall")
    assert (state.active_version, state.frozen) == (1, False)
    assert set(backend.footprint("firewall").history) == {1}


def test_a_commit_with_a_history_limit_below_1_is_refused_with_nothing_written(
    backend: Backend,
) -> None:
    seed(backend)
    with pytest.raises(ValueError, match="history_limit must be at least 1, not 0"):
        commit(backend, FW_ALLOW, history_limit=0)
    assert backend.state("firewall").active_version == 1
    assert set(backend.footprint("firewall").history) == {1}


def test_a_freeze_refuses_commits_but_not_rollbacks(backend: Backend) -> None:
    seed(backend)
    commit(backend, FW_ALLOW)
    backend.freeze("firewall", "breaker tripped")
    assert backend.state("firewall").frozen
    with pytest.raises(ConfigFrozenError):
        commit(backend, FW_TTL)
    assert backend.rollback("firewall", 1, modified_by=BY, history_limit=10) == 3
    backend.unfreeze("firewall")
    assert not backend.state("firewall").frozen
    assert commit(backend, FW_TTL) == 4


def test_commits_validate_against_the_schema_they_are_given(backend: Backend) -> None:
    backend.seed("scorer", "custom", {"threshold": 3}, json_schema=SCHEMA, modified_by=BY)
    with pytest.raises(ConfigValidationError):
        backend.commit(
            "scorer",
            "custom",
            {"threshold": 50},
            json_schema=SCHEMA,
            modified_by=BY,
            history_limit=10,
        )
    assert backend.state("scorer").active_version == 1
    laxer = {**SCHEMA, "properties": {"threshold": {"type": "integer"}}}
    assert (
        backend.commit(
            "scorer",
            "custom",
            {"threshold": 50},
            json_schema=laxer,
            modified_by=BY,
            history_limit=10,
        )
        == 2
    )


def test_rollbacks_record_their_kind(backend: Backend) -> None:
    seed(backend)
    commit(backend, FW_ALLOW)
    assert not backend.state("firewall").active_rollback
    backend.rollback(
        "firewall", 1, modified_by=BY, change=ChangeKind.BREAKER_REVERT, history_limit=10
    )
    assert backend.state("firewall").active_rollback


def test_a_config_over_the_request_limit_is_refused_whole(backend: Backend) -> None:
    huge = {**FW, "rules": [], "note": secrets.token_urlsafe(3_000_000)}
    backend.seed(
        "scorer",
        "custom",
        {"threshold": 3},
        json_schema={"type": "object"},
        modified_by=BY,
    )
    with pytest.raises(ValueTooLargeError):
        backend.commit(
            "scorer",
            "custom",
            huge,
            json_schema={"type": "object"},  # valid whichever schema the backend applies
            modified_by=BY,
            history_limit=10,
        )
    assert backend.state("scorer").active_version == 1
    with pytest.raises(ValueTooLargeError):
        backend.seed("big", "custom", huge, json_schema={"type": "object"}, modified_by=BY)
    assert backend.state("big").active_version is None


def test_owner_claims_are_compare_and_swap(backend: Backend) -> None:
    owner = Claim("default", "firewall", "uid-1")
    assert backend.write_claim("firewall", owner, revision=0)
    assert not backend.write_claim("firewall", Claim("tenant-b", "firewall", "uid-9"), revision=0)
    held, revision = backend.read_claim("firewall")
    assert held == owner and revision > 0
    released = Claim("default", "firewall", "uid-1", released=True)
    assert not backend.write_claim("firewall", released, revision=revision + 1000)
    assert backend.write_claim("firewall", released, revision=revision)
    assert backend.read_claim("firewall")[0] == released


def test_a_claim_and_a_seed_land_together_only_on_a_name_that_holds_nothing(
    backend: Backend,
) -> None:
    owner = Claim("default", "firewall", "uid-1")
    cadence = Cadence(interval_seconds=5, allowed_misses=2, by=BY)
    since = utcnow() - timedelta(seconds=5)

    def claim_and_seed(config: dict[str, Any] = FW) -> Any:
        return backend.claim_and_seed(
            "firewall",
            "firewall",
            config,
            claim=owner,
            json_schema=None,
            modified_by=BY,
            cadence=cadence,
            alerts_since=since,
        )

    # What a new component may hold already: a freeze and alerts (neither claims the name).
    backend.freeze("firewall", "before it existed")
    backend.alert("Misconfigured", "firewall", "raised before the resource existed")
    seen = claim_and_seed()
    assert seen is not None
    # What observe reads right after, from the seed's own transaction.
    observed = backend.observe("firewall", since)
    assert seen.state == observed.state == backend.state("firewall")
    assert (seen.state.active_version, seen.state.active_digest, seen.state.frozen) == (
        1,
        digest("firewall", FW),
        True,
    )
    assert cadence.same_rhythm(seen.cadence) and cadence.same_rhythm(observed.cadence)
    assert list(seen.alerts) == list(observed.alerts)
    assert "Misconfigured" in [a.reason for a in seen.alerts]
    assert seen.rollout is None and 0 < seen.revision <= observed.revision
    assert backend.read_claim("firewall")[0] == owner
    # Held: nothing written, neither the claim nor the config.
    assert claim_and_seed(FW_ALLOW) is None
    assert backend.state("firewall").active_digest == digest("firewall", FW)
    # MASTER without a claim (seeded before claims existed): no claim written with a seed.
    backend.purge("firewall")
    seed(backend, FW_ALLOW)
    assert claim_and_seed() is None
    assert backend.read_claim("firewall") == (None, 0)
    # A claim without data (another resource's, just written): nothing written either.
    backend.purge("firewall")
    backend.write_claim("firewall", Claim("tenant-b", "firewall", "uid-9"), revision=0)
    assert claim_and_seed() is None
    assert backend.state("firewall").master_digest is None


def test_a_name_seeded_again_above_a_registration_gets_one_above_it(backend: Backend) -> None:
    # The operator's re-seed after a restore (`_reconcile.reseed_after_restore`): purged, then
    # claimed and seeded above the registration readers hold, whatever the clock says.
    def claim_and_seed(uid: str, above: int = 0) -> Any:
        return backend.claim_and_seed(
            "firewall",
            "firewall",
            FW,
            claim=Claim("default", "firewall", uid),
            json_schema=None,
            modified_by=BY,
            cadence=Cadence(interval_seconds=5, allowed_misses=2, by=BY),
            alerts_since=utcnow(),
            registration_above=above,
        )

    seen = claim_and_seed("uid-1")
    assert seen is not None and seen.state.registration is not None
    assert backend.cluster_id is not None  # the cluster that answered (etcd: its header)
    above = seen.state.registration + 10**9
    backend.purge("firewall")
    again = claim_and_seed("uid-2", above)
    assert again is not None and again.state.registration == above + 1
    assert backend.state("firewall").registration == above + 1
    assert backend.read_claim("firewall")[0] == Claim("default", "firewall", "uid-2")


def test_storage_policy_changes_only_when_different(backend: Backend) -> None:
    policy = StoragePolicy(compress=True, encrypt=True, level=3, threshold_bytes=64)
    backend.seed("firewall", "firewall", FW, json_schema=None, modified_by=BY, storage=policy)
    assert backend.state("firewall").storage == policy
    assert not backend.set_storage("firewall", policy, modified_by=BY)
    other = StoragePolicy(compress=False, encrypt=True, level=3, threshold_bytes=64)
    assert backend.set_storage("firewall", other, modified_by=BY)
    state = backend.state("firewall")
    assert (state.storage, state.active_version) == (other, 1)


def test_purge_removes_the_component_and_its_claim(backend: Backend) -> None:
    seed(backend)
    commit(backend, FW_ALLOW)
    backend.freeze("firewall", "x")
    backend.write_claim("firewall", Claim("default", "firewall", "uid-1"), revision=0)
    assert backend.purge("firewall") > 0
    state = backend.state("firewall")
    assert (state.active_version, state.frozen) == (None, False)
    assert backend.read_claim("firewall") == (None, 0)


def test_cadence_and_alerts_round_trip(backend: Backend) -> None:
    cadence = Cadence(interval_seconds=5, allowed_misses=2, by=BY)
    backend.publish_cadence("firewall", cadence)
    stored = backend.cadence("firewall")
    assert cadence.same_rhythm(stored)
    since = utcnow() - timedelta(seconds=5)
    backend.alert("Misconfigured", "firewall", "two instances report UnknownKey")
    found = [a for a in backend.alerts("firewall", since) if a.reason == "Misconfigured"]
    assert [a.detail for a in found] == ["two instances report UnknownKey"]
    assert backend.alerts("firewall", utcnow() + timedelta(minutes=5)) == []


def test_observe_is_state_cadence_and_alerts_as_one_read(backend: Backend) -> None:
    empty = backend.observe("firewall", utcnow() - timedelta(minutes=1))
    assert (empty.state.active_version, empty.cadence, list(empty.alerts)) == (None, None, [])
    seed(backend)
    backend.freeze("firewall", "hold")
    cadence = Cadence(interval_seconds=5, allowed_misses=2, by=BY)
    backend.publish_cadence("firewall", cadence)
    since = utcnow() - timedelta(seconds=5)
    backend.alert("Misconfigured", "firewall", "two instances report UnknownKey")
    seen = backend.observe("firewall", since)
    assert seen.state == backend.state("firewall", tolerate_master=True)
    assert seen.state.frozen and seen.state.active_version == 1
    assert cadence.same_rhythm(seen.cadence)
    assert list(seen.alerts) == list(backend.alerts("firewall", since))
    assert "Misconfigured" in [a.reason for a in seen.alerts]
    assert list(backend.observe("firewall", utcnow() + timedelta(minutes=5)).alerts) == []


def test_the_change_watch_hears_every_write_an_observe_reads_and_no_other(
    backend: Backend,
) -> None:
    got: list[tuple[str, int, bool]] = []
    handle = backend.watch_changes(lambda *change: got.append(change), lambda exc: None)
    try:
        seed(backend)
        first = backend.observe("firewall", utcnow() - timedelta(minutes=1))
        assert 0 < first.revision <= backend.revision()
        backend.write_claim("firewall", Claim("ns", "firewall", "uid"), revision=0)  # no view
        for write in (
            lambda: backend.publish_cadence(
                "firewall", Cadence(interval_seconds=5, allowed_misses=2, by=BY)
            ),
            lambda: backend.freeze("firewall", "hold"),
            lambda: backend.unfreeze("firewall"),  # a delete
            lambda: backend.alert("Misconfigured", "firewall", "reported"),
            lambda: commit(backend, FW_ALLOW),
        ):
            before = max((r for _, r, _ in got), default=0)
            write()
            deadline = time.monotonic() + 15
            while max((r for _, r, _ in got), default=0) <= before:
                assert time.monotonic() < deadline, "the change watch did not hear a write"
                time.sleep(0.02)
        assert {c for c, _, _ in got} == {"firewall"}
        assert not any(replayed for _, _, replayed in got)
        last = backend.observe("firewall", utcnow() - timedelta(minutes=1))
        assert last.revision >= max(r for _, r, _ in got) > first.revision
        assert last.state.active_version == 2
    finally:
        handle.cancel()


@pytest.mark.parametrize("backend", ["library"], indirect=True)  # leases live in etcd only
def test_last_seen_without_asking_answers_only_what_a_sighting_knows(backend: Backend) -> None:
    # The monitor asks without a thread first (`_monitor._last_seen`) and only falls back to
    # a blocking read when this says None.
    assert isinstance(backend, LibraryBackend)
    hb = Heartbeater(
        backend.client, "firewall", "fw-0", interval_seconds=1, allowed_misses=10
    ).start()
    try:
        [rec] = backend.instances("firewall")
        assert backend.last_seen("firewall", [rec], ask=False) is None  # never sighted: must ask
        asked = backend.last_seen("firewall", [rec])
        assert asked is not None and backend.last_seen("firewall", [rec], ask=False) == asked
        leaseless = replace(rec, lease_id=0)
        assert backend.last_seen("firewall", [leaseless], ask=False) == [leaseless]
    finally:
        hb.stop()


@pytest.mark.parametrize("backend", ["library"], indirect=True)  # leases live in etcd only
def test_last_seen_follows_an_instance_onto_its_new_lease(backend: Backend) -> None:
    # A monitor pass that read the record just before a cadence change moved it to a new
    # lease (the old one revoked) must not judge the instance silent since the old record.
    assert isinstance(backend, LibraryBackend)
    hb = Heartbeater(
        backend.client, "firewall", "fw-0", interval_seconds=0.5, allowed_misses=4
    ).start()
    try:
        [rec] = backend.instances("firewall")
        assert rec.verified
        time.sleep(1)  # the record ages while its lease is renewed
        backend.publish_cadence("firewall", Cadence(interval_seconds=0.5, allowed_misses=6))
        deadline = time.monotonic() + 10
        while backend.client.store.lease_ttl(rec.lease_id) >= 0:
            assert time.monotonic() < deadline, "the heartbeater did not move to a new lease"
            time.sleep(0.1)
        [moved] = backend.instances("firewall")
        assert moved.lease_id != rec.lease_id
        time.sleep(2)  # renewed on the new lease since
        asked = backend.last_seen("firewall", [rec])
        assert asked is not None
        [seen] = asked
        assert seen.time > moved.time + timedelta(seconds=0.5)
        assert utcnow() - seen.time < timedelta(seconds=1.5)
        # An unverified record leads to no other record: its own time.
        unverified = replace(rec, verified=False)
        assert backend.last_seen("firewall", [unverified]) == [unverified]
    finally:
        hb.stop()


def test_a_footprint_counts_what_the_component_keeps_and_a_commit_never_exceeds_its_projection(
    backend: Backend,
) -> None:
    assert backend.footprint("firewall") == Footprint()
    seed(backend)
    seeded = backend.footprint("firewall")
    assert seeded.active > 0 and set(seeded.history) == {1}
    # MASTER and the metadata are counted beside ACTIVE and the history.
    assert seeded.total > seeded.active + sum(seeded.history.values())
    configs = [{**FW, "node_id": f"fw-{n:02d}", "rules": []} for n in range(2, 6)]
    now = seeded
    for version, config in enumerate(configs, start=2):
        size = len(canonical_json(validate_config("firewall", config, None)))
        projected = after_commit(now, new_value_bytes(size), version, 2)
        assert commit(backend, config, history_limit=2) == version
        now = backend.footprint("firewall")
        # The newest two kept, the rest pruned; the projection never counts less than etcd holds.
        assert set(now.history) == {version - 1, version}
        assert now.total <= projected
    # An instance's record is the agent's, and goes with its pod: not counted.
    if isinstance(backend, MemoryBackend):
        record = InstanceRecord(instance="fw-0", pod="fw-0", time=utcnow(), verified=True)
        backend.add_instance("firewall", record)
        assert backend.footprint("firewall") == now
        return
    assert isinstance(backend, LibraryBackend)
    hb = Heartbeater(
        backend.client, "firewall", "fw-0", interval_seconds=1, allowed_misses=10
    ).start()
    try:
        assert backend.instances("firewall")
        assert backend.footprint("firewall") == now
    finally:
        hb.stop()


def test_the_namespace_owning_each_component_is_named_by_its_owner_record(
    backend: Backend,
) -> None:
    assert backend.owners() == {}
    for component, owner in (
        ("firewall", Claim("team-a", "firewall", "uid-1")),
        ("ids", Claim("team-a", "ids", "uid-2", released=True)),  # deleted with retention Keep
        ("rag", Claim("team-b", "rag", "uid-3")),
        ("sniffer", Claim("team-a", "sniffer", "uid-4")),
    ):
        assert backend.write_claim(component, owner, revision=0)
    # A record that is not readable names nobody.
    if isinstance(backend, MemoryBackend):
        backend.garble_claim("sniffer")
    else:
        assert isinstance(backend, LibraryBackend)
        backend.client.store.put(backend.layout.owner("sniffer"), b"not a record")
    assert backend.owners() == {"firewall": "team-a", "ids": "team-a", "rag": "team-b"}


def declare_scorer(
    backend: Backend,
    schema: dict[str, Any],
    cap: int | None,
    *,
    threshold: int = 3,
    registration: int | None = None,
) -> Declared:
    """The scorer's declare with `schema` under the schema `cap`, for a config of `threshold`."""
    return backend.declare(
        "scorer",
        "custom",
        json_schema=schema,
        storage=StoragePolicy.from_options(EnvelopeOptions()),
        digest=config_digest({"threshold": threshold}),
        modified_by=BY,
        registration=registration,
        schema_cap=cap,
    )


def test_a_declare_records_a_schema_growing_the_record_past_its_cap_only_once_judged(
    backend: Backend,
) -> None:
    backend.seed("scorer", "custom", {"threshold": 3}, json_schema=SCHEMA, modified_by=BY)
    before = backend.footprint("scorer").total
    larger = {**SCHEMA, "description": "x" * 2000}

    def declare(schema: dict[str, Any], cap: int | None) -> Declared:
        return declare_scorer(backend, schema, cap)

    capped = declare(larger, 0)
    assert capped.schema_capped and capped.schema_growth >= 2000
    assert backend.footprint("scorer").total == before  # nothing of it written
    below = declare(larger, capped.schema_growth - 1)
    assert below.schema_capped and below.schema_growth == capped.schema_growth
    # Within the cap (what the operator judged): recorded, the growth as the footprint counts it.
    recorded = declare(larger, capped.schema_growth)
    assert not recorded.schema_capped and recorded.schema_growth == capped.schema_growth
    assert backend.footprint("scorer").total == before + recorded.schema_growth
    # The same schema, or a smaller one, passes any cap, a namespace already over its budget's.
    same = declare(larger, -1)
    assert not same.schema_capped and same.schema_growth == 0
    shrunk = declare(SCHEMA, -1)
    assert not shrunk.schema_capped and shrunk.schema_growth == -recorded.schema_growth
    assert backend.footprint("scorer").total == before
    # No budget applies: no cap, nothing measured.
    unlimited = declare(larger, None)
    assert not unlimited.schema_capped and unlimited.schema_growth == 0
    assert backend.footprint("scorer").total == before + recorded.schema_growth


def test_a_declare_leaves_a_schema_active_is_not_valid_under_to_the_next_commit(
    backend: Backend,
) -> None:
    backend.seed("scorer", "custom", {"threshold": 3}, json_schema=SCHEMA, modified_by=BY)
    before = backend.footprint("scorer").total
    stricter = {**SCHEMA, "properties": {"threshold": {"type": "integer", "maximum": 2}}}
    declared = declare_scorer(backend, stricter, 10**6)
    # Not recorded (ACTIVE, threshold 3, is not valid under it): nothing grew.
    assert not declared.schema_capped and declared.schema_growth == 0
    assert backend.footprint("scorer").total == before
    assert (
        backend.commit(
            "scorer",
            "custom",
            {"threshold": 2},
            json_schema=stricter,
            modified_by=BY,
            history_limit=10,
        )
        == 2
    )


def recorded_schema(backend: Backend, component: str) -> dict[str, Any] | None:
    """The custom schema the component's metadata record holds (later commits' schema)."""
    if isinstance(backend, MemoryBackend):
        return backend.components[component].json_schema
    assert isinstance(backend, LibraryBackend)
    meta = backend.configs.get_metadata(component)
    assert meta is not None
    return meta.json_schema


def record_of_an_earlier_registration_put_back(backend: Backend) -> tuple[int, Callable[[], None]]:
    """`scorer` (SCHEMA) seeded, its record saved by someone with etcd access, the name purged
    and seeded again (a new registration), and the saved record put back over the new one's.
    Returns the new registration (the one a declare anchors, so the record is re-signed) and
    a way to put the saved record back again."""
    backend.seed("scorer", "custom", {"threshold": 3}, json_schema=SCHEMA, modified_by=BY)
    if isinstance(backend, MemoryBackend):
        saved = copy.deepcopy(backend.components["scorer"])

        def put_back() -> None:
            backend.put_back("scorer", saved)
    else:
        assert isinstance(backend, LibraryBackend)
        meta_key = backend.layout.metadata("scorer")
        found = backend.client.store.get(meta_key)
        assert found is not None
        saved_record = found.value

        def put_back() -> None:
            backend.client.store.put(meta_key, saved_record)

    backend.purge("scorer")
    backend.seed("scorer", "custom", {"threshold": 3}, json_schema=SCHEMA, modified_by=BY)
    registration = backend.state("scorer").registration
    assert registration is not None
    put_back()
    return registration, put_back


def test_a_resign_records_no_schema_growing_the_record_past_its_cap_before_it_is_judged(
    backend: Backend,
) -> None:
    # The declare re-signs a record that is not this registration's, rebuilt with the spec's
    # schema: a larger one than the record held is judged (capped) first, nothing written.
    registration, _ = record_of_an_earlier_registration_put_back(backend)
    before = backend.footprint("scorer").total
    larger = {**SCHEMA, "description": "x" * 2000}

    def declare(schema: dict[str, Any], cap: int | None) -> Declared:
        return declare_scorer(backend, schema, cap, registration=registration)

    capped = declare(larger, 0)
    assert capped.schema_capped and capped.schema_growth >= 2000 and not capped.resigned
    # Nothing written: the record put back is left as it was (not re-signed), the name's
    # bytes unchanged.
    assert backend.footprint("scorer").total == before
    assert recorded_schema(backend, "scorer") == SCHEMA
    # Within the cap the operator judged: re-signed, holding the schema, its growth said.
    resigned = declare(larger, capped.schema_growth)
    assert resigned.resigned and not resigned.schema_capped
    assert resigned.schema_growth == capped.schema_growth
    assert recorded_schema(backend, "scorer") == larger
    assert backend.state("scorer").registration == registration


def test_a_resign_with_the_schema_the_record_holds_passes_any_cap(backend: Backend) -> None:
    # The same content signed again (the spec's schema is the one the record held): never
    # judged, so never refused, even in a namespace over its budget (a cap below 0).
    registration, _ = record_of_an_earlier_registration_put_back(backend)
    resigned = declare_scorer(backend, SCHEMA, -1, registration=registration)
    assert resigned.resigned and not resigned.schema_capped and resigned.schema_growth == 0
    assert recorded_schema(backend, "scorer") == SCHEMA
    assert backend.state("scorer").registration == registration


def test_a_promotion_records_no_schema_a_declare_left_to_the_next_commit(
    backend: Backend,
) -> None:
    # A schema ACTIVE is not valid under waits for a commit of spec.config; a canary's
    # promotion commits the candidate under the schema the record holds, so the new one is
    # still unrecorded after it, and the next declare judges it (capped) as any growth.
    backend.seed("scorer", "custom", {"threshold": 3}, json_schema=SCHEMA, modified_by=BY)
    stricter = {
        **SCHEMA,
        "properties": {"threshold": {"type": "integer", "maximum": 2}},
        "description": "x" * 2000,
    }

    def declare(cap: int | None) -> Declared:
        return declare_scorer(backend, stricter, cap, threshold=2)

    assert declare(10**6).schema_growth == 0  # not recorded: ACTIVE (3) is over its maximum
    backend.start_rollout("scorer", {"threshold": 2}, ["scorer-0"], by=BY)
    assert backend.promote_rollout("scorer", by=BY, history_limit=10) == 2
    assert recorded_schema(backend, "scorer") == SCHEMA
    capped = declare(0)
    assert capped.schema_capped and capped.schema_growth >= 2000
    assert recorded_schema(backend, "scorer") == SCHEMA


def test_a_schema_a_declare_left_capped_is_not_re_signed_by_a_read_meanwhile(
    backend: Backend,
) -> None:
    # A read that finds the record not verifying re-signs it with the spec a declare gave
    # (the library's monitor reads): never with a schema that declare left capped (the
    # operator refuses it, or has not judged it yet), but the one the declare before passed.
    registration, put_back = record_of_an_earlier_registration_put_back(backend)

    def declare(schema: dict[str, Any]) -> Declared:
        return declare_scorer(backend, schema, 0, registration=registration)

    assert declare(SCHEMA).resigned
    put_back()
    assert declare({**SCHEMA, "description": "x" * 2000}).schema_capped
    seen = backend.state("scorer")
    if isinstance(backend, LibraryBackend):  # the in-memory one re-signs in declare only
        assert seen.registration == registration
    assert recorded_schema(backend, "scorer") == SCHEMA
