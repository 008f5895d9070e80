"""The images a local node runs, built without Docker and written as OCI archives.

Each image is a recipe: the inputs it is made from (a hashed key), and the layers and config
it writes. An archive whose recorded key matches its inputs is not rebuilt. Archives live in
a cache outside the repository (``~/.cache/ml-defender/images`` by default), one file per
image, plus ``images.json`` listing what each file holds (see docs/images.md).

- pause: Kubernetes' build/pause/linux/pause.c (module cache), ``gcc -static``;
  tagged registry.k8s.io/pause:<TAG of build/pause/Makefile>.
- etcd: the Go-built static etcd + etcdctl (hack/tools.sh); tagged as the chart's etcd.image.
- coredns: the Go-built static coredns (node tools); registry.k8s.io/coredns/coredns:v<version>.
- stand-in: Debian's busybox-static + stand-in.sh (reads its config, reloads on SIGHUP);
  ghcr.io/ml-defender/stand-in:<project version>.
- project: debootstrap bookworm minbase + python3.11 + the pinned wheels; tagged as the chart's
  image (operator, agent, kubectl plugin).

Every tag can be overridden (``--ref NAME=REF``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from ._errors import DevClusterError, ImageBuildError, ImageInputMissing
from ._oci import (
    ANNOTATION_CONTAINERD_NAME,
    MEDIA_LAYER_GZIP,
    Descriptor,
    Entry,
    ImageConfig,
    ImageInfo,
    LayerBlob,
    dir_entry,
    entries_from_dir,
    extract_layer,
    file_entry,
    read_index,
    symlink_entry,
    write_image,
    write_layer,
)
from ._tools import REPO_ROOT, tools_bin

log = logging.getLogger(__name__)

# Bumped when a recipe changes what it writes for the same inputs.
RECIPE_VERSION = "2"
IMAGE_NAMES = ("pause", "etcd", "coredns", "stand-in", "project")
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# minbase is dpkg + apt + essentials; python3.11 is what the Dockerfile's base image runs.
DEBIAN_INCLUDE = ("python3.11", "ca-certificates")
PROJECT_PREFIX = "/opt/ml-defender"
PROJECT_UID = 10001
NONROOT_UID = 65532
PAUSE_UID = 65535
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ml-defender" / "images"


def _run(
    name: str,
    argv: Sequence[str],
    *,
    timeout: float = 1800,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> str:
    """Run a build step; its output is returned, a failure names the image and the step."""
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
            cwd=cwd,
        )
    except FileNotFoundError as exc:
        raise ImageInputMissing(name, f"{argv[0]} is not installed ({exc})") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(name, f"`{' '.join(argv)}` did not finish in {timeout:.0f}s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ImageBuildError(name, f"`{' '.join(argv)}` exited {proc.returncode}:\n{tail}")
    return str(proc.stdout)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tools_env() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (REPO_ROOT / "hack" / "tools.env").read_text().splitlines():
        m = re.match(r"^([A-Z_]+)=(\S+)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def project_version() -> str:
    m = re.search(r'^version = "([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M)
    if not m:
        raise ImageBuildError("project", "pyproject.toml has no version")
    return m.group(1)


def _chart_values() -> dict[str, object]:
    import yaml  # a dependency of the package; imported here so the rest needs no YAML

    data = yaml.safe_load((REPO_ROOT / "charts" / "ml-defender" / "values.yaml").read_text())
    if not isinstance(data, dict):
        raise ImageBuildError("chart", "charts/ml-defender/values.yaml is not a mapping")
    return data


def _chart_ref(image: Mapping[str, object], default_tag: str) -> str:
    registry, repo = str(image.get("registry") or ""), str(image["repository"])
    tag = str(image.get("tag") or default_tag)
    return f"{registry}/{repo}:{tag}" if registry else f"{repo}:{tag}"


def chart_refs() -> dict[str, str]:
    """The tags the chart's defaults pull: the project image and the etcd image."""
    values = _chart_values()
    image, etcd = values["image"], values["etcd"]
    assert isinstance(image, dict) and isinstance(etcd, dict)
    return {"project": _chart_ref(image, project_version()), "etcd": _chart_ref(etcd["image"], "")}


