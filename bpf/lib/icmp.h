/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ICMP and TCP control packets the load balancer sends or translates:
 *  - the reject of a frontend without backends, built in place of the
 *    client's packet and sent back out the interface it came from, as
 *    kube-proxy's REJECT rule does: TCP RST from VIP:port, otherwise an ICMP
 *    port unreachable from the VIP quoting the client's IP header + 8 bytes;
 *  - ICMP errors about a translated flow (destination unreachable incl.
 *    fragmentation needed, time exceeded, parameter problem), rewritten so the
 *    client sees them about the VIP it talked to, not the backend.
 */
#ifndef EBPFSVC_ICMP_H
#define EBPFSVC_ICMP_H

#define LB_REPLY_TTL 64
#define LB_ICMP_TOS  0xc0          /* IPTOS_PREC_INTERNETCONTROL, as Linux's icmp_send */
#define LB_ICMP_QUOTE_MAX (60 + 8) /* largest IP header + the 8 L4 bytes RFC 792 asks for */

/* TCP pseudo-header + header, summed in one csum_diff. */
struct lb4_tcp_csum_buf {
	__be32 saddr;
	__be32 daddr;
	__u8   zero;
	__u8   proto;
	__be16 len;
	struct tcphdr th;
};

/* ICMP header + quote, zero padded so the sum covers a fixed size. */
struct lb4_icmp_buf {
	struct icmphdr ih;
	__u8 quote[LB_ICMP_QUOTE_MAX];
};

static __always_inline void lb4_reply_ip(struct iphdr *ip, __u8 tos, __u16 tot_len, __u8 proto,
					 __be32 saddr, __be32 daddr)
{
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = tos;
	ip->tot_len = lb_htons(tot_len);
	ip->id = 0;
	ip->frag_off = 0;
	ip->ttl = LB_REPLY_TTL;
	ip->protocol = proto;
	ip->check = 0;
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = lb4_ip_hdr_csum(ip);
}

/* Resize the packet to `len` and swap its MACs (the ethertype stays): a reply's L2. */
static __always_inline int lb_reply_l2(struct __sk_buff *skb, __u32 len)
{
	__u8 mac[2 * ETH_ALEN];
	__u8 swapped[2 * ETH_ALEN];
	int i;

	if (bpf_skb_load_bytes(skb, 0, mac, sizeof(mac)))
		return -1;
#pragma unroll
	for (i = 0; i < ETH_ALEN; i++) {
		swapped[i] = mac[ETH_ALEN + i];
		swapped[ETH_ALEN + i] = mac[i];
	}
	if (bpf_skb_change_tail(skb, len, 0))
		return -1;
	if (bpf_skb_store_bytes(skb, 0, swapped, sizeof(swapped), 0))
		return -1;
	return 0;
}

/* Resize the packet to `len` and write Ethernet (MACs swapped) + IPv4 header. */
static __always_inline int lb4_reply_l2l3(struct __sk_buff *skb, __u32 len, struct iphdr *ip)
{
	if (lb_reply_l2(skb, len))
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, ip, sizeof(*ip), 0))
		return -1;
	return 0;
}

/*
 * The TCP header of the RST that answers a segment (both families): from its
 * destination port back to its source; if the segment had ACK, the RST takes its
 * sequence number from that ACK; otherwise it ACKs the segment, whose `payload_len`
 * bytes, SYN and FIN count. Data offset 5 words, no options; no checksum yet.
 */
static __always_inline void lb_rst_tcp(struct tcphdr *rst, __be16 sport, __be16 dport, __u8 flags,
				       __u32 seq, __u32 ack_seq, __u32 payload_len)
{
	__u8 *th = (__u8 *)rst;

	rst->source = sport;
	rst->dest = dport;
	th[12] = (sizeof(struct tcphdr) / 4) << 4;
	if (flags & LB_TCP_ACK) {
		rst->seq = lb_htonl(ack_seq);
		th[13] = LB_TCP_RST;
	} else {
		if (flags & LB_TCP_SYN)
			payload_len++;
		if (flags & LB_TCP_FIN)
			payload_len++;
		rst->ack_seq = lb_htonl(seq + payload_len);
		th[13] = LB_TCP_RST | LB_TCP_ACK;
	}
}

