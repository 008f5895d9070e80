"""The project image (debootstrap bookworm + python3.11 + the pinned wheels), checked from its
archive: the chart's tag and user, the pinned versions, and every entrypoint answering inside
the extracted root as the unprivileged user.

Marked ``slow``: cold, it costs ~8 min here (debootstrap ~3 min, wheels, install, gzip), and
~2.5 min whenever src/ or operator/ changed (the Debian and dependency layers stay cached). It
builds into the shared cache (~/.cache/ml-defender/images), so a run after `make images` finds
it cached (~1 min: unpacking the layers and starting Python four times).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from images_support import ctx_for, extract, missing_input, require, skopeo_inspect

from defender_devcluster import ImageInputMissing
from defender_devcluster._images import (
    PROJECT_UID,
    BuiltImage,
    build_image,
    chart_refs,
    default_cache_dir,
)
from defender_devcluster._tools import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project() -> BuiltImage:
    require("debootstrap", "debootstrap")
    try:
        return build_image(ctx_for(default_cache_dir()), "project")
    except ImageInputMissing as exc:
        missing_input(exc)
        raise


@pytest.fixture(scope="module")
def root(project: BuiltImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return extract(project.archive, tmp_path_factory.mktemp("project") / "root")


def in_root(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            require("chroot", "coreutils"),
            f"--userspec={PROJECT_UID}:{PROJECT_UID}",
            str(root),
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/opt/ml-defender/bin:/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent"},
    )


def test_tag_user_and_command_are_what_the_chart_runs(project: BuiltImage) -> None:
    assert project.ref == chart_refs()["project"]
    inspected = skopeo_inspect(project.archive, "--config")
    run = inspected["config"]
    assert run["User"] == f"{PROJECT_UID}:{PROJECT_UID}"
    assert run["Cmd"] == ["defender-operator"]
    assert run["Env"][0].startswith("PATH=/opt/ml-defender/bin:")
    assert len(inspected["rootfs"]["diff_ids"]) == 3  # debian root, dependencies, project


@pytest.mark.parametrize(
    "argv",
    [
        ("defender-operator", "--help"),
        ("python", "-m", "defender_operator", "--help"),
        ("defender-agent", "--help"),
        ("kubectl-defender", "--help"),
    ],
)
def test_entrypoints_run_inside_the_root_as_the_image_user(
    root: Path, argv: tuple[str, ...]
) -> None:
    out = in_root(root, *argv)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()


def test_installed_versions_are_the_pinned_ones(root: Path) -> None:
    out = in_root(
        root,
        "python",
        "-c",
        "import importlib.metadata as m, json;"
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))",
    )
    assert out.returncode == 0, out.stderr
    installed = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in json.loads(out.stdout).items()}
    pins = {}
    for line in (REPO_ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            pins[re.sub(r"[-_.]+", "-", name.strip()).lower()] = version.strip()
    assert installed.pop("ml-defender-config") == "0.1.0"
    assert "pip" not in installed  # pip ran from its wheel; the image carries none
    unpinned = sorted(set(installed) - set(pins))
    assert not unpinned, f"installed but not pinned in constraints.txt: {unpinned}"
    assert {k: installed[k] for k in installed} == {k: pins[k] for k in installed}


def test_the_image_user_exists_and_the_root_is_debian_bookworm(root: Path) -> None:
    assert f"defender:x:{PROJECT_UID}:{PROJECT_UID}:" in (root / "etc" / "passwd").read_text()
    assert "bookworm" in (root / "etc" / "os-release").read_text()
    assert shutil.which("python3.11", path=str(root / "usr" / "bin")) is not None
