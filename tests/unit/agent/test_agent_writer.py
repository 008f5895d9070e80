from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from defender_agent import OutputDirError, WriteError, write_atomic
from defender_agent._writer import OutputDir, file_holds, file_signature, parse_mount_points


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
    with pytest.raises(WriteError, match="cannot open the directory") as info:
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


# --- the output path's directories: resolved once, never a link below the volume ---------------


def test_mount_points_are_read_from_mountinfo_with_escapes_undone() -> None:
    text = (
        "22 1 0:21 / / rw,relatime - overlay overlay rw\n"
        "35 22 0:33 / /run/ml-defender/config rw,nosuid - tmpfs tmpfs rw,size=33792k\n"
        "36 22 0:34 / /mnt/with\\040space rw - tmpfs tmpfs rw\n"
        "\n"
    )
    assert parse_mount_points(text) == {"/", "/run/ml-defender/config", "/mnt/with space"}


def test_the_default_mount_points_are_this_process_s() -> None:
    # /proc is a mount in every Linux process's view (and /proc/sys often one of its own).
    directory = OutputDir.resolve("/proc/sys/kernel/demo.json")
    assert directory.root in ("/proc", "/proc/sys")
    assert directory.path == Path("/proc/sys/kernel")


def _volume_behind_a_var_run_link(tmp_path: Path) -> tuple[Path, Path, frozenset[str]]:
    """``<tmp>/run/vol`` is the shared volume (a mount point, as the test says), reached
    through ``<tmp>/var/run``, a link to ``<tmp>/run``, as /var/run is in Debian images."""
    volume = tmp_path / "run" / "vol"
    volume.mkdir(parents=True)
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "run").symlink_to(tmp_path / "run")
    return tmp_path / "var" / "run" / "vol", volume, frozenset({"/", str(volume.resolve())})


@pytest.mark.parametrize("below", [(), ("sub",), ("sub", "deeper")])
def test_a_link_above_the_volume_is_followed(tmp_path: Path, below: tuple[str, ...]) -> None:
    through_link, volume, mounts = _volume_behind_a_var_run_link(tmp_path)
    volume.joinpath(*below).mkdir(parents=True, exist_ok=True)
    target = through_link.joinpath(*below, "config.json")
    directory = OutputDir.resolve(target, mounts)
    assert directory == OutputDir(str(volume.resolve()), below)
    write_atomic(target, b"abc", directory=directory)
    assert volume.joinpath(*below, "config.json").read_bytes() == b"abc"
    assert file_holds(target, b"abc", directory=directory)
    assert file_signature(target, directory=directory) is not None


def test_a_subdirectory_swapped_for_a_link_after_start_is_refused(tmp_path: Path) -> None:
    through_link, volume, mounts = _volume_behind_a_var_run_link(tmp_path)
    (volume / "sub").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = through_link / "sub" / "config.json"
    directory = OutputDir.resolve(target, mounts)
    write_atomic(target, b"abc", directory=directory)
    (elsewhere / "config.json").write_bytes(b"abc")  # a copy, to be taken for the file
    # The component's container swaps the subdirectory for a link to somewhere the agent
    # may write.
    (volume / "sub").rename(volume / "old")
    (volume / "sub").symlink_to(elsewhere)
    with pytest.raises(WriteError, match="is a symbolic link") as info:
        write_atomic(target, b"new", directory=directory)
    assert info.value.reason == "WriteFailed"
    assert "put the directory back" in str(info.value) and "not full" not in str(info.value)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["config.json"]  # no temporary file
    assert (elsewhere / "config.json").read_bytes() == b"abc"  # nothing written there
    assert not file_holds(target, b"abc", directory=directory)
    assert file_signature(target, directory=directory) is None
    # Put back: written again.
    (volume / "sub").unlink()
    (volume / "old").rename(volume / "sub")
    write_atomic(target, b"new", directory=directory)
    assert (volume / "sub" / "config.json").read_bytes() == b"new"


