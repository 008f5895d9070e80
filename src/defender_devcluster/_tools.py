"""Where the Go-built binaries live (see hack/tools.sh and docs/dev/CONTRACT.md)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ._errors import ToolNotFoundError

ENV_TOOLS_BIN = "DEFENDER_TOOLS_BIN"

# src/defender_devcluster/_tools.py -> the repository root holds hack/tools.sh.
REPO_ROOT = Path(__file__).resolve().parents[2]


def tools_bin() -> Path:
    """The directory holding etcd, kube-apiserver, kubectl and friends.

    ``DEFENDER_TOOLS_BIN`` wins; otherwise ``hack/tools.sh --bindir`` of this checkout decides,
    so the harness and the Makefile always agree on the cache location.
    """
    env = os.environ.get(ENV_TOOLS_BIN)
    if env:
        path = Path(env)
    else:
        script = REPO_ROOT / "hack" / "tools.sh"
        if not script.is_file():
            raise ToolNotFoundError(
                "hack/tools.sh", None, f"{script} does not exist and {ENV_TOOLS_BIN} is not set"
            )
        try:
            out = subprocess.run(
                [str(script), "--bindir"], check=True, capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            raise ToolNotFoundError(
                "hack/tools.sh", None, f"{script} --bindir failed: {exc}"
            ) from exc
        path = Path(out)
    if not path.is_dir():
        raise ToolNotFoundError("the tools directory", path, "the directory does not exist")
    return path


def tool(binary: str) -> Path:
    """Absolute path of one built binary; a clear error naming it when it is missing."""
    bindir = tools_bin()
    path = bindir / binary
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ToolNotFoundError(binary, bindir)
    return path
