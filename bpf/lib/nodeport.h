/* SPDX-License-Identifier: GPL-2.0 */
/*
 * North-south: traffic that enters a node from outside the cluster, to a
 * NodePort (node address:nodePort), an externalIP or a LoadBalancer ingress
 * address (frontends of scope EXTERNAL), handled on the node's uplink.
 *
 *   np4_from_uplink  TC ingress. Tracked flows keep their backend; replies
 *     of SNATed flows are translated back and sent to the client; a packet to
 *     an EXTERNAL frontend or a ClusterIP (np4_lookup_frontend: exactly its
 *     address, port and protocol) starts a flow, if it can start one (a TCP SYN, any datagram: ct4_starts_flow; a
 *     connection kube-proxy translated stays the kernel's): source ranges,
 *     Local policy, backend choice, then
 *       - backend on this node, or externalTrafficPolicy Local: DNAT only, the
 *         backend sees the client's address, the kernel delivers it to the pod;
 *       - backend on another node (Cluster policy), or on this one with
 *         LB_CFG_MASQUERADE_LOCAL_BACKENDS (kube-proxy's masquerade): SNAT to node_snat4() with
 *         a source port of our own (np4_snat_alloc) + DNAT, sent out directly
 *         (np4_redirect): the kernel would refuse to forward a packet whose
 *         source is one of its own addresses (martian source).
 *     Anything else passes untouched.
 *   np4_to_uplink  TC egress. Replies of source-preserving flows (the local
 *     backend answered the client directly) get the frontend back as source;
 *     ICMP errors the backend sends about such flows are translated too.
 *
 * Conntrack entries are those of the pod side (ct.h) with CT_F_NODEPORT, and
 * CT_F_SNAT for SNATed flows, whose reply entry is keyed by the post-NAT tuple
 * (backend -> node address:SNAT port); lb4_snat holds the two SNAT halves.
 */
#ifndef EBPFSVC_NODEPORT_H
#define EBPFSVC_NODEPORT_H

#ifndef AF_INET
#define AF_INET 2
#endif

#define NP4_SNAT_PORTS (SNAT_PORT_MAX - SNAT_PORT_MIN + 1)

/* bcc 0.26 declares bpf_redirect_neigh with three arguments; the kernel's has
 * four (ifindex, params, plen, flags) and the verifier wants all of them set. */
