#!/bin/sh
# The image's entrypoint: points bcc at the kernel headers the kernel-headers init container
# prepared (deploy/image/kernel-headers.sh), then runs `ebpfsvc` with the container's args.
# With no prepared tree, bcc falls back to /lib/modules/$(uname -r) or the kernel's kheaders.
set -eu
tree=${EBPFSVC_STATE:-/var/lib/ebpfsvc}/kernel-headers/${EBPFSVC_KERNEL_RELEASE:-$(uname -r)}
if [ -z "${BCC_KERNEL_SOURCE:-}" ] && [ -d "$tree" ]; then
  BCC_KERNEL_SOURCE=$tree
  export BCC_KERNEL_SOURCE
fi
exec ebpfsvc "$@"
