"""pytest fixtures on the local cluster harness. Enable with
``pytest_plugins = ["defender_devcluster.pytest_plugin"]`` (tests/conftest.py does).

Session scope: ``defender_etcd`` (a 3-member :class:`EtcdCluster`).
Function scope: ``etcd_prefix`` (a key prefix unique to the test).

A missing binary skips the tests that need it, except under ``CI=true`` where it fails them:
CI must never go green by skipping the real parts.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from typing import NoReturn

import pytest

from ._errors import ToolNotFoundError
from ._etcd import EtcdCluster


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_tool(exc: ToolNotFoundError) -> NoReturn:
    """Skip locally, fail under CI (the house rule: CI never skips a real part)."""
    if in_ci():
        pytest.fail(f"CI=true and a required binary is missing: {exc}", pytrace=False)
    pytest.skip(f"{exc}")


@pytest.fixture(scope="session")
def defender_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A real 3-member etcd cluster on 127.0.0.1, shared by the whole session.

    Tests must keep to their own ``etcd_prefix`` and restart any member they kill or stop
    (``restart_member``) so later tests see three healthy members again.
    """
    cluster = EtcdCluster(
        tmp_path_factory.mktemp("defender-etcd"), members=3, name="defender", die_with_parent=True
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
def etcd_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix no other test uses, e.g. ``/test/test_put_get-3f2a9c1b/`` (ends with /)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:60]
    return f"/test/{name}-{uuid.uuid4().hex[:8]}/"
