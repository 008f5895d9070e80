"""Lease keep-alives over the store's one shared LeaseKeepAlive stream, against the real
3-member etcd: answers reach the right caller, expired leases answer 0, a dead or frozen member
is left for another one, and close() ends the stream's thread."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from prometheus_client import CollectorRegistry

from defender_config import EtcdSettings, StoreError, StoreUnavailableError
from defender_config.store import EtcdStore
from defender_devcluster import EtcdCluster, wait_for

pytestmark = pytest.mark.etcd


def label_of(endpoint: str) -> str:
    return endpoint.split("://")[-1]


def member_in_use(store: EtcdStore, cluster: EtcdCluster) -> int:
    return [label_of(e) for e in cluster.endpoints].index(store._client._current_endpoint_label)


def use_member(store: EtcdStore, endpoint: str) -> None:
    """Point the store's client at `endpoint` (as if it had picked it at random)."""
    with store._client._ep_lock:
        store._client._current_endpoint_label = label_of(endpoint)


def stream_generation(store: EtcdStore) -> int:
    return store._keepalive._generation


@contextmanager
def frozen(cluster: EtcdCluster, i: int) -> Iterator[None]:
    """Member `i` stopped with SIGSTOP: its connections stay open but nothing answers."""
    pid = cluster.member_pids[i]
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def sample(store: EtcdStore, name: str, **labels: str) -> float:
    return store.metrics.registry.get_sample_value(name, labels) or 0.0


def test_refresh_keeps_a_lease_alive_past_its_ttl_on_one_stream(
    store: EtcdStore, etcd_prefix: str
) -> None:
    lease = store.grant_lease(3)
    key = etcd_prefix + "kept"
    store.put(key, b"x", lease=lease)
    assert store.refresh_lease(lease) == lease.ttl
    reader = store._keepalive.reader
    assert reader is not None and reader.is_alive()
    deadline = time.monotonic() + 2.5 * lease.ttl
    while time.monotonic() < deadline:
        assert store.refresh_lease(lease) == lease.ttl
        time.sleep(0.5)
    assert store.get(key) is not None
    assert store.lease_ttl(lease) > 0
    # Every keep-alive went over the same stream (and the same reader thread).
    assert store._keepalive.reader is reader and stream_generation(store) == 1
    assert sample(store, "defender_etcd_calls_total", op="lease_keepalive") >= 6

    # Without keep-alives it expires like any lease.
    wait_for("lease expiry", lambda: store.get(key) is None, timeout=lease.ttl + 10)
    assert store.refresh_lease(lease) == 0


def test_expired_revoked_and_unknown_leases_answer_zero(store: EtcdStore) -> None:
    revoked = store.grant_lease(30)
    live = store.grant_lease(40)
    store.revoke_lease(revoked)
    assert store.refresh_lease(revoked) == 0
    assert store.refresh_lease(live) == 40  # the stream is still fine after a 0 answer
    assert store.refresh_lease(0x7EAD_BEEF_0000_0001) == 0  # never granted
    short = store.grant_lease(3)
    wait_for("expiry", lambda: store.lease_ttl(short) == -1, timeout=15)
    assert store.refresh_lease(short) == 0
    assert stream_generation(store) == 1
    assert sample(store, "defender_etcd_errors_total", op="lease_keepalive", reason="unknown") == 0


def test_many_threads_on_many_leases_each_get_their_own_answer(store: EtcdStore) -> None:
    # Distinct TTLs make every answer tell which lease it was about.
    leases = [store.grant_lease(60 + i) for i in range(24)]
    revoked = leases[::6]
    for lease in revoked:
        store.revoke_lease(lease)
    expected = {lease.id: (0 if lease in revoked else lease.ttl) for lease in leases}
    wrong: list[tuple[int, int, int]] = []
    errors: list[BaseException] = []
    answered = [0]
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        # Every thread hits a few leases that other threads hit too, so several callers
        # wait for answers about the same lease at once.
        try:
            for _ in range(60):
                lease = rng.choice(leases[: 8 + seed % 16])
                ttl = store.refresh_lease(lease)
                with lock:
                    answered[0] += 1
                    if ttl != expected[lease.id]:
                        wrong.append((lease.id, expected[lease.id], ttl))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a keep-alive caller hung"
    assert errors == [] and wrong == []
    assert answered[0] == 16 * 60
    assert stream_generation(store) == 1
    assert len(store._keepalive._stream.waiters) == 0  # type: ignore[union-attr]


def test_close_ends_the_stream_thread_and_later_calls_fail(
    make_etcd_settings: Callable[..., EtcdSettings],
) -> None:
    before = {t.ident for t in threading.enumerate()}
    store = EtcdStore(make_etcd_settings(), registry=CollectorRegistry())
    lease = store.grant_lease(30)
    assert store.refresh_lease(lease) == 30
    reader = store._keepalive.reader
    assert reader is not None and reader.is_alive()
    store.close()
    assert not reader.is_alive()
    # gRPC's request-sender thread of the stream ends too: nothing started here survives.
    wait_for(
        "the stream's threads to end",
        lambda: {t.ident for t in threading.enumerate()} <= before,
        timeout=10,
    )
    with pytest.raises(StoreError, match="closed"):
        store.refresh_lease(lease)
    with pytest.raises(StoreError, match="closed"):
        store._keepalive.refresh(store._client, lease.id)  # past the store's own check


