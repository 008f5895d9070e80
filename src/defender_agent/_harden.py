"""Keep the component out of its agent's process.

A component that signals-reloads through a shared process namespace runs as the agent's UID
(docs/agent.md, the `sameUser` setup), and Linux lets a process of the same UID read another's
`/proc/<pid>/environ` (the etcd password), `/proc/<pid>/mem` and follow `/proc/<pid>/root`
(the agent's mounted keyring). Those accesses need ptrace-read permission, which the kernel
refuses to other unprivileged processes once a process is not dumpable: so the agent makes
itself not dumpable first thing. Signalling is unaffected (that is a kill permission, not
ptrace), and so is the agent's own access to its /proc entries.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["forbid_inspection"]

_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4


def forbid_inspection() -> bool:
    """Make this process not dumpable; whether it is now (False off Linux, or when refused)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    return int(libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0)) == 0
