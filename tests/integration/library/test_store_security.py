"""TLS (CA + client certificate) and user/password auth against real single-member etcds.

The harness cluster is plaintext without auth, so these start their own etcd processes (by PID,
stopped afterwards): one serving TLS with client-certificate auth, one with auth enabled.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from defender_config import EtcdSettings, StoreAuthError, StoreError, StoreUnavailableError
from defender_config._store._keepalive import _Failure
from defender_config._store._pyetcd import _SharedClient
from defender_config.store import EtcdStore, WatchEvent
from defender_devcluster import (
    EtcdCluster,
    etcd_member_healthy,
    etcd_watch_counts,
    tool,
    wait_for,
)
from defender_devcluster._errors import ToolNotFoundError
from defender_devcluster._pki import Pki, make_pki
from defender_devcluster._procs import ManagedProcess, free_ports
from defender_devcluster.pytest_plugin import missing_tool

pytestmark = pytest.mark.etcd


@dataclass
class TlsEtcd:
    endpoint: str
    pki: Pki


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsEtcd]:
    try:
        etcd = tool("etcd")
    except ToolNotFoundError as exc:
        missing_tool(exc)
    run = tmp_path_factory.mktemp("tls-etcd")
    pki = make_pki(run / "pki", "10.0.0.1")
    client_port, peer_port = free_ports(2)
    endpoint = f"https://127.0.0.1:{client_port}"
    proc = ManagedProcess(
        "etcd-tls",
        [
            str(etcd),
            "--name=tls",
            f"--data-dir={run / 'data'}",
            f"--listen-client-urls={endpoint}",
            f"--advertise-client-urls={endpoint}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=tls=http://127.0.0.1:{peer_port}",
            f"--cert-file={pki.serving_cert}",
            f"--key-file={pki.serving_key}",
            f"--trusted-ca-file={pki.ca_cert}",
            "--client-cert-auth",
            "--log-level=warn",
        ],
        run,
        marker=str(run / "data"),
        die_with_parent=True,
    )
    proc.start()
    try:
        cert, key = pki.client("admin")
        settings = EtcdSettings(
            endpoints=[endpoint], ca_file=pki.ca_cert, cert_file=cert, key_file=key, retries=0
        )

        def up() -> bool:
            try:
                with EtcdStore(settings, registry=CollectorRegistry()) as s:
                    return s.has_quorum()
            except Exception:
                return False

        wait_for("the TLS etcd", up, timeout=60)
        yield TlsEtcd(endpoint, pki)
    finally:
        proc.stop()


def test_tls_with_client_certificate(tls_etcd: TlsEtcd, etcd_prefix: str) -> None:
    cert, key = tls_etcd.pki.client("admin")
    settings = EtcdSettings(
        endpoints=[tls_etcd.endpoint], ca_file=tls_etcd.pki.ca_cert, cert_file=cert, key_file=key
    )
    with EtcdStore(settings, registry=CollectorRegistry()) as store:
        store.put(etcd_prefix + "k", b"over tls")
        got = store.get(etcd_prefix + "k")
        assert got is not None and got.value == b"over tls"
        assert store.health().quorum


def test_tls_without_client_certificate_is_refused(tls_etcd: TlsEtcd, etcd_prefix: str) -> None:
    settings = EtcdSettings(
        endpoints=[tls_etcd.endpoint],
        ca_file=tls_etcd.pki.ca_cert,
        retries=1,
        timeout_seconds=2,
        backoff_base_seconds=0.01,
    )
    # The handshake fails, which gRPC reports as UNAVAILABLE: the message says to check TLS.
    with (
        EtcdStore(settings, registry=CollectorRegistry()) as store,
        pytest.raises(StoreUnavailableError, match="TLS/auth settings"),
    ):
        store.put(etcd_prefix + "k", b"x")


def test_tls_with_wrong_ca_is_refused(tls_etcd: TlsEtcd, tmp_path: Path, etcd_prefix: str) -> None:
    other = make_pki(tmp_path / "other", "10.0.0.1")
    cert, key = other.client("admin")
    settings = EtcdSettings(
        endpoints=[tls_etcd.endpoint],
        ca_file=other.ca_cert,
        cert_file=cert,
        key_file=key,
        retries=1,
        timeout_seconds=2,
        backoff_base_seconds=0.01,
    )
    with (
        EtcdStore(settings, registry=CollectorRegistry()) as store,
        pytest.raises(StoreUnavailableError),
    ):
        store.get(etcd_prefix + "k")


def _etcdctl(endpoint: str, *args: str, user: str | None = None) -> str:
    argv = [str(tool("etcdctl")), f"--endpoints={endpoint}"]
    if user:
        argv.append(f"--user={user}")
    out = subprocess.run(argv + list(args), check=True, capture_output=True, text=True)
    return out.stdout


@contextlib.contextmanager
def _auth_cluster(run_dir: Path, name: str, *extra_args: str) -> Iterator[str]:
    """One member with users root, app (readwrite /test/) and reader (read /test/), auth on."""
    cluster = EtcdCluster(
        run_dir, members=1, name=name, die_with_parent=True, extra_args=extra_args
    )
    try:
        cluster.start()
    except ToolNotFoundError as exc:
        missing_tool(exc)
    try:
        ep = cluster.endpoints[0]
        _etcdctl(ep, "user", "add", "root:rootpw", "--interactive=false")
        _etcdctl(ep, "user", "add", "app:apppw", "--interactive=false")
        _etcdctl(ep, "role", "add", "app")
        _etcdctl(ep, "role", "grant-permission", "app", "--prefix=true", "readwrite", "/test/")
        _etcdctl(ep, "user", "grant-role", "app", "app")
        _etcdctl(ep, "user", "add", "reader:readerpw", "--interactive=false")
        _etcdctl(ep, "role", "add", "reader")
        _etcdctl(ep, "role", "grant-permission", "reader", "--prefix=true", "read", "/test/")
        _etcdctl(ep, "user", "grant-role", "reader", "reader")
        _etcdctl(ep, "auth", "enable")
        assert etcd_member_healthy(ep)
        yield ep
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with _auth_cluster(tmp_path_factory.mktemp("auth-etcd"), "auth") as ep:
        yield ep


# Simple tokens unused this long are dropped by this member (etcd's default is 5 minutes).
TOKEN_TTL = 2


@pytest.fixture(scope="module")
def short_token_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    run_dir = tmp_path_factory.mktemp("short-token-etcd")
    with _auth_cluster(run_dir, "shorttoken", f"--auth-token-ttl={TOKEN_TTL}") as ep:
        yield ep


def _auth_settings(endpoint: str, user: str, password: str) -> EtcdSettings:
    return EtcdSettings.model_validate(
        {
            "endpoints": [endpoint],
            "user": user,
            "password": password,
            "retries": 2,
            "timeout_seconds": 3,
            "backoff_base_seconds": 0.01,
        }
    )


def test_user_password_auth_and_token_renewal(auth_etcd: str, etcd_prefix: str) -> None:
    with EtcdStore(_auth_settings(auth_etcd, "app", "apppw"), registry=CollectorRegistry()) as s:
        events: list[WatchEvent] = []
        handle = s.watch_prefix(etcd_prefix, events.append)
        s.put(etcd_prefix + "k", b"authorized")
        got = s.get(etcd_prefix + "k")
        assert got is not None and got.value == b"authorized"
        # An expired/invalid token (simple tokens live 5 minutes) is renewed once, transparently.
        s._client.metadata = (("token", "expired.token"),)
        s.put(etcd_prefix + "k", b"after renewal")
        wait_for("watch events under auth", lambda: len(events) == 2, timeout=10)
        handle.cancel()
        calls = s.metrics.registry.get_sample_value(
            "defender_etcd_calls_total", {"op": "authenticate"}
        )
        assert calls == 2


def test_watches_outlive_expired_tokens_once_each_and_leave_nothing_on_etcd(
    short_token_etcd: str, etcd_prefix: str
) -> None:
    # A token expires unused; the next call is refused, the store logs in again and drops the
    # watch stream of the old token. That stream was only half-closed, which etcd keeps open:
    # its watches went on under the old token, but a cancel could no longer reach them, and
    # they stayed on etcd until the store closed. Through each re-login every watch must
    # deliver every event once, etcd must hold one watcher per watch (none piling up), and
    # cancelling the watches must free etcd of them while the store runs on.
    ep = short_token_etcd
    baseline = etcd_watch_counts(ep)
    registry = CollectorRegistry()
    prefixes = [f"{etcd_prefix}w{i}/" for i in range(3)]
    events: dict[str, list[str]] = {p: [] for p in prefixes}

    def logins() -> float | None:
        return registry.get_sample_value("defender_etcd_calls_total", {"op": "authenticate"})

    with EtcdStore(_auth_settings(ep, "app", "apppw"), registry=registry) as s:
        handles = [s.watch_prefix(p, lambda e, p=p: events[p].append(e.key)) for p in prefixes]
        for handle in handles:
            assert handle.wait_connected(10)
        cycles = 3
        for cycle in range(cycles):
            before = logins()
            time.sleep(TOKEN_TTL + 1.5)  # the token expires unused
            for p in prefixes:
                s.put(f"{p}k{cycle}", b"v")
            assert logins() == (before or 0) + 1, "the expired token was not renewed"

            def delivered(n: int = cycle + 1) -> bool:
                return all(len(got) == n for got in events.values())

            wait_for(f"the events written after re-login {cycle + 1}", delivered, timeout=10)
            wait_for(
                "one watcher per watch on etcd, on one stream",
                lambda: etcd_watch_counts(ep) == (baseline[0] + 3, baseline[1] + 1),
                timeout=10,
            )
        time.sleep(0.5)  # nothing delivered twice
        assert events == {p: [f"{p}k{c}" for c in range(cycles)] for p in prefixes}
        for handle in handles:
            handle.cancel()
        wait_for(
            "etcd lets go of every watcher",
            lambda: etcd_watch_counts(ep)[0] == baseline[0],
            timeout=10,
        )


@pytest.mark.parametrize("defer_login", [True, False])
def test_wrong_password_is_an_auth_error_and_leaves_no_channel_open(
    auth_etcd: str, monkeypatch: pytest.MonkeyPatch, defer_login: bool
) -> None:
    # The constructor raises: the caller has no store to close, so the store closes its own.
    closed: list[_SharedClient] = []
    close = _SharedClient.close

    def recording_close(client: _SharedClient) -> None:
        closed.append(client)
        close(client)

    monkeypatch.setattr(_SharedClient, "close", recording_close)
    with pytest.raises(StoreAuthError, match="authentication as 'app' failed") as refused:
        EtcdStore(
            _auth_settings(auth_etcd, "app", "wrong"),
            registry=CollectorRegistry(),
            defer_login=defer_login,
        )
    assert refused.value.credentials_refused is True
    assert len(closed) == 1


def test_missing_permission_is_an_auth_error_not_retried(auth_etcd: str, etcd_prefix: str) -> None:
    registry = CollectorRegistry()
    with EtcdStore(_auth_settings(auth_etcd, "reader", "readerpw"), registry=registry) as s:
        assert s.get(etcd_prefix + "k") is None  # read is granted
        with pytest.raises(StoreAuthError, match="permission") as denied:
            s.put(etcd_prefix + "k", b"x")
        # A user etcd knows, lacking a right: not refused credentials (the agent clears such
        # an error only at a read of the same keys, never at a heartbeat put).
        assert denied.value.credentials_refused is False
        with pytest.raises(StoreAuthError) as outside:
            s.get("/outside/the/granted/prefix")
        assert outside.value.credentials_refused is False
        # Health reads a key the user may not read: "permission denied" still proves the member
        # answered through the quorum, as in `etcdctl endpoint health`.
        report = s.health()
        assert report.quorum and report.healthy_count == 1 and report.leader is not None
        assert s.has_quorum()
    assert registry.get_sample_value("defender_etcd_retries_total", {"op": "put"}) is None


def test_a_watch_etcd_refuses_is_an_auth_error_not_a_silent_one(
    auth_etcd: str, etcd_prefix: str
) -> None:
    # etcd answers a watch it refuses with "created" and "canceled" at once (id -1). Taken for
    # a running watch, it never delivered an event and never said why.
    with EtcdStore(
        _auth_settings(auth_etcd, "reader", "readerpw"), registry=CollectorRegistry()
    ) as s:
        errors: list[StoreError] = []
        handle = s.watch_prefix(
            "/outside/the/granted/prefix/",
            lambda _e: None,
            on_error=errors.append,
            start_revision=1,
        )
        try:
            wait_for("the refused watch reported", lambda: errors, timeout=10)
            assert isinstance(errors[0], StoreAuthError), errors
            assert "refused the watch" in str(errors[0])
            assert not handle.connected
        finally:
            handle.cancel()
        # A token etcd does not know: refused, logged in again, the watch runs.
        events: list[WatchEvent] = []
        with s._client._ep_lock:
            s._client.metadata = (("token", "abcdefghijklmnop.1"),)
            s._client._clear_old_stubs()
        handle = s.watch_prefix(etcd_prefix, events.append, start_revision=1)
        try:
            assert handle.wait_connected(10)
            with EtcdStore(
                _auth_settings(auth_etcd, "app", "apppw"), registry=CollectorRegistry()
            ) as w:
                w.put(etcd_prefix + "k", b"seen")
            wait_for("the event after the new login", lambda: events, timeout=10)
        finally:
            handle.cancel()


def test_login_is_deferred_while_etcd_is_down(tmp_path: Path, etcd_prefix: str) -> None:
    # The store is created before its etcd exists; the first call after etcd comes up logs in.
    client_port, peer_port = free_ports(2)
    endpoint = f"http://127.0.0.1:{client_port}"
    store = EtcdStore(_auth_settings(endpoint, "root", "rootpw"), registry=CollectorRegistry())
    proc = ManagedProcess(
        "etcd-late",
        [
            str(tool("etcd")),
            "--name=late",
            f"--data-dir={tmp_path / 'data'}",
            f"--listen-client-urls={endpoint}",
            f"--advertise-client-urls={endpoint}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=late=http://127.0.0.1:{peer_port}",
            "--log-level=warn",
        ],
        tmp_path,
        marker=str(tmp_path / "data"),
        die_with_parent=True,
    )
    try:
        with pytest.raises(StoreUnavailableError):
            store.put(etcd_prefix + "k", b"x")
        proc.start()
        wait_for("the late etcd", lambda: etcd_member_healthy(endpoint), timeout=60)
        _etcdctl(endpoint, "user", "add", "root:rootpw", "--interactive=false")
        _etcdctl(endpoint, "auth", "enable")
        store.put(etcd_prefix + "k", b"logged in late")
        got = store.get(etcd_prefix + "k")
        assert got is not None and got.value == b"logged in late"
        logins = store.metrics.registry.get_sample_value(
            "defender_etcd_calls_total", {"op": "authenticate"}
        )
        assert logins is not None and logins >= 2  # the failed one at start, then the late one
    finally:
        store.close()
        proc.stop()


def test_lease_keepalive_stream_under_auth(auth_etcd: str, etcd_prefix: str) -> None:
    # Keep-alives share one stream opened with the token of its time; a stream opened with a
    # token etcd no longer accepts is refused, and the store logs in again and reopens it.
    registry = CollectorRegistry()
    with EtcdStore(_auth_settings(auth_etcd, "app", "apppw"), registry=registry) as s:
        lease = s.grant_lease(30)
        s.put(etcd_prefix + "beat", b"alive", lease=lease)
        assert 0 < s.refresh_lease(lease) <= 30
        s._client.metadata = (("token", "expired.token"),)
        stream = s._keepalive._stream
        assert stream is not None
        stream.fail(_Failure(grpc.StatusCode.UNAVAILABLE, "closed by the test"))
        assert 0 < s.refresh_lease(lease) <= 30
        got = s.get(etcd_prefix + "beat")
        assert got is not None and got.value == b"alive"
        logins = registry.get_sample_value("defender_etcd_calls_total", {"op": "authenticate"})
        assert logins == 2  # at start, then once for the refused stream
        s.revoke_lease(lease)
        assert s.get(etcd_prefix + "beat") is None