def _passwd(users: Sequence[tuple[str, int]]) -> list[Entry]:
    """A minimal /etc/passwd and /etc/group: tools that look the user up find a name."""
    pw = "root:x:0:0:root:/root:/sbin/nologin\n" + "".join(
        f"{n}:x:{uid}:{uid}:{n}:/nonexistent:/sbin/nologin\n" for n, uid in users
    )
    gr = "root:x:0:\n" + "".join(f"{n}:x:{uid}:\n" for n, uid in users)
    return [file_entry("etc/passwd", pw.encode()), file_entry("etc/group", gr.encode())]


def _small_image(
    archive: Path,
    ref: str,
    files: Sequence[Entry],
    user: tuple[str, int],
    config: ImageConfig,
) -> ImageInfo:
    """One layer: the files, an /etc/passwd naming the user the image runs as, a /tmp."""
    name, uid = user
    layer = [*files, *_passwd([(name, uid)]), dir_entry("tmp", 0o1777)]
    return write_image(archive, ref, [layer], replace(config, user=f"{uid}:{uid}"))


# -- the context a recipe reads ---------------------------------------------------------------


@dataclass
class BuildContext:
    cache_dir: Path
    bindir: Path | None = None
    refs: dict[str, str] = field(default_factory=dict)
    progress: Callable[[str], None] = print
    # Debian's busybox-static puts it here; the stand-in image is built around it.
    busybox: Path = Path("/bin/busybox")

    def tools_dir(self, name: str) -> Path:
        if self.bindir is None:
            try:
                self.bindir = tools_bin()
            except DevClusterError as exc:
                raise ImageInputMissing(name, str(exc)) from exc
        return self.bindir

    def binary(self, name: str, binary: str, hint: str) -> Path:
        path = self.tools_dir(name) / binary
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ImageInputMissing(name, f"{path} does not exist; {hint}")
        return path


