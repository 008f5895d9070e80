"""Atomic file replacement for the decoded config on the shared volume.

A reader (the component) must only ever see the old file or the new file, never a mix: the new
content goes to a temporary file in the same directory (created exclusively, mode 0600 until it
is complete), is flushed, renamed over the target, and the directory is flushed too. The error
is the agent's WriteError (reason ``WriteFailed``, which heartbeats and alerts carry).

The component's container can write the shared volume, so it can also replace a subdirectory
of the output path with a symbolic link to somewhere else the agent may write: the agent would
then write the config (and its temporary files) wherever the link points. So the directory is
opened one component at a time without following a symbolic link (``O_NOFOLLOW``), and the
temporary file, the rename, the directory flush and the comparison all go through that one
directory descriptor: a link anywhere in the output path's directories is ``WriteFailed``. A
Kubernetes volume is a mount, not a link, at its ``mountPath`` (the ``..data`` links are inside
read-only projected volumes, which the agent never writes), so an emptyDir is unaffected; a path
through a link of the image itself (``/var/run`` on some) must be given as its real path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from ._errors import WriteError

__all__ = ["DEFAULT_FILE_MODE", "file_holds", "file_signature", "open_directory", "write_atomic"]

DEFAULT_FILE_MODE = 0o640

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_WALK_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def open_directory(path: str | os.PathLike[str]) -> int:
    """A descriptor of the directory ``path`` is in, reached without following a symbolic link
    in any of its components. Raises OSError (``ELOOP`` for a link, with a ``strerror`` naming
    the component)."""
    parent = Path(path).parent
    absolute = parent.is_absolute()
    parts = parent.parts[1:] if absolute else parent.parts
    walked = Path("/") if absolute else Path()
    # The directories on the way only need search permission, as a path lookup does (O_PATH);
    # the last one is opened for reading, which its flush needs.
    fd = os.open("/" if absolute else ".", _DIR_FLAGS if not parts else _WALK_FLAGS)
    try:
        for i, part in enumerate(parts):
            walked = walked / part
            flags = _DIR_FLAGS if i == len(parts) - 1 else _WALK_FLAGS
            try:
                inner = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(part, fd):
                    raise OSError(
                        errno.ELOOP,
                        f"{walked} is a symbolic link, which the agent does not follow "
                        "(the component's container may have put it there)",
                    ) from exc
                raise
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = DEFAULT_FILE_MODE) -> None:
    """Replace ``path`` with ``data`` so that no reader ever sees a partial file.

    Raises :class:`WriteError` on any failure; the previous file, if any, is untouched and the
    temporary file is removed (except when only the final directory flush failed: the file is
    then already replaced).
    """
    target = Path(path)
    try:
        dir_fd = open_directory(target)
    except OSError as exc:
        detail = f"cannot open the directory {target.parent}: {exc.strerror or exc}"
        raise WriteError(str(target), detail) from exc
    try:
        _replace(target, dir_fd, data, mode)
    finally:
        os.close(dir_fd)


def _replace(target: Path, dir_fd: int, data: bytes, mode: int) -> None:
    name = target.name
    try:
        # A dot prefix keeps file watchers that skip hidden files from picking up the temp file.
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, _TMP_FLAGS, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        detail = f"cannot create a temporary file in {target.parent}: {exc.strerror or exc}"
        raise WriteError(str(target), detail) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            # 0600 at creation and the umask may differ between images: set the mode the
            # readers expect explicitly.
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        if not isinstance(exc, OSError):
            raise
        raise WriteError(str(target), f"{type(exc).__name__}: {exc.strerror or exc}") from exc
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        # Some file systems (certain FUSE or tmpfs variants) refuse fsync on a directory; the
        # rename already happened, so the file is complete either way.
        if exc.errno != errno.EINVAL:
            raise WriteError(str(target.parent), f"cannot flush the directory: {exc}") from exc


def file_holds(path: str | os.PathLike[str], data: bytes) -> bool:
    """True when ``path`` is a regular file whose content is exactly ``data``.

    The component's container can write the shared volume and may have put a FIFO, a device or
    a symbolic link at the path, or a link in place of one of its directories: none of them
    holds the config, so the answer is False and the caller's write replaces the entry (or
    refuses the directory). Nothing is followed, nothing blocks, and at most ``len(data) + 1``
    bytes are read.
    """
    try:
        dir_fd = open_directory(path)
    except OSError:
        return False
    try:
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(Path(path).name, flags, dir_fd=dir_fd)
    except OSError:
        return False
    finally:
        os.close(dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        held = bytearray()
        while len(held) <= len(data):  # the size from fstat is not trusted: a writer may append
            chunk = os.read(fd, len(data) + 1 - len(held))
            if not chunk:
                break
            held += chunk
        return held == data
    except OSError:
        return False
    finally:
        os.close(fd)


def file_signature(path: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """What ``lstat`` says of the entry at ``path`` (device, inode, type and mode, size, change
    and modification times), None when there is none: an edit or a replacement changes it, so
    the content is only read again when it did (one ``lstat`` per check in the steady state)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
