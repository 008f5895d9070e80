"""The benchmark's modules (bench/ is scripts, not a package), imported for tests of their pure
parts."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[3]


def bench_module(name: str) -> ModuleType:
    """bench/`name`.py, imported with bench/ on the path only while it loads."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "bench"))
