"""pytest fixtures on the local cluster harness. Enable with
``pytest_plugins = ["defender_devcluster.pytest_plugin"]`` (tests/conftest.py does).

Session scope: ``defender_etcd`` (a 3-member :class:`EtcdCluster`), ``local_cluster``
(:class:`LocalCluster`: kube-apiserver, controller-manager, scheduler, and ``defender_etcd``),
``kubeconfig_path`` (admin kubeconfig; also exported as ``KUBECONFIG`` for subprocesses such as
kubectl, helm and kopf), ``k8s_api`` (a ``kubernetes.client.ApiClient``).
Function scope: ``etcd_prefix`` (a key prefix unique to the test), ``namespace`` (a fresh
namespace whose ``default`` ServiceAccount exists, deleted afterwards).

Autouse, session scope: ``isolated_env`` clears what a developer's shell may still export after
``source .devcluster/env.sh`` (``DEFENDER_*``, ``KUBECONFIG``, ``ETCDCTL_*``) for the test process
and every process it starts, so no test talks to a cluster it did not start. Only
``DEFENDER_TOOLS_BIN``/``DEFENDER_TOOLS_DIR`` stay: they say where the binaries are, not which
cluster to use.

A missing binary skips the tests that need it, except under ``CI=true`` where it fails them:
CI must never go green by skipping the real parts.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NoReturn

import pytest
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from ._cluster import LocalCluster
from ._errors import ToolNotFoundError
from ._etcd import EtcdCluster
from ._tools import tool
from ._wait import wait_for

# Start-up times measured this session, shown in the terminal summary (CI logs keep them).
_TIMINGS = pytest.StashKey[dict[str, float]]()


def _record_timing(config: pytest.Config, what: str, seconds: float) -> None:
    config.stash.setdefault(_TIMINGS, {})[what] = seconds


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    timings = config.stash.get(_TIMINGS, {})
    if timings:
        parts = ", ".join(f"{what} {secs:.1f}s" for what, secs in timings.items())
        terminalreporter.write_line(f"defender_devcluster start-up: {parts}")


# Where the built binaries are: chosen by the Makefile and hack/tools.sh, no cluster state.
_KEPT_ENV = frozenset({"DEFENDER_TOOLS_BIN", "DEFENDER_TOOLS_DIR"})


def caller_env_names(environ: Mapping[str, str]) -> list[str]:
    """The variables of `environ` that would point tests at somebody else's cluster."""
    return sorted(
        name
        for name in environ
        if name not in _KEPT_ENV
        and (name.startswith(("DEFENDER_", "ETCDCTL_")) or name == "KUBECONFIG")
    )


