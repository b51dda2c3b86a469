#!/usr/bin/env bash
# Builds the real Kubernetes control-plane binaries from Go modules, at the
# versions pinned in tools/k8s/go.mod, cached by version:
#
#   /var/lib/ebpfsvc/k8s/<k8s>-etcd<etcd>/bin/{kube-apiserver,kube-controller-manager,kube-proxy,kubectl,etcd}
#   /var/lib/ebpfsvc/k8s/current -> <k8s>-etcd<etcd>/bin
#
# A second run with the same pins takes a moment: nothing is built when the
# binaries are there. A cold build takes long (see tools/k8s/NOTES.md). The
# build goes into a temporary directory that is renamed into place only when
# every binary has built and printed its version, so an interrupted build
# never leaves a half cache. Go's module and build caches are the defaults.
#
#   build-k8s.sh --check   exit 0 when the pinned versions are built, 1 if not
#   EBPFSVC_K8S_ROOT       where the cache lives (default /var/lib/ebpfsvc/k8s)
#   EBPFSVC_K8S_FORCE=1    rebuild even when cached
set -euo pipefail

# The whole script is one function, read before it runs: editing this file
# while a long build is under way cannot change what the running build does.
main() {
  here=$(cd "$(dirname "$0")/.." && pwd)
  mod=$here/tools/k8s
  root=${EBPFSVC_K8S_ROOT:-/var/lib/ebpfsvc/k8s}

  # Versions straight from go.mod: no go command (and no network) on the cached path.
  pin() { awk -v m="$1" '$1==m {print $2; exit} $1=="require" && $2==m {print $3; exit}' "$mod/go.mod"; }
  k8s=$(pin k8s.io/kubernetes)
  etcd=$(pin go.etcd.io/etcd/server/v3)
  if [ -z "$k8s" ] || [ -z "$etcd" ]; then
    echo "build-k8s: no k8s.io/kubernetes or etcd pin in $mod/go.mod" >&2; exit 1
  fi

  dest=$root/$k8s-etcd$etcd
  bins=(kube-apiserver kube-controller-manager kube-proxy kubectl etcd)
  sum=$(cat "$mod/go.mod" "$mod/go.sum" | sha256sum | cut -d' ' -f1)

  cached() {
    [ -f "$dest/.built-from" ] && [ "$(cat "$dest/.built-from")" = "$sum" ] || return 1
    local b; for b in "${bins[@]}"; do [ -x "$dest/bin/$b" ] || return 1; done
  }

  says() {  # says LINE BINARY ARGS...: the binary, run with ARGS, prints LINE
    local want=$1 out; shift
    out=$("$tmp/bin/$1" "${@:2}" 2>&1) || true
    grep -qxF "$want" <<<"$out" || { echo "build-k8s: $1 ${*:2} printed: $out (wanted $want)" >&2; return 1; }
  }

  point_current() {
    # Replace the symlink atomically (rename over it), then say where it points.
    ln -sfn "$(basename "$dest")/bin" "$root/.current.tmp"
    mv -T "$root/.current.tmp" "$root/current"
    echo "build-k8s: $root/current -> $dest/bin"
  }

  if [ "${1:-}" = --check ]; then
    cached && [ "$(readlink "$root/current" 2>/dev/null)" = "$(basename "$dest")/bin" ]; exit
  fi

  mkdir -p "$root"
  # One build at a time; a second caller waits and then finds the cache.
  exec 9>"$root/.lock"
  flock 9

  if [ "${EBPFSVC_K8S_FORCE:-0}" != 1 ] && cached; then
    echo "build-k8s: kubernetes $k8s, etcd $etcd already built"
    point_current
    exit 0
  fi

  # CI and cron-like callers may come with a thin environment: Go's default install
  # place, and a HOME for its caches.
  PATH=$PATH:/usr/local/go/bin
  export HOME=${HOME:-/root}
  command -v go >/dev/null || { echo "build-k8s: needs the go command (Go >= the go line of $mod/go.mod)" >&2; exit 1; }

  # Under the lock, any other build directory is left from a killed build.
  rm -rf "$root"/.build.*
  tmp=$(mktemp -d "$root/.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  mkdir "$tmp/bin"

  start=$(date +%s)
  echo "build-k8s: building kubernetes $k8s and etcd $etcd into $dest with $(go version) (a cold build takes long)"

  # Kubernetes' own release flags (hack/lib/golang.sh, hack/lib/version.sh):
  # static binaries, selinux,notest,grpcnotrace tags, -s -w, and the version
  # variables in both component-base and client-go.
  minor=${k8s#v1.}; minor=${minor%%.*}
  build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
  done
  export CGO_ENABLED=0
  tags=selinux,notest,grpcnotrace
  goflags=(-C "$mod" -mod=readonly -trimpath "-tags=$tags")

  # One invocation for the four kubernetes commands: they share compilation.
  go build "${goflags[@]}" -ldflags "$ldflags" -o "$tmp/bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-proxy \
    k8s.io/kubernetes/cmd/kubectl
  # etcd's main package is the root of go.etcd.io/etcd/server/v3 (its version is
  # a constant in go.etcd.io/etcd/api/v3/version); the packages it shares with
  # the above (grpc, protobuf, otel, ...) come from the build cache.
  go build "${goflags[@]}" -ldflags "-s -w" -o "$tmp/bin/etcd" go.etcd.io/etcd/server/v3

  # Each binary must run and name the pinned version before the cache is kept.
  says "Kubernetes $k8s" kube-apiserver --version
  says "Kubernetes $k8s" kube-controller-manager --version
  says "Kubernetes $k8s" kube-proxy --version
  says "Client Version: $k8s" kubectl version --client
  says "etcd Version: ${etcd#v}" etcd --version

  echo "$sum" > "$tmp/.built-from"
  chmod 755 "$tmp"
  rm -rf "$dest"
  mv -T "$tmp" "$dest"
  trap - EXIT

  echo "build-k8s: built in $(( $(date +%s) - start ))s"
  point_current
}

main "$@"
exit