/*
 * Turn a TCP segment to VIP:port into the RST the VIP would answer with
 * (RFC 793 reset generation, as Linux's tcp_v4_send_reset): if the segment had
 * ACK, the RST takes its sequence number from that ACK; otherwise it ACKs the
 * segment (SYN and FIN count one). The caller never answers an RST.
 */
static __always_inline int lb4_build_tcp_rst(struct __sk_buff *skb, const struct lb4_pkt *p)
{
	struct lb4_tcp_csum_buf b = {};
	struct iphdr ip = {};

	b.saddr = p->daddr;
	b.daddr = p->saddr;
	b.proto = IPPROTO_TCP;
	b.len = lb_htons(sizeof(struct tcphdr));
	lb_rst_tcp(&b.th, p->dport, p->sport, p->tcp_flags, p->tcp_seq, p->tcp_ack_seq,
		   p->ip_len - p->ihl - p->tcp_doff);
	b.th.check = lb_csum_fold(bpf_csum_diff(0, 0, (__be32 *)&b, sizeof(b), 0));

	lb4_reply_ip(&ip, 0, sizeof(ip) + sizeof(b.th), IPPROTO_TCP, p->daddr, p->saddr);
	if (lb4_reply_l2l3(skb, ETH_HLEN + sizeof(ip) + sizeof(b.th), &ip))
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &b.th, sizeof(b.th), 0))
		return -1;
	return 0;
}

/* Turn a datagram to the VIP into the ICMP port unreachable the VIP would send. */
static __always_inline int lb4_build_icmp_port_unreach(struct __sk_buff *skb, const struct lb4_pkt *p)
{
	struct lb4_icmp_buf b = {};
	struct iphdr ip = {};
	__u32 qlen = (p->ihl & 0x3c) + 8;

	if (qlen > LB_ICMP_QUOTE_MAX || qlen < 8)
		return -1;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, b.quote, qlen))
		return -1;
	b.ih.type = ICMP_DEST_UNREACH;
	b.ih.code = ICMP_PORT_UNREACH;
	b.ih.checksum = lb_csum_fold(bpf_csum_diff(0, 0, (__be32 *)&b, sizeof(b), 0));

	lb4_reply_ip(&ip, LB_ICMP_TOS, sizeof(ip) + sizeof(b.ih) + qlen, IPPROTO_ICMP, p->daddr, p->saddr);
	if (lb4_reply_l2l3(skb, ETH_HLEN + sizeof(ip) + sizeof(b.ih) + qlen, &ip))
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &b, sizeof(b.ih) + qlen, 0))
		return -1;
	return 0;
}

/*
 * Turn a packet to a frontend into the answer a frontend without backends
 * gives (TCP RST / ICMP port unreachable), in place, counted under `reason`.
 * 0: built; -1: nothing to answer (an RST, a later fragment) or it could not
 * be built, the packet is to be dropped (counted too).
 */
static __always_inline int lb4_reject_build(struct __sk_buff *skb, const struct lb4_pkt *p, __u32 reason)
{
	int err;

	if (p->frag == LB_FRAG_LATER || (p->proto == IPPROTO_TCP && (p->tcp_flags & LB_TCP_RST))) {
		lb_count_drop(reason);
		return -1;
	}
	if (p->proto == IPPROTO_TCP)
		err = lb4_build_tcp_rst(skb, p);
	else
		err = lb4_build_icmp_port_unreach(skb, p);
	if (err) {
		lb_count_drop(REASON_REJECT_FAILED);
		return -1;
	}
	lb_count_drop(reason);
	return 0;
}

