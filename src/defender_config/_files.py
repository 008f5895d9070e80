"""Replacing a local file whole: the agent's decoded config on the shared volume, the plugin's
keyring export, an etcd snapshot.

A reader must only ever see the old file or the new file, never a mix: the new content goes to a
temporary file in the *same* directory (rename is only atomic within one file system), is flushed
to disk, then renamed over the target, and the directory entry is flushed too so the rename
survives a crash. The temporary file is created exclusively with mode 0600 and the target is
never opened, so neither a pre-existing file's mode nor a symbolic link at the path decides who
can read the new content: rename(2) replaces the link itself.

Reading such a file back (`read_regular_file`) is the other half: a file on a volume another
container can write may have been replaced by a FIFO (an open blocks for ever), a device such as
/dev/zero (a read never ends) or a symbolic link to either, so the read is bounded and refuses
anything that is not a regular file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ._errors import FileWriteError

__all__ = ["read_file_bounded", "read_regular_file", "write_file_atomic"]


def write_file_atomic(
    path: str | os.PathLike[str], data: bytes | Iterable[bytes], mode: int
) -> None:
    """Replace ``path`` with ``data`` (bytes, or chunks of them as they arrive, e.g. a stream;
    file mode ``mode``, whatever the umask) so that no reader ever sees a partial file.

    Raises :class:`FileWriteError` on any failure to write; an error raised by the chunks'
    iterator is raised as it is. Either way the previous file, if any, is untouched and the
    temporary file is removed (see the error for the one exception, the directory flush).
    """
    target = Path(path)
    directory = target.parent
    try:
        fd, tmp_name = _mkstemp(directory, target.name)
    except OSError as exc:
        detail = f"cannot create a temporary file in {directory}: {exc.strerror or exc}"
        raise FileWriteError(str(target), detail) from exc
    tmp = Path(tmp_name)
    chunks = (data,) if isinstance(data, bytes) else data
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            # mkstemp creates 0600 and the umask may differ between images: set the mode the
            # readers expect explicitly.
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        # Whatever ended the write (the disk, a stream that broke off, an interrupt), the
        # temporary file must not stay behind.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if not isinstance(exc, OSError):
            raise
        detail = f"{type(exc).__name__}: {exc.strerror or exc}"
        raise FileWriteError(str(target), detail) from exc
    _fsync_dir(directory)


def _mkstemp(directory: Path, name: str) -> tuple[int, str]:
    # A dot prefix keeps file watchers that skip hidden files from picking up the temp file.
    return tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)


def _fsync_dir(directory: Path) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        detail = f"cannot open the directory to flush it: {exc}"
        raise FileWriteError(str(directory), detail) from exc
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        # Some file systems (e.g. certain FUSE or tmpfs variants) refuse fsync on a directory;
        # the rename already happened, so the file is complete either way.
        if exc.errno != errno.EINVAL:
            detail = f"cannot flush the directory: {exc}"
            raise FileWriteError(str(directory), detail) from exc
    finally:
        os.close(dir_fd)


def read_regular_file(
    path: str | os.PathLike[str], max_bytes: int, *, follow_symlinks: bool = True
) -> bytes:
    """The content of ``path`` when it is a regular file of at most ``max_bytes`` bytes.

    Never blocks on a FIFO and never reads more than ``max_bytes + 1`` bytes. Raises OSError:
    FileNotFoundError when there is no file, ``ELOOP`` for a symbolic link when
    ``follow_symlinks`` is false, ``EINVAL`` for anything but a regular file, ``EFBIG`` when the
    file is larger than ``max_bytes``; each with a ``strerror`` fit for a one-line message.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        chunks: list[bytes] = []
        size = 0
        # The size from fstat is not trusted: the writer may still be appending.
        while size <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes", str(path))
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_file_bounded(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The content of ``path``, opened and read as any file a person names (a FIFO or a process
    substitution ``<(...)`` included), but never more than ``max_bytes + 1`` bytes: a path to a
    huge file by mistake, or to /dev/zero, is an error instead of all of memory. Raises OSError
    as ``open`` does, and ``EFBIG`` (with a ``strerror`` fit for a one-line message) when there
    is more than ``max_bytes``."""
    with open(path, "rb") as file:
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(errno.EFBIG, f"larger than {max_bytes // 1024} KiB", str(path))
    return data
