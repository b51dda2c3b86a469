/* SPDX-License-Identifier: GPL-2.0 */
/*
 * North-south over IPv6: the twins of nodeport.h's np4_* paths, on the same
 * uplink programs (lb_node.c dispatches on the EtherType), with the same
 * decisions in the same order:
 *
 *   np6_from_uplink  TC ingress. Tracked flows keep their backend; replies of
 *     SNATed flows (backend -> node IPv6 address:SNAT port) go back to the
 *     client from the frontend; a packet to an EXTERNAL IPv6 frontend
 *     (NodePort on a node IPv6 address, externalIP, LoadBalancer ingress) or
 *     an IPv6 ClusterIP starts a flow: source ranges (lb6_source_ranges), Local
 *     policy, backend choice, then DNAT only for a local backend or Local
 *     policy, else SNAT to node_snat6() with a port of np6_snat_alloc (the
 *     client's own when free, else SNAT_PORT_MIN..MAX) + DNAT, sent out by
 *     ourselves (np6_redirect) with one hop less.
 *   np6_to_uplink  TC egress: replies of source-preserving flows get the
 *     frontend back as their source; ICMPv6 errors about them too.
 *
 * ICMPv6 errors about translated flows are translated back both ways. Neighbour
 * discovery, other ICMPv6 and whatever is not for a Service pass untouched.
 * The node's own clients (host.h's hs6_* paths) meet np6_to_uplink too.
 *
 * Conntrack (ct6) and SNAT (lb6_snat) hold the same two entries per flow as
 * ct4 / lb4_snat, with CT_F_NODEPORT and CT_F_SNAT meaning the same.
 */
#ifndef EBPFSVC_NODEPORT6_H
#define EBPFSVC_NODEPORT6_H

#ifndef AF_INET6
#define AF_INET6 10
#endif

#define IP6_HOP_LIMIT_OFF 7

/* The IPv6 path's larger locals, per CPU rather than on the stack: in one program with the
 * IPv4 path, with 16-byte addresses in every key, entry and lookup, the 512-byte BPF stack has
 * no room for them (the same reason as lb6_icmp_scratch). Each use fills what it reads. */
struct np6_scratch {
	struct bpf_fib_lookup fib;      /* np6_redirect */
	struct lb6_icmp_quote q;        /* np6_icmp_error_snat / _reply */
	struct ct6_key k;
	struct ct6_key fk;              /* np6_from_uplink: the packet's forward key */
	struct ct6_key rk;              /* np6_from_uplink: the packet's reply key */
	struct ct6_key snat_rk;         /* np6_snat_create: the new flow's reply key */
	struct ct6_entry e;             /* np6_forward_new: the new flow */
	struct snat6_entry nat;         /* np6_forward_new: its node address and port */
	struct snat6_entry client;      /* np6_snat_alloc: the client's address and port */
	struct bpf_sock_tuple t;        /* np6_snat_port_is_free */
};
BPF_PERCPU_ARRAY(np6_scratch, struct np6_scratch, 1);

static __always_inline struct np6_scratch *np6_scratch_get(void)
{
	__u32 zero = 0;

	return np6_scratch.lookup(&zero);
}

/* lb6_parse for the uplink, with the scratch, the parser's paths merged (flow.h
 * lb6_merge_paths): without it the verifier checks the whole uplink path once per
 * way the extension-header walk ended and gives up (a million instructions). */
static __always_inline int np6_parse(struct __sk_buff *skb, struct lb6_pkt *p, struct np6_scratch **sp)
{
	struct np6_scratch *s = np6_scratch_get();
	int ret = lb6_parse(skb, p);

	if (ret != LB_PARSE_OK)
		return ret;
	if (!s || lb6_merge_paths(p))
		return LB_PARSE_PASS;
	*sp = s;
	return ret;
}