/*
 * Reject a packet to a frontend: build the answer in place and redirect it on
 * the interface it came from (`redirect_flags` 0: back out towards the sender;
 * BPF_F_INGRESS: into this host, for a sender in the node's own namespace).
 * Counted under `reason`; an RST is never answered and a later fragment never
 * rejected (only dropped).
 */
static __always_inline int lb4_reject_via(struct __sk_buff *skb, const struct lb4_pkt *p, __u32 reason,
					  __u64 redirect_flags)
{
	if (lb4_reject_build(skb, p, reason))
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, redirect_flags);
}

/* Reject back out of the interface the packet came from (to the client). */
static __always_inline int lb4_reject(struct __sk_buff *skb, const struct lb4_pkt *p, __u32 reason)
{
	return lb4_reject_via(skb, p, reason, 0);
}

static __always_inline int lb4_icmp_is_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

/* Replace 2 or 4 bytes inside an ICMP message, keeping the ICMP checksum right. */
static __always_inline int lb4_icmp_store(struct __sk_buff *skb, __u32 icmp_csum_off, __u32 off,
					  __be32 old, __be32 new, __u32 size)
{
	if (bpf_l4_csum_replace(skb, icmp_csum_off, old, new, size) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, size, 0) < 0 ? -1 : 0;
}

/*
 * Rewrite one end of the packet quoted in an ICMP error (source: address at
 * IP_SADDR_OFF, port at L4 offset 0; destination: IP_DADDR_OFF, 2), keeping
 * the quoted L4 checksum (when it was quoted), the quoted IP checksum and the
 * ICMP checksum right. The quoted L4 checksum goes first, while its old value
 * is still in place to be read.
 */
static __always_inline int lb4_icmp_quote_rewrite(struct __sk_buff *skb, __u32 icmp_csum, __u32 in_off,
						  __u32 in_l4, __u32 end, __u8 in_proto, __u32 addr_off, __u32 port_off,
						  __be32 old_addr, __be32 new_addr, __be16 old_port, __be16 new_port)
{
	__u32 l4c = lb4_l4_csum_off(in_proto);
	__u16 old_csum = 0, new_csum = 0;

	if (l4c && in_l4 + l4c + 2 <= end &&
	    !bpf_skb_load_bytes(skb, in_l4 + l4c, &old_csum, 2) &&
	    !(in_proto == IPPROTO_UDP && old_csum == 0)) {
		if (bpf_l4_csum_replace(skb, in_l4 + l4c, old_addr, new_addr, sizeof(new_addr)) < 0 ||
		    bpf_l4_csum_replace(skb, in_l4 + l4c, old_port, new_port, sizeof(new_port)) < 0 ||
		    bpf_skb_load_bytes(skb, in_l4 + l4c, &new_csum, 2) ||
		    bpf_l4_csum_replace(skb, icmp_csum, old_csum, new_csum, 2) < 0)
			return -1;
	}
	if (old_port != new_port &&
	    lb4_icmp_store(skb, icmp_csum, in_l4 + port_off, old_port, new_port, sizeof(new_port)))
		return -1;
	if (bpf_skb_load_bytes(skb, in_off + IP_CSUM_OFF, &old_csum, 2) ||
	    bpf_l3_csum_replace(skb, in_off + IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)) < 0 ||
	    bpf_skb_load_bytes(skb, in_off + IP_CSUM_OFF, &new_csum, 2) ||
	    bpf_l4_csum_replace(skb, icmp_csum, old_csum, new_csum, 2) < 0 ||
	    lb4_icmp_store(skb, icmp_csum, in_off + addr_off, old_addr, new_addr, sizeof(new_addr)))
		return -1;
	return 0;
}

