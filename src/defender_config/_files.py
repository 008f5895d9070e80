"""Replacing a local file whole: the agent's decoded config on the shared volume, the plugin's
keyring export, an etcd snapshot.

A reader must only ever see the old file or the new file, never a mix: the new content goes to a
temporary file in the *same* directory (rename is only atomic within one file system), is flushed
to disk, then renamed over the target, and the directory entry is flushed too so the rename
survives a crash. The temporary file is created exclusively with mode 0600 and the target is
never opened, so neither a pre-existing file's mode nor a symbolic link at the path decides who
can read the new content: rename(2) replaces the link itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ._errors import FileWriteError

__all__ = ["write_file_atomic"]


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
