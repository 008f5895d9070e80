"""Removing a node network takes its lock file along, also from a process that did not make it
(`make down` after `make up`), but never from under a run that still holds it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from defender_devcluster import _nodenet

NETNS = "dfnode-0000abcd"


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(_nodenet, "REGISTRY", tmp_path / "registry")
    monkeypatch.setattr(_nodenet, "NETNS_DIR", tmp_path / "netns")  # no netns to delete
    monkeypatch.setattr(_nodenet, "harness_rules", lambda netns: [])
    (tmp_path / "registry").mkdir()
    return tmp_path / "registry"


def test_a_network_removed_by_another_process_loses_its_lock_file(registry: Path) -> None:
    lock = registry / f"{NETNS}.lock"
    lock.touch()  # left by the run that made the network and has exited
    _nodenet.remove_network(NETNS, "dfh-absent")
    assert not lock.exists()


def test_the_lock_file_of_a_run_that_still_holds_it_stays(registry: Path) -> None:
    lock = registry / f"{NETNS}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live run's hold
        _nodenet.remove_network(NETNS, "dfh-absent")
        assert lock.exists()
    finally:
        os.close(fd)
