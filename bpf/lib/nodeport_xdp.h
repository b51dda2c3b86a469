/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The north-south fast path at XDP, in front of the TC program (nodeport.h).
 *
 * XDP translates the common case before the kernel builds an skb, with the
 * same maps and the same decisions as TC (lb4_flow_begin, np4_snat_create,
 * np4_note_forward), and passes everything else up, untouched, to
 * from_uplink, which stays the complete path:
 *   - what it handles: plain IPv4 (no options, not a fragment) TCP/UDP to an
 *     EXTERNAL frontend (new and tracked flows), replies of SNATed flows;
 *     refused source ranges are dropped here already;
 *   - what it passes: ICMP, fragments, IP options, SCTP, packets whose L4
 *     checksum is still partial (np4_csum_partial), frontends without
 *     backends (reject / Local drop), flows to restart (expired, port reuse,
 *     backend gone), and any packet whose next hop the FIB cannot give with
 *     a resolved neighbour (TC then resolves it with bpf_redirect_neigh).
 * A flow XDP created is "tracked" for TC, so a packet passed up half way (e.g.
 * unresolved neighbour) gets the same translation there.
 *
 * Checksums are updated incrementally in place: RFC 1624 over the changed
 * 32-bit words (bpf_csum_diff), pseudo-header included for TCP/UDP.
 */
#ifndef EBPFSVC_NODEPORT_XDP_H
#define EBPFSVC_NODEPORT_XDP_H

/* ~fold(~check + diff): the checksum after words summing to `diff` changed (RFC 1624 eqn 3). */
static __always_inline __u16 np4_csum_add(__u16 check, __s64 diff)
{
	__u64 s = (__u64)(__u16)~check + (__u32)diff;

	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* Is `check` the folded 16-bit sum `s` (a pseudo-header's, either family)? */
static __always_inline int np_csum_is_sum(__u32 s, __u16 check)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s == check;
}

/*
 * Does this L4 checksum field hold only the pseudo-header sum, i.e. was the
 * packet sent with checksum offload (CHECKSUM_PARTIAL) and never completed?
 * That happens on veth, where a local socket's packet keeps its partial sum
 * end to end. XDP cannot see ip_summed, and a frame it transmits (XDP_TX)
 * loses it: such a packet goes to TC, whose csum helpers know the skb's state.
 * A full checksum equals the folded pseudo-header sum by chance 1 in 65536
 * times: that packet goes to TC too, which is always correct, only slower.
 */
static __always_inline int np4_csum_partial(__be32 saddr, __be32 daddr, __u8 proto, __u16 l4_len, __u16 check)
{
	return np_csum_is_sum(lb_htons((__u16)proto) + lb_htons(l4_len) +
			      (saddr >> 16) + (saddr & 0xffff) + (daddr >> 16) + (daddr & 0xffff), check);
}

/* Plain IPv4 TCP/UDP into `p`; -1 for anything XDP leaves to TC. */
static __always_inline int np4_xdp_parse(struct xdp_md *ctx, struct lb4_pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = data + ETH_HLEN;
	void *l4 = data + ETH_HLEN + sizeof(struct iphdr);

	if ((void *)(iph + 1) > data_end || eth->h_proto != lb_htons(ETH_P_IP))
		return -1;
	if (iph->version != 4 || iph->ihl != 5)
		return -1;                      /* IP options: TC's parser handles them */
	if (iph->frag_off & lb_htons(LB_IP_MF | LB_IP_OFFSET))
		return -1;                      /* fragments need frag4: TC */
	p->ip_len = lb_ntohs(iph->tot_len);
	if (p->ip_len < sizeof(*iph) || data + ETH_HLEN + p->ip_len > data_end)
		return -1;
	p->l3_off = ETH_HLEN;
	p->l4_off = ETH_HLEN + sizeof(*iph);
	p->ihl = sizeof(*iph);
	p->saddr = iph->saddr;
	p->daddr = iph->daddr;
	p->proto = iph->protocol;
	p->ip_id = iph->id;
	p->frag = LB_FRAG_NONE;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end || th->doff < 5 || sizeof(*iph) + th->doff * 4 > p->ip_len)
			return -1;
		if (np4_csum_partial(iph->saddr, iph->daddr, IPPROTO_TCP, p->ip_len - sizeof(*iph), th->check))
			return -1;
		lb4_pkt_set_tcp(p, th);
		return 0;
	}
	if (p->proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > data_end || sizeof(*iph) + sizeof(*uh) > p->ip_len)
			return -1;
		if (uh->check && np4_csum_partial(iph->saddr, iph->daddr, IPPROTO_UDP, p->ip_len - sizeof(*iph),
						  uh->check))
			return -1;
		p->sport = uh->source;
		p->dport = uh->dest;
		return 0;
	}
	return -1;
}

