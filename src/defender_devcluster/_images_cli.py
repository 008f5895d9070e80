"""``python -m defender_devcluster images``: build the node's images, optionally load them."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import (
    BuildContext,
    BuiltImage,
    build_image,
    default_cache_dir,
    import_archives,
    write_index,
)
from ._errors import DevClusterError, ImageBuildError, ImageInputMissing
from ._images import IMAGE_NAMES
from ._oci import check_ref


def _progress(line: str) -> None:
    print(f"[images {time.strftime('%H:%M:%S')}] {line}", flush=True)


def _parse_refs(pairs: Sequence[str]) -> dict[str, str]:
    refs: dict[str, str] = {}
    for pair in pairs:
        name, sep, ref = pair.partition("=")
        if not sep or name not in IMAGE_NAMES:
            raise ImageBuildError(
                name or pair, f"--ref wants NAME=REF with NAME one of {', '.join(IMAGE_NAMES)}"
            )
        refs[name] = check_ref(ref)
    return refs


def images_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="defender-devcluster images",
        description="Build OCI image archives without Docker (pause, etcd, coredns, stand-in, "
        "project) and optionally import them into a containerd.",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"images to build (default: all of {', '.join(IMAGE_NAMES)})",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where archives go (default: ~/.cache/ml-defender/images)",
    )
    parser.add_argument(
        "--ref",
        action="append",
        default=[],
        metavar="NAME=REF",
        help="tag an image differently, e.g. pause=registry.k8s.io/pause:3.10.2",
    )
    parser.add_argument(
        "--import-to",
        type=Path,
        default=None,
        metavar="SOCKET",
        help="containerd socket to import the archives into (ctr images import)",
    )
    parser.add_argument(
        "--namespace",
        default="k8s.io",
        help="containerd namespace for --import-to (default: k8s.io, the CRI's)",
    )
    parser.add_argument(
        "--snapshotter",
        default="",
        help="snapshotter to unpack into on import (default: containerd's)",
    )
    parser.add_argument("--ctr", default="ctr", help="ctr binary for --import-to")
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="build what can be built; report images whose inputs are missing without failing",
    )
    args = parser.parse_args(argv)
    names = args.names or list(IMAGE_NAMES)
    unknown = [n for n in names if n not in IMAGE_NAMES]
    if unknown:
        parser.error(f"unknown image(s) {', '.join(unknown)}; known: {', '.join(IMAGE_NAMES)}")
    cache_dir: Path = (args.cache_dir or default_cache_dir()).resolve()
    try:
        ctx = BuildContext(cache_dir=cache_dir, refs=_parse_refs(args.ref), progress=_progress)
        cache_dir.mkdir(parents=True, exist_ok=True)
        built: list[BuiltImage] = []
        missing: list[ImageInputMissing] = []
        for name in names:
            try:
                built.append(build_image(ctx, name))
            except ImageInputMissing as exc:
                _progress(f"{name}: NOT BUILT: {exc.detail}")
                missing.append(exc)
        index = write_index(cache_dir, built)
        print(f"\n{'image':<9} {'tag':<52} {'size':>9} {'time':>7}  archive")
        for b in built:
            how = "cached" if b.cached else f"{b.seconds:.0f}s"
            print(f"{b.name:<9} {b.ref:<52} {b.size / 1e6:>7.1f}MB {how:>7}  {b.archive}")
        for miss in missing:
            print(f"{miss.name:<9} NOT BUILT: {miss.detail}")
        print(f"index: {index}")
        if args.import_to is not None:
            refs = import_archives(
                args.import_to,
                [b.archive for b in built],
                namespace=args.namespace,
                snapshotter=args.snapshotter,
                ctr=args.ctr,
                progress=_progress,
            )
            print(f"imported into {args.import_to} ({args.namespace}): {', '.join(refs)}")
    except DevClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if missing and not args.allow_missing:
        print(
            f"error: {len(missing)} image(s) not built (see above; --allow-missing to accept)",
            file=sys.stderr,
        )
        return 1
    return 0