def test_a_link_below_the_volume_at_start_is_refused_too(tmp_path: Path) -> None:
    # Put there before the agent started: a link in the volume is refused at start, wherever
    # it points (here: elsewhere on the root file system), and nothing is ever written there.
    through_link, volume, mounts = _volume_behind_a_var_run_link(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (volume / "sub").symlink_to(elsewhere)
    target = through_link / "sub" / "config.json"
    with pytest.raises(OutputDirError, match="is a symbolic link in the mount") as info:
        OutputDir.resolve(target, mounts)
    assert info.value.reason == "OutputDirRefused"
    assert str(volume.resolve() / "sub") in str(info.value)
    assert list(elsewhere.iterdir()) == []


def _another_volume(tmp_path: Path, mounts: frozenset[str]) -> tuple[Path, frozenset[str]]:
    """``<tmp>/other``: a second volume of the pod (a mount point, as the test says)."""
    other = tmp_path / "other"
    other.mkdir()
    return other, mounts | {str(other.resolve())}


def test_a_link_from_the_volume_to_another_volume_s_root_is_refused_at_start(
    tmp_path: Path,
) -> None:
    # A compromised init container left `sub` in the shared volume pointing at the root of
    # another volume: resolved like the image's links, the config went there.
    through_link, volume, mounts = _volume_behind_a_var_run_link(tmp_path)
    other, mounts = _another_volume(tmp_path, mounts)
    (volume / "sub").symlink_to(other)
    with pytest.raises(OutputDirError, match="is a symbolic link in the mount"):
        OutputDir.resolve(through_link / "sub" / "config.json", mounts)
    assert list(other.iterdir()) == []


def test_a_link_from_the_volume_to_slash_is_refused_at_start(tmp_path: Path) -> None:
    # `sub` -> `/`, and the names after it lead (from /) to another mount: the config would
    # have been written at that mount's root.
    through_link, volume, mounts = _volume_behind_a_var_run_link(tmp_path)
    other, mounts = _another_volume(tmp_path, mounts)
    (volume / "sub").symlink_to("/")
    target = through_link.joinpath("sub", *other.resolve().parts[1:], "config.json")
    with pytest.raises(OutputDirError, match="is a symbolic link in the mount"):
        OutputDir.resolve(target, mounts)
    assert list(other.iterdir()) == []


def test_an_image_link_is_not_a_way_through_a_link_in_a_volume(tmp_path: Path) -> None:
    # The image's link is followed, but its target crosses a link planted in the volume: each
    # link on the way is judged where it lies, not only the first.
    through_link, volume, mounts = _volume_behind_a_var_run_link(tmp_path)
    other, mounts = _another_volume(tmp_path, mounts)
    (volume / "evil").symlink_to(other)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "config").symlink_to(through_link / "evil")
    with pytest.raises(OutputDirError, match="is a symbolic link in the mount"):
        OutputDir.resolve(tmp_path / "etc" / "config" / "config.json", mounts)


def test_relative_image_links_resolve_as_the_kernel_does(tmp_path: Path) -> None:
    # `var/run -> ../run` (as Debian ships it) and a chain of two links on the root file system.
    volume = tmp_path / "run" / "vol"
    volume.mkdir(parents=True)
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "run").symlink_to("../run")
    (tmp_path / "shortcut").symlink_to(tmp_path / "var" / "run" / "vol")
    mounts = frozenset({"/", str(volume.resolve())})
    for target in (tmp_path / "var" / "run" / "vol" / "c.json", tmp_path / "shortcut" / "c.json"):
        assert OutputDir.resolve(target, mounts) == OutputDir(str(volume.resolve()))


def test_a_loop_of_links_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(OutputDirError, match="more than 40 symbolic links"):
        OutputDir.resolve(tmp_path / "a" / "c.json", frozenset({"/"}))


def test_without_a_mount_the_parent_s_real_path_at_start_is_trusted(tmp_path: Path) -> None:
    # Outside Kubernetes (no mount on the way): the parent's real path as it is at start; a
    # link that replaces one of its directories later is refused all the same.
    (tmp_path / "real" / "dir").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    target = tmp_path / "alias" / "dir" / "config.json"
    directory = OutputDir.resolve(target, frozenset({"/"}))
    assert directory == OutputDir(str((tmp_path / "real" / "dir").resolve()))
    write_atomic(target, b"abc", directory=directory)
    assert (tmp_path / "real" / "dir" / "config.json").read_bytes() == b"abc"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "real" / "dir").rename(tmp_path / "real" / "old")
    (tmp_path / "real" / "dir").symlink_to(elsewhere)
    with pytest.raises(WriteError, match="is a symbolic link"):
        write_atomic(target, b"new", directory=directory)
    assert list(elsewhere.iterdir()) == []


def test_a_loop_of_links_is_a_write_error_for_a_caller_without_a_resolved_directory(
    tmp_path: Path,
) -> None:
    # write_atomic outside the agent (no directory resolved at start) raises WriteError on any
    # failure, as documented; the checks answer "not there".
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(WriteError):
        write_atomic(tmp_path / "a" / "c.json", b"abc")
    assert not file_holds(tmp_path / "a" / "c.json", b"abc")
    assert file_signature(tmp_path / "a" / "c.json") is None


def test_a_directory_the_agent_may_write_but_not_read_still_takes_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Mode 0333 (root reads it anyway, hence the refusal is simulated): the file is created and
    # renamed as before the walk existed; only the flush fails, which the caller knows to mean
    # "the file is in place, the reload still owed".
    from defender_agent import _writer

    real_open = os.open

    def no_read(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags == _writer._DIR_FLAGS:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", no_read)
    with pytest.raises(WriteError, match="cannot flush the directory"):
        write_atomic(tmp_path / "config.json", b"abc")
    assert (tmp_path / "config.json").read_bytes() == b"abc"
