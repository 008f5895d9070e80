#!/usr/bin/env bash
# Builds the ml-defender-config image (operator + agent + kubectl plugin) with Docker.
#
#   hack/image.sh [IMAGE]     default IMAGE: ml-defender-config:dev (or $IMAGE)
#
# Needs a running Docker engine with BuildKit (Docker >= 23); this development machine has none,
# so the target fails here with the message below rather than pretending.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image="${1:-${IMAGE:-ml-defender-config:dev}}"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml" | head -1)

command -v docker >/dev/null || { echo "image: docker is not installed; install Docker to build the image" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "image: no Docker engine answers (docker info failed); start Docker, then retry" >&2; exit 1; }
DOCKER_BUILDKIT=1 docker build --build-arg "VERSION=$version" -t "$image" "$root"
echo "image: built $image" >&2