/* Rewrite addresses and ports in place (what np4_xdp_parse accepted only). */
static __always_inline int np4_xdp_rewrite(struct xdp_md *ctx, struct lb4_pkt *p, __be32 saddr, __be32 daddr,
					   __be16 sport, __be16 dport)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct iphdr *iph = data + ETH_HLEN;
	void *l4 = data + ETH_HLEN + sizeof(struct iphdr);
	__be32 from[3] = { p->saddr, p->daddr, 0 };
	__be32 to[3] = { saddr, daddr, 0 };
	__s64 ip_diff, l4_diff;

	__builtin_memcpy(&from[2], &p->sport, 2);
	__builtin_memcpy((__u8 *)&from[2] + 2, &p->dport, 2);
	__builtin_memcpy(&to[2], &sport, 2);
	__builtin_memcpy((__u8 *)&to[2] + 2, &dport, 2);
	ip_diff = bpf_csum_diff(from, 8, to, 8, 0);
	l4_diff = bpf_csum_diff(from, 12, to, 12, 0);

	if ((void *)(iph + 1) > data_end)
		return -1;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end)
			return -1;
		th->source = sport;
		th->dest = dport;
		th->check = np4_csum_add(th->check, l4_diff);
	} else {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > data_end)
			return -1;
		uh->source = sport;
		uh->dest = dport;
		if (uh->check) {                /* 0: no checksum, and it stays so */
			__u16 c = np4_csum_add(uh->check, l4_diff);

			uh->check = c ? c : 0xffff;
		}
	}
	iph->saddr = saddr;
	iph->daddr = daddr;
	iph->check = np4_csum_add(iph->check, ip_diff);
	p->saddr = saddr;
	p->daddr = daddr;
	p->sport = sport;
	p->dport = dport;
	return 0;
}

/* The next hop of a packet we are about to send as saddr:sport -> daddr:dport. */
static __always_inline int np4_xdp_fib(struct xdp_md *ctx, const struct lb4_pkt *p, struct bpf_fib_lookup *fib,
				       __be32 saddr, __be32 daddr, __be16 sport, __be16 dport)
{
	fib->family = AF_INET;
	fib->l4_protocol = p->proto;
	fib->sport = sport;
	fib->dport = dport;
	fib->tot_len = p->ip_len;
	fib->ipv4_src = saddr;
	fib->ipv4_dst = daddr;
	fib->ifindex = ctx->ingress_ifindex;
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}

/* Will forwarding this packet ourselves need a hop it has no TTL left for?
 * Asked before anything is rewritten, so TC gets the packet as it came and
 * drops and counts it there (np4_hop). */
static __always_inline int np4_xdp_ttl_spent(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct iphdr *iph = data + ETH_HLEN;

	return (void *)(iph + 1) > data_end || iph->ttl <= 1;
}

/* The frame to `fib`'s next hop (either family; `eth` bounds-checked by the caller):
 * back out (XDP_TX) or to another device. */
static __always_inline int np_xdp_send(struct xdp_md *ctx, struct ethhdr *eth, const struct bpf_fib_lookup *fib)
{
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	if (fib->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(fib->ifindex, 0);
}

/* Out towards `fib`'s next hop, with the hop a router owes the packet: TTL - 1
 * (np4_xdp_ttl_spent said there is one left) and the header checksum adjusted
 * for it, as the kernel's ip_decrease_ttl does. */
static __always_inline int np4_xdp_tx(struct xdp_md *ctx, const struct bpf_fib_lookup *fib)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = data + ETH_HLEN;
	__u32 check;

	if ((void *)(iph + 1) > data_end)
		return XDP_DROP;
	check = iph->check;
	check += lb_htons(0x0100);
	iph->check = (__u16)(check + (check >= 0xFFFF));
	iph->ttl--;
	return np_xdp_send(ctx, eth, fib);
}

