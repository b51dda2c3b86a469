/* SPDX-License-Identifier: GPL-2.0 */
/*
 * TEMPORARY, until branch v6node's bpf/lib/nodeaddr.h (the node addresses in
 * the pinned map lb_node_addrs) is merged: the node's IPv6 SNAT source as the
 * loader's -DNODE_SNAT_ADDR6_{0,1,2,3} (the address's four __be32 words as
 * numbers), behind the accessor nodeaddr.h will provide under the same name.
 */
#ifndef EBPFSVC_NODEADDR6_TMP_H
#define EBPFSVC_NODEADDR6_TMP_H

#ifndef NODE_SNAT_ADDR6_0
#define NODE_SNAT_ADDR6_0 0
#define NODE_SNAT_ADDR6_1 0
#define NODE_SNAT_ADDR6_2 0
#define NODE_SNAT_ADDR6_3 0
#endif

/* The node's IPv6 SNAT source into `out`: 0 when set, -1 when none (all zero). */
static __always_inline int node_snat6(__be32 out[4])
{
	out[0] = NODE_SNAT_ADDR6_0;
	out[1] = NODE_SNAT_ADDR6_1;
	out[2] = NODE_SNAT_ADDR6_2;
	out[3] = NODE_SNAT_ADDR6_3;
	return (out[0] | out[1] | out[2] | out[3]) ? 0 : -1;
}

#endif /* EBPFSVC_NODEADDR6_TMP_H */