static long (*np4_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

/*
 * Whether a new flow's first packet can be sent on at all (np4_hop would drop
 * it: TTL 1), asked before the flow is created: a packet that never leaves must
 * leave no flow behind, above all no claimed SNAT port (a stream of TTL-1 SYNs
 * would hold the ports of a backend for CT_TIMEOUT_TCP_SYN_S each), as the
 * kernel's conntrack never confirms the entry of a packet it then drops.
 */
static __always_inline __u32 np_hop_left(struct __sk_buff *skb, __u32 ttl_off)
{
	__u8 ttl;

	if (bpf_skb_load_bytes(skb, ttl_off, &ttl, 1))
		return REASON_MALFORMED;
	return ttl <= 1 ? REASON_TTL_EXCEEDED : 0;
}

static __always_inline __u32 np4_hop_left(struct __sk_buff *skb, const struct lb4_pkt *p)
{
	return np_hop_left(skb, p->l3_off + IP_TTL_OFF);
}

/*
 * The hop a router owes a packet it forwards, which bpf_redirect skips
 * (the kernel's ip_forward would do it): a packet that arrived with TTL 1 is not
 * forwarded, so routing loops end (the kernel would also answer "time
 * exceeded"; we drop and count), and the rest leave with TTL - 1, the header
 * checksum adjusted for the TTL/protocol word. 0, or the REASON_* to drop with.
 */
static __always_inline __u32 np4_hop(struct __sk_buff *skb, const struct lb4_pkt *p)
{
	__u8 ttl;

	if (bpf_skb_load_bytes(skb, p->l3_off + IP_TTL_OFF, &ttl, 1))
		return REASON_MALFORMED;
	if (ttl <= 1)
		return REASON_TTL_EXCEEDED;
	if (bpf_l3_csum_replace(skb, p->l3_off + IP_CSUM_OFF, lb_htons(ttl << 8), lb_htons((ttl - 1) << 8), 2))
		return REASON_MALFORMED;
	ttl--;
	if (bpf_skb_store_bytes(skb, p->l3_off + IP_TTL_OFF, &ttl, 1, 0))
		return REASON_MALFORMED;
	return 0;
}

/* The FIB lookup of a translated packet, from the interface it came in on. tot_len is
 * left 0: the kernel then checks the skb against the egress MTU itself, GSO-aware
 * (a GRO'd 64k skb is forwardable, its IP length is not). */
static __always_inline void np4_fib_params(struct bpf_fib_lookup *fib, const struct __sk_buff *skb,
					   const struct lb4_pkt *p)
{
	fib->family = AF_INET;
	fib->l4_protocol = p->proto;
	fib->sport = p->sport;
	fib->dport = p->dport;
	fib->ipv4_src = p->saddr;
	fib->ipv4_dst = p->daddr;
	fib->ifindex = skb->ifindex;
}

/*
 * Send a translated packet straight to its next hop (either family, `fib` filled
 * by np4_fib_params or np6_fib_params): FIB lookup for the egress interface and
 * MACs; when the neighbour is not resolved yet, let the kernel resolve it
 * (bpf_redirect_neigh).
 */
static __always_inline int np_fib_send(struct __sk_buff *skb, struct bpf_fib_lookup *fib, int stay)
{
	int rc = bpf_fib_lookup(skb, fib, sizeof(*fib), 0);

	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, fib->dmac, ETH_ALEN, 0) ||
		    bpf_skb_store_bytes(skb, ETH_ALEN, fib->smac, ETH_ALEN, 0))
			return lb_drop(REASON_MALFORMED);
		/* `stay`: a next hop out of the interface it came in on is left to the kernel. */
		if (stay && fib->ifindex == skb->ifindex)
			return TC_ACT_OK;
		return bpf_redirect(fib->ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return np4_redirect_neigh(fib->ifindex, 0, 0, 0);
	return lb_drop(REASON_FIB_LOOKUP);
}

static __always_inline int np4_fib_send(struct __sk_buff *skb, const struct lb4_pkt *p, int stay)
{
	struct bpf_fib_lookup fib = {};

	np4_fib_params(&fib, skb, p);
	return np_fib_send(skb, &fib, stay);
}

static __always_inline int np4_send(struct __sk_buff *skb, const struct lb4_pkt *p)
{
	return np4_fib_send(skb, p, 0);
}

/*
 * Forward a translated packet ourselves (np4_send) where the kernel's
 * forwarding would refuse it (its source is a node address) or route it wrong;
 * so the hop (np4_hop) is ours too.
 */
static __always_inline int np4_redirect(struct __sk_buff *skb, const struct lb4_pkt *p)
{
	__u32 reason = np4_hop(skb, p);

	return reason ? lb_drop(reason) : np4_send(skb, p);
}

/* The SNAT reply key of a flow: backend -> node address:port, as the backend answers. */
static __always_inline void np4_snat_reply_key(struct ct4_key *k, const struct ct4_entry *e,
					       const struct snat4_entry *nat, __u8 proto)
{
	ct4_key_reply_of(k, e, nat->address, nat->port, proto);
}

/*
 * Claim SNAT port `nat->port` for flow `e` (client `client`): insert the reply
 * half of lb4_snat with BPF_NOEXIST (atomic: two CPUs never get the same port),
 * or take the port back from a flow that is over (expired, or closed by FIN
 * both ways or RST and only waiting out its stragglers), still first come
 * first served. Waiting for closed flows to expire would cap a busy NodePort
 * at ports / CT_TIMEOUT_TCP_CLOSE_S new connections per second per backend. A
 * live flow on the same reply tuple that is no SNATed one (a node client's,
 * host.h) keeps the port too. On success (0) `rk` is the flow's reply key.
 */
