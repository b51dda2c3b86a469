#!/usr/bin/env bash
# The agent pod's kernel-headers init container: makes the running kernel's headers available to
# bcc as $EBPFSVC_STATE/kernel-headers/$(uname -r), which the image's entrypoint hands to bcc as
# BCC_KERNEL_SOURCE. Headers must match the node's kernel, so they cannot be baked into the image.
# In order of preference:
#   1. the host's headers (linux-headers-$(uname -r) installed on the node; /lib/modules and
#      /usr/src mounted read-only): Debian splits them into an arch half (build) and a -common
#      half (source), merged here into one tree exactly as scripts/setup.sh does (copy -common,
#      symlink the arch half over it); a single tree (Ubuntu, Fedora) is linked as it is;
#   2. the kernel's own copy, /sys/kernel/kheaders.tar.xz (CONFIG_IKHEADERS): bcc unpacks it
#      itself, nothing to do;
#   3. only with EBPFSVC_INSTALL_HEADERS=true, and only for Debian kernels: Debian's
#      linux-headers-$(uname -r) and its -common half, downloaded and unpacked (no dpkg, so
#      no capability and no write to the host's /usr/src) into a merged tree of real files.
# Idempotent: a tree stamped with what it was made from is reused; restarts are instant.
set -euo pipefail

# The overrides exist for tests (tests/unit/test_deploy.py) and for odd layouts.
release=${EBPFSVC_KERNEL_RELEASE:-$(uname -r)}
state=${EBPFSVC_STATE:-/var/lib/ebpfsvc}
tree=$state/kernel-headers/$release
stamp=$tree/.ebpfsvc-from
modules=${EBPFSVC_MODULES_DIR:-/lib/modules}/$release

log() { echo "kernel-headers: $*" >&2; }

mkdir -p "$state/kernel-headers"

# 1. Host headers.
if [ -e "$modules/build/Makefile" ]; then
  build=$(readlink -f "$modules/build")
  source=$(readlink -f "$modules/source" 2>/dev/null || true)
  if [ -n "$source" ] && [ "$source" != "$build" ] && [ -d "$source" ]; then
    from="$source + $build"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$from" ]; then
      log "merging $source + $build into $tree"
      rm -rf "$tree"
      cp -a "$source" "$tree"
      cp -rs --remove-destination "$build"/. "$tree"/
      echo "$from" > "$stamp"
    fi
  else
    log "linking the host's single headers tree $build"
    rm -rf "$tree"
    ln -sfn "$build" "$tree"
  fi
  exit 0
fi

# A tree installed by an earlier run of step 3.
if [ -f "$stamp" ]; then
  log "reusing $tree ($(cat "$stamp"))"
  exit 0
fi

# 2. In-kernel headers.
if [ -f "${EBPFSVC_KHEADERS:-/sys/kernel/kheaders.tar.xz}" ]; then
  log "no host headers; bcc will use /sys/kernel/kheaders.tar.xz"
  rm -rf "$tree"
  exit 0
fi

# 3. Debian's packages, on request.
if [ "${EBPFSVC_INSTALL_HEADERS:-false}" != true ]; then
  log "no headers for kernel $release: install linux-headers-$release on the node," \
      "or set EBPFSVC_INSTALL_HEADERS=true on this init container (Debian kernels only)"
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
apt_opts=(-o APT::Sandbox::User=root -qq)
apt-get "${apt_opts[@]}" update
# The arch package depends on its -common half; both are needed, kbuild is not.
common_pkg=$(apt-cache depends "linux-headers-$release" | sed -n 's/^ *Depends: \(linux-headers-.*-common\)$/\1/p' | head -n1)
(cd "$work" && apt-get "${apt_opts[@]}" download "linux-headers-$release" "$common_pkg")
for deb in "$work"/*.deb; do
  dpkg-deb -x "$deb" "$work/root"
done
log "installing $common_pkg + linux-headers-$release into $tree"
rm -rf "$tree"
cp -a "$work/root/usr/src/${common_pkg}" "$tree"
# Real files, not symlinks: the unpacked packages vanish with this container.
cp -a --remove-destination "$work/root/usr/src/linux-headers-$release"/. "$tree"/
echo "debian:linux-headers-$release" > "$stamp"
