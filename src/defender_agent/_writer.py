"""Atomic file replacement for the decoded config on the shared volume.

A reader (the component) must only ever see the old file or the new file, never a mix. How that
is done (temporary file in the same directory, fsync, rename, directory fsync) is the library's
`write_file_atomic`, shared with the plugin's keyring export; here its error becomes the agent's
WriteError (reason `WriteFailed`, which heartbeats and alerts carry).
"""

from __future__ import annotations

import os
from pathlib import Path

from defender_config import FileWriteError, write_file_atomic

from ._errors import WriteError

__all__ = ["DEFAULT_FILE_MODE", "read_current", "write_atomic"]

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


def read_current(path: str | os.PathLike[str]) -> bytes | None:
    """Return the bytes currently at ``path`` or ``None`` when there is no file yet."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None
