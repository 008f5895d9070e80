"""`kubectl defender restore` prints lines the chart's members can run as they are."""

from __future__ import annotations

from pathlib import Path

import pytest

from defender_cli import _etcd_commands as etcd
from defender_config import MaintenanceError

_MEMBERS = ["e-0=https://e-0:2380", "e-1=https://e-1:2380", "e-2=https://e-2:2380"]


@pytest.fixture
def snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "s.db"
    path.write_bytes(b"not checked here")
    monkeypatch.setattr(etcd, "verify_snapshot", lambda *_a, **_k: {"revision": 7})
    return path


def test_printed_plan_takes_the_charts_one_data_dir(snapshot: Path) -> None:
    # Each member mounts its own PVC at /var/lib/etcd and reads /var/lib/etcd/data.
    data = etcd.restore(snapshot, _MEMBERS, "/var/lib/etcd/data", "t", None, run=False)
    assert [s["dataDir"] for s in data["steps"]] == ["/var/lib/etcd/data"] * 3
    assert "--data-dir=/var/lib/etcd/data" in data["steps"][2]["argv"]


def test_run_here_still_needs_a_directory_per_member(snapshot: Path, tmp_path: Path) -> None:
    with pytest.raises(MaintenanceError, match="must contain"):
        etcd.restore(snapshot, _MEMBERS, str(tmp_path / "d"), "t", "etcdutl", run=True)