/* The packet an ICMP error is about, as the error quotes it. */
struct lb4_icmp_quote {
	struct iphdr ip;        /* its IP header */
	__be16 ports[2];        /* its source and destination ports */
	__u32 off;              /* offset of the quoted IP header */
	__u32 l4_off;           /* offset of the quoted ports */
	__u32 end;              /* end of the ICMP message (the outer total length): past it is padding */
};

/*
 * Read what ICMP error `p` quotes, and the conntrack key of the quoted packet's
 * flow in direction `dir`: the quoted packet travelled the other way, so the
 * key is its tuple reversed. 0, or -1 when `p` is not an (unfragmented) error
 * about a packet with ports.
 */
static __always_inline int lb4_icmp_quote(struct __sk_buff *skb, const struct lb4_pkt *p, __u8 dir,
					  struct lb4_icmp_quote *q, struct ct4_key *k)
{
	if (!lb4_icmp_is_error(p->icmp_type) || p->frag != LB_FRAG_NONE)
		return -1;
	/* The quote is read, and rewritten, only inside the ICMP message: bytes past
	 * the outer total length are Ethernet padding, which the receiver trims
	 * (found by the differential run, tests/diff). */
	q->end = p->l3_off + p->ip_len;
	q->off = p->l4_off + sizeof(struct icmphdr);
	if (q->off + sizeof(q->ip) > q->end || bpf_skb_load_bytes(skb, q->off, &q->ip, sizeof(q->ip)))
		return -1;
	if (q->ip.version != 4 || q->ip.ihl < 5 || !lb4_proto_has_ports(q->ip.protocol))
		return -1;
	q->l4_off = q->off + q->ip.ihl * 4;
	if (q->l4_off + sizeof(q->ports) > q->end || bpf_skb_load_bytes(skb, q->l4_off, q->ports, sizeof(q->ports)))
		return -1;
	k->saddr = q->ip.daddr;
	k->daddr = q->ip.saddr;
	k->sport = q->ports[1];
	k->dport = q->ports[0];
	k->proto = q->ip.protocol;
	k->dir = dir;
	k->pad0 = 0;
	return 0;
}

/*
 * ICMP errors about translated flows, in both directions:
 *
 *  - CT_DIR_REPLY (to_pod): an error going to a client about a packet the
 *    client sent to a VIP. The quoted packet is client -> backend (after our
 *    DNAT); it becomes client -> VIP again, and the outer source too when the
 *    backend itself sent the error (e.g. its port unreachable).
 *  - CT_DIR_FORWARD (from_pod): an error a client sends about a reply it got
 *    from the VIP (e.g. port unreachable once its socket closed). The quoted
 *    packet is VIP -> client (after our reverse NAT); it becomes backend ->
 *    client, and the outer destination the backend, so the backend learns.
 *
 * Returns 1 when translated, 0 when not ours, -1 on failure.
 */
static __always_inline int lb4_icmp_error_xlate(struct __sk_buff *skb, struct lb4_pkt *p, __u64 now, __u8 dir)
{
	struct lb4_icmp_quote q;
	__u32 icmp_csum = p->l4_off + ICMP_CSUM_OFF;
	__u32 in_addr_off, in_port_off, outer_off;
	struct ct4_key k;
	struct ct4_entry *e;
	__be32 from_addr, to_addr, outer;
	__be16 from_port, to_port;
	int reply;

	if (lb4_icmp_quote(skb, p, dir, &q, &k))
		return 0;
	e = ct4_lookup(&k, now);
	if (!e || (e->flags & CT_F_HAIRPIN))
		return 0;

	/* REPLY: quoted client -> backend becomes client -> VIP, outer source.
	 * FORWARD: quoted VIP -> client becomes backend -> client, outer destination. */
	reply = dir == CT_DIR_REPLY;
	from_addr = reply ? q.ip.daddr : q.ip.saddr;
	from_port = reply ? q.ports[1] : q.ports[0];
	to_addr = reply ? e->frontend_addr : e->backend_addr;
	to_port = reply ? e->frontend_port : e->backend_port;
	in_addr_off = reply ? IP_DADDR_OFF : IP_SADDR_OFF;
	in_port_off = reply ? 2 : 0;
	outer_off = reply ? IP_SADDR_OFF : IP_DADDR_OFF;
	outer = reply ? p->saddr : p->daddr;
	if (lb4_icmp_quote_rewrite(skb, icmp_csum, q.off, q.l4_off, q.end, q.ip.protocol, in_addr_off, in_port_off,
				   from_addr, to_addr, from_port, to_port))
		return -1;
	if (outer == from_addr &&
	    lb4_csum_store_addr(skb, p->l3_off, p->l3_off + outer_off, outer, to_addr, 0, 0))
		return -1;
	return 1;
}

