"""Reliability suites: chaos on the real 3-member etcd, key rotation under load, bad input, and
secrets hygiene. Long variants are `@pytest.mark.slow` (`make test-reliability` runs them all;
`make test` runs the rest).

Every log record of the session is kept in the hygiene ledger (reliability_support.HYGIENE) so
test_zz_secrets_hygiene.py can search it for key material.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from reliability_support import HYGIENE, restore_members

from defender_config import Alert
from defender_devcluster import EtcdCluster


@pytest.fixture(scope="module", autouse=True)
def _hygiene_ledger() -> Iterator[None]:
    # Per module, not per session: the root logger goes to DEBUG only while this folder's
    # tests run, so suites collected later see the logging setup they expect.
    HYGIENE.install()
    try:
        yield
    finally:
        HYGIENE.uninstall()


@pytest.fixture
def healthy_etcd(defender_etcd: EtcdCluster) -> Iterator[EtcdCluster]:
    """The harness etcd with three running members before and after the test (members the
    test killed or stopped are restarted), and its logs noted for the hygiene check."""
    restore_members(defender_etcd)
    for i in range(defender_etcd.members):
        HYGIENE.log_files.add(defender_etcd.log_path(i))
    yield defender_etcd
    restore_members(defender_etcd)


@pytest.fixture
def alerts() -> list[Alert]:
    return []
