#!/usr/bin/env bash
# Builds the local node's images as OCI archives, without Docker (see docs/images.md).
#
#   hack/images.sh [NAME...] [--ref NAME=REF] [--import-to SOCKET] [--cache-dir DIR]
#       build pause, etcd, coredns, stand-in, project (default: all; cached by content) into
#       ~/.cache/ml-defender/images/<name>.tar; with --import-to, `ctr images import` them too
#   hack/images.sh --deps
#       install the Debian packages the builds and their tests use, when missing
#       (debootstrap, busybox-static, skopeo, containerd for the import test)
#
# Every option of `python -m defender_devcluster images --help` is accepted.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ "${1:-}" == "--deps" ]]; then
  need=()
  command -v debootstrap >/dev/null || need+=(debootstrap)
  [[ -x /bin/busybox ]] && dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q installed || need+=(busybox-static)
  command -v skopeo >/dev/null || need+=(skopeo)
  command -v containerd >/dev/null && command -v ctr >/dev/null && command -v runc >/dev/null || need+=(containerd runc)
  command -v gcc >/dev/null || need+=(gcc libc6-dev)
  if [[ ${#need[@]} -eq 0 ]]; then echo "images: Debian packages present" >&2; exit 0; fi
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "images: missing packages: ${need[*]} (install them with apt-get as root)" >&2; exit 1
  fi
  echo "images: apt-get install ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  exit 0
fi

py="$root/.venv/bin/python"
[[ -x "$py" ]] || { echo "images: $py is missing; run \`make venv\` first" >&2; exit 1; }
exec "$py" -m defender_devcluster images "$@"
