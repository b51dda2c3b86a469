#!/usr/bin/env bash
# Installs everything ebpfsvc needs on a fresh Debian machine. Idempotent: each
# step checks first, so a second run takes seconds.
#
#   - Debian packages: bcc's Python bindings (python3-bpfcc; the PyPI "bcc" is an
#     unrelated project), kernel headers, iproute2, iperf3, iptables, nftables, ...
#   - a merged kernel-headers tree for BCC_KERNEL_SOURCE: this kernel ships no
#     headers, so bcc compiles against Debian's linux-headers-amd64, whose
#     -common and arch halves must be merged into one tree;
#   - a virtual environment from Debian's python3 that sees bcc (--system-site-packages);
#   - gcc, the Python headers and libb2: cffi builds the Maglev fill and name hashes
#     (ebpfsvc/maglev_fill.c, maglev_hash.c) once per machine;
#   - bpffs mounted at /sys/fs/bpf (pinned maps outlive the agent).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$here/.venv}
headers=${EBPFSVC_HEADERS:-/var/lib/ebpfsvc/kernel-headers}

apt_packages=(python3-bpfcc bpfcc-tools linux-headers-amd64 python3-venv python3-pip
              gcc python3-dev libb2-dev iproute2 iperf3 wrk sockperf qperf nginx-light iptables nftables redis-server redis-tools socat curl ethtool procps
              shellcheck ruby vagrant)   # the last three check deploy/ and vagrant/ (tests/unit/test_deploy.py)

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: must run as root (it installs packages and mounts bpffs)" >&2
  exit 1
fi

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The redis and nginx packages start a server on the host; the lab runs its own per pod.
  systemctl disable --now redis-server nginx >/dev/null 2>&1 || true
fi

# Merged headers tree: copy -common, then symlink the arch half over it.
common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
arch=${common%-common}-amd64
stamp="$headers/.ebpfsvc-from"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$arch" ]; then
  step "merging kernel headers $common + $arch into $headers"
  rm -rf "$headers"
  mkdir -p "$(dirname "$headers")"
  cp -a "$common" "$headers"
  cp -rs --remove-destination "$arch"/. "$headers"/
  echo "$arch" > "$stamp"
fi

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import bcc' 2>/dev/null; then
  step "virtual environment $venv (sees Debian's bcc)"
  rm -rf "$venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
# pip is quick when everything is already installed.
if ! "$venv/bin/python" -c 'import ebpfsvc, pyroute2, kubernetes, numpy, cffi, scapy, pytest' 2>/dev/null \
   || [ "$here/pyproject.toml" -nt "$venv/.ebpfsvc-installed" ]; then
  step "pip install -e .[test,bench]"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e "$here[test,bench]"
  touch "$venv/.ebpfsvc-installed"
fi

if ! mountpoint -q /sys/fs/bpf; then
  step "mount bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

# Real Kubernetes control-plane binaries (kube-apiserver, kube-controller-manager,
# kube-proxy, kubectl, etcd) built from the Go modules pinned in tools/k8s/go.mod,
# cached by version under /var/lib/ebpfsvc/k8s (current -> the bin dir). Needs Go;
# a cold build is long (tools/k8s/NOTES.md), a cached one a moment.
# EBPFSVC_K8S_BUILD=0 skips it.
if [ "${EBPFSVC_K8S_BUILD:-1}" != 0 ] && ! bash "$here/scripts/build-k8s.sh" --check; then
  step "kubernetes control-plane binaries (scripts/build-k8s.sh)"
  bash "$here/scripts/build-k8s.sh"
fi

echo "setup: ok (BCC_KERNEL_SOURCE=$headers, venv=$venv)"
