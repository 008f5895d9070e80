"""Helpers of the node tests: kubectl against a cluster, busybox pods, the test images."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from defender_devcluster import tool, wait_for
from defender_devcluster._images import (
    BuildContext,
    ImageInputMissing,
    build_image,
    default_cache_dir,
)

# pause (every pod's sandbox) and stand-in (busybox applets: sh, httpd, wget, nslookup).
TEST_IMAGES = ("pause", "stand-in")


def node_test_images(cache_dir: Path) -> dict[str, tuple[str, Path]]:
    """name -> (reference, archive) of TEST_IMAGES, built by the image recipes (no Docker)
    into ``cache_dir`` (cached by content, like `make images`)."""
    ctx = BuildContext(cache_dir=cache_dir, progress=lambda _line: None)
    built = {}
    for name in TEST_IMAGES:
        image = build_image(ctx, name)
        built[name] = (image.ref, image.archive)
    return built


def build_images(names: tuple[str, ...]) -> dict[str, Path]:
    """name -> archive of images built (or found cached) in the images cache."""
    ctx = BuildContext(cache_dir=default_cache_dir(), progress=lambda _line: None)
    return {name: build_image(ctx, name).archive for name in names}


class Kubectl:
    """kubectl against one cluster, failing the test with stderr on a non-zero exit."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig

    def run(
        self, *args: str, stdin: str | None = None, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(tool("kubectl")), f"--kubeconfig={self.kubeconfig}", *args]
        out = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {out.returncode}: {out.stderr}")
        return out

    def __call__(self, *args: str, stdin: str | None = None, timeout: float = 60.0) -> str:
        return self.run(*args, stdin=stdin, timeout=timeout).stdout

    def apply(self, doc: dict[str, Any]) -> None:
        self("apply", "-f", "-", stdin=json.dumps(doc))

    def get(self, *args: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self("get", *args, "-o", "json"))
        return data


def busybox_pod(
    image: str, name: str, namespace: str, command: str, **extra: Any
) -> dict[str, Any]:
    """A pod running ``sh -c command`` in ``image``, never pulled (it was imported)."""
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": 1,
        "containers": [
            {
                "name": "main",
                "image": image,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", command],
                **extra.pop("container", {}),
            }
        ],
        **extra,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": spec,
    }


def wait_pod_ready(kubectl: Kubectl, namespace: str, name: str, timeout: float = 120.0) -> Any:
    """The pod's JSON once its Ready condition is True; the last status in the failure."""

    def ready() -> dict[str, Any] | None:
        pod = kubectl.get("-n", namespace, "pod", name)
        conds = pod.get("status", {}).get("conditions", [])
        if any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
            return pod
        return None

    return wait_for(f"pod {namespace}/{name} Ready", ready, timeout=timeout, every=0.5)


def tcp_connects(kubectl: Kubectl, namespace: str, pod: str, ip: str, port: int) -> bool:
    """Whether `pod` opens a TCP connection to ip:port. False when the connection is refused or
    times out (a NetworkPolicy rejects or drops its first packet); any other failure fails the
    test. A caller shows that a refusal is the policy's by a connection that succeeds from
    another pod, or to another port, at the same time."""
    probe = f"nc -w 3 {ip} {port} </dev/null"
    out = kubectl.run("-n", namespace, "exec", pod, "--", "sh", "-c", probe, check=False)
    if out.returncode == 0:
        return True
    assert "timed out" in out.stderr or "Connection refused" in out.stderr, (
        out.returncode,
        out.stdout,
        out.stderr,
    )
    return False


__all__ = [
    "TEST_IMAGES",
    "ImageInputMissing",
    "Kubectl",
    "build_images",
    "busybox_pod",
    "node_test_images",
    "tcp_connects",
    "wait_pod_ready",
]
