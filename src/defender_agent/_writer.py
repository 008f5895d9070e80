"""Atomic file replacement for the decoded config on the shared volume.

A reader (the component) must only ever see the old file or the new file, never a mix: the new
content goes to a temporary file in the same directory (created exclusively, mode 0600 until it
is complete), is flushed, renamed over the target, and the directory is flushed too. Any
failure is the agent's WriteError (reason ``WriteFailed``, which heartbeats and alerts carry).

Which directory that is, is decided once, at start (:meth:`OutputDir.resolve`). The component's
container can write the shared volume, so it could replace a subdirectory of the output path
with a symbolic link to anywhere else the agent may write (another volume, ``/``), and a path
resolved by the kernel at every write would take the config (and its temporary files) there.
Refusing every link on the way is not possible either: the chart's path is under ``/var/run``, a
link to ``/run`` in Debian images. So at start a link is followed only on the root file system
(the image's, which the component cannot change), and a link in any mounted volume stops the
agent (:class:`OutputDirError`), whoever put it there before the agent started. Every write
then opens the directories from ``/`` down to the file one at a time without following a link
(``O_NOFOLLOW``, ``openat``): a link that appears on the way after start is ``WriteFailed``,
never followed. The temporary file, the rename, the flush and the comparison all go through that
one directory descriptor, so nothing is resolved twice.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from ._errors import OutputDirError, WriteError

__all__ = [
    "DEFAULT_FILE_MODE",
    "OutputDir",
    "file_holds",
    "file_signature",
    "parse_mount_points",
    "write_atomic",
]

DEFAULT_FILE_MODE = 0o640

# The directories on the way only need search permission, as a path lookup does (O_PATH); the
# last one is opened for reading, which its flush needs. O_NOFOLLOW with O_DIRECTORY refuses a
# link (ELOOP, or ENOTDIR with O_PATH, which would otherwise open the link itself).
_WALK_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC

_MOUNTINFO = "/proc/self/mountinfo"
# The kernel's own limit on the links one path lookup follows (MAXSYMLINKS).
_MAX_LINKS = 40
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


class LinkedDirectoryError(OSError):
    """A directory of the output path is a symbolic link the agent does not follow."""


def parse_mount_points(mountinfo: str) -> frozenset[str]:
    """The mount points listed in the text of ``/proc/self/mountinfo`` (the fifth field of each
    line, with the kernel's octal escapes of space, tab, newline and backslash undone)."""
    points: set[str] = set()
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            points.add(_OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4]))
    return frozenset(points)


def _read_mount_points() -> frozenset[str]:
    try:
        with open(_MOUNTINFO, encoding="utf-8", errors="surrogateescape") as handle:
            return parse_mount_points(handle.read())
    except OSError:
        return frozenset()  # no /proc: only the parent directory's real path is trusted