def test_close_fails_a_caller_still_waiting(
    members_restored: EtcdCluster, make_etcd_settings: Callable[..., EtcdSettings]
) -> None:
    cluster = members_restored
    store = EtcdStore(make_etcd_settings(timeout_seconds=30.0), registry=CollectorRegistry())
    lease = store.grant_lease(30)
    assert store.refresh_lease(lease) == 30
    outcome: list[object] = []

    def refresh() -> None:
        try:
            outcome.append(store.refresh_lease(lease))
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=refresh)
    with frozen(cluster, member_in_use(store, cluster)):
        caller.start()
        stream = store._keepalive._stream
        assert stream is not None
        wait_for("the caller to wait", lambda: len(stream.waiters) == 1, timeout=10)
        started = time.monotonic()
        store.close()
        caller.join(timeout=10)
        assert not caller.is_alive()
        assert time.monotonic() - started < 10  # far below the 30 s request timeout
    assert len(outcome) == 1 and isinstance(outcome[0], StoreError)
    assert not isinstance(outcome[0], StoreUnavailableError)
    assert "closed" in str(outcome[0])


@pytest.mark.parametrize("victim", ["leader", "follower"])
def test_refresh_survives_the_member_in_use_being_killed(
    members_restored: EtcdCluster,
    make_etcd_settings: Callable[..., EtcdSettings],
    etcd_prefix: str,
    victim: str,
) -> None:
    cluster = members_restored
    store = EtcdStore(make_etcd_settings(), registry=CollectorRegistry())
    try:
        leader = cluster.wait_for_leader()
        target = leader if victim == "leader" else next(e for e in cluster.endpoints if e != leader)
        use_member(store, target)
        lease = store.grant_lease(30)
        store.put(etcd_prefix + "owned", b"x", lease=lease)
        assert store.refresh_lease(lease) == 30
        assert store._keepalive._stream.label == label_of(target)  # type: ignore[union-attr]
        killed = cluster.endpoints.index(target)
        cluster.kill_member(killed)

        # The broken stream is replaced by one to a live member; the lease lives on.
        for _ in range(5):
            assert store.refresh_lease(lease) == 30
        stream = store._keepalive._stream
        assert stream is not None and stream.label != label_of(target)
        generation = stream_generation(store)
        if victim == "follower":
            assert generation == 2
        else:
            # While the others elect a leader, the new stream may be refused ("no leader") and
            # replaced once more (seen under load in CI): more than one replacement, not a loop.
            assert generation >= 2
        cluster.wait_for_leader()
        for _ in range(5):
            assert store.refresh_lease(lease) == 30
        assert stream_generation(store) == generation  # settled on a live member
        assert member_in_use(store, cluster) != killed
        assert store.get(etcd_prefix + "owned") is not None
        assert sample(store, "defender_etcd_endpoint_failovers_total") >= 1
    finally:
        store.close()


def test_a_frozen_member_times_out_and_the_next_attempt_uses_another(
    members_restored: EtcdCluster, make_etcd_settings: Callable[..., EtcdSettings]
) -> None:
    cluster = members_restored
    store = EtcdStore(
        make_etcd_settings(timeout_seconds=1.5, backoff_base_seconds=0.05),
        registry=CollectorRegistry(),
    )
    try:
        leader = cluster.wait_for_leader()
        follower = next(e for e in cluster.endpoints if e != leader)
        use_member(store, follower)
        lease = store.grant_lease(30)
        assert store.refresh_lease(lease) == 30
        with frozen(cluster, cluster.endpoints.index(follower)):
            assert store.refresh_lease(lease) == 30
            stream = store._keepalive._stream
            assert stream is not None and stream.label != label_of(follower)
        # One attempt waited out the timeout on the frozen member, then it was retried.
        assert sample(store, "defender_etcd_retries_total", op="lease_keepalive") >= 1
        assert stream_generation(store) >= 2
    finally:
        store.close()


def test_no_member_left_raises_store_unavailable_without_hanging(
    members_restored: EtcdCluster,
    restart_members: Callable[[], None],
    make_etcd_settings: Callable[..., EtcdSettings],
) -> None:
    cluster = members_restored
    store = EtcdStore(
        make_etcd_settings(retries=2, timeout_seconds=1.0, backoff_base_seconds=0.02),
        registry=CollectorRegistry(),
    )
    try:
        lease = store.grant_lease(30)
        assert store.refresh_lease(lease) == 30
        for i in range(cluster.members):
            cluster.kill_member(i)
        with pytest.raises(StoreUnavailableError) as info:
            store.refresh_lease(lease)
        assert info.value.attempts == 3
        assert sample(store, "defender_etcd_retries_total", op="lease_keepalive") == 2
        assert (
            sample(store, "defender_etcd_errors_total", op="lease_keepalive", reason="unavailable")
            == 1
        )

        restart_members()
        # Reopened lazily on the next call; the lease outlived the outage (30 s TTL).
        assert store.refresh_lease(lease) > 0
    finally:
        store.close()