@dataclass
class Plan:
    """What a recipe will write: its tag, the key of its inputs, and how to write it."""

    name: str
    ref: str
    inputs: dict[str, str]
    write: Callable[[Path, str], ImageInfo]

    @property
    def key(self) -> str:
        blob = json.dumps(
            {"recipe": RECIPE_VERSION, "ref": self.ref, **self.inputs}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()


# -- recipes -----------------------------------------------------------------------------------


def pause_source() -> tuple[Path, str]:
    """pause.c of the pinned Kubernetes module and the TAG its Makefile builds."""
    version = tools_env()["KUBERNETES_VERSION"]
    gomodcache = _run("pause", ["go", "env", "GOMODCACHE"]).strip()
    moddir = Path(gomodcache) / "k8s.io" / f"kubernetes@{version}"
    if not (moddir / "build" / "pause" / "linux" / "pause.c").is_file():
        out = _run(
            "pause",
            ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{version}"],
            env={**os.environ, "GOFLAGS": ""},
            cwd=tempfile.gettempdir(),
        )
        moddir = Path(json.loads(out)["Dir"])
    source = moddir / "build" / "pause" / "linux" / "pause.c"
    m = re.search(r"^TAG \?= (\S+)", (moddir / "build" / "pause" / "Makefile").read_text(), re.M)
    if not source.is_file() or not m:
        raise ImageInputMissing("pause", f"{moddir} has no build/pause/linux/pause.c or TAG")
    return source, m.group(1)


def plan_pause(ctx: BuildContext) -> Plan:
    source, tag = pause_source()
    ref = ctx.refs.get("pause", f"registry.k8s.io/pause:{tag}")
    gcc = _run("pause", ["gcc", "--version"]).splitlines()[0]
    # Upstream's flags (build/pause/Makefile), the version string naming this build.
    cflags = ["-Os", "-Wall", "-Werror", "-static", f"-DVERSION=v{tag}-ml-defender"]

    def write(archive: Path, work: str) -> ImageInfo:
        binary = Path(work) / "pause"
        _run("pause", ["gcc", *cflags, "-o", str(binary), str(source)])
        _run("pause", ["strip", str(binary)])
        return write_image(
            archive,
            ref,
            [[file_entry("pause", binary, 0o755)]],
            ImageConfig(entrypoint=("/pause",), env=(), user=f"{PAUSE_UID}:{PAUSE_UID}"),
        )

    inputs = {"pause.c": _sha256_file(source), "gcc": gcc, "cflags": " ".join(cflags)}
    return Plan("pause", ref, inputs, write)


def _binary_version(name: str, binary: Path, flag: str, pattern: str) -> str:
    out = _run(name, [str(binary), flag])
    m = re.search(pattern, out)
    if not m:
        raise ImageBuildError(name, f"`{binary} {flag}` printed no version: {out.strip()[:200]}")
    return m.group(1)


def plan_etcd(ctx: BuildContext) -> Plan:
    hint = "build it with `make tools` (hack/tools.sh)"
    etcd = ctx.binary("etcd", "etcd", hint)
    etcdctl = ctx.binary("etcd", "etcdctl", hint)
    version = _binary_version("etcd", etcd, "--version", r"etcd Version: (\S+)")
    ref = ctx.refs.get("etcd") or chart_refs()["etcd"]
    if "etcd" not in ctx.refs and not ref.endswith(f":v{version}"):
        # The chart would pull one version and the image would run another.
        raise ImageBuildError(
            "etcd",
            f"{etcd} is etcd {version} but the chart's default image is {ref}; "
            "align hack/tools.env ETCD_VERSION with charts/ml-defender/values.yaml etcd.image.tag",
        )

    def write(archive: Path, work: str) -> ImageInfo:
        return _small_image(
            archive,
            ref,
            [
                file_entry("usr/local/bin/etcd", etcd, 0o755),
                file_entry("usr/local/bin/etcdctl", etcdctl, 0o755),
                dir_entry("var/lib/etcd", 0o700, NONROOT_UID, NONROOT_UID),
            ],
            ("nonroot", NONROOT_UID),
            ImageConfig(
                cmd=("/usr/local/bin/etcd",),
                workdir="/var/lib/etcd",
                labels={"org.opencontainers.image.version": version},
            ),
        )

    inputs = {"etcd": _sha256_file(etcd), "etcdctl": _sha256_file(etcdctl)}
    return Plan("etcd", ref, inputs, write)


def plan_coredns(ctx: BuildContext) -> Plan:
    coredns = ctx.binary(
        "coredns",
        "coredns",
        "the node tools build it from its Go module (`make tools` once the node branch is merged)",
    )
    version = _binary_version("coredns", coredns, "-version", r"CoreDNS-(\S+)")
    ref = ctx.refs.get("coredns", f"registry.k8s.io/coredns/coredns:v{version}")

    def write(archive: Path, work: str) -> ImageInfo:
        return _small_image(
            archive,
            ref,
            [file_entry("coredns", coredns, 0o755)],
            ("nonroot", NONROOT_UID),
            ImageConfig(
                entrypoint=("/coredns",),
                labels={"org.opencontainers.image.version": version},
            ),
        )

    return Plan("coredns", ref, {"coredns": _sha256_file(coredns)}, write)


STAND_IN_PATH = "usr/local/bin/stand-in"
_PT_INTERP = 3


def is_static_elf(path: Path) -> bool:
    """True for a 64-bit little-endian ELF executable without a program interpreter."""
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return False
        phoff = int.from_bytes(head[32:40], "little")
        phentsize = int.from_bytes(head[54:56], "little")
        phnum = int.from_bytes(head[56:58], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    types = (int.from_bytes(table[i : i + 4], "little") for i in range(0, len(table), phentsize))
    return _PT_INTERP not in types


def stand_in_script() -> bytes:
    return resources.files("defender_devcluster").joinpath("stand-in.sh").read_bytes()


def plan_stand_in(ctx: BuildContext) -> Plan:
    busybox = ctx.busybox
    if not busybox.is_file():
        raise ImageInputMissing("stand-in", f"{busybox} is missing: apt-get install busybox-static")
    # Debian's `busybox` package is dynamically linked; only busybox-static runs in an image
    # that has no libc.
    if not is_static_elf(busybox):
        raise ImageInputMissing(
            "stand-in", f"{busybox} is dynamically linked: apt-get install busybox-static"
        )
    applets = sorted(set(_run("stand-in", [str(busybox), "--list"]).split()) - {"busybox"})
    script = stand_in_script()
    ref = ctx.refs.get("stand-in", f"ghcr.io/ml-defender/stand-in:{project_version()}")

    def write(archive: Path, work: str) -> ImageInfo:
        return _small_image(
            archive,
            ref,
            [
                file_entry("bin/busybox", busybox, 0o755),
                *(symlink_entry(f"bin/{a}", "busybox") for a in applets),
                file_entry(STAND_IN_PATH, script, 0o755),
            ],
            ("defender", PROJECT_UID),
            ImageConfig(
                entrypoint=(f"/{STAND_IN_PATH}",),
                env=("PATH=/usr/local/bin:/bin",),
                labels={"org.opencontainers.image.title": "ml-defender stand-in component"},
            ),
        )

    inputs = {"busybox": _sha256_file(busybox), "script": hashlib.sha256(script).hexdigest()}
    return Plan("stand-in", ref, inputs, write)


# -- the project image --------------------------------------------------------------------------


def _tree_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for top in paths:
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for p in files:
            if "__pycache__" in p.parts or p.suffix == ".pyc":
                continue
            h.update(str(p.relative_to(REPO_ROOT)).encode() + b"\0")
            h.update(_sha256_file(p).encode())
    return h.hexdigest()


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = str(path.resolve())
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    inside = [p for p in points if p == prefix or p.startswith(prefix + "/")]
    return sorted(inside, key=len, reverse=True)


def unmount_under(path: Path) -> None:
    for point in mounts_under(path):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False, timeout=60)
    left = mounts_under(path)
    if left:
        raise ImageBuildError("project", f"could not unmount {', '.join(left)}; unmount by hand")


def _empty_dir(target: Path) -> None:
    if not target.is_dir() or target.is_symlink():
        return
    if mounts_under(target):
        raise ImageBuildError("project", f"{target} has a mount below it; refusing to delete")
    for child in target.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _debootstrap_version() -> str:
    return _run("project", ["dpkg-query", "-W", "-f", "${Version}", "debootstrap"]).strip()


def rootfs_tarball(ctx: BuildContext) -> Path:
    """The debootstrap root (bookworm, minbase, python3.11), built once and kept as a tarball."""
    if shutil.which("debootstrap") is None:
        raise ImageInputMissing(
            "project", "debootstrap is not installed: apt-get install debootstrap"
        )
    spec = "|".join(
        (DEBIAN_SUITE, "minbase", ",".join(DEBIAN_INCLUDE), DEBIAN_MIRROR, _debootstrap_version())
    )
    key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    tarball = ctx.cache_dir / "rootfs" / f"{DEBIAN_SUITE}-minbase-{key}.tar"
    if tarball.is_file():
        ctx.progress(f"project: debian root cached ({tarball.name})")
        return tarball
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ctx.cache_dir, prefix=".debootstrap-") as tmp:
        root = Path(tmp) / "root"
        ctx.progress(
            f"project: debootstrap {DEBIAN_SUITE} minbase + {' '.join(DEBIAN_INCLUDE)} "
            "(a few minutes)"
        )
        t0 = time.monotonic()
        try:
            _run(
                "project",
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(DEBIAN_INCLUDE)}",
                    DEBIAN_SUITE,
                    str(root),
                    DEBIAN_MIRROR,
                ],
                timeout=3600,
            )
        finally:
            # debootstrap mounts proc (and, in some containers, binds /dev nodes) in the
            # target; nothing below may be deleted while a host filesystem is mounted there.
            unmount_under(root)
        # What an image does not need: package lists and caches, logs, docs; and the runtime
        # provides /dev, /proc and /sys.
        for junk in (
            "var/cache/apt",
            "var/lib/apt/lists",
            "var/log",
            "usr/share/doc",
            "usr/share/man",
            "usr/share/info",
            "dev",
            "proc",
            "sys",
        ):
            _empty_dir(root / junk)
        partial = tarball.with_suffix(".tar.partial")
        _run(
            "project",
            ["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(partial), "."],
        )
        partial.replace(tarball)
        ctx.progress(f"project: debian root built in {time.monotonic() - t0:.0f}s")
    return tarball


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"]


def _chroot(root: Path, *argv: str, env: Mapping[str, str] | None = None) -> str:
    run_env = {
        "PATH": f"{PROJECT_PREFIX}/bin:{DEFAULT_PATH}",
        "HOME": "/nonexistent",
        "LANG": "C.UTF-8",
    }
    run_env.update(env or {})
    return _run("project", ["chroot", str(root), *argv], env=run_env)


def _pip_in_root(root: Path, wheels: Path, *args: str) -> None:
    """pip, run from its own wheel inside the root, so the image carries no pip.

    SOURCE_DATE_EPOCH makes the .pyc files hash-based: the same wheels give the same layer.
    """
    inside = Path("/tmp") / wheels.name
    staged = root / inside.relative_to("/")
    shutil.copytree(wheels, staged)
    try:
        pip_whl = next(staged.glob("pip-*.whl"))
        _chroot(
            root,
            f"{PROJECT_PREFIX}/bin/python",
            f"{inside}/{pip_whl.name}/pip",
            "install",
            "-q",
            "--no-index",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--find-links",
            str(inside),
            *(a.replace("{wheels}", str(inside)) for a in args),
            env={"SOURCE_DATE_EPOCH": "0"},
        )
    finally:
        shutil.rmtree(staged)


def _files_state(top: Path) -> dict[str, tuple[int, int, int]]:
    return {
        str(p.relative_to(top)): (p.lstat().st_size, p.lstat().st_mtime_ns, p.lstat().st_mode)
        for p in top.rglob("*")
    }


@dataclass(frozen=True)
class _CachedLayer:
    """A layer kept in ``<cache>/layers`` under the key of what it was made from."""

    cache_dir: Path
    key: str

    @property
    def record(self) -> Path:
        return self.cache_dir / "layers" / f"{self.key}.json"

    def load(self) -> LayerBlob | None:
        try:
            data = json.loads(self.record.read_text())
            path = self.cache_dir / "layers" / str(data["digest"]).split(":", 1)[1]
            if path.stat().st_size != int(data["size"]):
                return None
            desc = Descriptor(MEDIA_LAYER_GZIP, str(data["digest"]), int(data["size"]))
            return LayerBlob(desc, str(data["diff_id"]), path)
        except (OSError, ValueError, KeyError, IndexError):
            return None

    def save(self, entries: Sequence[Entry]) -> LayerBlob:
        blob = write_layer(entries, self.cache_dir / "layers")
        d = blob.descriptor
        tmp = self.record.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"digest": d.digest, "size": d.size, "diff_id": blob.diff_id}))
        tmp.replace(self.record)
        return blob