/* As np4_hop_left: a new flow whose first packet has no hop left starts nothing. */
static __always_inline __u32 np6_hop_left(struct __sk_buff *skb, const struct lb6_pkt *p)
{
	return np_hop_left(skb, p->l3_off + IP6_HOP_LIMIT_OFF);
}

/* As np4_hop: the hop limit a router takes off (no header checksum in IPv6). */
static __always_inline __u32 np6_hop(struct __sk_buff *skb, const struct lb6_pkt *p)
{
	__u32 reason = np6_hop_left(skb, p);
	__u8 hl;

	if (reason)
		return reason;
	if (bpf_skb_load_bytes(skb, p->l3_off + IP6_HOP_LIMIT_OFF, &hl, 1))
		return REASON_MALFORMED;
	hl--;
	if (bpf_skb_store_bytes(skb, p->l3_off + IP6_HOP_LIMIT_OFF, &hl, 1, 0))
		return REASON_MALFORMED;
	return 0;
}

static __always_inline void np6_fib_params(struct bpf_fib_lookup *fib, const struct __sk_buff *skb,
					   const struct lb6_pkt *p)
{
	fib->family = AF_INET6;
	fib->l4_protocol = p->proto;
	fib->sport = p->sport;
	fib->dport = p->dport;
	__builtin_memcpy(fib->ipv6_src, p->saddr, 16);
	__builtin_memcpy(fib->ipv6_dst, p->daddr, 16);
	fib->ifindex = skb->ifindex;
}

/* As np4_redirect: our hop, then out to the FIB's next hop. */
static __always_inline int np6_redirect(struct __sk_buff *skb, const struct lb6_pkt *p)
{
	struct np6_scratch *s = np6_scratch_get();
	__u32 reason = np6_hop(skb, p);

	if (reason)
		return lb_drop(reason);
	if (!s)
		return lb_drop(REASON_FIB_LOOKUP);
	__builtin_memset(&s->fib, 0, sizeof(s->fib));
	np6_fib_params(&s->fib, skb, p);
	return np_fib_send(skb, &s->fib, 0);
}

/* Is `addr` the node's IPv6 SNAT address (node_snat6)? */
static __always_inline int np6_is_node_addr(const __be32 *addr)
{
	__be32 node[4];

	return !node_snat6(node) && lb6_addr_equal(addr, node);
}

static __always_inline void np6_snat_reply_key(struct ct6_key *k, const struct ct6_entry *e,
					       const struct snat6_entry *nat, __u8 proto)
{
	ct6_key_reply_of(k, e, nat->address, nat->port, proto);
}

/* As np4_snat_claim: port `nat->port` for flow `e`, atomically (BPF_NOEXIST), or taken back
 * from a flow that is over; a node client's live flow on the tuple keeps it. */
static __always_inline int np6_snat_claim(const struct ct6_entry *e, struct ct6_key *rk,
					  const struct snat6_entry *nat, struct snat6_entry *client,
					  __u8 proto, __u64 now)
{
	struct ct6_entry *held;

	np6_snat_reply_key(rk, e, nat, proto);
	if (!lb6_snat.insert(rk, client)) {
		held = ct6_lookup(rk, now);
		if (!held || ct4_closing(held->flags))
			return 0;
		lb6_snat.delete(rk);
		return -1;
	}
	held = ct6_lookup(rk, now);
	if (held && !ct4_closing(held->flags))
		return -1;
	lb6_snat.delete(rk);
	return lb6_snat.insert(rk, client) ? -1 : 0;
}

