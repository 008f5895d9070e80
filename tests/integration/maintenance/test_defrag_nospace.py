"""`kubectl defender defrag` and the NOSPACE alarm on real 3-member etcd clusters."""

from __future__ import annotations

import pytest

from conftest import SMALL_QUOTA_BYTES, run_cli
from defender_config import (
    CompactionLagError,
    EtcdSettings,
    StoreNoSpaceError,
    defragment_cluster,
)
from defender_config.store import ETCD_REQUEST_LIMIT_BYTES, EtcdStore
from defender_devcluster import EtcdCluster, etcd_client_settings, wait_for

pytestmark = pytest.mark.etcd

CHUNK = b"z" * (200 * 1024)


def store_for(cluster: EtcdCluster, **overrides: object) -> EtcdStore:
    """A store on `cluster` once every member answers its status: a defrag plans on that
    health report and skips a cluster with a member not serving, which a member just started
    on a loaded machine can be for a moment (seen once: "not serving" on a fresh cluster)."""
    store = EtcdStore(
        EtcdSettings.model_validate({**etcd_client_settings(cluster.endpoints), **overrides})
    )
    wait_for(
        "every member serving",
        lambda: all(m.serving for m in store.health().members),
        timeout=60,
    )
    return store


def flags(cluster: EtcdCluster) -> list[str]:
    return ["--etcd-endpoints", ",".join(cluster.endpoints), "-o", "json"]


def grow(store: EtcdStore, rounds: int) -> None:
    """Rewrite one key: every old revision stays in the database until compaction."""
    for _ in range(rounds):
        store.put("/ml-defender/test/big", CHUNK)


