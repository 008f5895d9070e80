"""The keep-alive keeper's bookkeeping against a fake stream and a hand-turned clock: what it
sends on a tick, how answers reach owners, and every way a lease goes back to its owner (the
keeper against etcd: tests/integration/library/test_heartbeat_keeper_etcd.py)."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, cast

import grpc
import pytest
from prometheus_client import CollectorRegistry

from defender_config import StoreError
from defender_config._store import _keeper
from defender_config._store._keepalive import KeepAliveMux, _Closed, _Failure
from defender_config._store._keeper import LeaseKeeper
from defender_config._store_types import StoreMetrics
from defender_devcluster import wait_for


class FakeStream:
    label = "fake:2379"

    def __init__(self) -> None:
        self.sent: list[tuple[int, Future[int]]] = []
        self.failed: _Failure | _Closed | None = None
        self.auto_ttl: int | None = None  # answer every keep-alive at once with this TTL

    def send(self, lease_id: int) -> Future[int]:
        waiter: Future[int] = Future()
        if self.failed is not None:
            waiter.set_exception(self.failed.error())
        elif self.auto_ttl is not None:
            waiter.set_result(self.auto_ttl)
        self.sent.append((lease_id, waiter))
        return waiter

    def fail(self, why: _Failure | _Closed) -> None:
        self.failed = why
        for _, waiter in self.sent:
            if not waiter.done():
                waiter.set_exception(why.error())

    def answer(self, lease_id: int, ttl: int) -> None:
        for sent, waiter in self.sent:
            if sent == lease_id and not waiter.done():
                waiter.set_result(ttl)
                return
        raise AssertionError(f"no keep-alive of {lease_id} waiting")


class FakeMux:
    def __init__(self) -> None:
        self.current = FakeStream()
        self.refuse: Exception | None = None
        self.resets: list[tuple[FakeStream, _Failure]] = []

    def stream(self, client: object) -> FakeStream:
        if self.refuse is not None:
            raise self.refuse
        return self.current

    def reset(self, stream: FakeStream, why: _Failure) -> None:
        self.resets.append((stream, why))
        stream.fail(why)


class FakeClient:
    timeout = 5.0


class Owner:
    """What a heartbeater gives the keeper: it counts answers and hand-backs."""

    def __init__(self) -> None:
        self.renewed: list[int] = []
        self.lost: list[str] = []

    def on_renewed(self, ttl: int) -> None:
        self.renewed.append(ttl)

    def on_lost(self, why: str) -> None:
        self.lost.append(why)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def mux() -> FakeMux:
    return FakeMux()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics() -> StoreMetrics:
    return StoreMetrics(CollectorRegistry())


@pytest.fixture
def keeper(mux: FakeMux, clock: Clock, metrics: StoreMetrics) -> Any:
    k = LeaseKeeper(cast(KeepAliveMux, mux), lambda: FakeClient(), metrics, clock=clock)  # type: ignore[arg-type,return-value]
    # Turned by hand: the thread `keep` would start is kept from running ticks of its own.
    k._thread = threading.Thread(target=lambda: None)
    k._thread.is_alive = lambda: True  # type: ignore[method-assign]
    return k


def tick(keeper: LeaseKeeper, clock: Clock) -> None:
    keeper._check_bursts(clock.now)
    keeper._send_due(clock.now, 0.25)


def handbacks(metrics: StoreMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "defender_etcd_kept_lease_handbacks_total", {"reason": reason}
    )
    return value or 0.0


def test_a_lease_is_sent_when_due_and_its_answer_reaches_the_owner(
    keeper: LeaseKeeper, mux: FakeMux, clock: Clock, metrics: StoreMetrics
) -> None:
    owner = Owner()
    keeper.keep(7, 1.0, owner.on_renewed, owner.on_lost)
    tick(keeper, clock)
    assert mux.current.sent == [], "kept right after its own beat: due one interval later"
    clock.now += 0.9  # within half a tick of 101.0: sent on this tick
    tick(keeper, clock)
    assert [lease for lease, _ in mux.current.sent] == [7]
    mux.current.answer(7, 3)
    assert owner.renewed == [3] and owner.lost == []
    assert metrics.registry.get_sample_value("defender_etcd_kept_keepalives_total") == 1
    clock.now += 1.0
    tick(keeper, clock)
    assert [lease for lease, _ in mux.current.sent] == [7, 7]


def test_many_due_leases_go_out_in_one_burst(
    keeper: LeaseKeeper, mux: FakeMux, clock: Clock
) -> None:
    owners = [Owner() for _ in range(50)]
    for lease, owner in enumerate(owners, start=1):
        keeper.keep(lease, 1.0, owner.on_renewed, owner.on_lost)
    clock.now += 1.0
    tick(keeper, clock)
    assert sorted(lease for lease, _ in mux.current.sent) == list(range(1, 51))
    for lease in range(1, 51):
        mux.current.answer(lease, 3)
    assert all(o.renewed == [3] for o in owners)
    tick(keeper, clock)
    assert not keeper._bursts, "an answered burst is forgotten"


def test_an_unanswered_lease_is_not_asked_again_on_its_next_due_tick(
    keeper: LeaseKeeper, mux: FakeMux, clock: Clock
) -> None:
    owner = Owner()
    keeper.keep(7, 1.0, owner.on_renewed, owner.on_lost)
    clock.now += 1.0
    tick(keeper, clock)
    clock.now += 1.0  # due again, the first keep-alive still unanswered (within the timeout)
    tick(keeper, clock)
    assert len(mux.current.sent) == 1
    mux.current.answer(7, 3)
    clock.now += 1.0
    tick(keeper, clock)
    assert len(mux.current.sent) == 2 and owner.renewed == [3]


def test_an_expired_lease_goes_back_to_its_owner(
    keeper: LeaseKeeper, mux: FakeMux, clock: Clock, metrics: StoreMetrics
) -> None:
    owner = Owner()
    keeper.keep(7, 1.0, owner.on_renewed, owner.on_lost)
    clock.now += 1.0
    tick(keeper, clock)
    mux.current.answer(7, 0)
    assert owner.lost == ["the lease expired"] and owner.renewed == []
    assert 7 not in keeper and handbacks(metrics, "expired") == 1
    clock.now += 1.0
    tick(keeper, clock)
    assert len(mux.current.sent) == 1, "a lease handed back is not sent again"


def test_a_failed_stream_hands_back_every_lease_waiting_on_it(
    keeper: LeaseKeeper, mux: FakeMux, clock: Clock, metrics: StoreMetrics
) -> None:
    owners = {lease: Owner() for lease in (1, 2, 3)}
    for lease, owner in owners.items():
        keeper.keep(lease, 1.0, owner.on_renewed, owner.on_lost)
    clock.now += 1.0
    tick(keeper, clock)
    mux.current.answer(2, 3)
    mux.current.fail(_Failure(grpc.StatusCode.UNAVAILABLE, "member gone"))
    assert owners[2].renewed == [3] and owners[2].lost == []
    for lease in (1, 3):
        assert len(owners[lease].lost) == 1 and "member gone" in owners[lease].lost[0]
    assert handbacks(metrics, "stream_failed") == 2 and len(keeper) == 1


def test_a_closed_store_fails_a_keep_alive_as_closed(
    keeper: LeaseKeeper, mux: FakeMux, clock: Clock, metrics: StoreMetrics
) -> None:
    owner = Owner()
    keeper.keep(7, 1.0, owner.on_renewed, owner.on_lost)
    clock.now += 1.0
    tick(keeper, clock)
    mux.current.fail(_Closed())
    assert len(owner.lost) == 1 and handbacks(metrics, "closed") == 1


def test_no_stream_to_send_on_hands_the_due_leases_back(
    keeper: LeaseKeeper, mux: FakeMux, clock: Clock, metrics: StoreMetrics
) -> None:
    owner, later = Owner(), Owner()
    keeper.keep(7, 1.0, owner.on_renewed, owner.on_lost)
    keeper.keep(8, 5.0, later.on_renewed, later.on_lost)
    mux.refuse = StoreError("no endpoint answers")
    clock.now += 1.0
    tick(keeper, clock)
    assert owner.lost == ["no keep-alive stream: no endpoint answers"]
    assert later.lost == [], "not due yet: still kept"
    assert handbacks(metrics, "no_stream") == 1 and list(keeper._kept) == [8]


def test_no_answer_within_the_timeout_resets_the_stream_and_hands_back(
    keeper: LeaseKeeper, mux: FakeMux, clock: Clock, metrics: StoreMetrics
) -> None:
    owner = Owner()
    keeper.keep(7, 1.0, owner.on_renewed, owner.on_lost)
    clock.now += 1.0
    tick(keeper, clock)
    clock.now += 4.9
    tick(keeper, clock)
    assert mux.resets == [] and owner.lost == []
    clock.now += 0.2  # past the 5 s request timeout
    tick(keeper, clock)
    [(stream, why)] = mux.resets
    assert stream is mux.current and why.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(owner.lost) == 1 and "no keep-alive answer within 5s" in owner.lost[0]
    # Failed by the reset: counted as the stream failing (the reset's reason is in the text).
    assert handbacks(metrics, "stream_failed") == 1 and not keeper._bursts


def test_a_keep_alive_the_reset_does_not_resolve_is_handed_back_after_a_moment(
    keeper: LeaseKeeper, mux: FakeMux, clock: Clock, metrics: StoreMetrics
) -> None:
    """A stream whose failure never reaches its waiters (stalled elsewhere): the keeper does not
    wait on it forever."""
    owner = Owner()
    mux.reset = lambda stream, why: mux.resets.append((stream, why))  # type: ignore[method-assign]
    keeper.keep(7, 1.0, owner.on_renewed, owner.on_lost)
    clock.now += 1.0
    tick(keeper, clock)
    clock.now += 5.1
    tick(keeper, clock)
    assert len(mux.resets) == 1 and owner.lost == []
    clock.now += 0.5
    tick(keeper, clock)
    assert owner.lost == [], "the reset's answer may still be on its way"
    clock.now += 0.6
    tick(keeper, clock)
    assert owner.lost == ["no keep-alive answer within 5s, and none after the stream reset"]
    assert handbacks(metrics, "timeout") == 1 and len(mux.resets) == 1


def test_an_answer_after_release_reaches_nobody(
    keeper: LeaseKeeper, mux: FakeMux, clock: Clock
) -> None:
    owner, again = Owner(), Owner()
    keeper.keep(7, 1.0, owner.on_renewed, owner.on_lost)
    clock.now += 1.0
    tick(keeper, clock)
    assert keeper.release(7) and not keeper.release(7)
    mux.current.answer(7, 3)
    assert owner.renewed == [] and owner.lost == []
    # Kept again while the old keep-alive is in flight: its late answer is not the new one's.
    keeper.keep(8, 1.0, owner.on_renewed, owner.on_lost)
    clock.now += 1.0
    tick(keeper, clock)
    keeper.keep(8, 1.0, again.on_renewed, again.on_lost)
    mux.current.fail(_Failure(grpc.StatusCode.UNAVAILABLE, "gone"))
    assert owner.lost == [] and again.lost == [] and 8 in keeper


def test_close_hands_every_lease_back_and_refuses_new_ones(
    keeper: LeaseKeeper, metrics: StoreMetrics
) -> None:
    owners = [Owner() for _ in range(3)]
    for lease, owner in enumerate(owners, start=1):
        keeper.keep(lease, 1.0, owner.on_renewed, owner.on_lost)
    keeper._thread = None
    keeper.close()
    assert all(o.lost == ["the store was closed"] for o in owners)
    assert handbacks(metrics, "closed") == 3 and len(keeper) == 0
    with pytest.raises(StoreError, match="closed"):
        keeper.keep(9, 1.0, owners[0].on_renewed, owners[0].on_lost)
    keeper.close()  # idempotent


def test_a_failing_owner_callback_is_logged_and_harms_no_other_lease(
    keeper: LeaseKeeper, mux: FakeMux, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    good = Owner()

    def broken(_: object) -> None:
        raise RuntimeError("owner bug")

    keeper.keep(1, 1.0, broken, broken)
    keeper.keep(2, 1.0, good.on_renewed, good.on_lost)
    clock.now += 1.0
    tick(keeper, clock)
    with caplog.at_level(logging.ERROR, logger="defender_config.store"):
        mux.current.answer(1, 3)
        mux.current.answer(2, 3)
        assert good.renewed == [3]
        keeper.keep(3, 1.0, broken, broken)
        keeper._hand_back_all("closed", "the store was closed")
    assert "on_renewed of lease 1 failed" in caplog.text
    assert "on_lost of lease 3 failed" in caplog.text
    assert good.lost == ["the store was closed"]


def test_a_lease_needs_a_positive_interval(keeper: LeaseKeeper) -> None:
    with pytest.raises(ValueError, match="interval"):
        keeper.keep(1, 0, lambda ttl: None, lambda why: None)


# --- the thread -----------------------------------------------------------------------------


def real_keeper(mux: FakeMux, metrics: StoreMetrics) -> LeaseKeeper:
    return LeaseKeeper(cast(KeepAliveMux, mux), lambda: FakeClient(), metrics)  # type: ignore[arg-type,return-value]


def test_one_thread_renews_every_lease_on_ticks_and_sleeps_while_none_is_kept(
    mux: FakeMux, metrics: StoreMetrics
) -> None:
    keeper = real_keeper(mux, metrics)
    mux.current.auto_ttl = 3
    try:
        assert keeper.thread is None, "no thread before the first lease"
        owners = [Owner() for _ in range(20)]
        for lease, owner in enumerate(owners, start=1):
            keeper.keep(lease, 0.2, owner.on_renewed, owner.on_lost)
        thread = keeper.thread
        assert thread is not None
        names = [t.name for t in threading.enumerate()]
        assert names.count("defender-lease-keeper") == 1
        wait_for("two rounds", lambda: len(mux.current.sent) >= 40, timeout=10)
        assert all(o.renewed for o in owners) and not any(o.lost for o in owners)
        for lease in range(1, 21):
            keeper.release(lease)
        sent = len(mux.current.sent)
        time.sleep(0.3)
        assert len(mux.current.sent) == sent, "released leases are not renewed"
        assert keeper.thread is thread, "the thread waits for the next lease"
    finally:
        keeper.close()
    assert keeper.thread is None


def test_a_lone_lease_with_a_long_interval_costs_no_tick_in_between(
    mux: FakeMux, metrics: StoreMetrics
) -> None:
    """A single heartbeater at a long interval (the default is 30 s) must not wake the keeper
    four times a second; a lease due sooner that arrives meanwhile still wakes it."""
    keeper = real_keeper(mux, metrics)
    mux.current.auto_ttl = 3
    ticks = [0]
    real_send = keeper._send_due

    def counted(now: float, tick: float) -> None:
        ticks[0] += 1
        real_send(now, tick)

    keeper._send_due = counted  # type: ignore[method-assign]
    slow, quick = Owner(), Owner()
    try:
        keeper.keep(1, 30.0, slow.on_renewed, slow.on_lost)
        time.sleep(0.2)  # the runs the start and the keep's wake-up made
        ticks[0] = 0
        time.sleep(1.0)
        assert ticks[0] == 0
        keeper.keep(2, 0.5, quick.on_renewed, quick.on_lost)
        wait_for("the quick lease renewed", lambda: len(quick.renewed) >= 2, timeout=5)
        assert slow.renewed == [] and [lease for lease, _ in mux.current.sent] == [2, 2]
    finally:
        keeper.close()


def test_a_tick_that_fails_hands_every_lease_back_and_refuses_leases_for_a_while(
    mux: FakeMux,
    metrics: StoreMetrics,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A keeper bug must not silence renewals while their owners sleep, nor make them beat at
    every tick (handed over, handed back, beat at once): for a while they renew on their own."""
    monkeypatch.setattr(_keeper, "_COOL_DOWN_SECONDS", 0.5)
    keeper = real_keeper(mux, metrics)
    mux.current.auto_ttl = 3
    calls = [0]
    real_send = keeper._send_due

    def flaky(now: float, tick: float) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("keeper bug")
        real_send(now, tick)

    keeper._send_due = flaky  # type: ignore[method-assign]
    owner = Owner()
    try:
        with caplog.at_level(logging.ERROR, logger="defender_config.store"):
            keeper.keep(1, 0.2, owner.on_renewed, owner.on_lost)
            wait_for("the hand-back", lambda: owner.lost, timeout=10)
        assert "a tick failed; its leases go back to their owners" in caplog.text
        assert owner.lost == ["a keeper tick failed"] and handbacks(metrics, "tick_failed") == 1
        with pytest.raises(StoreError, match="failed a tick just now"):
            keeper.keep(1, 0.2, owner.on_renewed, owner.on_lost)
        # Later the owner hands the lease over again after a beat of its own: it is renewed.
        time.sleep(0.6)
        keeper.keep(1, 0.2, owner.on_renewed, owner.on_lost)
        wait_for("renewed", lambda: owner.renewed, timeout=10)
        assert owner.lost == ["a keeper tick failed"]
    finally:
        keeper.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_keeper_thread_that_dies_hands_its_leases_back_and_a_new_keep_restarts_it(
    mux: FakeMux, metrics: StoreMetrics
) -> None:
    keeper = real_keeper(mux, metrics)

    def die(now: float) -> None:
        raise SystemExit  # nothing a tick catches

    real_check = keeper._check_bursts
    keeper._check_bursts = die  # type: ignore[method-assign]
    owner = Owner()
    try:
        keeper.keep(1, 0.2, owner.on_renewed, owner.on_lost)
        wait_for("the hand-back", lambda: owner.lost, timeout=10)
        assert owner.lost == ["the keeper thread ended unexpectedly"]
        assert handbacks(metrics, "keeper_ended") == 1
        keeper._check_bursts = real_check  # type: ignore[method-assign]
        keeper.keep(1, 0.2, owner.on_renewed, owner.on_lost)
        wait_for("renewed by a new thread", lambda: mux.current.sent, timeout=10)
    finally:
        keeper.close()
