"""The images the node tests run: pause (every pod's sandbox) and the stand-in image (busybox
applets: sh, httpd, wget, nslookup), built by defender_devcluster's image recipes (no Docker),
cached in the images cache like `make images` does."""

from __future__ import annotations

from pathlib import Path

from defender_devcluster._images import BuildContext, ImageInputMissing, build_image

TEST_IMAGES = ("pause", "stand-in")


def node_test_images(cache_dir: Path) -> dict[str, tuple[str, Path]]:
    """name -> (reference, archive) of every image in TEST_IMAGES."""
    ctx = BuildContext(cache_dir=cache_dir, progress=lambda _line: None)
    built = {}
    for name in TEST_IMAGES:
        image = build_image(ctx, name)
        built[name] = (image.ref, image.archive)
    return built


__all__ = ["TEST_IMAGES", "ImageInputMissing", "node_test_images"]
