#!/usr/bin/env bash
# Builds the control-plane tools from Go modules (no release downloads are possible here).
#
#   hack/tools.sh            build what is missing, print the bin directory on the last line
#   hack/tools.sh --bindir   print the bin directory only
#   hack/tools.sh --no-node  only the control-plane tools (no kubelet, containerd, CoreDNS, ...)
#   hack/tools.sh --helm     only helm (what `make helm-lint` / `make helm-install` need when no
#                            helm is on PATH: Go, but no root and no Kubernetes build)
#
# The node group (kubelet, kube-proxy, CoreDNS, kube-router from Go modules; containerd, runc and the CNI
# plugins from Debian packages, linked into the bin dir) has its own stamps in the same bin dir,
# so adding it never rebuilds the control-plane binaries.
#
# DEFENDER_TOOLS_DIR (like envtest's KUBEBUILDER_ASSETS) points to a directory that already has
# the binaries; when every binary is there, nothing is built.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tools.env
source "$here/tools.env"

tag="k8s-${KUBERNETES_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}"
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/ml-defender"
bindir="${DEFENDER_TOOLS_DIR:-$cache_root/$tag/bin}"
k8s_bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
all_bins=("${k8s_bins[@]}" etcd etcdctl etcdutl helm promtool)
k8s_node_bins=(kubelet kube-proxy)
# Linked from Debian packages (see build_node_packages): the harness finds every node binary in
# the bin dir, whatever its origin.
pkg_links=(containerd:/usr/bin/containerd ctr:/usr/bin/ctr runc:/usr/sbin/runc cni:/usr/lib/cni)

if [[ "${1:-}" == "--bindir" ]]; then echo "$bindir"; exit 0; fi
with_node=1
if [[ "${1:-}" == "--no-node" ]]; then with_node=0; fi
only_helm=0
if [[ "${1:-}" == "--helm" ]]; then only_helm=1; all_bins=(helm); fi