/* As np4_snat_port_is_free: no socket of the node connected to the backend from `port`. */
static __always_inline int np6_snat_port_is_free(void *ctx, const struct ct6_entry *e,
						 const struct snat6_entry *nat, __be16 port)
{
	struct np6_scratch *s = np6_scratch_get();
	struct bpf_sock_tuple *t;
	struct bpf_sock *sk;
	int free;

	if (!s)
		return 0;
	t = &s->t;
	__builtin_memset(t, 0, sizeof(*t));
	__builtin_memcpy(t->ipv6.saddr, e->backend_addr, 16);   /* as the backend's replies arrive */
	__builtin_memcpy(t->ipv6.daddr, nat->address, 16);
	t->ipv6.sport = e->backend_port;
	t->ipv6.dport = port;
	sk = bpf_skc_lookup_tcp(ctx, t, sizeof(t->ipv6), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 1;
	free = sk->state == BPF_TCP_LISTEN;
	bpf_sk_release(sk);
	return free;
}

/* As np4_snat_alloc, the source port rules included: a TCP client's own port when
 * free, else SNAT_PORT_MIN..MAX from a hash of the client's tuple, probed linearly.
 * `nat->address` is the node's IPv6 address already. Unrolled as IPv4's: as a bounded
 * loop the verifier walks every probe anyway and takes twice as long. */
static __always_inline int np6_snat_alloc(void *ctx, const struct lb6_pkt *p, const struct ct6_entry *e,
					  struct ct6_key *rk, struct snat6_entry *nat, struct snat6_entry *client,
					  __u64 now)
{
	__u32 off = lb6_flow_hash(p) % NP4_SNAT_PORTS;
	int i;

	lb6_addr_copy(client->address, p->saddr);
	client->port = p->sport;
	client->pad0 = 0;
	nat->pad0 = 0;
	nat->port = p->sport;
	if (p->proto == IPPROTO_TCP && lb_ntohs(p->sport) >= SNAT_KEEP_PORT_MIN &&
	    lb_option(LB_CFG_SNAT_KEEP_CLIENT_PORT) && np6_snat_port_is_free(ctx, e, nat, p->sport) &&
	    !np6_snat_claim(e, rk, nat, client, p->proto, now))
		return 0;
#pragma unroll
	for (i = 0; i < SNAT_PORT_PROBES; i++) {
		nat->port = lb_htons(SNAT_PORT_MIN + off);
		if (!np6_snat_claim(e, rk, nat, client, p->proto, now))
			return 0;
		off = off + 1 == NP4_SNAT_PORTS ? 0 : off + 1;
	}
	return -1;
}

/* As np4_snat_create: fail closed, 0 or the REASON_* to drop with. */
static __always_inline __u32 np6_snat_create(void *ctx, const struct lb6_pkt *p, struct ct6_key *fk,
					     struct ct6_entry *e, struct snat6_entry *nat, struct np6_scratch *s,
					     __u64 now)
{
	struct ct6_key *rk = &s->snat_rk;

	if (node_snat6(nat->address))
		return REASON_SNAT_EXHAUSTED;           /* no IPv6 node address: replies could not find us */
	e->flags |= CT_F_SNAT;
	if (np6_snat_alloc(ctx, p, e, rk, nat, &s->client, now))
		return REASON_SNAT_EXHAUSTED;
	if (lb6_snat.update(fk, nat) || ct6.update(fk, e) || ct6.update(rk, e)) {
		ct6.delete(fk);
		lb6_snat.delete(fk);
		lb6_snat.delete(rk);
		return REASON_CT_CREATE_FAILED;
	}
	return 0;
}

/* As np4_note_forward. */
static __always_inline void np6_note_forward(const struct lb6_pkt *p, struct ct6_entry *e,
					     const struct snat6_entry *nat, __u64 now)
{
	struct ct6_entry *re;
	struct ct6_key rk;
	__u8 flags;

	e->last_seen_ns = now;
	flags = e->flags | ct6_tcp_flags(p, CT_DIR_FORWARD);
	if (flags == e->flags)
		return;
	ct_flags_add(&e->flags, flags);
	if (nat)
		np6_snat_reply_key(&rk, e, nat, p->proto);
	else
		ct6_key_reply_of(&rk, e, p->saddr, p->sport, p->proto);
	re = ct6.lookup(&rk);
	if (re)
		ct_flags_add(&re->flags, flags);
}

/* As np4_delete_flow. */
static __always_inline void np6_delete_flow(struct ct6_key *fk, const struct ct6_entry *e)
{
	struct snat6_entry *nat;
	struct ct6_key rk;

	if (!(e->flags & CT_F_SNAT)) {
		ct6_delete_flow(fk, e);
		return;
	}
	nat = lb6_snat.lookup(fk);
	if (nat) {
		np6_snat_reply_key(&rk, e, nat, fk->proto);
		ct6.delete(&rk);
		lb6_snat.delete(&rk);
	}
	lb6_snat.delete(fk);
	ct6.delete(fk);
}

/* As np4_forward_xlate. */
static __always_inline int np6_forward_xlate(struct __sk_buff *skb, struct lb6_pkt *p,
					     const struct ct6_entry *e, const struct snat6_entry *nat)
{
	__u32 bytes = skb->len;

	frag6_record(p);
	if (nat && lb6_rewrite_src(skb, p, nat->address, nat->port))
		return lb_drop(REASON_MALFORMED);
	if (lb6_rewrite_dst(skb, p, e->backend_addr, e->backend_port))
		return lb_drop(REASON_MALFORMED);
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return nat ? np6_redirect(skb, p) : TC_ACT_OK;
}

/* As np4_lookup_frontend: an EXTERNAL IPv6 frontend, else an IPv6 ClusterIP. */
static __always_inline struct lb4_service *np6_lookup_frontend(const struct lb6_pkt *p)
{
	struct lb4_service *svc = lb6_lookup_frontend(p->daddr, p->dport, p->proto, LB_SCOPE_EXTERNAL);

	if (svc)
		return svc;
	svc = lb6_lookup_frontend(p->daddr, p->dport, p->proto, LB_SCOPE_INTERNAL);
	return svc && !(svc->flags & NP4_SVC_F_EXTERNAL_KINDS) ? svc : 0;
}

/* As np4_forward_new. */
static __always_inline int np6_forward_new(struct __sk_buff *skb, struct lb6_pkt *p,
					   struct ct6_key *fk, __u64 now)
{
	struct np6_scratch *s;
	struct lb4_service *svc;
	struct lb6_backend *be;
	struct ct6_entry *e;
	int ret;

	svc = np6_lookup_frontend(p);
	if (!svc || (svc->flags & LB_SVC_F_ADDRESS))
		return TC_ACT_OK;                       /* another port of a node address: the node's own */
	if (p->frag == LB_FRAG_LATER)
		return lb_drop(REASON_FRAG_UNTRACKED);
	if (!lb6_source_allowed(svc, p->saddr))
		return lb_drop(REASON_SOURCE_RANGE);
	if (!svc->backend_count || !svc->maglev_size) {
		if (svc->flags & LB_SVC_F_LOCAL_ONLY)
			return lb_drop(REASON_NO_LOCAL_BACKEND);
		return lb6_reject(skb, p, REASON_NO_BACKEND);
	}
	if (!ct6_starts_flow(p))
		return TC_ACT_OK;                       /* mid-stream, not ours: the kernel's (ct.h) */

	s = np6_scratch_get();
	if (!s)
		return lb_drop(REASON_CT_CREATE_FAILED);
	e = &s->e;
	__builtin_memset(e, 0, sizeof(*e));
	be = lb6_flow_begin(svc, p, now, e);
	if (!be)
		return lb_drop(REASON_NO_BACKEND);
	e->flags |= CT_F_NODEPORT;

	if (np_flow_keeps_source(svc, be->flags, lb_option(LB_CFG_MASQUERADE_LOCAL_BACKENDS))) {
		if (ct6_create(fk, e, p->saddr))
			return lb_drop(REASON_CT_CREATE_FAILED);
		lb6_affinity_update(svc, p->saddr, e->backend_id, now);
		return np6_forward_xlate(skb, p, e, 0);
	}

	ret = np6_hop_left(skb, p);
	if (!ret)
		ret = np6_snat_create(skb, p, fk, e, &s->nat, s, now);
	if (ret)
		return lb_drop(ret);
	lb6_affinity_update(svc, p->saddr, e->backend_id, now);
	return np6_forward_xlate(skb, p, e, &s->nat);
}

/* As np4_forward_tracked (and lb4_backend_gone). LB_REBALANCE: the flow is gone, balance
 * the packet as a new one (np6_from_uplink does, so the new-flow path is in the program once). */
static __always_inline int np6_forward_tracked(struct __sk_buff *skb, struct lb6_pkt *p,
					       struct ct6_key *fk, struct ct6_entry *e, __u64 now)
{
	struct snat6_entry *nat = 0;

	if (!lb6_flow_keeps_backend(e->backend_id, p->proto)) {
		np6_delete_flow(fk, e);
		if (p->proto == IPPROTO_TCP)
			return lb6_reject(skb, p, REASON_BACKEND_GONE);
		if (p->frag == LB_FRAG_LATER)
			return lb_drop(REASON_BACKEND_GONE);
		return LB_REBALANCE;
	}
	if (e->flags & CT_F_SNAT) {
		nat = lb6_snat.lookup(fk);
		if (!nat) {
			/* Half a flow (LRU evicted the SNAT entry): start over. */
			np6_delete_flow(fk, e);
			return LB_REBALANCE;
		}
	}
	np6_note_forward(p, e, nat, now);
	return np6_forward_xlate(skb, p, e, nat);
}

/* As np4_snat_reply_to: backend -> node:SNAT port becomes frontend -> client, sent to the
 * client. No map method calls of its own (flow.h calls it through a forward declaration). */
static __always_inline int np6_snat_reply_to(struct __sk_buff *skb, struct lb6_pkt *p, struct ct6_entry *e,
					     const struct snat6_entry *client, __u64 now)
{
	__u32 bytes = skb->len;

	ct6_note_reply(e, p, client->address, client->port, now);
	frag6_record(p);
	if (lb6_rewrite_dst(skb, p, client->address, client->port) ||
	    lb6_rewrite_src(skb, p, e->frontend_addr, e->frontend_port))
		return lb_drop(REASON_MALFORMED);
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return np6_redirect(skb, p);
}

/* As np4_snat_reply: a backend's reply to a SNATed flow (reply key `rk`), to its client. */
static __always_inline int np6_snat_reply(struct __sk_buff *skb, struct lb6_pkt *p,
					  struct ct6_entry *e, struct ct6_key *rk, __u64 now)
{
	struct snat6_entry *client = lb6_snat.lookup(rk);

	return client ? np6_snat_reply_to(skb, p, e, client, now) : TC_ACT_OK;
}

/* Both ends of the packet an ICMPv6 error about a SNATed flow quotes (s->q): its source
 * becomes saddr:sport and its destination daddr:dport. 0, or -1 on failure. */
static __always_inline int np6_icmp_quote_rewrite_both(struct __sk_buff *skb, __u32 icmp_csum,
						       const struct np6_scratch *s, const __be32 *saddr,
						       __be16 sport, const __be32 *daddr, __be16 dport)
{
	if (lb6_icmp_quote_rewrite(skb, icmp_csum, &s->q, IP6_SADDR_OFF, 0, s->q.saddr, saddr, s->q.ports[0], sport))
		return -1;
	return lb6_icmp_quote_rewrite(skb, icmp_csum, &s->q, IP6_DADDR_OFF, 2, s->q.daddr, daddr, s->q.ports[1],
				      dport);
}

/* As np4_icmp_error_snat: an error about a packet we sent node:port -> backend of a SNATed
 * flow becomes the client's error about its packet to the frontend, sent to the client.
 * A verdict, or -1 when not about such a flow. */
static __always_inline int np6_icmp_error_snat(struct __sk_buff *skb, struct lb6_pkt *p, __u64 now)
{
	__u32 icmp_csum = p->l4_off + ICMP_CSUM_OFF;
	struct np6_scratch *s = np6_scratch_get();
	struct snat6_entry *client;
	struct ct6_entry *e;

	if (!s || !np6_is_node_addr(p->daddr) || lb6_icmp_quote(skb, p, CT_DIR_REPLY, &s->q, &s->k) ||
	    !lb6_addr_equal(s->q.saddr, p->daddr))
		return -1;
	e = ct6_lookup(&s->k, now);
	if (!e || !(e->flags & CT_F_SNAT))
		return -1;
	client = lb6_snat.lookup(&s->k);
	if (!client)
		return -1;

	if (np6_icmp_quote_rewrite_both(skb, icmp_csum, s, client->address, client->port, e->frontend_addr,
					e->frontend_port))
		return lb_drop(REASON_MALFORMED);
	/* Outer header (in the ICMPv6 pseudo-header): to the client; from the frontend when
	 * the backend itself complained. */
	if (lb6_csum_store_addr(skb, p->l3_off + IP6_DADDR_OFF, p->daddr, client->address, icmp_csum, 0))
		return lb_drop(REASON_MALFORMED);
	lb6_addr_copy(p->daddr, client->address);
	if (lb6_addr_equal(p->saddr, s->q.daddr)) {
		if (lb6_csum_store_addr(skb, p->l3_off + IP6_SADDR_OFF, p->saddr, e->frontend_addr, icmp_csum, 0))
			return lb_drop(REASON_MALFORMED);
		lb6_addr_copy(p->saddr, e->frontend_addr);
	}
	return np6_redirect(skb, p);
}

/* As np4_icmp_error_reply: an error from outside about a reply we sent a client
 * (quoted frontend -> client) reaches the backend: by the pod side's translation for
 * a source-preserving flow, as one about backend -> node:port for a SNATed one. */
static __always_inline int np6_icmp_error_reply(struct __sk_buff *skb, struct lb6_pkt *p, __u64 now)
{
	__u32 icmp_csum = p->l4_off + ICMP_CSUM_OFF;
	struct np6_scratch *s = np6_scratch_get();
	struct snat6_entry *nat;
	struct ct6_entry *e;

	if (!s || lb6_icmp_quote(skb, p, CT_DIR_FORWARD, &s->q, &s->k))
		return -1;
	e = ct6_lookup(&s->k, now);
	if (!e || !(e->flags & CT_F_NODEPORT))
		return -1;
	if (!(e->flags & CT_F_SNAT)) {
		if (lb6_icmp_error_xlate(skb, p, now, CT_DIR_FORWARD) < 0)
			return lb_drop(REASON_MALFORMED);
		return TC_ACT_OK;
	}
	nat = lb6_snat.lookup(&s->k);
	if (!nat)
		return -1;
	if (np6_icmp_quote_rewrite_both(skb, icmp_csum, s, e->backend_addr, e->backend_port, nat->address,
					nat->port) ||
	    lb6_csum_store_addr(skb, p->l3_off + IP6_DADDR_OFF, p->daddr, e->backend_addr, icmp_csum, 0) ||
	    lb6_csum_store_addr(skb, p->l3_off + IP6_SADDR_OFF, p->saddr, nat->address, icmp_csum, 0))
		return lb_drop(REASON_MALFORMED);
	lb6_addr_copy(p->daddr, e->backend_addr);
	lb6_addr_copy(p->saddr, nat->address);
	return np6_redirect(skb, p);
}

static __always_inline int np6_from_uplink(struct __sk_buff *skb)
{
	struct lb6_pkt p = {};
	struct np6_scratch *s = 0;
	struct ct6_entry *e;
	__u64 now;
	int ret;

	ret = np6_parse(skb, &p, &s);
	if (ret != LB_PARSE_OK)
		return lb4_unparsed(ret);
	now = bpf_ktime_get_ns();
	if (p.proto == LB_IPPROTO_ICMPV6) {
		/* Errors about our flows; neighbour discovery and the rest pass. */
		ret = np6_icmp_error_snat(skb, &p, now);
		if (ret < 0)
			ret = np6_icmp_error_reply(skb, &p, now);
		return ret < 0 ? TC_ACT_OK : ret;
	}
	if (!lb4_proto_has_ports(p.proto))
		return TC_ACT_OK;
	if (p.frag == LB_FRAG_LATER && frag6_lookup_ports(&p)) {
		if (lb6_is_frontend_address(p.daddr, p.proto, LB_SCOPE_EXTERNAL))
			return lb_drop(REASON_FRAG_UNTRACKED);
		return TC_ACT_OK;
	}

	if (!s)
		return TC_ACT_OK;
	ct6_key_forward(&s->fk, &p);
	e = ct6.lookup(&s->fk);
	if (e && !(e->flags & CT_F_NODEPORT))
		e = 0;                                  /* a pod-side flow: not ours */
	if (e && ct6_flow_over(e, &p, now)) {
		np6_delete_flow(&s->fk, e);
		e = 0;
	}
	if (e) {
		ret = np6_forward_tracked(skb, &p, &s->fk, e, now);
		if (ret != LB_REBALANCE)
			return ret;
	} else if (np6_is_node_addr(p.daddr)) {
		ct6_key_reply(&s->rk, &p);
		e = ct6_lookup(&s->rk, now);
		if (e && (e->flags & CT_F_SNAT))
			return np6_snat_reply(skb, &p, e, &s->rk, now);
	}
	return np6_forward_new(skb, &p, &s->fk, now);
}

/* host.h: the node's own packet to an IPv6 externalIP or LoadBalancer IP it routes out here; -1 if not. */
static __always_inline int hs6_to_uplink(struct __sk_buff *skb, struct lb6_pkt *p, __u64 now,
					 struct np6_scratch *s);

static __always_inline int np6_to_uplink(struct __sk_buff *skb)
{
	struct lb6_pkt p = {};
	struct np6_scratch *s = 0;
	struct ct6_key rk;
	struct ct6_entry *e;
	__u32 bytes = skb->len;
	__u64 now;
	int ret;

	ret = np6_parse(skb, &p, &s);
	if (ret != LB_PARSE_OK)
		return lb4_unparsed(ret);
	now = bpf_ktime_get_ns();
	if (p.proto == LB_IPPROTO_ICMPV6) {
		/* A local backend's error about a source-preserving flow: about the frontend. */
		if (lb6_icmp_error_xlate(skb, &p, now, CT_DIR_REPLY) < 0)
			return lb_drop(REASON_MALFORMED);
		return TC_ACT_OK;
	}
	if (!lb4_proto_has_ports(p.proto))
		return TC_ACT_OK;
	if (p.frag == LB_FRAG_LATER && frag6_lookup_ports(&p))
		return TC_ACT_OK;

	ct6_key_reply(&rk, &p);
	e = ct6_lookup(&rk, now);
	if (!e || (e->flags & (CT_F_NODEPORT | CT_F_SNAT)) != CT_F_NODEPORT) {
		ret = s ? hs6_to_uplink(skb, &p, now, s) : -1;
		return ret < 0 ? TC_ACT_OK : ret;
	}
	/* As np4_to_uplink: a SYN-ACK on a flow that is over is not ours. */
	if (p.proto == IPPROTO_TCP && ct4_closing(e->flags) && (p.tcp_flags & LB_TCP_SYN))
		return TC_ACT_OK;
	return lb6_reply_rev_nat(skb, &p, e, bytes, now);
}

#endif /* EBPFSVC_NODEPORT6_H */