def _key(*parts: str) -> str:
    return hashlib.sha256("|".join((RECIPE_VERSION, *parts)).encode()).hexdigest()[:24]


def plan_project(ctx: BuildContext) -> Plan:
    """Three layers: the Debian root, the pinned dependencies in a venv, the project itself.

    The first two are cached by what they are made from (the debootstrap spec; constraints.txt
    and pyproject.toml), so a change to the sources rebuilds only the small top layer.
    """
    ref = ctx.refs.get("project") or chart_refs()["project"]
    version = project_version()
    sources = [REPO_ROOT / p for p in ("pyproject.toml", "README.md", "src", "operator")]
    constraints = REPO_ROOT / "requirements" / "constraints.txt"
    if os.geteuid() != 0:
        raise ImageInputMissing("project", "debootstrap and chroot need root; run as root")
    if shutil.which("debootstrap") is None:
        raise ImageInputMissing(
            "project", "debootstrap is not installed: apt-get install debootstrap"
        )
    debian = f"{DEBIAN_SUITE}|minbase|{','.join(DEBIAN_INCLUDE)}|{_debootstrap_version()}"
    python = sys.version.split()[0]
    deps_inputs = (
        debian,
        _sha256_file(constraints),
        _sha256_file(REPO_ROOT / "pyproject.toml"),
        python,
    )
    inputs = {
        "debian": debian,
        "sources": _tree_digest(sources),
        "constraints": _sha256_file(constraints),
        "python": python,
    }
    users = (
        f"defender:x:{PROJECT_UID}:{PROJECT_UID}::/nonexistent:/usr/sbin/nologin\n",
        f"defender:x:{PROJECT_UID}:\n",
    )

    def write(archive: Path, work: str) -> ImageInfo:
        tarball = rootfs_tarball(ctx)
        root = Path(work) / "root"
        root.mkdir()
        _run(
            "project", ["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-xpf", str(tarball)]
        )
        venv = root / PROJECT_PREFIX.lstrip("/")

        base_cache = _CachedLayer(ctx.cache_dir, "base-" + _key(debian))
        base = base_cache.load()
        if base is None:
            ctx.progress("project: base layer from the debian root")
            base = base_cache.save(
                entries_from_dir(
                    root, keep_owner=True, exclude=("dev", "proc", "sys", "tmp"), skip_special=True
                )
            )

        deps_cache = _CachedLayer(ctx.cache_dir, "deps-" + _key(*deps_inputs))
        deps = deps_cache.load()
        if deps is not None:
            ctx.progress("project: dependency layer cached")
            extract_layer(deps.path, root)
        else:
            wheels = Path(work) / "wheels"
            ctx.progress("project: pip wheel (project + pinned dependencies)")
            _run(
                "project",
                [
                    *_pip("wheel", "--wheel-dir", str(wheels), "-c", str(constraints)),
                    str(REPO_ROOT),
                ],
            )
            for own in wheels.glob("ml_defender_config-*.whl"):
                own.unlink()
            _run(
                "project",
                [*_pip("download", "--only-binary=:all:", "--no-deps", "-d", str(wheels)), "pip"],
            )
            ctx.progress(f"project: install the dependencies into {PROJECT_PREFIX} (chroot)")
            _chroot(root, "python3.11", "-m", "venv", "--without-pip", PROJECT_PREFIX)
            names = sorted(w.name for w in wheels.glob("*.whl") if not w.name.startswith("pip-"))
            _pip_in_root(root, wheels, "--no-deps", *(f"{{wheels}}/{n}" for n in names))
            passwd = (root / "etc" / "passwd").read_text() + users[0]
            group = (root / "etc" / "group").read_text() + users[1]
            deps = deps_cache.save(
                [
                    *entries_from_dir(venv, prefix=PROJECT_PREFIX, keep_owner=True),
                    file_entry("etc/passwd", passwd.encode()),
                    file_entry("etc/group", group.encode()),
                ]
            )

        ctx.progress("project: pip wheel + install the project (chroot)")
        before = _files_state(venv)
        own_wheels = Path(work) / "own"
        _run(
            "project", [*_pip("wheel", "--no-deps", "--wheel-dir", str(own_wheels)), str(REPO_ROOT)]
        )
        _run(
            "project",
            [*_pip("download", "--only-binary=:all:", "--no-deps", "-d", str(own_wheels)), "pip"],
        )
        _pip_in_root(root, own_wheels, "--no-deps", f"ml-defender-config=={version}")
        for cmd in (
            ("defender-operator", "--help"),
            ("python", "-m", "defender_operator", "--help"),
            ("defender-agent", "--help"),
            ("kubectl-defender", "--help"),
        ):
            _chroot(root, *cmd)
        ctx.progress("project: entrypoints answer --help inside the root")
        after = _files_state(venv)
        changed = {p for p, st in after.items() if before.get(p) != st}
        app = [
            e
            for e in entries_from_dir(venv, prefix=PROJECT_PREFIX, keep_owner=True)
            if e.path.removeprefix(PROJECT_PREFIX.lstrip("/") + "/") in changed
        ]
        if not app:
            raise ImageBuildError("project", "installing the project changed nothing in the venv")
        ctx.progress("project: writing the archive")
        return write_image(
            archive,
            ref,
            [base, deps, app],
            ImageConfig(
                cmd=("defender-operator",),
                env=(
                    f"PATH={PROJECT_PREFIX}/bin:{DEFAULT_PATH}",
                    "PYTHONDONTWRITEBYTECODE=1",
                    "PYTHONUNBUFFERED=1",
                    "LANG=C.UTF-8",
                ),
                user=f"{PROJECT_UID}:{PROJECT_UID}",
                workdir="/tmp",
                labels={
                    "org.opencontainers.image.title": "ml-defender-config",
                    "org.opencontainers.image.description": (
                        "ML Defender config plane: operator, sidecar agent, kubectl plugin"
                    ),
                    "org.opencontainers.image.version": version,
                    "org.opencontainers.image.licenses": "Apache-2.0",
                },
            ),
        )

    return Plan("project", ref, inputs, write)