static __always_inline int np4_snat_claim(const struct ct4_entry *e, struct ct4_key *rk,
					  const struct snat4_entry *nat, struct snat4_entry *client,
					  __u8 proto, __u64 now)
{
	struct ct4_entry *held;

	np4_snat_reply_key(rk, e, nat, proto);
	if (!lb4_snat.insert(rk, client)) {
		/* No SNATed flow has it; a node client's flow (host.h: the node's own
		 * socket, through a Service, to the same backend) may hold the tuple. */
		held = ct4_lookup(rk, now);
		if (!held || ct4_closing(held->flags))
			return 0;
		lb4_snat.delete(rk);
		return -1;
	}
	held = ct4_lookup(rk, now);
	if (held && !ct4_closing(held->flags))
		return -1;
	lb4_snat.delete(rk);
	return lb4_snat.insert(rk, client) ? -1 : 0;
}

/*
 * May a TCP flow to backend `e` keep the client's source port on the node
 * address? Only if no socket of the node itself is connected to the backend
 * from that port (a listener does not count: the flow's replies are ours before
 * the stack sees them).
 */
static __always_inline int np4_snat_port_is_free(void *ctx, const struct ct4_entry *e, __be16 port)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	int free;

	t.ipv4.saddr = e->backend_addr;         /* as the backend's replies arrive */
	t.ipv4.daddr = node_snat4();
	t.ipv4.sport = e->backend_port;
	t.ipv4.dport = port;
	sk = bpf_skc_lookup_tcp(ctx, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 1;
	free = sk->state == BPF_TCP_LISTEN;
	bpf_sk_release(sk);
	return free;
}

/*
 * Give a new flow to backend `e` a source port on the node address that no live
 * flow to the same backend address:port holds. A TCP flow first tries the
 * client's own port, as Linux NAT does: the backend then sees one client
 * connection per (node address, port), so when the backend closes first and
 * keeps TIME_WAIT, the client's next connection from that port carries that
 * connection's own timestamp clock (Linux offsets TCP timestamps per 4-tuple)
 * and is accepted; a port from a shared range meets TIME_WAIT sockets left by
 * other client ports, whose timestamps are unrelated, and PAWS drops about half
 * of those SYNs. Otherwise (and for UDP/SCTP) a port of SNAT_PORT_MIN..MAX:
 * start at a hash of the client's tuple, probe linearly. On success `rk` is the
 * flow's reply key and `nat` its SNAT address and port.
 */
static __always_inline int np4_snat_alloc(void *ctx, const struct lb4_pkt *p, const struct ct4_entry *e,
					  struct ct4_key *rk, struct snat4_entry *nat, __u64 now)
{
	struct snat4_entry client = { .address = p->saddr, .port = p->sport };
	__u32 off = lb4_flow_hash(p) % NP4_SNAT_PORTS;
	int i;

	nat->address = node_snat4();
	nat->pad0 = 0;
	nat->port = p->sport;
	if (p->proto == IPPROTO_TCP && lb_ntohs(p->sport) >= SNAT_KEEP_PORT_MIN &&
	    lb_option(LB_CFG_SNAT_KEEP_CLIENT_PORT) && np4_snat_port_is_free(ctx, e, p->sport) &&
	    !np4_snat_claim(e, rk, nat, &client, p->proto, now))
		return 0;
#pragma unroll
	for (i = 0; i < SNAT_PORT_PROBES; i++) {
		nat->port = lb_htons(SNAT_PORT_MIN + off);
		if (!np4_snat_claim(e, rk, nat, &client, p->proto, now))
			return 0;
		off = off + 1 == NP4_SNAT_PORTS ? 0 : off + 1;
	}
	return -1;
}

/*
 * Make flow `e` (client -> frontend, to a remote backend) a SNATed one: a
 * source port (np4_snat_alloc), both SNAT halves, both conntrack entries.
 * Fail closed, as ct4_create: 0, or the REASON_* to drop the packet with.
 */
static __always_inline __u32 np4_snat_create(void *ctx, const struct lb4_pkt *p, struct ct4_key *fk,
					     struct ct4_entry *e, struct snat4_entry *nat, __u64 now)
{
	struct ct4_key rk;

