/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Address and port rewrites: DNAT towards the backend, reverse NAT of replies
 * back to the frontend, and the hairpin SNAT.
 *
 * A later fragment carries no L4 header: only its IP header is rewritten (the
 * L4 checksum, in the first fragment, already covers the new pseudo-header).
 */
#ifndef EBPFSVC_NAT_H
#define EBPFSVC_NAT_H

/* Hairpin: a pod reaching itself through a Service. Without SNAT the packet
 * would come back into the pod with source == destination and be dropped as a
 * martian, so, like kube-proxy's masquerade, its source becomes a node-owned
 * address: node_hairpin4() / node_hairpin6() (nodeaddr.h; none = hairpin SNAT off). */

/* Absolute offset of the L4 checksum to fix, 0 when this packet has none (either family:
 * its protocol, fragment state and L4 offset). */
static __always_inline __u32 lb_pkt_csum_off(__u8 proto, __u8 frag, __u32 l4_off)
{
	__u32 off = lb4_l4_csum_off(proto);

	if (!off || frag == LB_FRAG_LATER)
		return 0;
	return l4_off + off;
}

static __always_inline __u32 lb4_pkt_csum_off(const struct lb4_pkt *p)
{
	return lb_pkt_csum_off(p->proto, p->frag, p->l4_off);
}

/* The port half of a rewrite, either family: the port at `port_off` from the L4 header
 * (`l4_len` bytes, SCTP's CRC over them), not in later fragments; `cur_port` is updated. */
static __always_inline int lb_rewrite_port(struct __sk_buff *skb, __u8 proto, __u8 frag, __u32 l4_off,
					   __u32 l4_len, __u32 port_off, __be16 *cur_port, __be16 port,
					   __u32 csum_off, __u64 flags)
{
	if (frag != LB_FRAG_LATER && *cur_port != port) {
		if (lb4_csum_store_port(skb, l4_off + port_off, *cur_port, port, csum_off, flags))
			return -1;
		if (proto == IPPROTO_SCTP && frag == LB_FRAG_NONE &&
		    lb4_sctp_crc_port_update(skb, l4_off, l4_len, port_off, *cur_port, port))
			return -1;
		*cur_port = port;
	}
	return 0;
}

/*
 * Rewrite one side (source or destination) of a packet: the address at
 * `addr_off` from the IP header and the port at `port_off` from the L4 header
 * (port: not in later fragments). `cur_addr` / `cur_port` point into `p` and
 * are updated, so chained rewrites keep using the packet's current values.
 */
static __always_inline int lb4_rewrite(struct __sk_buff *skb, struct lb4_pkt *p, __u32 addr_off, __u32 port_off,
				       __be32 *cur_addr, __be16 *cur_port, __be32 addr, __be16 port)
{
	__u32 csum_off = lb4_pkt_csum_off(p);
	__u64 flags = lb4_l4_csum_flags(p->proto);

	if (*cur_addr != addr) {
		if (lb4_csum_store_addr(skb, p->l3_off, p->l3_off + addr_off, *cur_addr, addr, csum_off, flags))
			return -1;
		*cur_addr = addr;
	}
	return lb_rewrite_port(skb, p->proto, p->frag, p->l4_off, p->ip_len - p->ihl, port_off, cur_port, port,
			       csum_off, flags);
}

/* DNAT side: destination address and port. */
static __always_inline int lb4_rewrite_dst(struct __sk_buff *skb, struct lb4_pkt *p, __be32 addr, __be16 port)
{
	return lb4_rewrite(skb, p, IP_DADDR_OFF, 2, &p->daddr, &p->dport, addr, port);
}

/* Reverse NAT / SNAT side: source address and port. */
static __always_inline int lb4_rewrite_src(struct __sk_buff *skb, struct lb4_pkt *p, __be32 addr, __be16 port)
{
	return lb4_rewrite(skb, p, IP_SADDR_OFF, 0, &p->saddr, &p->sport, addr, port);
}

/* ---- IPv6 twins. Hairpin SNAT writes the source with lb6_rewrite_src too: a pod
 * reaching itself through an IPv6 Service is SNATed to node_hairpin6() (flow.h). ---- */

static __always_inline __u32 lb6_pkt_csum_off(const struct lb6_pkt *p)
{
	return lb_pkt_csum_off(p->proto, p->frag, p->l4_off);
}

/* As lb4_rewrite: one side of an IPv6 packet, `cur_addr` / `cur_port` kept current in `p`. */
static __always_inline int lb6_rewrite(struct __sk_buff *skb, struct lb6_pkt *p, __u32 addr_off, __u32 port_off,
				       __be32 *cur_addr, __be16 *cur_port, const __be32 *addr, __be16 port)
{
	__u32 csum_off = lb6_pkt_csum_off(p);
	__u64 flags = lb4_l4_csum_flags(p->proto);

	if (!lb6_addr_equal(cur_addr, addr)) {
		if (lb6_csum_store_addr(skb, p->l3_off + addr_off, cur_addr, addr, csum_off, flags))
			return -1;
		lb6_addr_copy(cur_addr, addr);
	}
	return lb_rewrite_port(skb, p->proto, p->frag, p->l4_off, p->l3_off + p->ip_len - p->l4_off, port_off,
			       cur_port, port, csum_off, flags);
}

static __always_inline int lb6_rewrite_dst(struct __sk_buff *skb, struct lb6_pkt *p, const __be32 *addr, __be16 port)
{
	return lb6_rewrite(skb, p, IP6_DADDR_OFF, 2, p->daddr, &p->dport, addr, port);
}

static __always_inline int lb6_rewrite_src(struct __sk_buff *skb, struct lb6_pkt *p, const __be32 *addr, __be16 port)
{
	return lb6_rewrite(skb, p, IP6_SADDR_OFF, 0, p->saddr, &p->sport, addr, port);
}

#endif /* EBPFSVC_NAT_H */