/* The to_pod direction, under the name the uplink programs use too. */
static __always_inline int lb4_icmp_error_rev_nat(struct __sk_buff *skb, struct lb4_pkt *p, __u64 now)
{
	return lb4_icmp_error_xlate(skb, p, now, CT_DIR_REPLY);
}

/* ---- IPv6 rejects: the same answers, over IPv6 (RFC 4443: ICMPv6 destination
 * unreachable, code 4 port unreachable). No IPv6 header checksum; the TCP and
 * ICMPv6 checksums cover the IPv6 pseudo-header. ---- */

#define LB_ICMP6_DEST_UNREACH 1
#define LB_ICMP6_PORT_UNREACH 4
/* Bytes of the invoking packet an ICMPv6 error quotes: its IPv6 header, a
 * usual extension header chain and the L4 header. RFC 4443 asks for as much as
 * fits in 1280 bytes; a bounded quote keeps the checksum one csum_diff over a
 * fixed buffer (the sender needs only the headers to find its socket). */
#define LB_ICMP6_QUOTE_MAX 128

/* IPv6 pseudo-header (RFC 8200 8.1), then the upper-layer header. */
struct lb6_pseudo_hdr {
	__be32 saddr[4];
	__be32 daddr[4];
	__be32 len;
	__u8   zero[3];
	__u8   nexthdr;
};

struct lb6_tcp_csum_buf {
	struct lb6_pseudo_hdr ph;
	struct tcphdr th;
};

struct lb6_icmp_buf {
	struct lb6_pseudo_hdr ph;
	__u8   type;
	__u8   code;
	__sum16 checksum;
	__be32 unused;
	__u8   quote[256];          /* LB_ICMP6_QUOTE_MAX used; the rest stays zero (see the mask below) */
};

static __always_inline void lb6_reply_ip(struct ipv6hdr *ip, __u16 payload_len, __u8 nexthdr,
					 const __be32 *saddr, const __be32 *daddr)
{
	ip->version = 6;
	ip->priority = 0;
	ip->flow_lbl[0] = 0;
	ip->flow_lbl[1] = 0;
	ip->flow_lbl[2] = 0;
	ip->payload_len = lb_htons(payload_len);
	ip->nexthdr = nexthdr;
	ip->hop_limit = LB_REPLY_TTL;
	__builtin_memcpy(&ip->saddr, saddr, 16);
	__builtin_memcpy(&ip->daddr, daddr, 16);
}

/* As lb4_build_tcp_rst, from [VIP]:port, extension headers left behind. */
static __always_inline int lb6_build_tcp_rst(struct __sk_buff *skb, const struct lb6_pkt *p)
{
	struct lb6_tcp_csum_buf b = {};
	struct ipv6hdr ip = {};

	lb6_addr_copy(b.ph.saddr, p->daddr);
	lb6_addr_copy(b.ph.daddr, p->saddr);
	b.ph.len = lb_htonl(sizeof(struct tcphdr));
	b.ph.nexthdr = IPPROTO_TCP;
	lb_rst_tcp(&b.th, p->dport, p->sport, p->tcp_flags, p->tcp_seq, p->tcp_ack_seq,
		   p->l3_off + p->ip_len - p->l4_off - p->tcp_doff);
	b.th.check = lb_csum_fold(bpf_csum_diff(0, 0, (__be32 *)&b, sizeof(b), 0));

	lb6_reply_ip(&ip, sizeof(b.th), IPPROTO_TCP, p->daddr, p->saddr);
	if (lb_reply_l2(skb, ETH_HLEN + sizeof(ip) + sizeof(b.th)) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &b.th, sizeof(b.th), 0))
		return -1;
	return 0;
}

