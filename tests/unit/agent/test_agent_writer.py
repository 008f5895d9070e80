from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import pytest

from defender_agent import WriteError, write_atomic
from defender_agent._writer import file_holds


def test_writes_content_with_mode(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    write_atomic(target, b'{"a": 1}', mode=0o640)
    assert target.read_bytes() == b'{"a": 1}'
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    write_atomic(target, b'{"a": 2}', mode=0o600)
    assert target.read_bytes() == b'{"a": 2}'
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_mode_ignores_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_atomic(tmp_path / "c", b"x", mode=0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o644


def test_replaces_inode_so_open_readers_keep_old_content(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    write_atomic(target, b"old")
    with target.open("rb") as reader:
        write_atomic(target, b"new")
        assert reader.read() == b"old"
    assert target.read_bytes() == b"new"


def test_no_temp_files_left(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    for i in range(5):
        write_atomic(target, str(i).encode())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_missing_directory_raises_write_error(tmp_path: Path) -> None:
    with pytest.raises(WriteError, match="temporary file") as info:
        write_atomic(tmp_path / "nope" / "config.json", b"x")
    assert info.value.reason == "WriteFailed"


def test_failed_rename_keeps_previous_file_and_cleans_up(tmp_path: Path) -> None:
    # The target is a non-empty directory: rename(2) fails after the temp file was written.
    target = tmp_path / "config.json"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(WriteError, match=r"config\.json"):
        write_atomic(target, b"new")
    assert (target / "keep").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_file_holds(tmp_path: Path) -> None:
    assert not file_holds(tmp_path / "absent", b"abc")
    write_atomic(tmp_path / "c", b"abc")
    assert file_holds(tmp_path / "c", b"abc")
    assert not file_holds(tmp_path / "c", b"ab")
    assert not file_holds(tmp_path / "c", b"abcd")


def test_file_holds_does_not_follow_a_link_planted_by_the_component(tmp_path: Path) -> None:
    # The component's container shares the volume: a link to a file that happens to hold the
    # config must still be replaced by the agent's own regular file.
    (tmp_path / "elsewhere").write_bytes(b"abc")
    (tmp_path / "c").symlink_to(tmp_path / "elsewhere")
    assert not file_holds(tmp_path / "c", b"abc")


def test_concurrent_reader_never_sees_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    # Large, distinct payloads so a torn read would be visible as a mix or a short read.
    payloads = [bytes([65 + i]) * 300_000 for i in range(4)]
    write_atomic(target, payloads[0])
    stop = threading.Event()
    bad: list[int] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            data = target.read_bytes()
            reads += 1
            if data not in payloads:
                bad.append(len(data))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(60):
            write_atomic(target, payloads[i % len(payloads)])
    finally:
        stop.set()
        thread.join()
    assert reads > 0
    assert bad == []


def _fail_dir_fsync(monkeypatch: pytest.MonkeyPatch, code: int) -> list[int]:
    """Make fsync of a directory fail with `code`, as some file systems do; files still sync."""
    real = os.fsync
    refused: list[int] = []

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            refused.append(fd)
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return refused


def test_directory_fsync_refused_with_einval_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = _fail_dir_fsync(monkeypatch, errno.EINVAL)
    target = tmp_path / "config.json"
    write_atomic(target, b'{"v": 1}')
    assert refused, "the directory fsync was not attempted"
    assert target.read_bytes() == b'{"v": 1}'


def test_directory_fsync_io_error_is_a_write_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_dir_fsync(monkeypatch, errno.EIO)
    with pytest.raises(WriteError, match="cannot flush the directory"):
        write_atomic(tmp_path / "config.json", b'{"v": 1}')