PLANNERS: dict[str, Callable[[BuildContext], Plan]] = {
    "pause": plan_pause,
    "etcd": plan_etcd,
    "coredns": plan_coredns,
    "stand-in": plan_stand_in,
    "project": plan_project,
}


# -- building with the cache --------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltImage:
    name: str
    ref: str
    archive: Path
    digest: str
    size: int
    cached: bool
    seconds: float

    def as_json(self) -> dict[str, object]:
        return {
            "ref": self.ref,
            "archive": str(self.archive),
            "digest": self.digest,
            "size": self.size,
        }


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Two builds of one image (two terminals, a test and `make images`) take turns.
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def archive_path(cache_dir: Path, name: str) -> Path:
    return cache_dir / f"{name}.tar"


def build_image(ctx: BuildContext, name: str) -> BuiltImage:
    """Build one image unless its archive is already there for the same inputs."""
    if name not in PLANNERS:
        raise ImageBuildError(name, f"unknown image (known: {', '.join(IMAGE_NAMES)})")
    t0 = time.monotonic()
    plan = PLANNERS[name](ctx)
    archive = archive_path(ctx.cache_dir, name)
    record_path = archive.with_suffix(".json")
    with _locked(ctx.cache_dir / f".{name}.lock"):
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {}
        if (
            record.get("key") == plan.key
            and archive.is_file()
            and archive.stat().st_size == record.get("size")
        ):
            ctx.progress(f"{name}: cached {plan.ref} ({archive})")
            return BuiltImage(
                name,
                plan.ref,
                archive,
                str(record["digest"]),
                archive.stat().st_size,
                True,
                time.monotonic() - t0,
            )
        ctx.progress(f"{name}: building {plan.ref}")
        with tempfile.TemporaryDirectory(dir=ctx.cache_dir, prefix=f".work-{name}-") as work:
            info = plan.write(archive, work)
        size = info.archive_size
        tmp = record_path.with_suffix(".json.tmp")
        tmp.write_text(
            json.dumps(
                {"key": plan.key, "ref": plan.ref, "digest": info.manifest.digest, "size": size},
                indent=2,
            )
        )
        tmp.replace(record_path)
    seconds = time.monotonic() - t0
    ctx.progress(
        f"{name}: wrote {archive} ({size / 1e6:.1f} MB, {info.manifest.digest[:19]}) "
        f"in {seconds:.1f}s"
    )
    return BuiltImage(name, plan.ref, archive, info.manifest.digest, size, False, seconds)