	if (!node_snat4())
		return REASON_SNAT_EXHAUSTED;           /* no node address: no source replies could follow */
	e->flags |= CT_F_SNAT;
	if (np4_snat_alloc(ctx, p, e, &rk, nat, now))
		return REASON_SNAT_EXHAUSTED;
	if (lb4_snat.update(fk, nat) || ct4.update(fk, e) || ct4.update(&rk, e)) {
		ct4.delete(fk);
		lb4_snat.delete(fk);
		lb4_snat.delete(&rk);
		return REASON_CT_CREATE_FAILED;
	}
	return 0;
}

/* A client packet of tracked flow `e` was seen: refresh it, and carry new TCP
 * state to the reply entry too (whose key depends on SNAT). */
static __always_inline void np4_note_forward(const struct lb4_pkt *p, struct ct4_entry *e,
					     const struct snat4_entry *nat, __u64 now)
{
	struct ct4_entry *re;
	struct ct4_key rk;
	__u8 flags;

	e->last_seen_ns = now;
	flags = e->flags | ct4_tcp_flags(p, CT_DIR_FORWARD);
	if (flags == e->flags)
		return;
	ct_flags_add(&e->flags, flags);
	if (nat)
		np4_snat_reply_key(&rk, e, nat, p->proto);
	else
		ct4_key_reply_of(&rk, e, p->saddr, p->sport, p->proto);
	re = ct4.lookup(&rk);
	if (re)
		ct_flags_add(&re->flags, flags);
}

/* Remove every entry of a north-south flow, given its forward key and entry. */
static __always_inline void np4_delete_flow(struct ct4_key *fk, const struct ct4_entry *e)
{
	struct snat4_entry *nat;
	struct ct4_key rk;

	if (!(e->flags & CT_F_SNAT)) {
		ct4_delete_flow(fk, e);
		return;
	}
	nat = lb4_snat.lookup(fk);
	if (nat) {
		np4_snat_reply_key(&rk, e, nat, fk->proto);
		ct4.delete(&rk);
		lb4_snat.delete(&rk);
	}
	lb4_snat.delete(fk);
	ct4.delete(fk);
}

/* Translate a client packet of flow `e` towards its backend: DNAT, plus SNAT to `nat` when given. */
static __always_inline int np4_forward_xlate(struct __sk_buff *skb, struct lb4_pkt *p,
					     const struct ct4_entry *e, const struct snat4_entry *nat)
{
	__u32 bytes = skb->len;

	frag4_record(p);
	if (nat && lb4_rewrite_src(skb, p, nat->address, nat->port))
		return lb_drop(REASON_MALFORMED);
	if (lb4_rewrite_dst(skb, p, e->backend_addr, e->backend_port))
		return lb_drop(REASON_MALFORMED);
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return nat ? np4_redirect(skb, p) : TC_ACT_OK;
}

/* The frontend kinds that have an EXTERNAL twin: never looked up by their INTERNAL entry here. */
#define NP4_SVC_F_EXTERNAL_KINDS (LB_SVC_F_NODEPORT | LB_SVC_F_EXTERNAL_IP | LB_SVC_F_LOADBALANCER | LB_SVC_F_ADDRESS)

/*
 * The frontend a packet arriving from outside starts a flow to: an EXTERNAL
 * one (NodePort, externalIP, LoadBalancer IP), else a ClusterIP. kube-proxy
 * matches ClusterIPs in PREROUTING from any interface, so a static route or a
 * BGP-advertised service range that sends a ClusterIP to a node's uplink is
 * served (issue 17 item 2). The ClusterIP's own frontend is used, so its
 * backends follow internalTrafficPolicy, as kube-proxy's internal chain does;
 * the flow is then a north-south one like any other (DNAT for a local backend,
 * SNAT + DNAT for a remote one, whose reply must come back through this node).
 */
/*
 * The cluster's pod CIDR, kube-proxy's --cluster-cidr under its default
 * --detect-local-mode ClusterCIDR (the agent's --cluster-cidr: LB_CFG_CLUSTER_CIDR,
 * network and prefix length in lb_agent_cluster_cidr): traffic from it is "pod
 * traffic", which kube-proxy's external chain sends to the cluster-wide endpoints
 * even under externalTrafficPolicy Local. Without it (or a /0, kube-proxy's no-op
 * detector): no source is, and Local stays Local for everyone. Asked only for a
 * Local-policy external frontend.
 */
