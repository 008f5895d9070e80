"""Mounts a node leaves under its run dir (kubelet volumes, container root filesystems, pod
network namespaces): found in /proc/self/mountinfo, removed deepest first."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (octal).
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below ``directory``, deepest first (the order to unmount them)."""
    root = Path(directory).resolve()
    found: list[Path] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        point = Path(_unescape(fields[4]))
        if point == root or point.is_relative_to(root):
            found.append(point)
    # A path mounted twice (kubelet's shared bind of its root dir) is listed twice: unmount both.
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_under(directory: Path) -> list[Path]:
    """Unmount everything at or below ``directory``; returns what could not be unmounted."""
    for _ in range(3):
        points = mounts_under(directory)
        if not points:
            return []
        for point in points:
            done = subprocess.run(["umount", str(point)], capture_output=True, check=False)
            if done.returncode != 0:
                # Busy (a process still holds it): detach now, the kernel frees it when released.
                subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)
    left = mounts_under(directory)
    if left:
        log.warning("mounts left under %s: %s", directory, ", ".join(map(str, left)))
    return left
