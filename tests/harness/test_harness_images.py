"""The node's images, built for real and checked by readers that are not ours.

pause (from Kubernetes' pause.c), etcd (the Go-built binaries) and the stand-in component
(busybox-static) are built into a per-session cache: skopeo must accept each archive and find
every digest right, the binaries must run from the extracted layers, and a real containerd must
import them, list their tags and run them through runc.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from images_support import (
    blobs,
    ctx_for,
    extract,
    missing_input,
    require,
    skopeo_copy_to_dir,
    skopeo_inspect,
    throwaway_containerd,
)

from defender_devcluster import (
    ImageBuildError,
    ImageInputMissing,
    ToolNotFoundError,
    tools_bin,
    wait_for,
)
from defender_devcluster._images import (
    BuiltImage,
    build_image,
    chart_refs,
    import_archives,
    is_static_elf,
    pause_source,
    tools_env,
    write_index,
)
from defender_devcluster.pytest_plugin import missing_tool

FAST_IMAGES = ("pause", "etcd", "stand-in")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="module")
def built(cache_dir: Path) -> dict[str, BuiltImage]:
    try:
        bindir = tools_bin()
    except ToolNotFoundError as exc:
        missing_tool(exc)
    require("gcc", "gcc")
    ctx = ctx_for(cache_dir, bindir=bindir)
    out: dict[str, BuiltImage] = {}
    for name in FAST_IMAGES:
        try:
            out[name] = build_image(ctx, name)
        except ImageInputMissing as exc:
            missing_input(exc)
    return out


def test_skopeo_reads_every_archive_and_checks_every_blob(
    built: dict[str, BuiltImage], tmp_path: Path
) -> None:
    for name, image in built.items():
        inspected = skopeo_inspect(image.archive)
        assert inspected["Digest"] == image.digest, name
        manifest, _, layers = blobs(image.archive)
        assert inspected["Layers"] == layers
        raw = skopeo_inspect(image.archive, "--raw")
        assert raw == manifest
        skopeo_copy_to_dir(image.archive, tmp_path / name)
        assert (tmp_path / name / "manifest.json").is_file()


def test_pause_is_kubernetes_pause_c_static_and_tagged_as_its_makefile_says(
    built: dict[str, BuiltImage], tmp_path: Path
) -> None:
    _, tag = pause_source()
    image = built["pause"]
    assert image.ref == f"registry.k8s.io/pause:{tag}"
    _, config, layers = blobs(image.archive)
    assert len(layers) == 1
    assert config["config"]["Entrypoint"] == ["/pause"]
    assert config["config"]["User"] == "65535:65535"
    root = extract(image.archive, tmp_path / "root")
    assert is_static_elf(root / "pause")
    out = subprocess.run([root / "pause", "-v"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and f"v{tag}-ml-defender" in out.stdout


def test_etcd_runs_from_the_image_and_matches_the_chart(
    built: dict[str, BuiltImage], tmp_path: Path
) -> None:
    image = built["etcd"]
    assert image.ref == chart_refs()["etcd"]
    root = extract(image.archive, tmp_path / "root")
    tag = image.ref.rsplit(":", 1)[1].removeprefix("v")
    for binary in ("etcd", "etcdctl"):
        path = root / "usr" / "local" / "bin" / binary
        assert is_static_elf(path)
        out = subprocess.run(
            [path, "version" if binary == "etcdctl" else "--version"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert tag in out.stdout, out.stdout + out.stderr
    _, config, _ = blobs(image.archive)
    assert config["config"]["Cmd"] == ["/usr/local/bin/etcd"]
    assert config["config"]["User"] == "65532:65532"


def test_a_second_build_is_cached_and_a_changed_input_rebuilds(
    built: dict[str, BuiltImage], cache_dir: Path
) -> None:
    ctx = ctx_for(cache_dir, bindir=tools_bin())
    again = build_image(ctx, "pause")
    assert again.cached and again.digest == built["pause"].digest
    # A damaged archive is not trusted: its size no longer matches the record.
    with built["stand-in"].archive.open("ab") as f:
        f.write(b"\0")
    rebuilt = build_image(ctx, "stand-in")
    assert not rebuilt.cached and rebuilt.digest == built["stand-in"].digest
    retagged = build_image(
        ctx_for(cache_dir, bindir=tools_bin(), refs={"pause": "localhost/pause:test"}), "pause"
    )
    assert not retagged.cached and retagged.ref == "localhost/pause:test"
    assert build_image(ctx, "pause").ref == built["pause"].ref


def test_the_same_inputs_give_the_same_digests_in_another_cache(
    built: dict[str, BuiltImage], tmp_path: Path
) -> None:
    ctx = ctx_for(tmp_path, bindir=tools_bin())
    for name in FAST_IMAGES:
        assert build_image(ctx, name).digest == built[name].digest, name


def test_the_index_lists_every_archive(built: dict[str, BuiltImage], tmp_path: Path) -> None:
    index = json.loads(write_index(tmp_path, list(built.values())).read_text())
    assert set(index) == set(FAST_IMAGES)
    assert index["pause"]["archive"] == str(built["pause"].archive)


class StandIn:
    """The stand-in script run from its own extracted image (chroot), as the image runs it."""

    def __init__(self, root: Path, *, dev_null: bool = True) -> None:
        self.root = root
        self.config = root / "cfg" / "config.json"
        self.config.parent.mkdir()
        if dev_null:
            # What every container runtime gives a container (background jobs read it).
            (root / "dev").mkdir(exist_ok=True)
            os.mknod(root / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            (root / "dev" / "null").chmod(0o666)
        self.log = root / "tmp" / "out.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    require("chroot", "coreutils"),
                    "--userspec=10001:10001",
                    str(self.root),
                    "/usr/local/bin/stand-in",
                    "/cfg/config.json",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={"PATH": "/usr/local/bin:/bin", "STAND_IN_NAME": "sniffer"},
            )

    def events(self) -> list[dict[str, str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def wait_event(self, count: int) -> dict[str, str]:
        wait_for("stand-in log line", lambda: len(self.events()) >= count, 20)
        return self.events()[count - 1]

    def write(self, text: str) -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)


@pytest.fixture
def stand_in(built: dict[str, BuiltImage], tmp_path: Path) -> Iterator[StandIn]:
    root = extract(built["stand-in"].archive, tmp_path / "root")
    s = StandIn(root)
    yield s
    if s.proc is not None and s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait(timeout=10)


def test_stand_in_logs_the_version_it_runs_and_reloads_on_sighup(stand_in: StandIn) -> None:
    if os.geteuid() != 0:
        pytest.fail("chroot needs root (the CI machine runs as root)")
    stand_in.start()
    assert stand_in.wait_event(1)["event"] == "started"
    first = stand_in.wait_event(2)
    assert first["event"] == "waiting" and first["component"] == "sniffer"

    stand_in.write(json.dumps({"version": "1.0.0", "interface": "eth0"}, indent=2) + "\n")
    stand_in.signal(signal.SIGHUP)
    loaded = stand_in.wait_event(3)
    assert (loaded["event"], loaded["trigger"], loaded["version"]) == ("loaded", "SIGHUP", "1.0.0")

    stand_in.write(json.dumps({"nested": {"version": "9.9.9"}}, indent=2) + "\n")
    stand_in.signal(signal.SIGHUP)
    bad = stand_in.wait_event(4)
    assert bad["event"] == "bad_config"

    stand_in.write(json.dumps({"version": "1.1.0"}, indent=2) + "\n")
    stand_in.signal(signal.SIGHUP)
    assert stand_in.wait_event(5)["version"] == "1.1.0"

    stand_in.signal(signal.SIGTERM)
    assert stand_in.proc is not None and stand_in.proc.wait(timeout=20) == 0
    assert stand_in.events()[-1]["event"] == "stopping"


def test_stand_in_without_dev_null_stops_instead_of_spinning(
    built: dict[str, BuiltImage], tmp_path: Path
) -> None:
    s = StandIn(extract(built["stand-in"].archive, tmp_path / "root"), dev_null=False)
    s.start()
    assert s.proc is not None and s.proc.wait(timeout=20) == 1
    assert s.events()[-1] == {**s.events()[-1], "event": "failed", "reason": "/dev/null is missing"}


def test_containerd_imports_the_archives_lists_the_tags_and_runs_them(
    built: dict[str, BuiltImage], tmp_path: Path
) -> None:
    with throwaway_containerd(tmp_path / "ctd") as sock:
        refs = import_archives(sock, [b.archive for b in built.values()], progress=lambda _: None)
        assert sorted(refs) == sorted(b.ref for b in built.values())
        ctr = ["ctr", "--address", str(sock), "--namespace", "k8s.io"]
        listed = subprocess.run(
            [*ctr, "images", "list"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        for image in built.values():
            line = next(line for line in listed.splitlines() if line.startswith(image.ref + " "))
            assert image.digest in line
        # kind (`kind load image-archive`) and k3s import with these flags; the tag must hold.
        subprocess.run(
            [*ctr, "images", "rm", built["stand-in"].ref],
            capture_output=True,
            timeout=60,
            check=True,
        )
        subprocess.run(
            [
                *ctr,
                "images",
                "import",
                "--all-platforms",
                "--digests",
                str(built["stand-in"].archive),
            ],
            capture_output=True,
            timeout=120,
            check=True,
        )
        names = subprocess.run(
            [*ctr, "images", "list", "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()
        assert built["stand-in"].ref in names
        # The etcd image runs through runc: the chart's etcd test pod runs exactly this binary.
        run = subprocess.run(
            [
                *ctr,
                "run",
                "--rm",
                built["etcd"].ref,
                f"etcd-{time.monotonic_ns()}",
                "/usr/local/bin/etcdctl",
                "version",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        assert built["etcd"].ref.rsplit(":v", 1)[1] in run.stdout


def test_importing_into_no_containerd_is_a_typed_error(
    built: dict[str, BuiltImage], tmp_path: Path
) -> None:
    with pytest.raises(ImageBuildError, match="no containerd socket"):
        import_archives(tmp_path / "nope.sock", [built["pause"].archive])


def test_missing_inputs_and_wrong_versions_are_named(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    ctx = ctx_for(tmp_path / "cache", bindir=empty)
    with pytest.raises(ImageInputMissing, match="coredns does not exist"):
        build_image(ctx, "coredns")
    with pytest.raises(ImageInputMissing, match="etcd does not exist; build it with `make tools`"):
        build_image(ctx, "etcd")
    with pytest.raises(ImageBuildError, match="unknown image"):
        build_image(ctx, "nginx")
    # An etcd that is not the chart's version would run one version under another's tag.
    for binary, out in (("etcd", "etcd Version: 9.9.9"), ("etcdctl", "etcdctl version: 9.9.9")):
        (empty / binary).write_text(f"#!/bin/sh\necho '{out}'\n")
        (empty / binary).chmod(0o755)
    with pytest.raises(ImageBuildError, match=r"is etcd 9\.9\.9 but the chart's default image"):
        build_image(ctx, "etcd")
    (empty / "coredns").write_text("#!/bin/sh\necho 'no version here'\n")
    (empty / "coredns").chmod(0o755)
    with pytest.raises(ImageBuildError, match="printed no version"):
        build_image(ctx, "coredns")
    (empty / "coredns").write_text("#!/bin/sh\nexit 3\n")
    with pytest.raises(ImageBuildError, match="exited 3"):
        build_image(ctx, "coredns")


def test_coredns_image_from_the_node_tools(tmp_path: Path) -> None:
    bindir = tools_bin()
    ctx = ctx_for(tmp_path / "cache", bindir=bindir)
    if not (bindir / "coredns").exists():
        # The node tools (which build CoreDNS) have not run for this checkout: the target must
        # say so, naming the binary.
        assert "COREDNS_VERSION" not in tools_env(), "CoreDNS is pinned but was not built"
        with pytest.raises(ImageInputMissing, match="coredns does not exist"):
            build_image(ctx, "coredns")
        return
    image = build_image(ctx, "coredns")
    version = image.ref.rsplit(":v", 1)[1]
    assert image.ref == f"registry.k8s.io/coredns/coredns:v{version}"
    pinned = tools_env().get("COREDNS_VERSION")
    assert pinned is None or pinned == f"v{version}"
    assert skopeo_inspect(image.archive)["Digest"] == image.digest
    _, config, _ = blobs(image.archive)
    assert config["config"]["Entrypoint"] == ["/coredns"]
    assert config["config"]["User"] == "65532:65532"
    root = extract(image.archive, tmp_path / "root")
    assert is_static_elf(root / "coredns")
    out = subprocess.run([root / "coredns", "-version"], capture_output=True, text=True, timeout=30)
    assert f"CoreDNS-{version}" in out.stdout


def test_the_stand_in_needs_a_static_busybox(tmp_path: Path) -> None:
    missing = ctx_for(tmp_path, busybox=tmp_path / "busybox")
    with pytest.raises(
        ImageInputMissing, match="busybox is missing: apt-get install busybox-static"
    ):
        build_image(missing, "stand-in")
    dynamic = ctx_for(tmp_path, busybox=Path(sys.executable).resolve())
    assert not is_static_elf(Path(sys.executable).resolve())
    with pytest.raises(ImageInputMissing, match="is dynamically linked"):
        build_image(dynamic, "stand-in")
    (tmp_path / "text").write_text("not an ELF file")
    assert not is_static_elf(tmp_path / "text")


def test_the_cli_reports_what_it_could_not_build(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFENDER_")}
    env["DEFENDER_TOOLS_BIN"] = str(empty)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "defender_devcluster",
                "images",
                "--cache-dir",
                str(tmp_path / "cache"),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )

    out = cli("coredns", "stand-in")
    assert out.returncode == 1
    assert "coredns   NOT BUILT" in out.stdout and "1 image(s) not built" in out.stderr
    assert "stand-in" in json.loads((tmp_path / "cache" / "images.json").read_text())
    allowed = cli("coredns", "--allow-missing")
    assert allowed.returncode == 0 and "NOT BUILT" in allowed.stdout
    bad_ref = cli("pause", "--ref", "pause=Not A Ref")
    assert bad_ref.returncode == 1 and "not a tagged image reference" in bad_ref.stderr
    bad_name = cli("pause", "--ref", "nginx=a/b:1")
    assert bad_name.returncode == 1 and "--ref wants NAME=REF" in bad_name.stderr
    unknown = cli("nginx")
    assert unknown.returncode == 2 and "unknown image" in unknown.stderr