static __always_inline int np4_from_cluster(__be32 saddr)
{
	__u32 k0 = 0, k1 = 1;
	__u32 *net, *len;
	__u32 mask;

	if (!lb_option(LB_CFG_CLUSTER_CIDR))
		return 0;
	net = lb_agent_cluster_cidr.lookup(&k0);
	len = lb_agent_cluster_cidr.lookup(&k1);
	if (!net || !len || !*len || *len > 32)
		return 0;
	mask = 0xffffffffU << (32 - *len);
	return (lb_ntohl(saddr) & mask) == (*net & mask);
}

static __always_inline struct lb4_service *np4_lookup_frontend(const struct lb4_pkt *p)
{
	struct lb4_service *svc = lb4_lookup_frontend(p->daddr, p->dport, p->proto, LB_SCOPE_EXTERNAL);
	struct lb4_service *twin;

	/* A pod of another node to a Local-policy NodePort, externalIP or LB IP
	 * here: its INTERNAL twin, whose backends are the cluster-wide set (kube-proxy:
	 * "route traffic from within the cluster to cluster endpoints"). */
	if (svc && (svc->flags & LB_SVC_F_LOCAL_ONLY) && np4_from_cluster(p->saddr)) {
		twin = lb4_lookup_frontend(p->daddr, p->dport, p->proto, LB_SCOPE_INTERNAL);
		return twin ? twin : svc;
	}
	if (svc)
		return svc;
	svc = lb4_lookup_frontend(p->daddr, p->dport, p->proto, LB_SCOPE_INTERNAL);
	return svc && !(svc->flags & NP4_SVC_F_EXTERNAL_KINDS) ? svc : 0;
}

/*
 * Whether external traffic to a backend on this node under externalTrafficPolicy
 * Cluster is masqueraded to node_snat4(), as kube-proxy does (the agent's
 * --masquerade-external-to-local-backends), or keeps the client's address (the
 * default: better for the backend's logs and policies; docs/semantics.md).
 * A masqueraded flow to a local pod is sent to the pod's veth like a remote one
 * to the uplink (np4_redirect); its reply is translated back where it leaves
 * the pod (flow.h lb4_reply_to_node -> np4_snat_reply).
 *
 * Does a new north-south flow to `svc` on backend `be_flags` keep the client's address
 * (DNAT only)? Always under a Local policy; for a backend on this node unless `masquerade`
 * (lb_option(LB_CFG_MASQUERADE_LOCAL_BACKENDS), either family). Otherwise it is
 * SNATed to the node. A kept source's reply leaves through to_uplink, which restores the
 * frontend.
 */
static __always_inline int np_flow_keeps_source(const struct lb4_service *svc, __u8 be_flags, int masquerade)
{
	if (svc->flags & LB_SVC_F_LOCAL_ONLY)
		return 1;
	return (be_flags & LB_BE_F_LOCAL) && !masquerade;
}

/* A new flow to an EXTERNAL frontend or a ClusterIP, or a packet that is not ours (passes). */
static __always_inline int np4_forward_new(struct __sk_buff *skb, struct lb4_pkt *p,
					   struct ct4_key *fk, __u64 now)
{
	struct lb4_service *svc;
	struct lb4_backend *be;
	struct ct4_entry e = {};
	struct snat4_entry nat;
	int ret;

	svc = np4_lookup_frontend(p);
	if (!svc || (svc->flags & LB_SVC_F_ADDRESS))
		return TC_ACT_OK;                       /* another port of a node address: the node's own */
	if (p->frag == LB_FRAG_LATER)
		return lb_drop(REASON_FRAG_UNTRACKED);
	if (!lb4_source_allowed(svc, p->saddr))
		return lb_drop(REASON_SOURCE_RANGE);
	if (!svc->backend_count || !svc->maglev_size) {
		if (svc->flags & LB_SVC_F_LOCAL_ONLY)
			return lb_drop(REASON_NO_LOCAL_BACKEND);
		return lb4_reject(skb, p, REASON_NO_BACKEND);
	}
	if (!ct4_starts_flow(p))
		return TC_ACT_OK;                       /* mid-stream, not ours: the kernel's (ct.h) */

