/* SPDX-License-Identifier: GPL-2.0 */
#ifndef EBPFSVC_NODEPORT_XDP_H
#define EBPFSVC_NODEPORT_XDP_H

static __always_inline int np4_xdp_uplink(struct xdp_md *ctx)
{
	return XDP_PASS;
}

#endif /* EBPFSVC_NODEPORT_XDP_H */