@pytest.fixture(scope="session", autouse=True)
def isolated_env() -> Iterator[None]:
    """Clear the caller's cluster exports for the session (restored afterwards). Subprocesses
    inherit os.environ, so they are cleared for them too; fixtures then set what the session's
    own cluster needs (``kubeconfig_path`` exports its ``KUBECONFIG``)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in caller_env_names(os.environ):
            mp.delenv(name)
        yield


_ETCD_FIXTURES = {"defender_etcd"}
_CLUSTER_FIXTURES = {"local_cluster", "kubeconfig_path", "k8s_api", "namespace"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "etcd: needs the local 3-member defender etcd cluster")
    config.addinivalue_line(
        "markers", "cluster: needs the local kube-apiserver/controller-manager (make tools)"
    )
    config.addinivalue_line(
        "markers", "node: runs pods on a real node (kubelet, containerd); needs root (tests/node)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the fixtures they use, so `-m "not cluster"` selects without guessing."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _CLUSTER_FIXTURES:
            item.add_marker("cluster")
        if names & (_ETCD_FIXTURES | _CLUSTER_FIXTURES):
            item.add_marker("etcd")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_part(what: str) -> NoReturn:
    """A real part a test needs is missing (`what` says which and how to get it): skip
    locally, fail under CI (the house rule: CI never skips a real part)."""
    if in_ci():
        pytest.fail(f"CI=true and {what}", pytrace=False)
    pytest.skip(what)


def missing_tool(exc: ToolNotFoundError) -> NoReturn:
    missing_part(f"a required binary is missing: {exc}")


@pytest.fixture(scope="session")
def defender_etcd(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[EtcdCluster]:
    """A real 3-member etcd cluster on 127.0.0.1, shared by the whole session.

    Tests must keep to their own ``etcd_prefix`` and restart any member they kill or stop
    (``restart_member``) so later tests see three healthy members again.
    """
    cluster = EtcdCluster(
        tmp_path_factory.mktemp("defender-etcd"), members=3, name="defender", die_with_parent=True
    )
    t0 = time.monotonic()
    try:
        cluster.start()
    except ToolNotFoundError as exc:
        missing_tool(exc)
    _record_timing(pytestconfig, "defender etcd (3 members)", time.monotonic() - t0)
    try:
        yield cluster
    finally:
        cluster.stop()


def private_etcd(
    run_dir: Path, name: str, *, extra_args: tuple[str, ...] = (), peer_proxy: bool = False
) -> Iterator[EtcdCluster]:
    """A 3-member cluster for one test alone (its data may be destroyed, its quota filled),
    stopped afterwards; `yield from private_etcd(...)` in a fixture. `peer_proxy` lets the
    test cut a member off (EtcdCluster.partition). A missing etcd binary skips, or fails under
    CI, like the session cluster."""
    cluster = EtcdCluster(
        run_dir,
        3,
        name=name,
        die_with_parent=True,
        peer_proxy=peer_proxy,
        extra_args=extra_args,
    )
    try:
        cluster.start()
    except ToolNotFoundError as exc:
        missing_tool(exc)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcdutl() -> str:
    """Path of the etcdutl binary (snapshot status and restore), built by `make tools`."""
    try:
        return str(tool("etcdutl"))
    except ToolNotFoundError as exc:
        missing_part(f"etcdutl is missing ({exc}); run `make tools` (hack/tools.sh builds it)")


@pytest.fixture
def etcd_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix no other test uses, e.g. ``/test/test_put_get-3f2a9c1b/`` (ends with /)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:60]
    return f"/test/{name}-{uuid.uuid4().hex[:8]}/"


@pytest.fixture(scope="session")
def local_cluster(
    tmp_path_factory: pytest.TempPathFactory,
    defender_etcd: EtcdCluster,
    pytestconfig: pytest.Config,
) -> Iterator[LocalCluster]:
    """kube-apiserver + controller-manager + scheduler (own 1-member etcd) and ``defender_etcd``.

    No kubelet runs: pods are created (and scheduled nowhere) but never start.
    """
    cluster = LocalCluster(
        tmp_path_factory.mktemp("local-cluster"), etcd=defender_etcd, die_with_parent=True
    )
    try:
        cluster.start()
    except ToolNotFoundError as exc:
        missing_tool(exc)
    _record_timing(pytestconfig, "control plane", cluster.start_seconds or 0.0)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kubeconfig_path(local_cluster: LocalCluster, isolated_env: None) -> Iterator[Path]:
    """Admin kubeconfig of the local cluster, also set as ``KUBECONFIG`` for the session."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBECONFIG", str(local_cluster.kubeconfig))
        yield local_cluster.kubeconfig


@pytest.fixture(scope="session")
def k8s_api(kubeconfig_path: Path) -> Iterator[k8s_client.ApiClient]:
    """A ``kubernetes`` ApiClient for the local cluster (admin, group system:masters)."""
    api: k8s_client.ApiClient = k8s_config.new_client_from_config(config_file=str(kubeconfig_path))
    try:
        yield api
    finally:
        api.close()


def namespace_name(test_name: str) -> str:
    """A DNS-1123 label unique to one test: ``t-<test name>-<8 hex>``, at most 63 chars."""
    slug = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:44].strip("-")
    return f"t-{slug}-{uuid.uuid4().hex[:8]}" if slug else f"t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def namespace(request: pytest.FixtureRequest, k8s_api: k8s_client.ApiClient) -> Iterator[str]:
    """A fresh namespace for this test; its ``default`` ServiceAccount exists; deleted after."""
    core = k8s_client.CoreV1Api(k8s_api)
    name = namespace_name(request.node.name)
    core.create_namespace(k8s_client.V1Namespace(metadata=k8s_client.V1ObjectMeta(name=name)))
    try:
        # Admission refuses pods until the serviceaccount controller has made `default`.
        def default_account() -> bool:
            try:
                core.read_namespaced_service_account("default", name)
            except k8s_client.ApiException as exc:
                if exc.status != 404:
                    raise
                return False
            return True

        wait_for(f"ServiceAccount {name}/default", default_account, timeout=60, every=0.2)
        yield name
    finally:
        # Not waiting for the namespace controller to finish: later tests use new names.
        core.delete_namespace(name)