	be = lb4_flow_begin(svc, p, now, &e);
	if (!be)
		return lb_drop(REASON_NO_BACKEND);
	e.flags |= CT_F_NODEPORT;

	if (np_flow_keeps_source(svc, be->flags, lb_option(LB_CFG_MASQUERADE_LOCAL_BACKENDS))) {
		/* Source-preserving: the reply leaves through to_uplink, which restores the frontend. */
		if (ct4_create(fk, &e, p->saddr))
			return lb_drop(REASON_CT_CREATE_FAILED);
		lb4_affinity_update(svc, p->saddr, e.backend_id, now);
		return np4_forward_xlate(skb, p, &e, 0);
	}

	ret = np4_hop_left(skb, p);
	if (!ret)
		ret = np4_snat_create(skb, p, fk, &e, &nat, now);
	if (ret)
		return lb_drop(ret);
	lb4_affinity_update(svc, p->saddr, e.backend_id, now);
	return np4_forward_xlate(skb, p, &e, &nat);
}

/* A packet of a tracked north-south flow from the client side. */
static __always_inline int np4_forward_tracked(struct __sk_buff *skb, struct lb4_pkt *p,
					       struct ct4_key *fk, struct ct4_entry *e, __u64 now)
{
	struct snat4_entry *nat = 0;

	if (!lb4_flow_keeps_backend(e->backend_id, p->proto)) {
		/* As on the pod side: backend removed -> reset TCP, re-balance datagrams. */
		int ret;

		np4_delete_flow(fk, e);
		ret = lb4_backend_gone(skb, p);
		return ret == LB_REBALANCE ? np4_forward_new(skb, p, fk, now) : ret;
	}
	if (e->flags & CT_F_SNAT) {
		nat = lb4_snat.lookup(fk);
		if (!nat) {
			/* Half a flow (LRU evicted the SNAT entry): start over. */
			np4_delete_flow(fk, e);
			return np4_forward_new(skb, p, fk, now);
		}
	}

	np4_note_forward(p, e, nat, now);
	return np4_forward_xlate(skb, p, e, nat);
}

/* A backend's reply to a SNATed flow (backend -> node address:SNAT port), whose
 * client is `client`: back to client <- frontend, and out towards the client.
 * No map method calls of its own: flow.h calls it through a forward declaration,
 * and bcc rewrites `map.lookup()` only in functions defined before their first use. */
static __always_inline int np4_snat_reply_to(struct __sk_buff *skb, struct lb4_pkt *p, struct ct4_entry *e,
					     const struct snat4_entry *client, __u64 now)
{
	__u32 bytes = skb->len;

	ct4_note_reply(e, p, client->address, client->port, now);
	frag4_record(p);
	if (lb4_rewrite_dst(skb, p, client->address, client->port) ||
	    lb4_rewrite_src(skb, p, e->frontend_addr, e->frontend_port))
		return lb_drop(REASON_MALFORMED);
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return np4_redirect(skb, p);
}

/* A backend's reply to a SNATed flow (reply key `rk`): to its client (np4_snat_reply_to). */
static __always_inline int np4_snat_reply(struct __sk_buff *skb, struct lb4_pkt *p,
					  struct ct4_entry *e, struct ct4_key *rk, __u64 now)
{
	struct snat4_entry *client = lb4_snat.lookup(rk);

	return client ? np4_snat_reply_to(skb, p, e, client, now) : TC_ACT_OK;
}

/*
 * An ICMP error arriving for a SNATed flow, about a packet we sent to the
 * backend as node address:port -> backend (e.g. fragmentation needed on the
 * way, or the backend's port unreachable): make it the error the client would
 * get about its own packet to the frontend, and send it to the client.
 * Returns a verdict, or -1 when the error is not about such a flow.
 */
