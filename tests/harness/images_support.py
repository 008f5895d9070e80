"""Helpers for the image tests: read archives like a runtime would, run a throwaway containerd."""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from defender_devcluster import (
    BuildContext,
    ImageInputMissing,
    ToolNotFoundError,
    popen_dying_with_parent,
    wait_for,
)
from defender_devcluster.pytest_plugin import missing_part, missing_tool


def require(binary: str, package: str) -> str:
    """The path of a Debian-packaged binary a test needs; fail under CI, skip elsewhere."""
    path = shutil.which(binary)
    if path is None:
        missing_tool(ToolNotFoundError(binary, None, f"`make images-deps` installs {package}"))
    return path


def missing_input(exc: ImageInputMissing) -> NoReturn:
    missing_part(f"an image input is missing: {exc}")


def blobs(archive: Path) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(manifest, config, layer digests) of a one-image archive."""
    with tarfile.open(archive) as tar:

        def read(name: str) -> bytes:
            f = tar.extractfile(name)
            assert f is not None
            return f.read()

        index = json.loads(read("index.json"))
        digest = index["manifests"][0]["digest"].removeprefix("sha256:")
        manifest = json.loads(read(f"blobs/sha256/{digest}"))
        config = json.loads(
            read("blobs/sha256/" + manifest["config"]["digest"].removeprefix("sha256:"))
        )
        return manifest, config, [layer["digest"] for layer in manifest["layers"]]


def extract(archive: Path, dest: Path) -> Path:
    """Apply the image's layers in order under ``dest``, owners kept (what a snapshotter does)."""
    _, _, layers = blobs(archive)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as outer:
        for digest in layers:
            member = outer.extractfile("blobs/sha256/" + digest.removeprefix("sha256:"))
            assert member is not None
            with gzip.open(member) as gz, tarfile.open(fileobj=gz, mode="r|") as layer:
                layer.extractall(dest, numeric_owner=True, filter="fully_trusted")
    return dest


def skopeo_inspect(archive: Path, *extra: str) -> dict[str, Any]:
    skopeo = require("skopeo", "skopeo")
    out = subprocess.run(
        [skopeo, "inspect", *extra, f"oci-archive:{archive}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def skopeo_copy_to_dir(archive: Path, dest: Path) -> None:
    """skopeo copies blob by blob and checks every digest and size on the way."""
    skopeo = require("skopeo", "skopeo")
    subprocess.run(
        [skopeo, "copy", "--quiet", f"oci-archive:{archive}", f"dir:{dest}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )


def _mounts_under(path: Path) -> list[str]:
    lines = Path("/proc/self/mounts").read_text().splitlines()
    points = [line.split()[1] for line in lines]
    return sorted((p for p in points if p.startswith(str(path))), reverse=True)


@contextlib.contextmanager
def throwaway_containerd(base: Path) -> Iterator[Path]:
    """A containerd whose root, state, socket and config all live under ``base``.

    The CRI plugin is off (nothing here is a node); images land in the same content store a
    node's containerd uses. Stopped by PID; its mounts are removed before the directory is.
    """
    containerd = require("containerd", "containerd")
    require("ctr", "containerd")
    require("runc", "runc")
    base.mkdir(parents=True, exist_ok=True)
    sock = base / "containerd.sock"
    config = base / "config.toml"
    config.write_text(
        "\n".join(
            [
                "version = 2",
                f'root = "{base / "root"}"',
                f'state = "{base / "state"}"',
                'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
                "[grpc]",
                f'  address = "{sock}"',
                "[ttrpc]",
                f'  address = "{sock}.ttrpc"',
                "[debug]",
                '  address = ""',
                "[metrics]",
                '  address = ""',
            ]
        )
        + "\n"
    )
    log = (base / "containerd.log").open("wb")
    proc = popen_dying_with_parent(
        [containerd, "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for("containerd socket", lambda: sock.exists() or proc.poll() is not None, 60)
        if proc.poll() is not None:
            tail = (base / "containerd.log").read_text()[-2000:]
            pytest.fail(f"containerd exited {proc.returncode}: {tail}")
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        for point in _mounts_under(base):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def ctx_for(cache_dir: Path, **kw: Any) -> BuildContext:
    return BuildContext(cache_dir=cache_dir, progress=lambda line: None, **kw)
