"""Chart tests without a cluster: `helm template` / `helm lint` output checked as YAML."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from packaging_chart import Render, render_chart

from defender_devcluster import ToolNotFoundError, tool
from defender_devcluster.pytest_plugin import missing_tool


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    try:
        return tool("helm")
    except ToolNotFoundError as exc:
        missing_tool(exc)


@pytest.fixture(scope="session")
def render(helm_bin: Path) -> Render:
    """render("--set", "a=b", chart=..., namespace=..., release=...) -> rendered objects."""
    return functools.partial(render_chart, helm_bin)
