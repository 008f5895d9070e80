"""How large a config the agent can afford to take in, from its container's memory limit.

Parsing, validating and rendering a config takes many times its decoded size in memory:
measured with CPython 3.11 through the agent's own path (decompress, ``json.loads``,
validation, digest, the indented render, the atomic write), the peak grows by up to 9x the
config's size for a list of small numbers and up to 39x for many small nested lists or objects
(the parsed objects; the indented render writes into one buffer, see ``render_config``), about
3x for long strings. A container killed for
memory part way through writes nothing, restarts, reads the same config and is killed again:
the pod crash-loops, and every pod of the component with it. So the agent refuses a config
it cannot afford before parsing it (``ConfigTooLargeError``: last_error and one alert, the last
good file kept), from the size the library knows once the value is decompressed
(``ConfigStore.before_parse``).

The budget is ``(memory limit - resident memory now) / WORST_CASE_EXPANSION``; the limit is the
container's cgroup limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), none when there is
none. ``--max-config-bytes`` replaces the estimate.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ._errors import ConfigTooLargeError

__all__ = [
    "WORST_CASE_EXPANSION",
    "MemoryBudget",
    "config_budget",
    "memory_limit",
    "resident_bytes",
]

log = logging.getLogger("defender_agent")

#: Peak memory per decoded byte the agent may need for one config: 39 measured at worst (small
#: nested lists, 0.5 to 9 MiB; 72 before the render stopped building a chunk list), plus the
#: new file on the shared in-memory volume (charged to the agent's container, up to ~4.4x a
#: config of small values once indented) and a margin for the old file and the allocator.
WORST_CASE_EXPANSION = 56

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_STATM = Path("/proc/self/statm")

# cgroup v1 writes "no limit" as the largest page-aligned counter (9223372036854771712), not as
# "max"; nothing real comes near it.
_V1_UNLIMITED = 1 << 62

_MiB = 1024 * 1024


def memory_limit(cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """The container's memory limit in bytes; None when there is none or it cannot be read.

    Inside a container ``cgroup_root`` is the container's own cgroup (cgroup namespace on v2,
    the ``memory`` controller's mount on v1)."""
    for path in (
        cgroup_root / "memory.max",
        cgroup_root / "memory" / "memory.limit_in_bytes",
        cgroup_root / "memory.limit_in_bytes",
    ):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            log.warning("ignoring %s: not a number of bytes", path)
            return None
        return value if 0 < value < _V1_UNLIMITED else None
    return None


def resident_bytes(statm: Path = PROC_STATM) -> int:
    """This process's resident memory now (0 if it cannot be read: the limit alone counts)."""
    try:
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def config_budget(
    limit: int | None, resident: int, expansion: float = WORST_CASE_EXPANSION
) -> int | None:
    """The largest decoded config (bytes) that fits in ``limit`` beside ``resident`` bytes
    already in use, at ``expansion`` bytes of peak memory per byte; None without a limit."""
    if limit is None:
        return None
    return max(0, int((limit - resident) / expansion))


class MemoryBudget:
    """The check the agent hands to the library as ``ConfigStore.before_parse``.

    ``max_config_bytes`` (``--max-config-bytes``) replaces the estimate from the limit. The
    limit is read at each check: an in-place pod resize changes it without a restart."""

    def __init__(
        self,
        max_config_bytes: int | None = None,
        *,
        cgroup_root: Path = CGROUP_ROOT,
        statm: Path = PROC_STATM,
    ) -> None:
        self.max_config_bytes = max_config_bytes
        self._cgroup_root = cgroup_root
        self._statm = statm

    def allowance(self) -> tuple[int | None, str]:
        """The largest config the agent takes now (None: no cap here) and why, for people."""
        if self.max_config_bytes is not None:
            return self.max_config_bytes, "--max-config-bytes (DEFENDER_AGENT_MAX_CONFIG_BYTES)"
        limit = memory_limit(self._cgroup_root)
        if limit is None:
            return None, "no container memory limit"
        resident = resident_bytes(self._statm)
        budget = config_budget(limit, resident)
        return budget, (
            f"container memory limit {limit / _MiB:.0f} MiB, {resident / _MiB:.0f} MiB in use, "
            f"up to {WORST_CASE_EXPANSION}x a config's size to parse, validate and write it"
        )

    def check(self, component: str, size: int) -> None:
        """Raise :class:`ConfigTooLargeError` when a decoded config of ``size`` bytes is over
        the allowance."""
        budget, why = self.allowance()
        if budget is None or size <= budget:
            return
        raise ConfigTooLargeError(
            size,
            budget,
            f"the config of {component!r} is {_mib(size)} decoded, more than this agent can "
            f"take in: at most {budget / _MiB:.2f} MiB ({why}); the last good file is kept. "
            "Raise the agent container's memory limit (the chart's "
            "agent.resources.limits.memory; see docs/agent.md#memory) or make the config smaller",
        )


def _mib(size: int) -> str:
    return f"{size / _MiB:.2f} MiB ({size} bytes)"
