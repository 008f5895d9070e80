"""OCI image archives written with the standard library: no Docker, no registry.

An archive is a tar of an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/*``),
the format ``ctr images import``, ``k3s ctr images import``, ``kind load image-archive``,
``skopeo`` (``oci-archive:``) and ``podman load`` read. Everything is deterministic: entries are
sorted, times are fixed, owners are numeric and gzip carries no name or time, so the same input
always gives the same layer, config and manifest digests (containerd then shares unchanged
layers between two builds, and a cache can compare digests).

Layers are streamed: the uncompressed tar is hashed (the config's ``diff_id``) while it is
compressed, and the compressed stream is hashed (the layer digest) while it is written, so a
layer of a few hundred MB never sits in memory.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal, Protocol

from ._errors import OciError as OciError  # re-exported: callers of the writer catch it here

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
# containerd's importer takes the image name from this annotation before anything else.
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
# 1970-01-01: an image built twice from the same input must not differ by its build time.
EPOCH_TIME = "1970-01-01T00:00:00Z"

EntryKind = Literal["file", "dir", "symlink", "hardlink"]

# A reference as the distribution spec names it: [registry[:port]/]path[:tag][@digest]. Only a
# tagged form is accepted: an archive's tag is what a pod spec and the chart ask for.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?/)?"
_REF_RE = re.compile(rf"^{_DOMAIN}{_COMPONENT}(?:/{_COMPONENT})*:[\w][\w.-]{{0,127}}$")
_GZIP_LEVEL = 6


@dataclass(frozen=True)
class Entry:
    """One member of a layer. ``path`` is relative to the image root (``usr/bin/x``)."""

    path: str
    kind: EntryKind = "file"
    mode: int = 0o644
    # A file's content: bytes, or a host file read when the layer is written.
    source: bytes | Path | None = None
    # Target of a symlink (any string) or a hardlink (another entry's path in the same layer).
    target: str = ""
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class ImageConfig:
    """What runs: the parts of the OCI image config a pod spec can rely on."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
    user: str = ""
    workdir: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    stop_signal: str = ""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def as_json(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class LayerBlob:
    """A written layer: the compressed blob and the digest of its uncompressed tar."""

    descriptor: Descriptor
    diff_id: str
    path: Path


@dataclass(frozen=True)
class ImageInfo:
    """What ``write_image`` produced."""

    ref: str
    archive: Path
    manifest: Descriptor
    config: Descriptor
    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]

    @property
    def archive_size(self) -> int:
        return self.archive.stat().st_size


def check_ref(ref: str) -> str:
    """``ref`` itself when it is a valid tagged image reference; OciError otherwise."""
    if not _REF_RE.match(ref) or len(ref) > 255:
        raise OciError(
            f"{ref!r} is not a tagged image reference (expected [registry/]name:tag, "
            f"lower-case name, e.g. registry.k8s.io/pause:3.10.1)"
        )
    return ref


# -- entries -------------------------------------------------------------------------------------