/* The ICMPv6 reject is built in a per-CPU scratch buffer, not on the stack: with the
 * IPv4 path in the same program, the 512-byte BPF stack has no room for it. */
BPF_PERCPU_ARRAY(lb6_icmp_scratch, struct lb6_icmp_buf, 1);

/* A datagram to the VIP becomes the ICMPv6 port unreachable the VIP would send,
 * quoting the first LB_ICMP6_QUOTE_MAX bytes of the invoking packet. */
static __always_inline int lb6_build_icmp_port_unreach(struct __sk_buff *skb, const struct lb6_pkt *p)
{
	__u32 zero = 0;
	struct lb6_icmp_buf *bp = lb6_icmp_scratch.lookup(&zero);
	struct ipv6hdr ip = {};
	__u64 qlen = p->ip_len;        /* 64-bit: no zero-extension copy between the check and the use */
	__u32 icmp_len;

	if (!bp)
		return -1;
	__builtin_memset(bp, 0, sizeof(*bp));

	if (qlen > LB_ICMP6_QUOTE_MAX)
		qlen = LB_ICMP6_QUOTE_MAX;
	/* A mask the compiler cannot see through, then the lower bound: else clang hands the
	 * helpers below a copy of the length it never clamped, and the verifier refuses an
	 * unbounded size. The buffer has room for what the mask lets through. */
	asm volatile("%0 &= 0xff" : "+r"(qlen));
	if (qlen < LB_IP6_HLEN)
		return -1;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, bp->quote, qlen))
		return -1;
	icmp_len = 8 + qlen;
	lb6_addr_copy(bp->ph.saddr, p->daddr);
	lb6_addr_copy(bp->ph.daddr, p->saddr);
	bp->ph.len = lb_htonl(icmp_len);
	bp->ph.nexthdr = LB_IPPROTO_ICMPV6;
	bp->type = LB_ICMP6_DEST_UNREACH;
	bp->code = LB_ICMP6_PORT_UNREACH;
	/* The quote is zero-padded to the buffer's size: zeros add nothing to the sum. */
	bp->checksum = lb_csum_fold(bpf_csum_diff(0, 0, (__be32 *)bp, sizeof(*bp), 0));

	lb6_reply_ip(&ip, icmp_len, LB_IPPROTO_ICMPV6, p->daddr, p->saddr);
	if (lb_reply_l2(skb, ETH_HLEN + sizeof(ip) + icmp_len) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &bp->type, icmp_len, 0))
		return -1;
	return 0;
}

/* As lb4_reject_build: the answer built in place, counted under `reason`; 0, or -1 when
 * there is nothing to answer or it could not be built (the packet is to be dropped). */
static __always_inline int lb6_reject_build(struct __sk_buff *skb, const struct lb6_pkt *p, __u32 reason)
{
	int err;

	if (p->frag == LB_FRAG_LATER || (p->proto == IPPROTO_TCP && (p->tcp_flags & LB_TCP_RST))) {
		lb_count_drop(reason);
		return -1;
	}
	if (p->proto == IPPROTO_TCP)
		err = lb6_build_tcp_rst(skb, p);
	else
		err = lb6_build_icmp_port_unreach(skb, p);
	if (err) {
		lb_count_drop(REASON_REJECT_FAILED);
		return -1;
	}
	lb_count_drop(reason);
	return 0;
}

