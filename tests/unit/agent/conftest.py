"""Helpers for the agent unit tests: real files and real child processes, no cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from defender_devcluster import wait_for

# A child that counts SIGHUPs into a file, so a test can see the signal arrived.
_HUP_COUNTER = """
import signal, sys, time
path = sys.argv[1]
count = 0
def on_hup(signum, frame):
    global count
    count += 1
    with open(path, "w") as f:
        f.write(str(count))
signal.signal(signal.SIGHUP, on_hup)
open(path, "w").write("ready")
while True:
    time.sleep(0.05)
"""


@pytest.fixture
def spawn_named(tmp_path: Path) -> Iterator[Callable[[str], tuple[subprocess.Popen[bytes], Path]]]:
    """Start a Python child whose argv[0] is a given name and that counts SIGHUPs."""
    children: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> tuple[subprocess.Popen[bytes], Path]:
        marker = tmp_path / f"hup-{uuid.uuid4().hex[:8]}"
        child = subprocess.Popen([name, "-c", _HUP_COUNTER, str(marker)], executable=sys.executable)
        children.append(child)
        wait_for(
            "the child to install its SIGHUP handler",
            lambda: marker.exists() and marker.read_text() == "ready",
            timeout=10,
        )
        return child, marker

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)


@pytest.fixture
def unique_name() -> str:
    # Unique per test so processes of parallel tests (or other engineers) never match.
    return f"dfa-{os.getpid()}-{uuid.uuid4().hex[:6]}"