def fill_until_nospace(store: EtcdStore) -> StoreNoSpaceError:
    for _ in range(4 * SMALL_QUOTA_BYTES // len(CHUNK)):
        try:
            store.put("/ml-defender/test/big", CHUNK)
        except StoreNoSpaceError as exc:
            return exc
    raise AssertionError(f"no NOSPACE after writing {4 * SMALL_QUOTA_BYTES} bytes")


def test_defrag_goes_through_followers_first_and_the_leader_last(
    fresh_etcd: EtcdCluster,
) -> None:
    with store_for(fresh_etcd) as store:
        grow(store, 10)
        leader = next(m for m in store.health().members if m.is_leader).endpoint

        def applied() -> bool:
            # A follower applies the writes a little later (seen under load), and bbolt writes
            # applied revisions to its file in batches: a member's file may still have its empty
            # size right after the writes (CI measured 20 KiB on all three, then 224 KiB after
            # the defrag). Measure once every file holds at least half of what was written.
            members = store.health().members
            revisions = {m.revision for m in members}
            written = all((m.db_size_bytes or 0) >= 5 * len(CHUNK) for m in members)
            return len(revisions) == 1 and None not in revisions and written

        wait_for("every member applied and stored the writes", applied, timeout=60, every=0.5)
        before = {m.endpoint: m.db_size_bytes or 0 for m in store.health().members}
        result = run_cli("defrag", "--compact", *flags(fresh_etcd))
        assert result.code == 0, result.err
        data = result.json()
        order = [s["endpoint"] for s in data["steps"]]
        assert len(order) == 3 and len(set(order)) == 3
        assert [s["was_leader"] for s in data["steps"]] == [False, False, True]
        # Checked against the leader the test measured itself, before and after: a busy machine
        # may elect another leader in between, and the defrag must have gone with the one it
        # saw (its own was_leader above).
        after_leader = next(m for m in store.health().members if m.is_leader).endpoint
        assert order[-1] in {leader, after_leader}, (order, leader, after_leader)
        assert data["compacted_to"] is not None
        after = {m.endpoint: m.db_size_bytes or 0 for m in store.health().members}
        # Ten 200 KiB revisions compacted away: every member's file shrank.
        assert all(after[ep] < before[ep] for ep in before), (before, after)


def test_every_member_serves_between_two_defrags(fresh_etcd: EtcdCluster) -> None:
    seen: list[int] = []
    with store_for(fresh_etcd) as store:
        grow(store, 3)

        def after_each(step: object) -> None:
            # The next member is only taken once the whole cluster serves again.
            seen.append(sum(1 for m in store.health().members if m.serving))

        result = defragment_cluster(store, on_step=after_each)
    assert result.skipped is None
    assert seen == [3, 3, 3]


def test_defrag_is_skipped_while_a_member_is_down(fresh_etcd: EtcdCluster) -> None:
    with store_for(fresh_etcd, retries=1, timeout_seconds=2) as store:
        grow(store, 1)
        old_revision = store.current_revision()
        grow(store, 4)
        fresh_etcd.stop_member(2)
        try:
            result = run_cli("defrag", "--compact", *flags(fresh_etcd))
            assert result.code == 3, (result.out, result.err)
            assert "not healthy, skipped" in result.err
            assert "nothing defragmented" in result.err
            # Not even compacted: nothing ran, the old revision is still readable.
            assert store.get("/ml-defender/test/big", revision=old_revision) is not None
        finally:
            fresh_etcd.restart_member(2)


def test_nospace_is_a_typed_error_shown_by_status_and_cleared_by_defrag(
    small_quota_etcd: EtcdCluster,
) -> None:
    with store_for(small_quota_etcd, retries=1) as store:
        refused = fill_until_nospace(store)
        assert refused.reason == "StoreNoSpace"
        assert "defrag --compact --disarm-nospace" in str(refused)
        report = store.health()
        assert report.alarms == ("NOSPACE",)
        assert report.degraded and report.quorum

        status = run_cli("status", *flags(small_quota_etcd))
        assert status.code == 0, status.err
        etcd = status.json()["etcd"]
        assert etcd["alarms"] == ["NOSPACE"] and not etcd["healthy"] and etcd["quorum"]
        assert all(m["dbSizeQuotaBytes"] == SMALL_QUOTA_BYTES for m in etcd["members"])
        assert all(m["dbSizeInUseBytes"] for m in etcd["members"])

        table = run_cli("status", "--etcd-endpoints", ",".join(small_quota_etcd.endpoints))
        assert "NOSPACE" in table.out and "degraded" in table.out

        # Still refused: the alarm stays until someone disarms it.
        with pytest.raises(StoreNoSpaceError):
            store.put("/ml-defender/test/small", b"x")

        fixed = run_cli("defrag", "--compact", "--disarm-nospace", *flags(small_quota_etcd))
        assert fixed.code == 0, fixed.err
        assert fixed.json()["alarms_left"] == []
        assert len(fixed.json()["disarmed"]) >= 1
        assert store.health().alarms == ()
        store.put("/ml-defender/test/small", b"x")
        assert store.get("/ml-defender/test/small") is not None


def test_disarming_without_freeing_space_is_refused_and_writes_stay_refused(
    small_quota_etcd: EtcdCluster,
) -> None:
    with store_for(small_quota_etcd, retries=1) as store:
        fill_until_nospace(store)
        # Without compaction every revision written stays live: the files cannot get smaller
        # than the values they hold, which already exceed the quota.
        written = store.get("/ml-defender/test/big")
        assert written is not None and written.version * len(CHUNK) > SMALL_QUOTA_BYTES
        # Without --disarm-nospace it is a report, not an error.
        table = run_cli("defrag", "--etcd-endpoints", ",".join(small_quota_etcd.endpoints))
        assert table.code == 0, table.err
        assert "Still at or over the quota: " in table.out and "Alarms left: NOSPACE" in table.out
        result = run_cli("defrag", "--disarm-nospace", *flags(small_quota_etcd))
        # Disarming would not hold (etcd raises NOSPACE at the next write): a typed error,
        # never "no alarm left".
        assert result.code == 2, (result.out, result.err)
        assert "DefragIncompleteError" in result.err and "not disarmed" in result.err
        assert store.health().alarms == ("NOSPACE",)
        with pytest.raises(StoreNoSpaceError):
            store.put("/ml-defender/test/small", b"x")


def test_a_member_left_without_room_for_the_largest_write_is_reported_and_that_write_refused(
    small_quota_etcd: EtcdCluster,
) -> None:
    with store_for(small_quota_etcd, retries=1) as store:
        # Live data in keys of their own: no compaction frees it.
        live = []
        for i in range(4 * SMALL_QUOTA_BYTES // len(CHUNK)):
            try:
                store.put(f"/ml-defender/test/live-{i}", CHUNK)
            except StoreNoSpaceError:
                break
            live.append(f"/ml-defender/test/live-{i}")
        else:
            raise AssertionError(f"no NOSPACE after writing {4 * SMALL_QUOTA_BYTES} bytes")
        # etcd takes deletes under NOSPACE. Six chunks stay: 1.2 MiB of a 2 MiB quota.
        for key in live[6:]:
            store.delete(key)
        result = run_cli("defrag", "--compact", "--disarm-nospace", *flags(small_quota_etcd))
        assert result.code == 0, result.err
        data = result.json()
        assert data["alarms_left"] == [] and data["over_quota"] == []
        assert data["room_bytes"] == ETCD_REQUEST_LIMIT_BYTES
        assert len(data["short_of_room"]) == 3, data
        table = run_cli(
            "defrag", "--compact", "--etcd-endpoints", ",".join(small_quota_etcd.endpoints)
        )
        assert "1.5MiB or less (the largest write) left under the quota" in table.out
        # What the report says holds: a small write goes through, a 1 MiB one (under the
        # request limit) raises NOSPACE again.
        store.put("/ml-defender/test/small", b"x")
        with pytest.raises(StoreNoSpaceError):
            store.put("/ml-defender/test/large", b"y" * (1 << 20))


class CutOffDuringCompact(EtcdStore):
    """The store, except that its compaction runs while one follower is cut off from the
    others: that follower applies it only once it is back, which is when the defrag reaches
    it. What a loaded machine does by chance (a follower that applies the log late).

    The compaction is sent to the leader (`first_follower` moved it to the first endpoint).
    The client picks its endpoint at random: on the cut-off member the compaction would wait
    out a whole timeout before failing over, which under load left the one retry too little
    time (CI, once)."""

    def __init__(
        self, settings: EtcdSettings, cluster: EtcdCluster, victim: int, *, heal: bool = True
    ) -> None:
        super().__init__(settings)
        self.cluster = cluster
        self.victim = victim
        self.heal = heal

    def compact(self, revision: int) -> None:
        with self._client._ep_lock:
            self._client._current_endpoint_label = self.cluster.endpoints[0].split("://")[-1]
        self.cluster.partition(self.victim)
        try:
            super().compact(revision)
        finally:
            if self.heal:
                self.cluster.heal(self.victim)


def first_follower(cluster: EtcdCluster) -> tuple[str, int]:
    """The follower a defrag takes first (health's label, cluster index), with the leader
    moved to the first endpoint: `CutOffDuringCompact` sends the compaction there, so it is
    served while the follower is cut off."""
    cluster.move_leader(0)
    with store_for(cluster) as store:
        followers = sorted(m.endpoint for m in store.health().members if not m.is_leader)
    port = int(followers[0].rsplit(":", 1)[1])
    return followers[0], next(
        i for i, ep in enumerate(cluster.endpoints) if ep.endswith(f":{port}")
    )


def test_a_follower_is_defragmented_only_after_it_applied_the_compaction(
    small_quota_proxied_etcd: EtcdCluster,
) -> None:
    cluster = small_quota_proxied_etcd
    label, victim = first_follower(cluster)
    with store_for(cluster, retries=1) as store:
        fill_until_nospace(store)
    settings = EtcdSettings.model_validate(etcd_client_settings(cluster.endpoints))
    with CutOffDuringCompact(settings, cluster, victim) as store:
        result = defragment_cluster(store, compact=True, disarm_nospace=True)
        assert result.skipped is None
        # Once each: the victim was not defragmented before its compaction (it would then
        # have needed a second pass, or kept its size and raised NOSPACE at the next write).
        assert result.steps[0].endpoint == label
        assert len(result.steps) == 3, result.steps
        assert all((s.db_size_after or 0) < SMALL_QUOTA_BYTES // 2 for s in result.steps)
        assert result.alarms_left == () and result.over_quota == ()
        store.put("/ml-defender/test/small", b"x")
        assert store.health().alarms == ()


def test_a_follower_that_never_applies_the_compaction_stops_the_defrag(
    small_quota_proxied_etcd: EtcdCluster,
) -> None:
    cluster = small_quota_proxied_etcd
    label, victim = first_follower(cluster)
    # The harness' timeouts, made for its 2 s elections: the wait for the cut-off member is
    # bounded by settle_timeout alone, so shorter ones only made the compaction (served by the
    # other two members, on a loaded machine) fail for want of time.
    settings = EtcdSettings.model_validate(etcd_client_settings(cluster.endpoints))
    done: list[str] = []
    try:
        with CutOffDuringCompact(settings, cluster, victim, heal=False) as store:
            grow(store, 3)
            with pytest.raises(CompactionLagError) as caught:
                defragment_cluster(
                    store,
                    compact=True,
                    settle_timeout=3,
                    on_step=lambda s: done.append(s.endpoint),
                )
    finally:
        cluster.heal(victim)
    assert caught.value.endpoint == label and caught.value.reason == "CompactionLag"
    # It came first: nothing was defragmented.
    assert done == []