have_all() { for b in "$@"; do [[ -x "$bindir/$b" ]] || return 1; done; }
# A stamp per tool group records what it was built from (version + flags), so changing either
# rebuilds that group only; a directory given by DEFENDER_TOOLS_DIR is taken as it is.
stamp_ok() { [[ -f "$bindir/.stamp-$1" && "$(cat "$bindir/.stamp-$1")" == "$2" ]]; }
stamp() { printf '%s' "$2" > "$bindir/.stamp-$1"; }
log() { printf '[tools %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

if [[ -n "${DEFENDER_TOOLS_DIR:-}" ]]; then
  have_all "${all_bins[@]}" || { log "DEFENDER_TOOLS_DIR=$bindir lacks some of: ${all_bins[*]}"; exit 1; }
  echo "$bindir"; exit 0
fi

command -v go >/dev/null || { log "go is required to build the tools (apt-get install golang or a Go >= 1.26 toolchain)"; exit 1; }
mkdir -p "$bindir"
# Two builds at once (a colleague's `make tools` beside CI's, or two worktrees) would rewrite the
# same go.mod files and binaries under each other: the second waits and then finds them cached.
exec 9>"$cache_root/.tools-$tag.lock"
flock 9
work="$cache_root/$tag/src"
mkdir -p "$work"
export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0

kubernetes_ldflags() {
  local p ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$ld"
}

build_kubernetes() {
  local mod="$work/kubernetes" staging="v0${KUBERNETES_VERSION#v1}"
  local ld
  ld=$(kubernetes_ldflags)
  if have_all "${k8s_bins[@]}" && stamp_ok kubernetes "$ld"; then log "kubernetes $KUBERNETES_VERSION: cached"; return; fi
  mkdir -p "$mod"
  log "kubernetes $KUBERNETES_VERSION: resolving k8s.io/kubernetes go.mod"
  local gomod
  gomod=$(cd "$mod" && GOFLAGS= go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  {
    echo "module ml-defender.local/tools/kubernetes"
    echo
    echo "go 1.26.0"
    echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo
    # Kubernetes replaces its staging modules with ./staging/src paths; point each at the
    # published module of the matching version instead. The list comes from upstream's go.mod.
    grep -E '^\s*k8s\.io/[^ ]+ => \./staging/' "$gomod" | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
  } > "$mod/go.mod"
  log "kubernetes: $(grep -c '^replace' "$mod/go.mod") staging replaces generated"
  local pkgs=()
  for b in "${k8s_bins[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  log "kubernetes: go build ${k8s_bins[*]} (a cold build takes 20-40 min on 2 cores)"
  (cd "$mod" && go build -tags selinux,notest -ldflags "$ld" -o "$bindir/" "${pkgs[@]}")
  stamp kubernetes "$ld"
  log "kubernetes: built"
}

build_etcd() {
  local ld="-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=release-$ETCD_VERSION"
  if have_all etcd etcdctl && stamp_ok etcd "$ld"; then log "etcd $ETCD_VERSION: cached"; return; fi
  local mod="$work/etcd"
  mkdir -p "$mod"
  cat > "$mod/go.mod" <<MOD
module ml-defender.local/tools/etcd

go 1.26.0

require (
	go.etcd.io/etcd/server/v3 $ETCD_VERSION
	go.etcd.io/etcd/etcdctl/v3 $ETCD_VERSION
)
MOD
  log "etcd $ETCD_VERSION: go build etcd etcdctl"
  (cd "$mod" && go build -ldflags "$ld" -o "$bindir/etcd" go.etcd.io/etcd/server/v3 \
     && go build -ldflags "$ld" -o "$bindir/etcdctl" go.etcd.io/etcd/etcdctl/v3)
  stamp etcd "$ld"
  log "etcd: built"
}

build_etcdutl() {
  # etcd 3.6 moved `snapshot status` and `snapshot restore` out of etcdctl into etcdutl (offline
  # tool on a data file); backup verification and restore need it. Its own stamp, so adding it
  # never rebuilds etcd/etcdctl.
  local ld="-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=release-$ETCD_VERSION" mod="$work/etcdutl"
  if have_all etcdutl && stamp_ok etcdutl "$ld"; then log "etcdutl $ETCD_VERSION: cached"; return; fi
  mkdir -p "$mod"
  cat > "$mod/go.mod" <<MOD
module ml-defender.local/tools/etcdutl

go 1.26.0

require go.etcd.io/etcd/etcdutl/v3 $ETCD_VERSION
MOD
  log "etcdutl $ETCD_VERSION: go build etcdutl"
  (cd "$mod" && go build -ldflags "$ld" -o "$bindir/etcdutl" go.etcd.io/etcd/etcdutl/v3)
  stamp etcdutl "$ld"
  log "etcdutl: built"
}

build_helm() {
  # Helm's default Capabilities.KubeVersion (used by `helm template` and `helm lint`) is a
  # build-time value; upstream stamps it from client-go, else it says v1.20 and charts that
  # require a newer kubeVersion fail to render.
  local kminor ld p
  kminor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)
  ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ld+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$kminor"
  done
  if have_all helm && stamp_ok helm "$ld"; then log "helm $HELM_VERSION: cached"; return; fi
  log "helm $HELM_VERSION: go install"
  GOBIN="$bindir" go install -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  stamp helm "$ld"
  log "helm: built"
}

build_promtool() {
  # `promtool check rules` / `promtool test rules` run the chart's alert rules in `make test`.
  # remove_all_sd drops every service-discovery plugin (cloud SDKs) that promtool links only for
  # `check service-discovery`: the rule commands need none of them and the build is much shorter.
  local tags="remove_all_sd" ld="-s -w -X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION"
  if have_all promtool && stamp_ok promtool "$ld $tags"; then log "promtool $PROMETHEUS_VERSION: cached"; return; fi
  log "promtool $PROMETHEUS_VERSION: go install (tags: $tags)"
  GOBIN="$bindir" go install -tags "$tags" -ldflags "$ld" "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
  stamp promtool "$ld $tags"
  log "promtool: built"
}

build_kubernetes_node() {
  # The same wrapper module as build_kubernetes (its go.mod must exist: that group runs first).
  local mod="$work/kubernetes" ld pkgs=() b
  ld=$(kubernetes_ldflags)
  if have_all "${k8s_node_bins[@]}" && stamp_ok kubernetes-node "$ld"; then log "kubelet, kube-proxy $KUBERNETES_VERSION: cached"; return; fi
  [[ -f "$mod/go.mod" ]] || { log "kubernetes-node: $mod/go.mod missing (build_kubernetes did not run)"; exit 1; }
  for b in "${k8s_node_bins[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  log "kubernetes-node: go build ${k8s_node_bins[*]} (1-3 min once the control plane is built)"
  (cd "$mod" && go build -tags selinux,notest -ldflags "$ld" -o "$bindir/" "${pkgs[@]}")
  stamp kubernetes-node "$ld"
  log "kubernetes-node: built"
}

build_coredns() {
  # CoreDNS's own main with the plugins a cluster DNS uses (the list upstream's plugin.cfg
  # orders; a plugin not imported is simply not registered): upstream's main links every cloud
  # SDK (route53, azure, clouddns) and takes several times longer to build.
  local ld="-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" mod="$work/coredns" p
  local plugins=(bind errors log health ready kubernetes cache loadbalance reload loop hosts forward metrics)
  if have_all coredns && stamp_ok coredns "$ld ${plugins[*]}"; then log "coredns $COREDNS_VERSION: cached"; return; fi
  mkdir -p "$mod"
  cat > "$mod/go.mod" <<MOD
module ml-defender.local/tools/coredns

go 1.26.0

require github.com/coredns/coredns $COREDNS_VERSION
MOD
  {
    echo "// Generated by hack/tools.sh: CoreDNS with the plugins of a cluster DNS."
    echo "package main"
    echo
    echo "import ("
    echo '	"github.com/coredns/coredns/coremain"'
    for p in "${plugins[@]}"; do echo "	_ \"github.com/coredns/coredns/plugin/$p\""; done
    echo ")"
    echo
    echo "func main() { coremain.Run() }"
  } > "$mod/main.go"
  log "coredns $COREDNS_VERSION: go build (plugins: ${plugins[*]})"
  (cd "$mod" && go build -ldflags "$ld" -o "$bindir/coredns" .)
  stamp coredns "$ld ${plugins[*]}"
  log "coredns: built"
}

build_kube_router() {
  # Only its firewall runs (--run-router=false --run-service-proxy=false): NetworkPolicy on the
  # node, as on a default k3s.
  local ld="-s -w"
  if have_all kube-router && stamp_ok kube-router "$KUBE_ROUTER_VERSION $ld"; then log "kube-router $KUBE_ROUTER_VERSION: cached"; return; fi
  log "kube-router $KUBE_ROUTER_VERSION: go install"
  GOBIN="$bindir" go install -ldflags "$ld" "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@$KUBE_ROUTER_VERSION"
  stamp kube-router "$KUBE_ROUTER_VERSION $ld"
  log "kube-router: built"
}

build_node_packages() {
  # containerd, runc and the CNI plugins come from Debian (see docs/local-cluster.md: why).
  # apt only when a package is missing, so a second run changes nothing.
  local missing=() pkg versions link name target
  for pkg in $NODE_APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then log "node: missing Debian packages ${missing[*]}: run as root or apt-get install them"; exit 1; fi
    log "node: apt-get install ${missing[*]}"
    # Another apt may hold the lock (a colleague's install): wait for it rather than fail.
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # shellcheck disable=SC2086
  versions=$(dpkg-query -W -f='${Package}=${Version} ' $NODE_APT_PACKAGES)
  if stamp_ok node-packages "$versions" && have_all containerd ctr runc cni/bridge; then log "node packages: cached ($versions)"; return; fi
  for link in "${pkg_links[@]}"; do
    name=${link%%:*} target=${link#*:}
    [[ -e "$target" ]] || { log "node: $target missing after installing $NODE_APT_PACKAGES"; exit 1; }
    ln -sfn "$target" "$bindir/$name"
  done
  stamp node-packages "$versions"
  log "node packages: linked ($versions)"
}

if ((only_helm)); then build_helm; echo "$bindir"; exit 0; fi
build_etcd
build_etcdutl
build_helm
build_promtool
build_kubernetes
if ((with_node)); then
  build_node_packages
  build_kubernetes_node
  build_coredns
  build_kube_router
fi
echo "$bindir"