/* As lb4_reject_via: the reject sent back through the interface the packet came
 * from, `redirect_flags` saying which way (BPF_F_INGRESS: into the host). */
static __always_inline int lb6_reject_via(struct __sk_buff *skb, const struct lb6_pkt *p, __u32 reason,
					  __u64 redirect_flags)
{
	if (lb6_reject_build(skb, p, reason))
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, redirect_flags);
}

/* Reject back out of the interface the packet came from (to the client). */
static __always_inline int lb6_reject(struct __sk_buff *skb, const struct lb6_pkt *p, __u32 reason)
{
	return lb6_reject_via(skb, p, reason, 0);
}

/* ---- ICMPv6 errors about translated flows (destination unreachable, packet too
 * big, time exceeded, parameter problem), translated as lb4_icmp_error_xlate does.
 * The ICMPv6 checksum covers a pseudo-header, so an outer address change goes in
 * with BPF_F_PSEUDO_HDR; a quoted address or port is plain data to it. A quote
 * whose packet carries extension headers is left as it is. ---- */

static __always_inline int lb6_icmp_is_error(__u8 type)
{
	return type >= 1 && type <= 4;
}

/* The packet an ICMPv6 error quotes: its addresses and ports, and where they are. */
struct lb6_icmp_quote {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 ports[2];
	__u8   proto;
	__u8   pad0[3];
	__u32  off;             /* offset of the quoted IPv6 header */
	__u32  l4_off;          /* offset of the quoted ports */
	__u32  end;             /* end of the ICMPv6 message: past it is padding */
};

/* Replace 16 bytes inside the ICMPv6 message (no pseudo-header part), checksum kept right. */
static __always_inline int lb6_icmp_store_addr(struct __sk_buff *skb, __u32 icmp_csum, __u32 off,
					       const __be32 *old, const __be32 *new)
{
	__be32 from[4], to[4];
	__s64 diff;

	lb6_addr_copy(from, old);
	lb6_addr_copy(to, new);
	diff = bpf_csum_diff(from, sizeof(from), to, sizeof(to), 0);
	if (diff < 0 || bpf_l4_csum_replace(skb, icmp_csum, 0, diff, 0) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, to, sizeof(to), 0) < 0 ? -1 : 0;
}

/*
 * Rewrite one end of the packet an ICMPv6 error quotes (source: address at
 * IP6_SADDR_OFF, port at L4 offset 0; destination: IP6_DADDR_OFF, 2), keeping
 * the quoted L4 checksum (when quoted) and the ICMPv6 checksum right: the
 * IPv6 twin of lb4_icmp_quote_rewrite (no quoted IP header checksum).
 */
static __always_inline int lb6_icmp_quote_rewrite(struct __sk_buff *skb, __u32 icmp_csum,
						  const struct lb6_icmp_quote *q, __u32 addr_off, __u32 port_off,
						  const __be32 *old_addr, const __be32 *new_addr,
						  __be16 old_port, __be16 new_port)
{
	__u32 l4c = lb4_l4_csum_off(q->proto);
	__u16 old_csum = 0, new_csum = 0;

	if (l4c && q->l4_off + l4c + 2 <= q->end &&
	    !bpf_skb_load_bytes(skb, q->l4_off + l4c, &old_csum, 2) &&
	    !(q->proto == IPPROTO_UDP && old_csum == 0)) {
		__be32 f[4], t[4];
		__s64 diff;

		lb6_addr_copy(f, old_addr);
		lb6_addr_copy(t, new_addr);
		diff = bpf_csum_diff(f, sizeof(f), t, sizeof(t), 0);
		if (diff < 0 ||
		    bpf_l4_csum_replace(skb, q->l4_off + l4c, 0, diff, 0) < 0 ||
		    bpf_l4_csum_replace(skb, q->l4_off + l4c, old_port, new_port, sizeof(new_port)) < 0 ||
		    bpf_skb_load_bytes(skb, q->l4_off + l4c, &new_csum, 2) ||
		    bpf_l4_csum_replace(skb, icmp_csum, old_csum, new_csum, 2) < 0)
			return -1;
	}
	if (old_port != new_port &&
	    lb4_icmp_store(skb, icmp_csum, q->l4_off + port_off, old_port, new_port, sizeof(new_port)))
		return -1;
	return lb6_icmp_store_addr(skb, icmp_csum, q->off + addr_off, old_addr, new_addr);
}