static __always_inline int np4_icmp_error_snat(struct __sk_buff *skb, struct lb4_pkt *p, __u64 now)
{
	__u32 icmp_csum = p->l4_off + ICMP_CSUM_OFF;
	struct lb4_icmp_quote q;
	struct snat4_entry *client;
	struct ct4_entry *e;
	struct ct4_key k;
	__be32 node = node_snat4();

	/* The quoted packet went node:port -> backend; its flow's reply key is the reverse. */
	if (!node || p->daddr != node || lb4_icmp_quote(skb, p, CT_DIR_REPLY, &q, &k) || q.ip.saddr != node)
		return -1;
	e = ct4_lookup(&k, now);
	if (!e || !(e->flags & CT_F_SNAT))
		return -1;
	client = lb4_snat.lookup(&k);
	if (!client)
		return -1;

	if (lb4_icmp_quote_rewrite(skb, icmp_csum, q.off, q.l4_off, q.end, q.ip.protocol, IP_SADDR_OFF, 0,
				   q.ip.saddr, client->address, q.ports[0], client->port) ||
	    lb4_icmp_quote_rewrite(skb, icmp_csum, q.off, q.l4_off, q.end, q.ip.protocol, IP_DADDR_OFF, 2,
				   q.ip.daddr, e->frontend_addr, q.ports[1], e->frontend_port))
		return lb_drop(REASON_MALFORMED);
	/* Outer header: to the client; from the frontend when the backend itself complained. */
	if (lb4_csum_store_addr(skb, p->l3_off, p->l3_off + IP_DADDR_OFF, p->daddr, client->address, 0, 0))
		return lb_drop(REASON_MALFORMED);
	p->daddr = client->address;
	if (p->saddr == q.ip.daddr) {
		if (lb4_csum_store_addr(skb, p->l3_off, p->l3_off + IP_SADDR_OFF, p->saddr, e->frontend_addr, 0, 0))
			return lb_drop(REASON_MALFORMED);
		p->saddr = e->frontend_addr;
	}
	return np4_redirect(skb, p);
}

/*
 * An ICMP error from outside about a reply we sent to a client (quoted:
 * frontend -> client), e.g. fragmentation needed on the way to the client or
 * the client's port unreachable: the backend must learn it. A source-preserving
 * flow gets the pod side's translation (quoted source and outer destination
 * become the backend) and the kernel delivers it; a SNATed flow's error becomes
 * one about backend -> node:port, from the node to the backend, and is sent there.
 * Returns a verdict, or -1 when the error is not about such a flow.
 */
static __always_inline int np4_icmp_error_reply(struct __sk_buff *skb, struct lb4_pkt *p, __u64 now)
{
	__u32 icmp_csum = p->l4_off + ICMP_CSUM_OFF;
	struct lb4_icmp_quote q;
	struct snat4_entry *nat;
	struct ct4_entry *e;
	struct ct4_key k;

	/* The quoted reply went frontend -> client: the flow's forward key is the reverse. */
	if (lb4_icmp_quote(skb, p, CT_DIR_FORWARD, &q, &k))
		return -1;
	e = ct4_lookup(&k, now);
	if (!e || !(e->flags & CT_F_NODEPORT))
		return -1;
	if (!(e->flags & CT_F_SNAT)) {
		if (lb4_icmp_error_xlate(skb, p, now, CT_DIR_FORWARD) < 0)
			return lb_drop(REASON_MALFORMED);
		return TC_ACT_OK;
	}
	nat = lb4_snat.lookup(&k);
	if (!nat)
		return -1;
	if (lb4_icmp_quote_rewrite(skb, icmp_csum, q.off, q.l4_off, q.end, q.ip.protocol, IP_SADDR_OFF, 0,
				   q.ip.saddr, e->backend_addr, q.ports[0], e->backend_port) ||
	    lb4_icmp_quote_rewrite(skb, icmp_csum, q.off, q.l4_off, q.end, q.ip.protocol, IP_DADDR_OFF, 2,
				   q.ip.daddr, nat->address, q.ports[1], nat->port) ||
	    lb4_csum_store_addr(skb, p->l3_off, p->l3_off + IP_DADDR_OFF, p->daddr, e->backend_addr, 0, 0) ||
	    lb4_csum_store_addr(skb, p->l3_off, p->l3_off + IP_SADDR_OFF, p->saddr, nat->address, 0, 0))
		return lb_drop(REASON_MALFORMED);
	p->daddr = e->backend_addr;
	p->saddr = nat->address;
	return np4_redirect(skb, p);
}

