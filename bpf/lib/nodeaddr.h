/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The node's own addresses, read from lb_node_addrs (maps.h) at run time: the
 * source hairpin flows are SNATed to, and the node address north-south SNAT
 * and node clients use, in both families.
 *
 * They used to be compiled in (-D); read from a map, the programs no longer
 * depend on the node, so one compiled program (ebpfsvc/datapath/progcache.py)
 * serves every node and an address change is a map write, not a reload. The
 * agent writes the map (ebpfsvc/datapath/nodeaddrs.py) before it attaches
 * programs. An all-zero address means "none": the feature that needs it is off.
 */
#ifndef EBPFSVC_NODEADDR_H
#define EBPFSVC_NODEADDR_H

static __always_inline const struct lb_node_addrs *node_addrs(void)
{
	__u32 zero = 0;

	return lb_node_addrs.lookup(&zero);
}

/* Source of IPv4 hairpin flows (pod -> Service -> same pod); 0: none, hairpin SNAT off. */
static __always_inline __be32 node_hairpin4(void)
{
	const struct lb_node_addrs *a = node_addrs();

	return a ? a->hairpin4 : 0;
}

/* The node's IPv4 address for its own translated traffic; 0: none. */
static __always_inline __be32 node_snat4(void)
{
	const struct lb_node_addrs *a = node_addrs();

	return a ? a->snat4 : 0;
}

/* The IPv6 address at offset `off` of struct lb_node_addrs into `out`: 0 when set, -1 when
 * none (all zero; `out` zeroed). */
static __always_inline int node_addr6(__u32 off, __be32 out[4])
{
	const struct lb_node_addrs *a = node_addrs();
	const __be32 *src;

	if (!a) {
		out[0] = out[1] = out[2] = out[3] = 0;
		return -1;
	}
	src = (const __be32 *)((const __u8 *)a + off);
	out[0] = src[0];
	out[1] = src[1];
	out[2] = src[2];
	out[3] = src[3];
	return (out[0] | out[1] | out[2] | out[3]) ? 0 : -1;
}

/* Source of IPv6 hairpin flows: 0 and `out` set, -1 when none. */
static __always_inline int node_hairpin6(__be32 out[4])
{
	return node_addr6(__builtin_offsetof(struct lb_node_addrs, hairpin6), out);
}

/* The node's IPv6 address for its own translated traffic: 0 and `out` set, -1 when none. */
static __always_inline int node_snat6(__be32 out[4])
{
	return node_addr6(__builtin_offsetof(struct lb_node_addrs, snat6), out);
}

#endif /* EBPFSVC_NODEADDR_H */
