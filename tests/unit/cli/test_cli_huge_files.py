"""Files the plugin reads that are far too big (a wrong path: an etcd snapshot given as the
keyring, /dev/zero): one line and exit 2 after reading a bounded amount, instead of a
MemoryError traceback after reading all of it. A FIFO (`--passphrase-file <(pass show x)`)
still works."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest

from defender_cli import main

# Sparse: costs no disk, reads as zeros (valid UTF-8, so only the size can refuse it).
HUGE = 8 * 1024 * 1024


def huge(tmp_path: Path) -> Path:
    path = tmp_path / "huge"
    with path.open("wb") as file:
        file.truncate(HUGE)
    return path


def run(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([*argv, "--no-color"], out=out, err=err)
    return code, err.getvalue()


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "--settings", "{huge}"],
        ["diff", "sniffer", "--keyring", "{huge}"],
        ["keyring", "import", "-f", "{huge}"],
        ["keyring", "export", "-f", "{tmp}/out", "--passphrase-file", "{huge}"],
    ],
    ids=["settings", "keyring", "import file", "passphrase file"],
)
def test_a_huge_file_is_refused_by_its_size(tmp_path: Path, argv: list[str]) -> None:
    path = huge(tmp_path)
    args = [a.format(huge=path, tmp=tmp_path) for a in argv]
    code, err = run(*args, "--etcd-endpoints", "http://127.0.0.1:1", "--kubeconfig", "/none")
    assert code == 2
    assert err.count("\n") == 1, err
    assert "larger than" in err and str(path) in err
    assert not (tmp_path / "out").exists()


def test_a_fifo_is_still_read(tmp_path: Path) -> None:
    from defender_config import read_file_bounded

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def write() -> None:
        with fifo.open("w") as file:
            file.write("a passphrase from a pipe\n")

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert read_file_bounded(fifo, 64) == b"a passphrase from a pipe\n"
    finally:
        writer.join(timeout=5)


def test_the_bound_is_exact(tmp_path: Path) -> None:
    from defender_config import read_file_bounded

    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    assert read_file_bounded(path, 10) == b"x" * 10
    with pytest.raises(OSError, match="larger than"):
        read_file_bounded(path, 9)