static __always_inline int np4_from_uplink(struct __sk_buff *skb)
{
	struct lb4_pkt p = {};
	struct ct4_key fk, rk;
	struct ct4_entry *e;
	__u64 now;
	int ret;

	ret = lb4_parse(skb, &p);
	if (ret != LB_PARSE_OK)
		return lb4_unparsed(ret);
	now = bpf_ktime_get_ns();
	if (p.proto == IPPROTO_ICMP) {
		ret = np4_icmp_error_snat(skb, &p, now);
		if (ret < 0)
			ret = np4_icmp_error_reply(skb, &p, now);
		return ret < 0 ? TC_ACT_OK : ret;
	}
	if (!lb4_proto_has_ports(p.proto))
		return TC_ACT_OK;
	if (p.frag == LB_FRAG_LATER && frag4_lookup_ports(&p)) {
		if (lb4_is_frontend_address(p.daddr, p.proto, LB_SCOPE_EXTERNAL))
			return lb_drop(REASON_FRAG_UNTRACKED);
		return TC_ACT_OK;
	}

	ct4_key_forward(&fk, &p);
	e = ct4.lookup(&fk);
	if (e && !(e->flags & CT_F_NODEPORT))
		e = 0;                                  /* a pod-side flow: not ours */
	if (e && ct4_flow_over(e, &p, now)) {
		np4_delete_flow(&fk, e);
		e = 0;
	}
	if (e)
		return np4_forward_tracked(skb, &p, &fk, e, now);

	if (p.daddr && p.daddr == node_snat4()) {
		ct4_key_reply(&rk, &p);
		e = ct4_lookup(&rk, now);
		if (e && (e->flags & CT_F_SNAT))
			return np4_snat_reply(skb, &p, e, &rk, now);
		if (e && lb4_is_host_flow(e))           /* a remote backend answering a node client */
			return lb4_host_reply(skb, &p, e, now);
	}
	return np4_forward_new(skb, &p, &fk, now);
}

/* host.h: the node's own packet to an externalIP or LoadBalancer IP it routes out here; -1 if not. */
static __always_inline int hs4_to_uplink(struct __sk_buff *skb, struct lb4_pkt *p, __u64 now);

static __always_inline int np4_to_uplink(struct __sk_buff *skb)
{
	struct lb4_pkt p = {};
	struct ct4_key rk;
	struct ct4_entry *e;
	__u32 bytes = skb->len;
	__u64 now;
	int ret;

	ret = lb4_parse(skb, &p);
	if (ret != LB_PARSE_OK)
		return lb4_unparsed(ret);
	now = bpf_ktime_get_ns();
	if (p.proto == IPPROTO_ICMP) {
		/* A local backend's error about a source-preserving flow: about the frontend. */
		if (lb4_icmp_error_rev_nat(skb, &p, now) < 0)
			return lb_drop(REASON_MALFORMED);
		return TC_ACT_OK;
	}
	if (!lb4_proto_has_ports(p.proto))
		return TC_ACT_OK;
	if (p.frag == LB_FRAG_LATER && frag4_lookup_ports(&p))
		return TC_ACT_OK;

	ct4_key_reply(&rk, &p);
	e = ct4_lookup(&rk, now);
	if (!e || (e->flags & (CT_F_NODEPORT | CT_F_SNAT)) != CT_F_NODEPORT) {
		ret = hs4_to_uplink(skb, &p, now);
		return ret < 0 ? TC_ACT_OK : ret;
	}
	/* A SYN-ACK on a flow that is over answers a connection that did not come
	 * through the frontend (its SYN would have restarted the flow), e.g. the
	 * client reaching the pod directly with the same ports: not ours. */
	if (p.proto == IPPROTO_TCP && ct4_closing(e->flags) && (p.tcp_flags & LB_TCP_SYN))
		return TC_ACT_OK;
	return lb4_reply_rev_nat(skb, &p, e, bytes, now);
}

#endif /* EBPFSVC_NODEPORT_H */