/* Translate a client packet of flow `e` (DNAT, plus SNAT to `nat`); XDP_PASS untouched when the next hop is unknown. */
static __always_inline int np4_xdp_forward(struct xdp_md *ctx, struct lb4_pkt *p, const struct ct4_entry *e,
					   const struct snat4_entry *nat)
{
	struct bpf_fib_lookup fib = {};
	__u32 bytes = ctx->data_end - ctx->data;
	__be32 saddr = nat ? nat->address : p->saddr;
	__be16 sport = nat ? nat->port : p->sport;

	if (nat && (np4_xdp_ttl_spent(ctx) ||
		    np4_xdp_fib(ctx, p, &fib, saddr, e->backend_addr, sport, e->backend_port) !=
		    BPF_FIB_LKUP_RET_SUCCESS))
		return XDP_PASS;
	if (np4_xdp_rewrite(ctx, p, saddr, e->backend_addr, sport, e->backend_port))
		return XDP_PASS;
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return nat ? np4_xdp_tx(ctx, &fib) : XDP_PASS;   /* local backend: the kernel delivers it */
}

/* The backend of tracked flow `e` is on this node (only asked when lb_option(LB_CFG_MASQUERADE_LOCAL_BACKENDS)). */
static __always_inline int np4_xdp_backend_is_local(const struct ct4_entry *e)
{
	__u32 id = e->backend_id;
	struct lb4_backend *be = lb4_backends.lookup(&id);

	return !be || (be->flags & LB_BE_F_LOCAL);
}

static __always_inline int np4_xdp_new(struct xdp_md *ctx, struct lb4_pkt *p, struct ct4_key *fk, __u64 now)
{
	struct lb4_service *svc;
	struct lb4_backend *be;
	struct ct4_entry e = {};
	struct snat4_entry nat;
	int masquerade;

	svc = np4_lookup_frontend(p);
	if (!svc || (svc->flags & LB_SVC_F_ADDRESS))
		return XDP_PASS;
	if (!lb4_source_allowed(svc, p->saddr)) {
		lb_count_drop(REASON_SOURCE_RANGE);
		return XDP_DROP;
	}
	if (!svc->backend_count || !svc->maglev_size)
		return XDP_PASS;                        /* reject or Local drop: TC */
	if (!ct4_starts_flow(p))
		return XDP_PASS;                        /* mid-stream, not ours: TC passes it on too */
	be = lb4_flow_begin(svc, p, now, &e);
	if (!be)
		return XDP_PASS;
	e.flags |= CT_F_NODEPORT;
	masquerade = lb_option(LB_CFG_MASQUERADE_LOCAL_BACKENDS);
	if (masquerade && (be->flags & LB_BE_F_LOCAL) && !np_flow_keeps_source(svc, be->flags, masquerade))
		return XDP_PASS;                        /* masqueraded to a local pod: TC's (np4_redirect to its veth) */
	if (np_flow_keeps_source(svc, be->flags, masquerade)) {
		if (ct4_create(fk, &e, p->saddr))
			return XDP_PASS;                /* TC tries again, and counts a failure */
		lb4_affinity_update(svc, p->saddr, e.backend_id, now);
		return np4_xdp_forward(ctx, p, &e, 0);
	}
	/* No hop left: TC drops it, and no flow (no SNAT port) may be left behind (np4_hop_left). */
	if (np4_xdp_ttl_spent(ctx) || np4_snat_create(ctx, p, fk, &e, &nat, now))
		return XDP_PASS;
	lb4_affinity_update(svc, p->saddr, e.backend_id, now);
	return np4_xdp_forward(ctx, p, &e, &nat);
}

static __always_inline int np4_xdp_snat_reply(struct xdp_md *ctx, struct lb4_pkt *p, struct ct4_entry *e,
					      struct ct4_key *rk, __u64 now)
{
	struct bpf_fib_lookup fib = {};
	struct snat4_entry *client = lb4_snat.lookup(rk);
	__u32 bytes = ctx->data_end - ctx->data;