/* As lb4_icmp_quote: what ICMPv6 error `p` quotes (an IPv6 header without extension
 * headers and the ports after it), and the key of the quoted packet's flow in
 * direction `dir` (its tuple reversed). 0, or -1 when not such an error. */
static __always_inline int lb6_icmp_quote(struct __sk_buff *skb, const struct lb6_pkt *p, __u8 dir,
					  struct lb6_icmp_quote *q, struct ct6_key *k)
{
	__u8 nexthdr;

	if (!lb6_icmp_is_error(p->icmp_type) || p->frag != LB_FRAG_NONE)
		return -1;
	q->end = p->l3_off + p->ip_len;
	q->off = p->l4_off + 8;
	q->l4_off = q->off + LB_IP6_HLEN;
	if (q->l4_off + sizeof(q->ports) > q->end ||
	    bpf_skb_load_bytes(skb, q->off + 6, &nexthdr, 1) ||
	    bpf_skb_load_bytes(skb, q->off + IP6_SADDR_OFF, q->saddr, 32) ||
	    bpf_skb_load_bytes(skb, q->l4_off, q->ports, sizeof(q->ports)))
		return -1;
	if (!lb4_proto_has_ports(nexthdr))
		return -1;
	q->proto = nexthdr;
	lb6_addr_copy(k->saddr, q->daddr);
	lb6_addr_copy(k->daddr, q->saddr);
	k->sport = q->ports[1];
	k->dport = q->ports[0];
	k->proto = q->proto;
	k->dir = dir;
	k->pad0 = 0;
	return 0;
}

static __always_inline int lb6_icmp_error_xlate(struct __sk_buff *skb, struct lb6_pkt *p, __u64 now, __u8 dir)
{
	struct lb6_icmp_quote q = {};
	__u32 icmp_csum = p->l4_off + ICMP_CSUM_OFF;
	struct ct6_key k = {};
	struct ct6_entry *e;
	const __be32 *from_addr, *to_addr, *outer;
	__be16 from_port, to_port;
	int reply;

	if (lb6_icmp_quote(skb, p, dir, &q, &k))
		return 0;
	e = ct6_lookup(&k, now);
	if (!e)
		return 0;

	/* REPLY: quoted client -> backend becomes client -> VIP, outer source.
	 * FORWARD: quoted VIP -> client becomes backend -> client, outer destination. */
	reply = dir == CT_DIR_REPLY;
	from_addr = reply ? q.daddr : q.saddr;
	from_port = reply ? q.ports[1] : q.ports[0];
	to_addr = reply ? e->frontend_addr : e->backend_addr;
	to_port = reply ? e->frontend_port : e->backend_port;
	outer = reply ? p->saddr : p->daddr;
	if (lb6_icmp_quote_rewrite(skb, icmp_csum, &q, reply ? IP6_DADDR_OFF : IP6_SADDR_OFF, reply ? 2 : 0,
				   from_addr, to_addr, from_port, to_port))
		return -1;
	/* The outer address, when the error came from (went to) the translated end itself:
	 * part of the ICMPv6 pseudo-header. */
	if (lb6_addr_equal(outer, from_addr) &&
	    lb6_csum_store_addr(skb, p->l3_off + (reply ? IP6_SADDR_OFF : IP6_DADDR_OFF), outer, to_addr,
				icmp_csum, 0))
		return -1;
	return 1;
}

#endif /* EBPFSVC_ICMP_H */
