#!/usr/bin/env bash
# Every node, first: the newest Debian kernel and the headers that match it. bcc compiles the
# datapath against the running kernel's headers, and Debian keeps only the newest ABI's headers in
# its archive, so a box's original kernel may have none to install. Vagrant reboots the node into
# the new kernel after this script (reboot: true in the Vagrantfile). Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

apt-get update -qq
apt-get install -y -qq --no-install-recommends linux-image-amd64 linux-headers-amd64 >/dev/null
newest=$(dpkg-query -W -f='${Depends}' linux-headers-amd64 | sed 's/^linux-headers-\([^ ,]*\).*/\1/')
echo "kernel: running $(uname -r); newest $newest with its headers installed (rebooting into it)"