	if (!client || np4_xdp_ttl_spent(ctx))
		return XDP_PASS;
	if (np4_xdp_fib(ctx, p, &fib, e->frontend_addr, client->address, e->frontend_port, client->port) !=
	    BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS;
	ct4_note_reply(e, p, client->address, client->port, now);
	if (np4_xdp_rewrite(ctx, p, e->frontend_addr, client->address, e->frontend_port, client->port))
		return XDP_PASS;
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return np4_xdp_tx(ctx, &fib);
}

static __always_inline int np4_xdp_uplink(struct xdp_md *ctx)
{
	struct lb4_pkt p = {};
	struct snat4_entry *nat = 0;
	struct ct4_key fk, rk;
	struct ct4_entry *e;
	__u64 now;

	if (np4_xdp_parse(ctx, &p))
		return XDP_PASS;
	now = bpf_ktime_get_ns();
	ct4_key_forward(&fk, &p);
	e = ct4.lookup(&fk);
	if (e) {
		if (!(e->flags & CT_F_NODEPORT))
			return XDP_PASS;
		if (ct4_flow_over(e, &p, now) || !lb4_flow_keeps_backend(e->backend_id, p.proto))
			return XDP_PASS;                /* the flow restarts or ends: TC decides how */
		if (e->flags & CT_F_SNAT) {
			nat = lb4_snat.lookup(&fk);
			if (!nat || (lb_option(LB_CFG_MASQUERADE_LOCAL_BACKENDS) && np4_xdp_backend_is_local(e)))
				return XDP_PASS;        /* a masqueraded flow to a local pod stays TC's */
		}
		np4_note_forward(&p, e, nat, now);
		return np4_xdp_forward(ctx, &p, e, nat);
	}
	if (p.daddr && p.daddr == node_snat4()) {
		ct4_key_reply(&rk, &p);
		e = ct4_lookup(&rk, now);
		if (e && (e->flags & CT_F_SNAT))
			return np4_xdp_snat_reply(ctx, &p, e, &rk, now);
	}
	return np4_xdp_new(ctx, &p, &fk, now);
}


/* ---- IPv6 twins: the same fast path for plain IPv6 (no extension headers) TCP/UDP to an
 * EXTERNAL frontend, and replies of SNATed flows; everything else passes to from_uplink
 * (np6_from_uplink). No IP header checksum; the L4 checksum covers the pseudo-header. ---- */

/* As np4_csum_partial, over the IPv6 pseudo-header (RFC 8200 8.1). */
static __always_inline int np6_csum_partial(const struct ipv6hdr *ip6, __u8 proto, __u16 l4_len, __u16 check)
{
	const __u16 *w = (const __u16 *)&ip6->saddr;
	__u32 s = lb_htons((__u16)proto) + lb_htons(l4_len);
	int i;

#pragma unroll
	for (i = 0; i < 16; i++)        /* saddr and daddr, adjacent */
		s += w[i];
	return np_csum_is_sum(s, check);
}

/* Plain IPv6 TCP/UDP into `p`; -1 for anything XDP leaves to TC. */
static __always_inline int np6_xdp_parse(struct xdp_md *ctx, struct lb6_pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	void *l4 = data + ETH_HLEN + sizeof(struct ipv6hdr);
	__u16 l4_len;

	if ((void *)(ip6 + 1) > data_end || eth->h_proto != lb_htons(ETH_P_IPV6) || ip6->version != 6)
		return -1;
	l4_len = lb_ntohs(ip6->payload_len);
	if (data + ETH_HLEN + sizeof(*ip6) + l4_len > data_end)
		return -1;                      /* also BIG TCP's payload length 0 with a TCP header: TC */
	p->l3_off = ETH_HLEN;
	p->l4_off = ETH_HLEN + sizeof(*ip6);
	p->ip_len = sizeof(*ip6) + l4_len;
	__builtin_memcpy(p->saddr, &ip6->saddr, 16);
	__builtin_memcpy(p->daddr, &ip6->daddr, 16);
	p->proto = ip6->nexthdr;                /* an extension header is no TCP/UDP: TC */
	p->frag = LB_FRAG_NONE;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end || th->doff < 5 || th->doff * 4 > l4_len)
			return -1;
		if (np6_csum_partial(ip6, IPPROTO_TCP, l4_len, th->check))
			return -1;
		LB_PKT_SET_TCP(p, th);
		return 0;
	}
	if (p->proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > data_end || sizeof(*uh) > l4_len)
			return -1;
		if (!uh->check || np6_csum_partial(ip6, IPPROTO_UDP, l4_len, uh->check))
			return -1;              /* a zero UDP checksum is invalid over IPv6: TC decides */
		p->sport = uh->source;
		p->dport = uh->dest;
		return 0;
	}
	return -1;
}

