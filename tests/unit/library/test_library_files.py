"""`write_file_atomic`, the one way the agent and the plugin replace a local file: what the
agent's writer tests do not already show (they drive the same code through `write_atomic`)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from defender_config import DefenderConfigError, FileWriteError, write_file_atomic


def test_an_existing_world_readable_file_ends_with_the_mode_asked_for(tmp_path: Path) -> None:
    target = tmp_path / "secret.json"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_file_atomic(target, b"new", 0o600)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_symbolic_link_is_replaced_not_written_through(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"untouched")
    link = tmp_path / "link"
    link.symlink_to(elsewhere)
    write_file_atomic(link, b"new", 0o600)
    assert not link.is_symlink() and link.read_bytes() == b"new"
    assert elsewhere.read_bytes() == b"untouched"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "secret.json"
    target.write_bytes(b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(FileWriteError) as caught:
        write_file_atomic(target, b"new", 0o600)
    assert isinstance(caught.value, DefenderConfigError)
    assert caught.value.reason == "FileWriteFailed" and caught.value.path == str(target)
    assert str(caught.value) == f"cannot write {target}: OSError: No space left on device"
    assert "new" not in str(caught.value)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.json"]


def test_chunks_are_written_in_order(tmp_path: Path) -> None:
    target = tmp_path / "snapshot.db"
    write_file_atomic(target, iter([b"ab", b"", b"cd"]), 0o600)
    assert target.read_bytes() == b"abcd"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_stream_that_breaks_off_keeps_the_old_file_and_leaves_no_temporary_file(
    tmp_path: Path,
) -> None:
    """The stream's own error (a gRPC one, say) is the caller's to type: raised as it is."""
    target = tmp_path / "snapshot.db"
    target.write_bytes(b"old")

    class BrokeOff(Exception):
        pass

    def chunks() -> Iterator[bytes]:
        yield b"partial"
        raise BrokeOff("member went away")

    with pytest.raises(BrokeOff):
        write_file_atomic(target, chunks(), 0o600)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot.db"]


def test_read_regular_file_is_bounded_and_refuses_what_is_not_a_file(tmp_path: Path) -> None:
    from defender_config import read_regular_file

    (tmp_path / "f").write_bytes(b"12345")
    assert read_regular_file(tmp_path / "f", 5) == b"12345"
    with pytest.raises(OSError) as too_big:
        read_regular_file(tmp_path / "f", 4)
    assert too_big.value.errno == errno.EFBIG
    os.mkfifo(tmp_path / "pipe")  # an open for reading would wait for a writer for ever
    with pytest.raises(OSError) as fifo:
        read_regular_file(tmp_path / "pipe", 10)
    assert fifo.value.errno == errno.EINVAL
    (tmp_path / "zero").symlink_to("/dev/zero")  # a read that never ends
    with pytest.raises(OSError) as device:
        read_regular_file(tmp_path / "zero", 10)
    assert device.value.errno == errno.EINVAL
    (tmp_path / "link").symlink_to(tmp_path / "f")
    assert read_regular_file(tmp_path / "link", 5) == b"12345"
    with pytest.raises(OSError) as link:
        read_regular_file(tmp_path / "link", 5, follow_symlinks=False)
    assert link.value.errno == errno.ELOOP
    with pytest.raises(FileNotFoundError):
        read_regular_file(tmp_path / "absent", 5)
