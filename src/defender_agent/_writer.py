"""Atomic file replacement for the decoded config on the shared volume.

A reader (the component) must only ever see the old file or the new file, never a mix. How that
is done (temporary file in the same directory, fsync, rename, directory fsync) is the library's
`write_file_atomic`, shared with the plugin's keyring export; here its error becomes the agent's
WriteError (reason `WriteFailed`, which heartbeats and alerts carry).
"""

from __future__ import annotations

import os

from defender_config import FileWriteError, read_regular_file, write_file_atomic

from ._errors import WriteError

__all__ = ["DEFAULT_FILE_MODE", "file_holds", "file_signature", "write_atomic"]

DEFAULT_FILE_MODE = 0o640


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = DEFAULT_FILE_MODE) -> None:
    """Replace ``path`` with ``data`` so that no reader ever sees a partial file.

    Raises :class:`WriteError` on any failure; the previous file, if any, is untouched and the
    temporary file is removed.
    """
    try:
        write_file_atomic(path, data, mode)
    except FileWriteError as exc:
        raise WriteError(exc.path, exc.detail) from exc


def file_holds(path: str | os.PathLike[str], data: bytes) -> bool:
    """True when ``path`` is a regular file whose content is exactly ``data``.

    The component's container can write the shared volume and may have put a FIFO, a device or
    a symbolic link at the path: none of them holds the config, so the answer is False and the
    caller's write replaces the entry (rename replaces a link, it does not write through it).
    Nothing is followed, nothing blocks, and at most ``len(data) + 1`` bytes are read.
    """
    try:
        return read_regular_file(path, len(data), follow_symlinks=False) == data
    except OSError:
        return False


def file_signature(path: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """What ``lstat`` says of the entry at ``path`` (device, inode, type and mode, size, change
    and modification times), None when there is none: an edit or a replacement changes it, so
    the content is only read again when it did (one ``lstat`` per check in the steady state)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