/* Rewrite addresses and ports in place (what np6_xdp_parse accepted only). */
static __always_inline int np6_xdp_rewrite(struct xdp_md *ctx, struct lb6_pkt *p, const __be32 *saddr,
					   const __be32 *daddr, __be16 sport, __be16 dport)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	void *l4 = data + ETH_HLEN + sizeof(struct ipv6hdr);
	__be32 from[9], to[9];
	__s64 diff;

	lb6_addr_copy(from, p->saddr);
	lb6_addr_copy(from + 4, p->daddr);
	lb6_addr_copy(to, saddr);
	lb6_addr_copy(to + 4, daddr);
	from[8] = 0;
	to[8] = 0;
	__builtin_memcpy(&from[8], &p->sport, 2);
	__builtin_memcpy((__u8 *)&from[8] + 2, &p->dport, 2);
	__builtin_memcpy(&to[8], &sport, 2);
	__builtin_memcpy((__u8 *)&to[8] + 2, &dport, 2);
	diff = bpf_csum_diff(from, sizeof(from), to, sizeof(to), 0);

	if ((void *)(ip6 + 1) > data_end)
		return -1;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end)
			return -1;
		th->source = sport;
		th->dest = dport;
		th->check = np4_csum_add(th->check, diff);
	} else {
		struct udphdr *uh = l4;
		__u16 c;

		if ((void *)(uh + 1) > data_end)
			return -1;
		uh->source = sport;
		uh->dest = dport;
		c = np4_csum_add(uh->check, diff);
		uh->check = c ? c : 0xffff;
	}
	__builtin_memcpy(&ip6->saddr, to, 16);
	__builtin_memcpy(&ip6->daddr, to + 4, 16);
	lb6_addr_copy(p->saddr, saddr);
	lb6_addr_copy(p->daddr, daddr);
	p->sport = sport;
	p->dport = dport;
	return 0;
}

/* The next hop of a packet about to leave as saddr:sport -> daddr:dport. */
static __always_inline int np6_xdp_fib(struct xdp_md *ctx, const struct lb6_pkt *p, struct bpf_fib_lookup *fib,
				       const __be32 *saddr, const __be32 *daddr, __be16 sport, __be16 dport)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET6;
	fib->l4_protocol = p->proto;
	fib->sport = sport;
	fib->dport = dport;
	fib->tot_len = p->ip_len;
	__builtin_memcpy(fib->ipv6_src, saddr, 16);
	__builtin_memcpy(fib->ipv6_dst, daddr, 16);
	fib->ifindex = ctx->ingress_ifindex;
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}

/* As np4_xdp_ttl_spent: no hop left to forward with (TC drops and counts it). */
static __always_inline int np6_xdp_hop_spent(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip6 = data + ETH_HLEN;

	return (void *)(ip6 + 1) > data_end || ip6->hop_limit <= 1;
}

/* As np4_xdp_tx: out towards `fib`'s next hop with one hop less. */
static __always_inline int np6_xdp_tx(struct xdp_md *ctx, const struct bpf_fib_lookup *fib)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = data + ETH_HLEN;

	if ((void *)(ip6 + 1) > data_end)
		return XDP_DROP;
	ip6->hop_limit--;
	return np_xdp_send(ctx, eth, fib);
}

/* As np4_xdp_forward. */
static __always_inline int np6_xdp_forward(struct xdp_md *ctx, struct lb6_pkt *p, const struct ct6_entry *e,
					   const struct snat6_entry *nat, struct np6_scratch *s)
{
	__u32 bytes = ctx->data_end - ctx->data;
	const __be32 *saddr = nat ? nat->address : p->saddr;
	__be16 sport = nat ? nat->port : p->sport;

	if (nat && (np6_xdp_hop_spent(ctx) ||
		    np6_xdp_fib(ctx, p, &s->fib, saddr, e->backend_addr, sport, e->backend_port) !=
		    BPF_FIB_LKUP_RET_SUCCESS))
		return XDP_PASS;
	if (np6_xdp_rewrite(ctx, p, saddr, e->backend_addr, sport, e->backend_port))
		return XDP_PASS;
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return nat ? np6_xdp_tx(ctx, &s->fib) : XDP_PASS;
}

/* As np4_xdp_backend_is_local. */
static __always_inline int np6_xdp_backend_is_local(const struct ct6_entry *e)
{
	__u32 id = e->backend_id;
	struct lb6_backend *be = lb6_backends.lookup(&id);

	return !be || (be->flags & LB_BE_F_LOCAL);
}

