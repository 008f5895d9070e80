#!/usr/bin/env bash
# Try ML Defender on a kind cluster (Docker needed; not available on the CI machine, where the
# chart is tested against the local control plane instead).
#
#   hack/kind.sh up            create the cluster from kind-config.yaml (1 control plane, 3 workers)
#   hack/kind.sh load          build the image (hack/image.sh) and load it into the kind nodes
#   hack/kind.sh helm-install  install the chart with that image and wait for it
#   hack/kind.sh down          delete the cluster
#
# Environment: KIND_CLUSTER (default ml-defender), IMAGE (default ml-defender-config:dev),
# NAMESPACE (default ml-defender), HELM / KUBECTL (default: the pinned tools, else PATH).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cluster="${KIND_CLUSTER:-ml-defender}"
image="${IMAGE:-ml-defender-config:dev}"
namespace="${NAMESPACE:-ml-defender}"
bindir=$("$root/hack/tools.sh" --bindir)
helm="${HELM:-$([[ -x "$bindir/helm" ]] && echo "$bindir/helm" || echo helm)}"

need() {
  command -v "$1" >/dev/null || { echo "kind.sh: $1 is not installed ($2)" >&2; exit 1; }
}
need_docker() {
  need docker "https://docs.docker.com/engine/install/"
  docker info >/dev/null 2>&1 || { echo "kind.sh: no Docker engine answers (docker info failed); start Docker first" >&2; exit 1; }
}

case "${1:-}" in
  up)
    need_docker
    need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
    if kind get clusters | grep -qx "$cluster"; then
      echo "kind.sh: cluster $cluster already exists" >&2
    else
      kind create cluster --name "$cluster" --config "$root/kind-config.yaml" --wait 120s
    fi
    ;;
  load)
    need_docker
    need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
    "$root/hack/image.sh" "$image"
    kind load docker-image "$image" --name "$cluster"
    ;;
  helm-install)
    repo="${image%:*}"
    tag="${image##*:}"
    # An empty registry makes the chart use the bare name that `kind load` put on the nodes;
    # pullPolicy Never fails fast if the load step was skipped.
    "$helm" upgrade --install ml-defender "$root/charts/ml-defender" \
      --kube-context "kind-$cluster" --namespace "$namespace" --create-namespace \
      --set image.registry= --set "image.repository=$repo" --set "image.tag=$tag" \
      --set image.pullPolicy=Never --wait --timeout 5m
    "$helm" test ml-defender --kube-context "kind-$cluster" --namespace "$namespace"
    ;;
  down)
    need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
    kind delete cluster --name "$cluster"
    ;;
  *)
    sed -n "2,10p" "$0" >&2
    exit 2
    ;;
esac