def write_index(cache_dir: Path, built: Sequence[BuiltImage]) -> Path:
    """``images.json``: every archive in the cache, by image name (the node reads it)."""
    path = cache_dir / "images.json"
    try:
        current = json.loads(path.read_text())
    except (OSError, ValueError):
        current = {}
    current.update({b.name: b.as_json() for b in built})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


# -- loading into containerd ---------------------------------------------------------------------


def import_archives(
    socket: Path,
    archives: Sequence[Path],
    *,
    namespace: str = "k8s.io",
    snapshotter: str = "",
    ctr: str = "ctr",
    progress: Callable[[str], None] = print,
) -> list[str]:
    """``ctr images import`` each archive into the containerd at ``socket``; returns its tags.

    ``k8s.io`` is the namespace the CRI plugin (and so kubelet) reads. Every tag written by an
    archive must then be listed by containerd, else ImageBuildError.
    """
    if not socket.exists():
        raise ImageBuildError("import", f"no containerd socket at {socket}")
    base = [ctr, "--address", str(socket), "--namespace", namespace]
    wanted: list[str] = []
    for archive in archives:
        argv = [*base, "images", "import"]
        if snapshotter:
            argv += ["--snapshotter", snapshotter]
        progress(f"import: {archive.name} -> {socket} ({namespace})")
        _run("import", [*argv, str(archive)], timeout=600)
        wanted += _archive_refs(archive)
    listed = set(_run("import", [*base, "images", "list", "--quiet"]).split())
    missing = [r for r in wanted if r not in listed]
    if missing:
        raise ImageBuildError(
            "import", f"containerd does not list {', '.join(missing)} after the import"
        )
    return wanted


def _archive_refs(archive: Path) -> list[str]:
    manifests = read_index(archive).get("manifests")
    refs: list[str] = []
    for m in manifests if isinstance(manifests, list) else []:
        ref = (
            m.get("annotations", {}).get(ANNOTATION_CONTAINERD_NAME)
            if isinstance(m, dict)
            else None
        )
        if isinstance(ref, str):
            refs.append(ref)
    return refs