def _norm(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise OciError(f"layer path {path!r} must name something below the image root")
    return "/".join(parts)


def file_entry(
    path: str, source: bytes | Path, mode: int = 0o644, uid: int = 0, gid: int = 0
) -> Entry:
    return Entry(_norm(path), "file", mode, source, "", uid, gid)


def dir_entry(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(_norm(path), "dir", mode, None, "", uid, gid)


def symlink_entry(path: str, target: str) -> Entry:
    return Entry(_norm(path), "symlink", 0o777, None, target)


def entries_from_dir(
    root: Path,
    *,
    prefix: str = "",
    keep_owner: bool = False,
    exclude: Iterable[str] = (),
    skip_special: bool = False,
) -> list[Entry]:
    """Every file, directory and symlink under ``root`` as entries below ``prefix``.

    Files that share an inode become one file and hardlinks to it (the first path in sorted
    order is the file). Owners become 0:0 unless ``keep_owner`` (a root filesystem needs its
    owners). ``exclude`` names paths relative to ``root`` whose *contents* are left out (the
    directory itself stays, e.g. ``dev`` or ``proc`` of a root filesystem). Device nodes, fifos
    and sockets raise OciError unless ``skip_special``: the runtime provides ``/dev``.
    """
    if not root.is_dir():
        raise OciError(f"{root} is not a directory")
    base = _norm(prefix) if prefix.strip("/") else ""
    skip = {_norm(e) for e in exclude}
    entries: list[Entry] = []
    seen_inodes: dict[tuple[int, int], str] = {}

    def walk(directory: Path, rel: str) -> None:
        try:
            children = sorted(os.scandir(directory), key=lambda d: d.name)
        except OSError as exc:
            raise OciError(f"cannot list {directory}: {exc}") from exc
        for child in children:
            child_rel = f"{rel}/{child.name}" if rel else child.name
            name = f"{base}/{child_rel}" if base else child_rel
            st = child.stat(follow_symlinks=False)
            uid, gid = (st.st_uid, st.st_gid) if keep_owner else (0, 0)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                entries.append(
                    Entry(name, "symlink", 0o777, None, os.readlink(child.path), uid, gid)
                )
            elif stat.S_ISDIR(st.st_mode):
                entries.append(Entry(name, "dir", mode, None, "", uid, gid))
                if child_rel not in skip:
                    walk(Path(child.path), child_rel)
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in seen_inodes:
                    entries.append(Entry(name, "hardlink", mode, None, seen_inodes[key], uid, gid))
                else:
                    seen_inodes[key] = name
                    entries.append(Entry(name, "file", mode, Path(child.path), "", uid, gid))
            elif not skip_special:
                raise OciError(
                    f"{child.path} is a device, fifo or socket; an image layer cannot carry it "
                    f"(exclude its directory or pass skip_special)"
                )

    walk(root, "")
    return entries


def _with_parents(entries: Sequence[Entry]) -> list[Entry]:
    """Entries sorted by path, duplicates refused, missing parent directories added (0755)."""
    by_path: dict[str, Entry] = {}
    for e in entries:
        path = _norm(e.path)
        if path in by_path:
            raise OciError(f"layer has {path!r} twice")
        by_path[path] = (
            e if path == e.path else Entry(path, e.kind, e.mode, e.source, e.target, e.uid, e.gid)
        )
    for path in list(by_path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            existing = by_path.get(parent)
            if existing is None:
                by_path[parent] = Entry(parent, "dir", 0o755)
            elif existing.kind != "dir":
                raise OciError(f"{parent!r} is a {existing.kind} but {path!r} is below it")
    for e in by_path.values():
        if e.kind == "hardlink" and (e.target not in by_path or by_path[e.target].kind != "file"):
            raise OciError(f"hardlink {e.path!r} points to {e.target!r}, not a file of this layer")
        if e.kind == "file" and e.source is None:
            raise OciError(f"file {e.path!r} has no content")
    # Sorted by path components so a directory always precedes what is inside it.
    return sorted(by_path.values(), key=lambda e: e.path.split("/"))


# -- blobs ---------------------------------------------------------------------------------------


class _Sink(Protocol):
    def write(self, data: ReadableBuffer, /) -> int: ...


class _HashingWriter(io.RawIOBase):
    """Hashes and counts what passes through on its way to ``sink``."""

    def __init__(self, sink: _Sink) -> None:
        super().__init__()
        self._sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer, /) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.size += view.nbytes
        self._sink.write(view)
        return view.nbytes


def _tarinfo(e: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(e.path)
    info.mtime = 0
    info.uid, info.gid = e.uid, e.gid
    info.uname = info.gname = ""
    info.mode = e.mode
    if e.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif e.kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, e.target
    elif e.kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, e.target
    return info


@contextlib.contextmanager
def _open_source(source: bytes | Path) -> Iterator[tuple[IO[bytes], int]]:
    if isinstance(source, bytes):
        yield io.BytesIO(source), len(source)
        return
    try:
        with source.open("rb") as f:
            yield f, os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise OciError(f"cannot read {source}: {exc}") from exc


def _add_entry(tar: tarfile.TarFile, e: Entry) -> None:
    info = _tarinfo(e)
    if e.kind != "file" or e.source is None:
        tar.addfile(info)
        return
    with _open_source(e.source) as (f, size):
        info.size = size
        try:
            tar.addfile(info, f)
        except OSError as exc:
            # tarfile copies exactly `size` bytes: a file that shrank while the layer was
            # written ends here, named.
            where = e.source if isinstance(e.source, Path) else "<bytes>"
            raise OciError(f"{where} ({e.path!r}): {exc}") from exc


def write_layer(entries: Sequence[Entry], blobs: Path) -> LayerBlob:
    """Write one gzip layer of ``entries`` into the ``blobs`` directory (named by digest)."""
    ordered = _with_parents(entries)
    blobs.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=blobs, prefix=".layer-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            compressed = _HashingWriter(out)
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=_GZIP_LEVEL
            ) as gz:
                plain = _HashingWriter(gz)
                with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    for e in ordered:
                        _add_entry(tar, e)
        digest = "sha256:" + compressed.sha.hexdigest()
        final = blobs / digest.split(":", 1)[1]
        tmp.replace(final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return LayerBlob(
        Descriptor(MEDIA_LAYER_GZIP, digest, compressed.size),
        "sha256:" + plain.sha.hexdigest(),
        final,
    )


def _write_json_blob(obj: object, media_type: str, blobs: Path) -> Descriptor:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest.split(":", 1)[1]).write_bytes(data)
    return Descriptor(media_type, digest, len(data))


def _config_json(config: ImageConfig, diff_ids: Sequence[str], arch: str) -> dict[str, object]:
    run: dict[str, object] = {}
    if config.entrypoint:
        run["Entrypoint"] = list(config.entrypoint)
    if config.cmd:
        run["Cmd"] = list(config.cmd)
    if config.env:
        run["Env"] = list(config.env)
    if config.user:
        run["User"] = config.user
    if config.workdir:
        run["WorkingDir"] = config.workdir
    if config.labels:
        run["Labels"] = dict(config.labels)
    if config.stop_signal:
        run["StopSignal"] = config.stop_signal
    return {
        "created": EPOCH_TIME,
        "architecture": arch,
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [
            {"created": EPOCH_TIME, "created_by": "defender_devcluster images"} for _ in diff_ids
        ],
    }


def host_arch() -> str:
    """The OCI architecture name of this machine (amd64, arm64, ...)."""
    machine = os.uname().machine
    return {
        "x86_64": "amd64",
        "aarch64": "arm64",
        "armv7l": "arm",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
    }.get(machine, machine)


def _add_tree(tar: tarfile.TarFile, layout: Path) -> None:
    for path in sorted(layout.rglob("*"), key=lambda p: p.relative_to(layout).parts):
        rel = path.relative_to(layout).as_posix()
        info = tarfile.TarInfo(rel)
        info.mtime, info.uname, info.gname = 0, "", ""
        if path.is_dir():
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        else:
            info.mode, info.size = 0o644, path.stat().st_size
            with path.open("rb") as f:
                tar.addfile(info, f)


def _place_blob(layer: LayerBlob, blobs: Path) -> LayerBlob:
    """A layer written earlier (a cache) joins this image's blobs: linked when it can be."""
    target = blobs / layer.descriptor.digest.split(":", 1)[1]
    try:
        if layer.path.stat().st_size != layer.descriptor.size:
            raise OciError(f"{layer.path} is not the {layer.descriptor.size}-byte layer recorded")
        try:
            os.link(layer.path, target)
        except OSError:
            shutil.copyfile(layer.path, target)
    except OSError as exc:
        raise OciError(f"cannot use the layer {layer.path}: {exc}") from exc
    return LayerBlob(layer.descriptor, layer.diff_id, target)


def extract_layer(blob: Path, dest: Path) -> None:
    """Unpack one gzip layer under ``dest`` with its owners and modes (no whiteouts expected)."""
    try:
        with gzip.open(blob) as gz, tarfile.open(fileobj=gz, mode="r|") as tar:
            tar.extractall(dest, numeric_owner=True, filter="fully_trusted")
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise OciError(f"cannot unpack the layer {blob}: {exc}") from exc


def write_image(
    archive: Path,
    ref: str,
    layers: Sequence[Sequence[Entry] | LayerBlob],
    config: ImageConfig,
    *,
    arch: str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> ImageInfo:
    """Write ``archive`` (an OCI image-layout tar) holding one image tagged ``ref``.

    ``layers`` go bottom to top: entries to write, or a LayerBlob written before (a cached
    layer is then linked, not rewritten). The archive is written beside its final name and renamed,
    so a reader never finds half an archive.
    """
    check_ref(ref)
    if not layers:
        raise OciError(f"{ref}: an image needs at least one layer")
    archive.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=archive.parent, prefix=f".{archive.name}."))
    try:
        layout = staging / "layout"
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        written = [
            _place_blob(layer, blobs) if isinstance(layer, LayerBlob) else write_layer(layer, blobs)
            for layer in layers
        ]
        diff_ids = tuple(w.diff_id for w in written)
        cfg = _write_json_blob(
            _config_json(config, diff_ids, arch or host_arch()), MEDIA_CONFIG, blobs
        )
        manifest_obj: dict[str, object] = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": cfg.as_json(),
            "layers": [w.descriptor.as_json() for w in written],
        }
        if annotations:
            manifest_obj["annotations"] = dict(annotations)
        manifest = _write_json_blob(manifest_obj, MEDIA_MANIFEST, blobs)
        index = {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [
                {
                    **manifest.as_json(),
                    "annotations": {ANNOTATION_REF_NAME: ref, ANNOTATION_CONTAINERD_NAME: ref},
                    "platform": {"architecture": arch or host_arch(), "os": "linux"},
                }
            ],
        }
        (layout / "index.json").write_text(json.dumps(index, sort_keys=True, separators=(",", ":")))
        (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        tmp_archive = staging / "archive.tar"
        with tarfile.open(tmp_archive, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_tree(tar, layout)
        tmp_archive.replace(archive)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ImageInfo(
        ref=ref,
        archive=archive,
        manifest=manifest,
        config=cfg,
        layers=tuple(w.descriptor for w in written),
        diff_ids=diff_ids,
    )


def read_index(archive: Path) -> dict[str, object]:
    """The ``index.json`` of an archive (for checks and the loader)."""
    try:
        with tarfile.open(archive) as tar:
            member = tar.extractfile("index.json")
            if member is None:
                raise OciError(f"{archive}: index.json is not a file")
            data: dict[str, object] = json.loads(member.read())
            return data
    except (OSError, tarfile.TarError, KeyError, ValueError) as exc:
        raise OciError(f"{archive} is not a readable OCI image archive: {exc}") from exc