@dataclass(frozen=True)
class OutputDir:
    """The output file's directory as every write reaches it: ``root``, a path resolved once at
    start (no link in it then), and the ``below`` names under it, inside the shared volume.
    Every component of both is opened without following a link."""

    root: str
    below: tuple[str, ...] = ()

    @classmethod
    def resolve(
        cls, path: str | os.PathLike[str], mount_points: Collection[str] | None = None
    ) -> OutputDir:
        """Resolve the directory of ``path``, once.

        A link is followed only where it lies on the root file system (in no mount point
        ``mount_points`` lists but ``/``): the image's, which no other container can change,
        such as ``/var/run`` -> ``/run``. A link in a mounted volume — the one shared with the
        component, or any other — is :class:`OutputDirError`: planted there before the agent
        started, it could take the config to another volume or anywhere the agent may write.
        The directory is then kept as the deepest mount point (other than ``/``) its real path
        lies in and the names below it, each opened without following a link at every write;
        a path in no mount (outside Kubernetes) is its real path. ``mount_points`` defaults to
        what ``/proc/self/mountinfo`` lists.
        """
        parent = Path(os.path.abspath(path)).parent
        mounts = _read_mount_points() if mount_points is None else frozenset(mount_points)
        real = _real_path(parent, mounts)
        volume = _mount_of(real, mounts)
        if volume is None:
            return cls(real)
        return cls(volume, Path(real).relative_to(volume).parts)

    @property
    def path(self) -> Path:
        return Path(self.root, *self.below)

    def open(self) -> int:
        """A descriptor of the directory (read-only), reached from ``/`` without following a
        link. Raises OSError; :class:`LinkedDirectoryError` for a link on the way."""
        names = (*Path(self.root).parts[1:], *self.below)
        fd = os.open("/", _WALK_FLAGS if names else _DIR_FLAGS)
        walked = Path("/")
        try:
            for i, name in enumerate(names):
                walked = walked / name
                flags = _DIR_FLAGS if i == len(names) - 1 else _WALK_FLAGS
                try:
                    inner = _open_at(name, flags, fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(name, fd):
                        raise LinkedDirectoryError(
                            errno.ELOOP,
                            f"{walked} is a symbolic link, which the agent does not follow "
                            f"below {self.root} (resolved at start)",
                        ) from exc
                    raise
                os.close(fd)
                fd = inner
        except BaseException:
            os.close(fd)
            raise
        return fd


def _mount_of(path: str, mounts: frozenset[str]) -> str | None:
    """The deepest mount point other than ``/`` that ``path`` (a real path) is in or at."""
    inside = [
        point
        for point in mounts
        if point != "/" and (path == point or path.startswith(point.rstrip("/") + "/"))
    ]
    return max(inside, key=len, default=None)


def _real_path(directory: Path, mounts: frozenset[str]) -> str:
    """The real path of ``directory`` (absolute, normalized), resolved name by name as the
    kernel would, refusing a link that lies in a mount (:meth:`OutputDir.resolve`). Names
    that do not exist (yet) are kept as given, as ``os.path.realpath`` keeps them: the write
    then fails and is retried."""
    todo = list(reversed(directory.parts[1:]))  # names still to resolve, the next one last
    parts: list[str] = []  # the resolved directory, no link in it
    followed = 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            if parts:
                parts.pop()
            continue
        here = "/" + "/".join(parts)
        candidate = os.path.join(here, name)
        try:
            is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
        except OSError:
            is_link = False
        if not is_link:
            parts.append(name)
            continue
        mount = _mount_of(here, mounts)
        if mount is not None:
            raise OutputDirError(
                str(directory),
                f"{candidate} is a symbolic link in the mount {mount}, which the agent does not "
                "follow: a link is followed only on the image's root file system, and one in a "
                "volume (another container may write it) could lead out of it",
            )
        followed += 1
        if followed > _MAX_LINKS:
            raise OutputDirError(str(directory), f"more than {_MAX_LINKS} symbolic links")
        try:
            target = os.readlink(candidate)
        except OSError as exc:  # replaced meanwhile: what it is now decides
            raise OutputDirError(
                str(directory), f"cannot read the link {candidate}: {exc.strerror or exc}"
            ) from exc
        if target.startswith("/"):
            parts = []
        todo.extend(reversed(target.split("/")))
    return "/" + "/".join(parts)


def _open_at(name: str, flags: int, dir_fd: int) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except PermissionError:
        if flags != _DIR_FLAGS:
            raise
        # A directory the agent may write but not read (mode 0333): the file is still written
        # and renamed, and only the flush fails (WriteFailed, `cannot flush the directory`).
        return os.open(name, _WALK_FLAGS, dir_fd=dir_fd)


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _directory_of(path: Path, directory: OutputDir | None) -> OutputDir:
    # Without one resolved at start: the parent's real path now (a caller outside the agent).
    if directory is not None:
        return directory
    try:
        return OutputDir.resolve(path, ())
    except OutputDirError:
        # A loop of links, or one gone while read: the walk fails on it, which each caller
        # reports its own way (WriteError, False, None), not an error of the agent's start.
        return OutputDir(os.path.realpath(path.parent))


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes,
    mode: int = DEFAULT_FILE_MODE,
    *,
    directory: OutputDir | None = None,
) -> None:
    """Replace ``path`` with ``data`` so that no reader ever sees a partial file, in
    ``directory`` (the one resolved at start; default: ``path``'s parent as it is now).

    Raises :class:`WriteError` on any failure; the previous file, if any, is untouched and the
    temporary file is removed (except when only the final directory flush failed: the file is
    then already replaced).
    """
    target = Path(path)
    where = _directory_of(target, directory)
    try:
        dir_fd = where.open()
    except LinkedDirectoryError as exc:
        raise WriteError(
            str(target),
            f"cannot open the directory {target.parent}: {exc.strerror}",
            hint="nothing was written; a directory of the shared volume was replaced with a "
            "symbolic link (by the component's container?): put the directory back",
        ) from exc
    except OSError as exc:
        detail = f"cannot open the directory {target.parent}: {exc.strerror or exc}"
        raise WriteError(str(target), detail) from exc
    try:
        _replace(target, dir_fd, data, mode)
    finally:
        os.close(dir_fd)


def _create_temporary(name: str, dir_fd: int) -> tuple[int, str]:
    for _ in range(100):
        # A dot prefix keeps file watchers that skip hidden files from picking up the temp file.
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, _TMP_FLAGS, 0o600, dir_fd=dir_fd), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name")


def _replace(target: Path, dir_fd: int, data: bytes, mode: int) -> None:
    name = target.name
    try:
        fd, tmp = _create_temporary(name, dir_fd)
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
        # Whatever ended the write, the temporary file must not stay behind.
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


def file_holds(
    path: str | os.PathLike[str], data: bytes, *, directory: OutputDir | None = None
) -> bool:
    """True when ``path`` is a regular file whose content is exactly ``data``.

    The component's container can write the shared volume and may have put a FIFO, a device or
    a symbolic link at the path, or a link in place of one of its directories: none of them
    holds the config, so the answer is False and the caller's write replaces the entry (or
    refuses the directory). Nothing is followed, nothing blocks, and at most ``len(data) + 1``
    bytes are read.
    """
    target = Path(path)
    try:
        dir_fd = _directory_of(target, directory).open()
    except OSError:
        return False
    try:
        fd = os.open(target.name, _READ_FLAGS, dir_fd=dir_fd)
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


def file_signature(
    path: str | os.PathLike[str], *, directory: OutputDir | None = None
) -> tuple[int, ...] | None:
    """What ``lstat`` says of the entry at ``path`` (device, inode, type and mode, size, change
    and modification times), None when there is none or its directory cannot be reached
    without a link: an edit or a replacement changes it, so the content is only read again when
    it did (a walk of the directories and one ``lstat`` per check in the steady state)."""
    target = Path(path)
    try:
        dir_fd = _directory_of(target, directory).open()
    except OSError:
        return None
    try:
        st = os.lstat(target.name, dir_fd=dir_fd)
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    return (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
