"""Retry classification and backoff of the etcd layer, without a cluster.

The loop is driven with real gRPC against a port nobody listens on (connection refused is a
real UNAVAILABLE) and with RpcError instances carrying a status code, as grpc raises them."""

from __future__ import annotations

import random
import socket
import threading
import time

import grpc
import pytest
from prometheus_client import CollectorRegistry
from pyetcd import exceptions as etcd_exc

from defender_config import (
    EtcdSettings,
    NotFoundError,
    SettingsError,
    StoreAuthError,
    StoreError,
    StoreUnavailableError,
)
from defender_config._store import classify_error, parse_endpoint
from defender_config._store._etcd_store import _is_simple_token
from defender_config._store_types import backoff_delay
from defender_config.store import EtcdStore


class StatusError(grpc.RpcError):
    """An RpcError with a status, as grpc's _InactiveRpcError presents it."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


TRANSIENT = [
    etcd_exc.ConnectionFailedError(),
    etcd_exc.ConnectionTimeoutError(),
    etcd_exc.NoServerAvailableError(),
    etcd_exc.WatchTimedOut(),
    StatusError(grpc.StatusCode.UNAVAILABLE, "etcdserver: leader changed"),
    StatusError(grpc.StatusCode.DEADLINE_EXCEEDED),
    # A leader handing over drops proposals; a throttled leader refuses them: not applied.
    StatusError(grpc.StatusCode.UNKNOWN, "raft proposal dropped"),
    StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests"),
    # A member shutting down resets its streams (seen in CI while a member was killed).
    StatusError(
        grpc.StatusCode.CANCELLED,
        "Stream removed (RST_STREAM (Received RST_STREAM with error code 8))",
    ),
]
PERMANENT = [
    (StatusError(grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token"), "auth"),
    (StatusError(grpc.StatusCode.PERMISSION_DENIED), "auth"),
    # etcd with auth on, a client with no credentials: refused under another code.
    (StatusError(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: user name is empty"), "auth"),
    (StatusError(grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found"), "not_found"),
    (StatusError(grpc.StatusCode.OUT_OF_RANGE), "compacted"),
    (etcd_exc.RevisionCompactedError(5), "compacted"),
    (StatusError(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: request is too large"), "error"),
    (StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED), "error"),
    (StatusError(grpc.StatusCode.UNKNOWN, "something else"), "error"),
    (StatusError(grpc.StatusCode.FAILED_PRECONDITION), "error"),
    (StatusError(grpc.StatusCode.INTERNAL), "error"),
    # This process cancelled the call itself: not a member going away, never retried.
    (StatusError(grpc.StatusCode.CANCELLED, "Locally cancelled by application!"), "error"),
    (etcd_exc.InternalServerError(), "error"),
    (etcd_exc.PreconditionFailedError(), "error"),
    (StatusError(grpc.StatusCode.DATA_LOSS), "error"),  # not in the table: unknown, permanent
]


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: type(e).__name__)
def test_transient_errors_are_retried(exc: BaseException) -> None:
    rule = classify_error(exc)
    assert rule is not None and rule.transient and rule.kind == "unavailable"


@pytest.mark.parametrize(("exc", "kind"), PERMANENT, ids=lambda e: str(e)[:30])
def test_other_errors_are_not_retried(exc: BaseException, kind: str) -> None:
    rule = classify_error(exc)
    assert rule is not None and not rule.transient and rule.kind == kind


def test_non_etcd_exceptions_are_not_classified() -> None:
    assert classify_error(TypeError("a bug")) is None
    assert classify_error(KeyError("x")) is None


def test_backoff_is_exponential_capped_and_jittered() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        ceiling = min(2.0, 0.1 * 2**attempt)
        samples = [backoff_delay(attempt, 0.1, 2.0, rng) for _ in range(200)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8  # full jitter uses the whole range
        assert len(set(samples)) > 150  # and is not a constant
    assert backoff_delay(10_000, 0.1, 2.0, rng) <= 2.0  # no overflow on huge attempts
    with pytest.raises(ValueError):
        backoff_delay(-1, 0.1, 2.0)


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("127.0.0.1:2379", ("127.0.0.1", 2379, False)),
        ("http://etcd-0.etcd:2379", ("etcd-0.etcd", 2379, False)),
        ("https://etcd:2379/", ("etcd", 2379, True)),
        ("[::1]:2379", ("[::1]", 2379, False)),
    ],
)
def test_parse_endpoint(endpoint: str, expected: tuple[str, int, bool]) -> None:
    assert parse_endpoint(endpoint) == expected


@pytest.mark.parametrize("endpoint", ["ftp://x:1", "x", "x:port"])
def test_parse_endpoint_refuses_garbage(endpoint: str) -> None:
    with pytest.raises(SettingsError):
        parse_endpoint(endpoint)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def dead_store() -> EtcdStore:
    settings = EtcdSettings(
        endpoints=[f"127.0.0.1:{_closed_port()}", f"127.0.0.1:{_closed_port()}"],
        retries=3,
        timeout_seconds=1.0,
        backoff_base_seconds=0.001,
        backoff_max_seconds=0.002,
    )
    return EtcdStore(settings, registry=CollectorRegistry())


def test_unreachable_endpoints_exhaust_retries(dead_store: EtcdStore) -> None:
    with pytest.raises(StoreUnavailableError) as info:
        dead_store.put("/k", b"v")
    assert info.value.attempts == 4
    assert "UNAVAILABLE" in str(info.value)
    assert isinstance(info.value.__cause__, Exception)  # the gRPC cause is kept
    reg = dead_store.metrics.registry
    assert reg.get_sample_value("defender_etcd_retries_total", {"op": "put"}) == 3
    assert (
        reg.get_sample_value("defender_etcd_errors_total", {"op": "put", "reason": "unavailable"})
        == 1
    )
    # Never read, nothing cached: no stale value to fall back on.
    with pytest.raises(StoreUnavailableError):
        dead_store.get("/k")
    assert not dead_store.has_quorum()
    report = dead_store.health()
    assert not report.quorum and report.healthy_count == 0
    assert all(m.error for m in report.members)
    dead_store.close()


def _login_settings() -> EtcdSettings:
    return EtcdSettings(
        endpoints=[f"127.0.0.1:{_closed_port()}"],
        user="root",
        password="rootpw",
        retries=1,
        timeout_seconds=1.0,
        backoff_base_seconds=0.001,
        backoff_max_seconds=0.002,
    )


def test_a_login_without_an_answer_is_deferred_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with EtcdStore(_login_settings(), registry=CollectorRegistry()) as store:
        assert [r.getMessage()[:21] for r in caplog.records] == ["etcd login deferred: "]
        # The first call logs in, and fails as the login did.
        with pytest.raises(StoreUnavailableError):
            store.put("/k", b"v")


def test_a_login_that_may_not_wait_raises_at_once_and_warns_of_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(StoreUnavailableError) as info:
        EtcdStore(_login_settings(), registry=CollectorRegistry(), defer_login=False)
    assert info.value.attempts == 2
    assert caplog.records == []


@pytest.mark.parametrize(
    ("exc", "typed"),
    [
        (
            StatusError(grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied"),
            StoreAuthError,
        ),
        (
            StatusError(grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found"),
            NotFoundError,
        ),
        (
            StatusError(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: request is too large"),
            StoreError,
        ),
    ],
)
def test_permanent_errors_are_raised_typed_after_one_attempt(
    dead_store: EtcdStore, exc: grpc.RpcError, typed: type[StoreError]
) -> None:
    calls = []

    def failing(_client: object) -> None:
        calls.append(1)
        raise exc

    with pytest.raises(typed) as info:
        dead_store._call("put", failing, path="/k")
    assert calls == [1]
    assert info.value.__cause__ is exc
    assert exc.details() in str(info.value)
    dead_store.close()


def test_transient_then_success_is_retried(dead_store: EtcdStore) -> None:
    outcomes: list[BaseException | str] = [
        StatusError(grpc.StatusCode.UNAVAILABLE),
        StatusError(grpc.StatusCode.DEADLINE_EXCEEDED),
        "ok",
    ]

    def flaky(_client: object) -> str:
        item = outcomes.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    assert dead_store._call("get", flaky) == "ok"
    assert (
        dead_store.metrics.registry.get_sample_value("defender_etcd_retries_total", {"op": "get"})
        == 2
    )
    dead_store.close()


def test_bugs_are_not_wrapped(dead_store: EtcdStore) -> None:
    def buggy(_client: object) -> None:
        raise TypeError("programming error")

    with pytest.raises(TypeError):
        dead_store._call("get", buggy)
    dead_store.close()


def test_closed_store_refuses_calls(dead_store: EtcdStore) -> None:
    dead_store.close()
    with pytest.raises(StoreError, match="closed"):
        dead_store.get("/k")


def test_mixed_schemes_are_refused() -> None:
    with pytest.raises(SettingsError, match="mix"):
        EtcdStore(EtcdSettings(endpoints=["http://a:1", "https://b:2"]))


def test_missing_ca_file_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="ca_file"):
        EtcdStore(EtcdSettings(endpoints=["https://a:1"], ca_file="/nonexistent/ca.pem"))


def test_lease_ttl_must_be_positive(dead_store: EtcdStore) -> None:
    with pytest.raises(ValueError, match="at least 1 second"):
        dead_store.grant_lease(0)
    dead_store.close()


def test_a_failed_call_marks_the_endpoint_it_used(dead_store: EtcdStore) -> None:
    client = dead_store._client
    assert client.kvstub is not None  # this thread's next call goes to the current endpoint
    used = client._current_endpoint_label

    def switch_elsewhere() -> None:
        client.endpoints[used].fail()
        assert client.channel is not None  # another thread moves the client elsewhere

    t = threading.Thread(target=switch_elsewhere)
    t.start()
    t.join()
    now = client._current_endpoint_label
    assert now != used
    with pytest.raises(etcd_exc.ConnectionFailedError):
        try:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "connection refused")
        except grpc.RpcError as exc:
            client._manage_grpc_errors(exc)
    # pyetcd alone would have marked `now`, the endpoint this call never talked to.
    assert client.endpoints[used].is_failed()
    assert not client.endpoints[now].is_failed()
    dead_store.close()


def test_get_and_put_fail_over_from_the_endpoint_their_call_used(dead_store: EtcdStore) -> None:
    # get/put use a cached (endpoint, KV stub) pair read without the lock: a failed call must
    # still mark the endpoint it went to and drop the pair, so the next call picks another.
    client = dead_store._client
    first, _ = client._kv_stub()
    assert client._kv_stub()[0] == first  # cached
    with pytest.raises(etcd_exc.ConnectionFailedError):  # real UNAVAILABLE: nobody listens
        client.range(b"/k", None)
    assert client.endpoints[first].is_failed()
    assert client._kv is None
    second, _ = client._kv_stub()
    assert second != first
    with pytest.raises(etcd_exc.ConnectionFailedError):
        client.put_value(b"/k", b"v", 0)
    assert client.endpoints[second].is_failed()
    assert client._kv is None
    dead_store.close()


def test_the_store_counts_a_change_of_cluster_id_not_the_first_sighting(
    dead_store: EtcdStore, caplog: pytest.LogCaptureFixture
) -> None:
    # Readers forget remembered versions on a change (a restored cluster numbers on from its
    # snapshot); the first answer, a repeat, or a header without an id (0) is no change.
    for cluster_id in (0, 0x51, 0x51, 0):
        dead_store.observe_cluster(cluster_id)
    assert dead_store.cluster_changes == 0
    dead_store.observe_cluster(0x52)
    dead_store.observe_cluster(0x52)
    assert dead_store.cluster_changes == 1
    assert "another cluster (id 52, was 51)" in caplog.text
    dead_store.observe_cluster(0x51)
    assert dead_store.cluster_changes == 2
    dead_store.close()


@pytest.mark.parametrize(
    ("token", "simple"),
    [
        ("gpkWUmdDdAhUpHzA.1029", True),  # etcd's simple token: random part and raft index
        ("eyJhbGciOiJSUzI1NiJ9.eyJyZXZpc2lvbiI6Mn0.c2lnbmF0dXJl", False),  # a JWT
        ("gpkWUmdDdAhUpHzA", False),
        ("gpkWUmdDdAhUpHzA.x1", False),
    ],
)
def test_a_simple_token_is_told_from_a_jwt(token: str, simple: bool) -> None:
    assert _is_simple_token(token) is simple


def _login_store(token: str) -> tuple[EtcdStore, list[str]]:
    """A store with a user whose logins are recorded instead of sent (what `_authenticate`
    notes after a successful one)."""
    settings = EtcdSettings(
        endpoints=[f"127.0.0.1:{_closed_port()}"],
        user="agent",
        password="pw",
        retries=2,
        timeout_seconds=1.0,
        backoff_base_seconds=0.001,
        backoff_max_seconds=0.002,
    )
    store = EtcdStore(settings, registry=CollectorRegistry())  # its first login is deferred
    logins: list[str] = []

    def login() -> None:
        store._login_at = time.monotonic()
        store._token_simple = _is_simple_token(token)
        store._token_generation += 1
        store._token_ready = True
        logins.append(token)

    store._authenticate = login  # type: ignore[method-assign]
    return store, logins


def _timing_out_once() -> tuple[list[BaseException | str], object]:
    outcomes: list[BaseException | str] = [StatusError(grpc.StatusCode.DEADLINE_EXCEEDED), "ok"]

    def call(_client: object) -> str:
        item = outcomes.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    return outcomes, call


def test_a_timed_out_call_logs_in_again_with_a_simple_token() -> None:
    # A simple token of a cluster since restored makes every call wait out its deadline: the
    # store logs in again and tries once more, without counting a retry.
    store, logins = _login_store("gpkWUmdDdAhUpHzA.1029")
    try:
        store._authenticate()
        store._login_at -= 10.0  # logged in a while ago
        _, call = _timing_out_once()
        assert store._call("get", call) == "ok"  # type: ignore[arg-type]
        assert len(logins) == 2
        retries = store.metrics.registry.get_sample_value(
            "defender_etcd_retries_total", {"op": "get"}
        )
        assert not retries
        # Just logged in: the next timeout is retried as usual, without another login.
        _, call = _timing_out_once()
        assert store._call("get", call) == "ok"  # type: ignore[arg-type]
        assert len(logins) == 2
    finally:
        store.close()


def test_a_timed_out_call_keeps_a_jwt() -> None:
    store, logins = _login_store("eyJhbGciOiJSUzI1NiJ9.eyJyZXZpc2lvbiI6Mn0.c2lnbmF0dXJl")
    try:
        store._authenticate()
        store._login_at -= 10.0
        _, call = _timing_out_once()
        assert store._call("get", call) == "ok"  # type: ignore[arg-type]
        assert len(logins) == 1
    finally:
        store.close()
