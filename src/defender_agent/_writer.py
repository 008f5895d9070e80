"""Atomic file replacement for the decoded config on the shared volume.

A reader (the component) must only ever see the old file or the new file, never a mix: the new
content goes to a temporary file in the *same* directory (rename is only atomic within one file
system), is flushed to disk, then renamed over the target, and the directory entry is flushed too
so the rename survives a node crash.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from ._errors import WriteError

__all__ = ["DEFAULT_FILE_MODE", "read_current", "write_atomic"]

DEFAULT_FILE_MODE = 0o640


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = DEFAULT_FILE_MODE) -> None:
    """Replace ``path`` with ``data`` so that no reader ever sees a partial file.

    Raises :class:`WriteError` on any failure; the previous file, if any, is untouched and the
    temporary file is removed.
    """
    target = Path(path)
    directory = target.parent
    try:
        fd, tmp_name = _mkstemp(directory, target.name)
    except OSError as exc:
        detail = f"cannot create a temporary file in {directory}: {exc.strerror or exc}"
        raise WriteError(str(target), detail) from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            # mkstemp creates 0600 and the umask may differ between images: set the mode the
            # component's user/group expects explicitly.
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise WriteError(str(target), f"{type(exc).__name__}: {exc.strerror or exc}") from exc
    _fsync_dir(directory)


def read_current(path: str | os.PathLike[str]) -> bytes | None:
    """Return the bytes currently at ``path`` or ``None`` when there is no file yet."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


def _mkstemp(directory: Path, name: str) -> tuple[int, str]:
    # A dot prefix keeps file watchers that skip hidden files from picking up the temp file.
    return tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)


def _fsync_dir(directory: Path) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise WriteError(str(directory), f"cannot open the directory to flush it: {exc}") from exc
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        # Some file systems (e.g. certain FUSE or tmpfs variants) refuse fsync on a directory;
        # the rename already happened, so the file is complete either way.
        if exc.errno != errno.EINVAL:
            raise WriteError(str(directory), f"cannot flush the directory: {exc}") from exc
    finally:
        os.close(dir_fd)