/* As np4_xdp_new. */
static __always_inline int np6_xdp_new(struct xdp_md *ctx, struct lb6_pkt *p, struct np6_scratch *s, __u64 now)
{
	struct lb4_service *svc;
	struct lb6_backend *be;
	struct ct6_entry *e = &s->e;
	int masquerade;

	svc = np6_lookup_frontend(p);
	if (!svc || (svc->flags & LB_SVC_F_ADDRESS))
		return XDP_PASS;
	if (!lb6_source_allowed(svc, p->saddr)) {
		lb_count_drop(REASON_SOURCE_RANGE);
		return XDP_DROP;
	}
	if (!svc->backend_count || !svc->maglev_size)
		return XDP_PASS;                        /* reject or Local drop: TC */
	if (!ct6_starts_flow(p))
		return XDP_PASS;
	__builtin_memset(e, 0, sizeof(*e));
	be = lb6_flow_begin(svc, p, now, e);
	if (!be)
		return XDP_PASS;
	e->flags |= CT_F_NODEPORT;
	masquerade = lb_option(LB_CFG_MASQUERADE_LOCAL_BACKENDS);
	if (masquerade && (be->flags & LB_BE_F_LOCAL) && !np_flow_keeps_source(svc, be->flags, masquerade))
		return XDP_PASS;                        /* masqueraded to a local pod: TC's (np6_redirect to its veth) */
	if (np_flow_keeps_source(svc, be->flags, masquerade)) {
		if (ct6_create(&s->fk, e, p->saddr))
			return XDP_PASS;
		lb6_affinity_update(svc, p->saddr, e->backend_id, now);
		return np6_xdp_forward(ctx, p, e, 0, s);
	}
	if (np6_xdp_hop_spent(ctx) || np6_snat_create(ctx, p, &s->fk, e, &s->nat, s, now))
		return XDP_PASS;
	lb6_affinity_update(svc, p->saddr, e->backend_id, now);
	return np6_xdp_forward(ctx, p, e, &s->nat, s);
}

/* As np4_xdp_snat_reply. */
static __always_inline int np6_xdp_snat_reply(struct xdp_md *ctx, struct lb6_pkt *p, struct ct6_entry *e,
					      struct np6_scratch *s, __u64 now)
{
	struct snat6_entry *client = lb6_snat.lookup(&s->rk);
	__u32 bytes = ctx->data_end - ctx->data;

	if (!client || np6_xdp_hop_spent(ctx))
		return XDP_PASS;
	if (np6_xdp_fib(ctx, p, &s->fib, e->frontend_addr, client->address, e->frontend_port, client->port) !=
	    BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS;
	ct6_note_reply(e, p, client->address, client->port, now);
	if (np6_xdp_rewrite(ctx, p, e->frontend_addr, client->address, e->frontend_port, client->port))
		return XDP_PASS;
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return np6_xdp_tx(ctx, &s->fib);
}

static __always_inline int np6_xdp_uplink(struct xdp_md *ctx)
{
	struct np6_scratch *s = np6_scratch_get();
	struct snat6_entry *nat = 0;
	struct lb6_pkt p = {};
	struct ct6_entry *e;
	__u64 now;

	if (!s || np6_xdp_parse(ctx, &p))
		return XDP_PASS;
	now = bpf_ktime_get_ns();
	ct6_key_forward(&s->fk, &p);
	e = ct6.lookup(&s->fk);
	if (e) {
		if (!(e->flags & CT_F_NODEPORT))
			return XDP_PASS;
		if (ct6_flow_over(e, &p, now) || !lb6_flow_keeps_backend(e->backend_id, p.proto))
			return XDP_PASS;                /* the flow restarts or ends: TC decides how */
		if (e->flags & CT_F_SNAT) {
			nat = lb6_snat.lookup(&s->fk);
			if (!nat || (lb_option(LB_CFG_MASQUERADE_LOCAL_BACKENDS) && np6_xdp_backend_is_local(e)))
				return XDP_PASS;        /* a masqueraded flow to a local pod stays TC's */
		}
		np6_note_forward(&p, e, nat, now);
		return np6_xdp_forward(ctx, &p, e, nat, s);
	}
	if (np6_is_node_addr(p.daddr)) {
		ct6_key_reply(&s->rk, &p);
		e = ct6_lookup(&s->rk, now);
		if (e && (e->flags & CT_F_SNAT))
			return np6_xdp_snat_reply(ctx, &p, e, s, now);
	}
	return np6_xdp_new(ctx, &p, s, now);
}

#endif /* EBPFSVC_NODEPORT_XDP_H */
