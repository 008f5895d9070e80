"""The OCI archive writer on its own: digests, determinism, layout, typed errors.

An independent reader (skopeo, containerd) checks the same archives in
tests/harness/test_harness_images.py.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from defender_devcluster import OciError
from defender_devcluster._oci import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    MEDIA_CONFIG,
    MEDIA_LAYER_GZIP,
    MEDIA_MANIFEST,
    Entry,
    ImageConfig,
    check_ref,
    dir_entry,
    entries_from_dir,
    file_entry,
    read_index,
    symlink_entry,
    write_image,
    write_layer,
)

REF = "registry.example/team/tool:1.2.3"


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        out: dict[str, bytes] = {}
        for m in tar.getmembers():
            if m.isfile():
                f = tar.extractfile(m)
                assert f is not None
                out[m.name] = f.read()
        return out


def blob(files: dict[str, bytes], digest: str) -> bytes:
    return files["blobs/sha256/" + digest.removeprefix("sha256:")]


def layer_members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        return {m.name: m for m in tar.getmembers()}


def sample_tree(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (root / "bin" / "tool").chmod(0o755)
    os.link(root / "bin" / "tool", root / "bin" / "tool-alias")
    (root / "bin" / "sh").symlink_to("tool")
    (root / "etc").mkdir()
    (root / "etc" / "tool.conf").write_text("level=1\n")
    (root / "etc" / "tool.conf").chmod(0o600)
    return root


def build(tmp: Path, tree: Path, config: ImageConfig | None = None) -> tuple[Path, Any]:
    cfg = config or ImageConfig(
        entrypoint=("/bin/tool",),
        cmd=("--serve",),
        env=("PATH=/bin", "MODE=test"),
        user="10001:10001",
        workdir="/tmp",
        labels={"org.opencontainers.image.title": "tool"},
        stop_signal="SIGTERM",
    )
    extra = [file_entry("etc/motd", b"hello\n"), dir_entry("tmp", 0o1777)]
    info = write_image(tmp / "tool.tar", REF, [entries_from_dir(tree), extra], cfg)
    return tmp / "tool.tar", info


def test_every_blob_is_named_by_the_sha256_of_its_content(tmp_path: Path) -> None:
    archive, info = build(tmp_path, sample_tree(tmp_path / "tree"))
    files = members(archive)
    blobs = {name: data for name, data in files.items() if name.startswith("blobs/sha256/")}
    assert len(blobs) == 4  # two layers, the config, the manifest
    for name, data in blobs.items():
        assert name.removeprefix("blobs/sha256/") == hashlib.sha256(data).hexdigest()

    index = json.loads(files["index.json"])
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    (desc,) = index["manifests"]
    assert desc["mediaType"] == MEDIA_MANIFEST
    assert desc["digest"] == info.manifest.digest
    assert desc["size"] == len(blob(files, desc["digest"]))
    assert desc["annotations"] == {ANNOTATION_REF_NAME: REF, ANNOTATION_CONTAINERD_NAME: REF}

    manifest = json.loads(blob(files, desc["digest"]))
    assert manifest["schemaVersion"] == 2
    assert manifest["config"]["mediaType"] == MEDIA_CONFIG
    assert manifest["config"]["size"] == len(blob(files, manifest["config"]["digest"]))
    config = json.loads(blob(files, manifest["config"]["digest"]))
    diff_ids = []
    for layer in manifest["layers"]:
        assert layer["mediaType"] == MEDIA_LAYER_GZIP
        data = blob(files, layer["digest"])
        assert layer["size"] == len(data)
        diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest())
    assert config["rootfs"] == {"type": "layers", "diff_ids": diff_ids}
    assert list(info.diff_ids) == diff_ids


def test_the_config_carries_what_runs(tmp_path: Path) -> None:
    archive, info = build(tmp_path, sample_tree(tmp_path / "tree"))
    config = json.loads(blob(members(archive), info.config.digest))
    assert config["os"] == "linux" and config["architecture"]
    assert config["config"] == {
        "Entrypoint": ["/bin/tool"],
        "Cmd": ["--serve"],
        "Env": ["PATH=/bin", "MODE=test"],
        "User": "10001:10001",
        "WorkingDir": "/tmp",
        "Labels": {"org.opencontainers.image.title": "tool"},
        "StopSignal": "SIGTERM",
    }
    assert len(config["history"]) == 2


def test_layers_keep_modes_links_and_hardlinks_with_fixed_owners_and_times(tmp_path: Path) -> None:
    tree = sample_tree(tmp_path / "tree")
    archive, info = build(tmp_path, tree)
    files = members(archive)
    first = layer_members(blob(files, info.layers[0].digest))
    assert list(first) == ["bin", "bin/sh", "bin/tool", "bin/tool-alias", "etc", "etc/tool.conf"]
    assert first["bin/tool"].mode == 0o755 and first["bin/tool"].isfile()
    assert first["etc/tool.conf"].mode == 0o600
    assert first["bin/sh"].issym() and first["bin/sh"].linkname == "tool"
    assert first["bin/tool-alias"].islnk() and first["bin/tool-alias"].linkname == "bin/tool"
    for m in first.values():
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
    second = layer_members(blob(files, info.layers[1].digest))
    assert second["tmp"].isdir() and second["tmp"].mode == 0o1777
    assert second["etc"].isdir()  # the parent of etc/motd is added


def test_same_input_gives_the_same_bytes_whatever_the_times_and_owners(tmp_path: Path) -> None:
    a = sample_tree(tmp_path / "a")
    b = sample_tree(tmp_path / "b")
    os.utime(b / "etc" / "tool.conf", (1_000_000, 1_000_000))
    os.chown(b / "etc" / "tool.conf", 4242, 4242)
    (tmp_path / "out-a").mkdir()
    (tmp_path / "out-b").mkdir()
    archive_a, info_a = build(tmp_path / "out-a", a)
    archive_b, info_b = build(tmp_path / "out-b", b)
    assert info_a.manifest.digest == info_b.manifest.digest
    assert archive_a.read_bytes() == archive_b.read_bytes()


def test_a_changed_byte_or_mode_changes_the_digest(tmp_path: Path) -> None:
    base = write_layer([file_entry("x", b"1")], tmp_path / "blobs").descriptor.digest
    other_content = write_layer([file_entry("x", b"2")], tmp_path / "blobs").descriptor.digest
    other_mode = write_layer([file_entry("x", b"1", 0o755)], tmp_path / "blobs").descriptor.digest
    assert len({base, other_content, other_mode}) == 3


def test_keep_owner_and_exclude_for_a_root_filesystem(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "dev" / "pts").mkdir(parents=True)
    (root / "var" / "mail").mkdir(parents=True)
    os.chown(root / "var" / "mail", 0, 8)
    entries = {e.path: e for e in entries_from_dir(root, keep_owner=True, exclude=["dev"])}
    assert "dev" in entries and "dev/pts" not in entries
    assert entries["var/mail"].gid == 8
    prefixed = {e.path for e in entries_from_dir(root, prefix="/opt/app/")}
    assert "opt/app/var/mail" in prefixed


def test_read_index_returns_the_tag(tmp_path: Path) -> None:
    archive, _ = build(tmp_path, sample_tree(tmp_path / "tree"))
    index = read_index(archive)
    manifests = index["manifests"]
    assert isinstance(manifests, list)
    assert manifests[0]["annotations"][ANNOTATION_CONTAINERD_NAME] == REF


@pytest.mark.parametrize(
    "ref",
    [
        "registry.k8s.io/pause:3.10.1",
        "localhost:5000/a/b:v1",
        "busybox:1",
        "ghcr.io/a_b/c-d:0.1.0-rc.1",
    ],
)
def test_valid_references(ref: str) -> None:
    assert check_ref(ref) == ref


@pytest.mark.parametrize(
    "ref", ["", "pause", "Registry/UPPER:1", "a:b:c", "x:", "x:-bad", "a//b:1", "a:" + "t" * 129]
)
def test_invalid_references_are_refused(ref: str, tmp_path: Path) -> None:
    with pytest.raises(OciError, match="not a tagged image reference"):
        write_image(tmp_path / "x.tar", ref, [[file_entry("a", b"")]], ImageConfig())
    assert not (tmp_path / "x.tar").exists()


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([file_entry("a", b"1"), file_entry("a", b"2")], "twice"),
        ([Entry("../escape", "file", 0o644, b"")], "below the image root"),
        ([Entry("", "dir")], "below the image root"),
        ([symlink_entry("lib", "usr/lib"), file_entry("lib/x", b"")], "is a symlink"),
        ([Entry("l", "hardlink", 0o644, None, "missing")], "not a file of this layer"),
        ([Entry("f", "file", 0o644, None)], "has no content"),
    ],
)
def test_bad_entries_raise_typed_errors_and_leave_nothing(
    entries: list[Entry], message: str, tmp_path: Path
) -> None:
    with pytest.raises(OciError, match=message):
        write_image(tmp_path / "x.tar", REF, [entries], ImageConfig())
    assert list(tmp_path.iterdir()) == []


def test_an_image_needs_a_layer(tmp_path: Path) -> None:
    with pytest.raises(OciError, match="at least one layer"):
        write_image(tmp_path / "x.tar", REF, [], ImageConfig())


def test_unreadable_or_missing_sources_are_named(tmp_path: Path) -> None:
    with pytest.raises(OciError, match=r"cannot read .*nope"):
        write_layer([file_entry("a", tmp_path / "nope")], tmp_path / "blobs")
    with pytest.raises(OciError, match="is not a directory"):
        entries_from_dir(tmp_path / "nope")
    assert [p.name for p in (tmp_path / "blobs").iterdir()] == []


def test_a_file_shorter_than_its_size_is_named(tmp_path: Path) -> None:
    # sysfs reports 4096 bytes for every attribute and returns a few: the same as a file that
    # shrank while the layer was being written.
    source = Path("/sys/devices/system/cpu/online")
    assert source.stat().st_size > len(source.read_bytes())
    with pytest.raises(OciError, match="online"):
        write_layer([file_entry("online", source)], tmp_path / "blobs")


def test_special_files_are_refused_unless_skipped(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "pipe")
    with pytest.raises(OciError, match="device, fifo or socket"):
        entries_from_dir(root)
    assert entries_from_dir(root, skip_special=True) == []


def test_a_non_tar_archive_is_a_typed_error(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.tar"
    bogus.write_bytes(b"not a tar")
    with pytest.raises(OciError, match="not a readable OCI image archive"):
        read_index(bogus)
