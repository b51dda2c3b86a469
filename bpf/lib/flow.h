/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The ClusterIP packet path of the pod-facing hooks, built from the other
 * headers:
 *
 *   lb4_from_pod: pod -> world. An established flow keeps its backend (CT
 *     forward entry); otherwise a frontend (scope INTERNAL) starts a flow:
 *     reject if it has no backends, else pick one (affinity, Maglev or random),
 *     create conntrack (fail closed), DNAT. A TCP segment other than a SYN
 *     starts nothing (ct4_starts_flow): a connection kube-proxy translated
 *     stays with the kernel's conntrack. Anything else passes untouched.
 *   lb4_to_pod: world -> pod. A reply of a tracked flow gets the frontend back
 *     as its source; an ICMP error about a tracked flow is translated back.
 */
#ifndef EBPFSVC_FLOW_H
#define EBPFSVC_FLOW_H

/* Verdict for what the parser refused: pass what is not ours (ARP, IPv6...), drop
 * what is broken, since offsets from a lying header would make us write blind. */
static __always_inline int lb4_unparsed(int ret)
{
	return ret == LB_PARSE_PASS ? TC_ACT_OK : lb_drop(REASON_MALFORMED);
}

/* ICMP on a pod hook: errors about our flows are translated (`dir`: whose
 * conntrack entry the quoted packet is looked up in), the rest passes. */
static __always_inline int lb4_icmp(struct __sk_buff *skb, struct lb4_pkt *p, __u8 dir)
{
	if (lb4_icmp_error_xlate(skb, p, bpf_ktime_get_ns(), dir) < 0)
		return lb_drop(REASON_MALFORMED);
	return TC_ACT_OK;
}

/* Translate a client packet of flow `e` towards its backend. */
static __always_inline int lb4_forward_xlate(struct __sk_buff *skb, struct lb4_pkt *p,
					     const struct ct4_entry *e)
{
	__u32 bytes = skb->len;

	frag4_record(p);
	if ((e->flags & CT_F_HAIRPIN) && lb4_rewrite_src(skb, p, node_hairpin4(), p->sport))
		return lb_drop(REASON_MALFORMED);
	if (lb4_rewrite_dst(skb, p, e->backend_addr, e->backend_port))
		return lb_drop(REASON_MALFORMED);
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return TC_ACT_OK;
}

/*
 * Pick the backend of a new flow to `svc` (a fresh affinity entry first, then
 * the frontend's table) and describe the flow in `e` (flags: the TCP state
 * seen so far). 0 when the table names a missing backend. Shared by the pod
 * (flow.h) and uplink (nodeport.h) hooks, so both balance alike.
 */
static __always_inline struct lb4_backend *lb4_flow_begin(const struct lb4_service *svc,
							  const struct lb4_pkt *p, __u64 now,
							  struct ct4_entry *e)
{
	struct lb4_backend *be = 0;
	__u32 id;

	id = lb4_affinity_backend(svc, p->saddr, now);
	if (id) {
		be = lb4_backends.lookup(&id);
		if (be && (be->flags & LB_BE_F_NO_NEW_FLOWS))
			be = 0;         /* affinity never outlives termination or readiness */
	}
	if (!be)
		be = lb4_select_backend(svc, p, &id);
	if (!be)
		return 0;

	e->last_seen_ns = now;
	e->backend_id = id;
	e->service_id = svc->service_id;
	e->frontend_id = svc->frontend_id;
	e->frontend_addr = p->daddr;
	e->frontend_port = p->dport;
	e->backend_addr = be->address;
	e->backend_port = be->port;
	e->flags = ct4_tcp_flags(p, CT_DIR_FORWARD);
	return be;
}

/* No flow yet: balance a packet to a frontend, or let it pass. */
static __always_inline int lb4_forward_new(struct __sk_buff *skb, struct lb4_pkt *p,
					   struct ct4_key *fk, struct lb_clock *clk)
{
	__u64 now;
	struct lb4_service *svc;
	struct lb4_backend *be = 0;
	struct ct4_entry e = {};
	__be32 reply_daddr = p->saddr;
	__be32 hairpin;
	__u32 id;

	svc = lb4_lookup_frontend(p->daddr, p->dport, p->proto, LB_SCOPE_INTERNAL);
	if (!svc || (svc->flags & LB_SVC_F_ADDRESS))
		return TC_ACT_OK;                       /* not a Service: not ours */
	if (p->frag == LB_FRAG_LATER)
		return lb_drop(REASON_FRAG_UNTRACKED);  /* a later fragment cannot start a flow */
	if (!svc->backend_count || !svc->maglev_size) {
		if (svc->flags & LB_SVC_F_LOCAL_ONLY)
			return lb_drop(REASON_NO_LOCAL_BACKEND);
		return lb4_reject(skb, p, REASON_NO_BACKEND);
	}
	if (!ct4_starts_flow(p))
		return TC_ACT_OK;                       /* mid-stream, not ours: the kernel's (ct.h) */

	now = lb_clock_ns(clk);            /* a Service's flow begins: stamp it */
	be = lb4_flow_begin(svc, p, now, &e);
	if (!be)
		return lb_drop(REASON_NO_BACKEND);      /* table names a missing backend: writer bug */
	id = e.backend_id;
	hairpin = node_hairpin4();
	if (hairpin && be->address == p->saddr) {
		e.flags |= CT_F_HAIRPIN;
		reply_daddr = hairpin;
	}
	if (ct4_create(fk, &e, reply_daddr))
		return lb_drop(REASON_CT_CREATE_FAILED);
	lb4_affinity_update(svc, p->saddr, id, now);
	return lb4_forward_xlate(skb, p, &e);
}

#define LB_REBALANCE (-1000)  /* not a TC verdict (those are -1..8): "balance this flow again" */

/*
 * A tracked flow whose backend was removed, or a UDP flow whose backend is not
 * ready (lb4_flow_keeps_backend; its flow entries already deleted).
 * A TCP connection cannot move to another backend (it would answer with RST
 * anyway): reset it now rather than let the client time out. A datagram flow
 * has no state on the backend: LB_REBALANCE tells the caller to balance it
 * again, unless this is a later fragment, which cannot start a flow.
 */
static __always_inline int lb4_backend_gone(struct __sk_buff *skb, struct lb4_pkt *p)
{
	if (p->proto == IPPROTO_TCP)
		return lb4_reject(skb, p, REASON_BACKEND_GONE);
	if (p->frag == LB_FRAG_LATER)
		return lb_drop(REASON_BACKEND_GONE);
	return LB_REBALANCE;
}

/* A client packet of tracked flow `e` was seen: refresh it, and carry new TCP
 * state to the reply entry too. */
static __always_inline void lb4_note_forward(const struct lb4_pkt *p, struct ct4_entry *e, __u64 now)
{
	struct ct4_key rk;
	struct ct4_entry *re;
	__u8 flags;

	ct4_touch(e, now);
	flags = e->flags | ct4_tcp_flags(p, CT_DIR_FORWARD);
	if (flags == e->flags)
		return;
	ct_flags_add(&e->flags, flags);
	ct4_key_reply_of(&rk, e, (flags & CT_F_HAIRPIN) ? node_hairpin4() : p->saddr, p->sport, p->proto);
	re = ct4.lookup(&rk);
	if (re)
		ct_flags_add(&re->flags, flags);
}

/* The loopback device's ifindex: 1 in every network namespace (the kernel's LOOPBACK_IFINDEX). */
#define LB_LOOPBACK_IFINDEX 1

/*
 * Hand a packet whose source is one of the node's own addresses to the local
 * stack, through lo's ingress. Arriving on any other device it would be a
 * martian (the kernel drops a packet from a local address unless that device
 * has accept_local); lo is where the agent sets accept_local
 * (ebpfsvc/datapath/hostpath.py), and, by the kernel's code, the one device
 * where such a packet also passes rp_filter. lo's MAC address is all zeros:
 * the frame gets it as destination, so it counts as the host's.
 */
static __always_inline int lb4_to_loopback(struct __sk_buff *skb)
{
	__u8 zero[2 * ETH_ALEN] = {};

	if (bpf_skb_store_bytes(skb, 0, zero, sizeof(zero), 0))
		return lb_drop(REASON_MALFORMED);
	return bpf_redirect(LB_LOOPBACK_IFINDEX, BPF_F_INGRESS);
}

/* Reverse NAT of a backend's reply to a node client (reply entry `e`): the
 * frontend back as source. 0, or -1 when the packet cannot be rewritten. */
static __always_inline int lb4_host_reply_xlate(struct __sk_buff *skb, struct lb4_pkt *p, struct ct4_entry *e,
						__u64 now)
{
	__u32 bytes = skb->len;

	ct4_note_reply(e, p, p->daddr, p->dport, now);
	if (lb4_rewrite_src(skb, p, e->frontend_addr, e->frontend_port))
		return -1;
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return 0;
}

/*
 * A backend's reply to a client in the node's own namespace (a flow host.h
 * made: node address -> frontend), whose reply entry `e` was found: the
 * frontend back as source, and the kernel delivers it to the client's socket.
 * When the frontend is the node's own address (a NodePort the node reached
 * itself, host.h hs4_from_loopback), source and destination are now both the
 * node's: in through lo (lb4_to_loopback).
 */
static __always_inline int lb4_host_reply(struct __sk_buff *skb, struct lb4_pkt *p, struct ct4_entry *e,
					  __u64 now)
{
	if (lb4_host_reply_xlate(skb, p, e, now))
		return lb_drop(REASON_MALFORMED);
	if (p->saddr == p->daddr)
		return lb4_to_loopback(skb);
	return TC_ACT_OK;
}

/* Is `e`, found by a reply key addressed to the node, a host.h flow? Pod-side
 * flows answer pods (or the hairpin address); north-south ones carry CT_F_NODEPORT. */
static __always_inline int lb4_is_host_flow(const struct ct4_entry *e)
{
	return !(e->flags & (CT_F_NODEPORT | CT_F_HAIRPIN));
}

/* A packet of a tracked flow from the client side. */
static __always_inline int lb4_forward_tracked(struct __sk_buff *skb, struct lb4_pkt *p,
					       struct ct4_key *fk, struct ct4_entry *e, __u64 now)
{
	if (!lb4_flow_keeps_backend(e->backend_id, p->proto)) {
		int ret;

		ct4_delete_flow(fk, e);
		ret = lb4_backend_gone(skb, p);
		return ret == LB_REBALANCE ? lb4_forward_new(skb, p, fk, &(struct lb_clock){ .ns = now }) : ret;
	}

	lb4_note_forward(p, e, now);
	return lb4_forward_xlate(skb, p, e);
}

/* A hairpin reply (backend -> the hairpin address), reply entry `e`, leaves the pod
 * that is also the client: restore VIP:port as source and the pod itself as
 * destination. */
static __always_inline int lb4_hairpin_reply(struct __sk_buff *skb, struct lb4_pkt *p, struct ct4_entry *e,
					     __u64 now)
{
	__u32 bytes = skb->len;

	ct4_note_reply(e, p, p->saddr, p->dport, now);
	frag4_record(p);        /* a fragmented reply: its later fragments need the same translation */
	if (lb4_rewrite_dst(skb, p, p->saddr, p->dport) ||
	    lb4_rewrite_src(skb, p, e->frontend_addr, e->frontend_port))
		return lb_drop(REASON_MALFORMED);
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return TC_ACT_OK;
}

/*
 * A pod's packet to a node-owned address we translate for: the hairpin address, or the
 * node address (node_snat4()), often the same one (the agent's default, as
 * kube-proxy masquerades hairpin flows to a node address). Its reply entry says
 * whose reply it is: a hairpin flow's, or a node client's (host.h) to a local
 * backend. LB_NOT_A_REPLY: neither; the caller goes on (a new connection to a
 * NodePort on that address, or plain traffic such as a kubelet probe's answer).
 */
#define LB_NOT_A_REPLY (-1001)   /* not a TC verdict */

/* nodeport.h: a backend's reply to a SNATed north-south flow, back to its client. */
static __always_inline int np4_snat_reply_to(struct __sk_buff *skb, struct lb4_pkt *p, struct ct4_entry *e,
					     const struct snat4_entry *client, __u64 now);

static __always_inline int lb4_reply_to_node(struct __sk_buff *skb, struct lb4_pkt *p, struct lb_clock *clk)
{
	__be32 hairpin = node_hairpin4(), node = node_snat4();
	struct snat4_entry *client;
	struct ct4_key rk;
	struct ct4_entry *e;
	__u64 now;

	if (!((hairpin && p->daddr == hairpin) || (node && p->daddr == node)))
		return LB_NOT_A_REPLY;
	ct4_key_reply(&rk, p);
	e = ct4_lookup_at(&rk, clk);
	if (!e)
		return LB_NOT_A_REPLY;
	now = lb_clock_ns(clk);
	if (hairpin && p->daddr == hairpin && (e->flags & CT_F_HAIRPIN))
		return lb4_hairpin_reply(skb, p, e, now);
	if (node && p->daddr == node && lb4_is_host_flow(e))
		return lb4_host_reply(skb, p, e, now);
	/* A local pod answering external traffic the uplink masqueraded to it
	 * (--masquerade-external-to-local-backends): to the client, from the frontend. */
	if (node && p->daddr == node &&
	    (e->flags & (CT_F_NODEPORT | CT_F_SNAT)) == (CT_F_NODEPORT | CT_F_SNAT)) {
		client = lb4_snat.lookup(&rk);
		return client ? np4_snat_reply_to(skb, p, e, client, now) : TC_ACT_OK;
	}
	return LB_NOT_A_REPLY;
}

/* `m`: the sending socket's mark when the socket path translated it (lib/sock.h), else 0. */
static __always_inline int lb4_from_pod(struct __sk_buff *skb, const struct lb_sock_path *m)
{
	struct lb4_pkt p = {};
	struct ct4_key fk;
	struct ct4_entry *e;
	struct lb_clock clk = {};        /* read only if a decision needs it */
	int ret;

	ret = lb4_parse(skb, &p);
	if (ret != LB_PARSE_OK)
		return lb4_unparsed(ret);
	if (lb4_sock_path_packet(skb, m, &p))
		return TC_ACT_OK;               /* translated at connect() (sock.h) */
	if (p.proto == IPPROTO_ICMP)
		return lb4_icmp(skb, &p, CT_DIR_FORWARD);
	if (!lb4_proto_has_ports(p.proto))
		return TC_ACT_OK;
	if (p.frag == LB_FRAG_LATER && frag4_lookup_ports(&p)) {
		if (lb4_is_frontend_address(p.daddr, p.proto, LB_SCOPE_INTERNAL))
			return lb_drop(REASON_FRAG_UNTRACKED);
		return TC_ACT_OK;
	}

	e = ct4_flow_of_at(&fk, &p, &clk);
	if (e)
		return lb4_forward_tracked(skb, &p, &fk, e, lb_clock_ns(&clk));
	ret = lb4_reply_to_node(skb, &p, &clk);
	if (ret != LB_NOT_A_REPLY)
		return ret;
	return lb4_forward_new(skb, &p, &fk, &clk);
}

/* A backend's reply of a tracked flow, on its way back to the client: noted in the
 * flow's entry, its ports kept for later fragments, its source rewritten to the
 * frontend (rev-NAT), counted. One helper, so a reply leaving through a pod veth
 * (lb4_to_pod) and one of a source-preserving NodePort flow leaving through the
 * uplink (np4_to_uplink) cannot be translated two ways. */
static __always_inline int lb4_reply_rev_nat(struct __sk_buff *skb, struct lb4_pkt *p,
					     struct ct4_entry *e, __u32 bytes, __u64 now)
{
	ct4_note_reply(e, p, p->daddr, p->dport, now);
	frag4_record(p);
	if (lb4_rewrite_src(skb, p, e->frontend_addr, e->frontend_port))
		return lb_drop(REASON_MALFORMED);
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return TC_ACT_OK;
}

static __always_inline int lb4_to_pod(struct __sk_buff *skb, const struct lb_sock_path *m)
{
	struct lb4_pkt p = {};
	struct ct4_key rk;
	struct ct4_entry *e;
	struct lb_clock clk = {};        /* read only if a decision needs it */
	__u32 bytes = skb->len;
	int ret;

	ret = lb4_parse(skb, &p);
	if (ret != LB_PARSE_OK)
		return lb4_unparsed(ret);
	if (lb4_sock_path_packet(skb, m, &p))
		return TC_ACT_OK;               /* a node process's translated socket (sock.h) */
	if (p.proto == IPPROTO_ICMP)
		return lb4_icmp(skb, &p, CT_DIR_REPLY);
	if (!lb4_proto_has_ports(p.proto))
		return TC_ACT_OK;
	if (p.frag == LB_FRAG_LATER && frag4_lookup_ports(&p))
		return TC_ACT_OK;                       /* cannot tell whose: leave it */

	ct4_key_reply(&rk, &p);
	e = ct4_lookup_at(&rk, &clk);
	if (!e || ct4_reply_of_other_flow(e, &p))
		return TC_ACT_OK;
	return lb4_reply_rev_nat(skb, &p, e, bytes, lb_clock_ns(&clk));
}

/* ---- IPv6 twins of the pod-side path: DNAT, conntrack, reverse NAT, affinity,
 * reject, fragments, hairpin SNAT (to node_hairpin6()). ICMPv6 errors about
 * translated flows are translated back; other ICMPv6 (neighbour discovery
 * included) and whatever is not for a Service pass untouched. ---- */

/* ICMPv6 on a pod hook: as lb4_icmp. */
static __always_inline int lb6_icmp(struct __sk_buff *skb, struct lb6_pkt *p, __u8 dir)
{
	if (lb6_icmp_error_xlate(skb, p, bpf_ktime_get_ns(), dir) < 0)
		return lb_drop(REASON_MALFORMED);
	return TC_ACT_OK;
}

static __always_inline int lb6_forward_xlate(struct __sk_buff *skb, struct lb6_pkt *p,
					     const struct ct6_entry *e)
{
	__u32 bytes = skb->len;
	__be32 hairpin[4];

	frag6_record(p);
	if ((e->flags & CT_F_HAIRPIN) && !node_hairpin6(hairpin) && lb6_rewrite_src(skb, p, hairpin, p->sport))
		return lb_drop(REASON_MALFORMED);
	if (lb6_rewrite_dst(skb, p, e->backend_addr, e->backend_port))
		return lb_drop(REASON_MALFORMED);
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return TC_ACT_OK;
}

/* As lb4_flow_begin. */
static __always_inline struct lb6_backend *lb6_flow_begin(const struct lb4_service *svc,
							  const struct lb6_pkt *p, __u64 now,
							  struct ct6_entry *e)
{
	struct lb6_backend *be = 0;
	__u32 id;

	id = lb6_affinity_backend(svc, p->saddr, now);
	if (id) {
		be = lb6_backends.lookup(&id);
		if (be && (be->flags & LB_BE_F_NO_NEW_FLOWS))
			be = 0;
	}
	if (!be)
		be = lb6_select_backend(svc, p, &id);
	if (!be)
		return 0;

	e->last_seen_ns = now;
	e->backend_id = id;
	e->service_id = svc->service_id;
	e->frontend_id = svc->frontend_id;
	lb6_addr_copy(e->frontend_addr, p->daddr);
	e->frontend_port = p->dport;
	lb6_addr_copy(e->backend_addr, be->address);
	e->backend_port = be->port;
	e->flags = ct6_tcp_flags(p, CT_DIR_FORWARD);
	return be;
}

static __always_inline int lb6_forward_new(struct __sk_buff *skb, struct lb6_pkt *p,
					   struct ct6_key *fk, struct lb_clock *clk)
{
	__u64 now;
	const __be32 *reply_daddr = p->saddr;
	struct lb4_service *svc;
	struct lb6_backend *be;
	struct ct6_entry e = {};
	__be32 hairpin[4];

	svc = lb6_lookup_frontend(p->daddr, p->dport, p->proto, LB_SCOPE_INTERNAL);
	if (!svc || (svc->flags & LB_SVC_F_ADDRESS))
		return TC_ACT_OK;
	if (p->frag == LB_FRAG_LATER)
		return lb_drop(REASON_FRAG_UNTRACKED);
	if (!svc->backend_count || !svc->maglev_size) {
		if (svc->flags & LB_SVC_F_LOCAL_ONLY)
			return lb_drop(REASON_NO_LOCAL_BACKEND);
		return lb6_reject(skb, p, REASON_NO_BACKEND);
	}
	if (!ct6_starts_flow(p))
		return TC_ACT_OK;

	now = lb_clock_ns(clk);            /* a Service's flow begins: stamp it */
	be = lb6_flow_begin(svc, p, now, &e);
	if (!be)
		return lb_drop(REASON_NO_BACKEND);
	if (!node_addr6_diff(be->address, p->saddr) && !node_hairpin6(hairpin)) {
		e.flags |= CT_F_HAIRPIN;        /* as lb4_forward_new: the pod is its own backend */
		reply_daddr = hairpin;
	}
	if (ct6_create(fk, &e, reply_daddr))
		return lb_drop(REASON_CT_CREATE_FAILED);
	lb6_affinity_update(svc, p->saddr, e.backend_id, now);
	return lb6_forward_xlate(skb, p, &e);
}

static __always_inline void lb6_note_forward(const struct lb6_pkt *p, struct ct6_entry *e, __u64 now)
{
	struct ct6_key rk;
	struct ct6_entry *re;
	__be32 hairpin[4];
	__u8 flags;

	ct6_touch(e, now);
	flags = e->flags | ct6_tcp_flags(p, CT_DIR_FORWARD);
	if (flags == e->flags)
		return;
	ct_flags_add(&e->flags, flags);
	if ((flags & CT_F_HAIRPIN) && !node_hairpin6(hairpin))
		ct6_key_reply_of(&rk, e, hairpin, p->sport, p->proto);
	else
		ct6_key_reply_of(&rk, e, p->saddr, p->sport, p->proto);
	re = ct6.lookup(&rk);
	if (re)
		ct_flags_add(&re->flags, flags);
}

/* As lb4_forward_tracked and lb4_backend_gone. */
static __always_inline int lb6_forward_tracked(struct __sk_buff *skb, struct lb6_pkt *p,
					       struct ct6_key *fk, struct ct6_entry *e, __u64 now)
{
	if (!lb6_flow_keeps_backend(e->backend_id, p->proto)) {
		ct6_delete_flow(fk, e);
		if (p->proto == IPPROTO_TCP)
			return lb6_reject(skb, p, REASON_BACKEND_GONE);
		if (p->frag == LB_FRAG_LATER)
			return lb_drop(REASON_BACKEND_GONE);
		return lb6_forward_new(skb, p, fk, &(struct lb_clock){ .ns = now });
	}
	lb6_note_forward(p, e, now);
	return lb6_forward_xlate(skb, p, e);
}

/* As lb4_hairpin_reply: the pod's reply to the hairpin address becomes VIP:port -> the pod. */
static __always_inline int lb6_hairpin_reply(struct __sk_buff *skb, struct lb6_pkt *p, struct ct6_entry *e,
					     __u64 now)
{
	__u32 bytes = skb->len;

	ct6_note_reply(e, p, p->saddr, p->dport, now);
	frag6_record(p);
	if (lb6_rewrite_dst(skb, p, p->saddr, p->dport) ||
	    lb6_rewrite_src(skb, p, e->frontend_addr, e->frontend_port))
		return lb_drop(REASON_MALFORMED);
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return TC_ACT_OK;
}

/* As lb4_is_host_flow. */
static __always_inline int lb6_is_host_flow(const struct ct6_entry *e)
{
	return !(e->flags & (CT_F_NODEPORT | CT_F_HAIRPIN));
}

/* As lb4_host_reply_xlate: a backend's reply to a node client (host.h hs6_*), reply
 * entry `e`, gets the frontend back as its source; the kernel delivers it to the
 * client's socket. 0, or -1 when the packet cannot be rewritten. */
static __always_inline int lb6_host_reply_xlate(struct __sk_buff *skb, struct lb6_pkt *p, struct ct6_entry *e,
						__u64 now)
{
	__u32 bytes = skb->len;

	ct6_note_reply(e, p, p->daddr, p->dport, now);
	if (lb6_rewrite_src(skb, p, e->frontend_addr, e->frontend_port))
		return -1;
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return 0;
}

/* What lb6_merge_paths reads back; per CPU, filled and read by the same packet. */
struct lb6_merge {
	__u32 l4_off;
	__u8  proto;
	__u8  frag;
};
BPF_PERCPU_ARRAY(lb6_merge_scratch, struct lb6_merge, 1);

/*
 * The parser's walk of extension headers ends on many paths, each with its own
 * constant L4 offset, protocol and fragment state, and the verifier checks what
 * follows once per path. Read back through a per-CPU map they are values it
 * does not know, and the paths merge. Used by the uplink's parse (nodeport6.h
 * np6_parse) and where the pod path goes on to the replies to the node
 * (lb6_reply_to_node), which would otherwise not fit the verifier's budget
 * (E2BIG). -1: no scratch.
 */
static __always_inline int lb6_merge_paths(struct lb6_pkt *p)
{
	__u32 zero = 0;
	struct lb6_merge *m = lb6_merge_scratch.lookup(&zero);

	if (!m)
		return -1;
	*(volatile __u32 *)&m->l4_off = p->l4_off;
	*(volatile __u8 *)&m->proto = p->proto;
	*(volatile __u8 *)&m->frag = p->frag;
	p->l4_off = *(volatile __u32 *)&m->l4_off;
	p->proto = *(volatile __u8 *)&m->proto;
	p->frag = *(volatile __u8 *)&m->frag;
	return 0;
}

/* nodeport6.h: as np4_snat_reply_to. */
static __always_inline int np6_snat_reply_to(struct __sk_buff *skb, struct lb6_pkt *p, struct ct6_entry *e,
					     const struct snat6_entry *client, __u64 now);

/* As lb4_reply_to_node: a pod's packet to the node's IPv6 hairpin address that is
 * the reply of a hairpin flow, or to its IPv6 node address (node_snat6()) that is
 * a local backend's reply to a node client; LB_NOT_A_REPLY otherwise. */
static __always_inline int lb6_reply_to_node(struct __sk_buff *skb, struct lb6_pkt *p, struct lb_clock *clk)
{
	const struct lb_node_addrs *a = node_addrs();
	struct ct6_key rk;
	struct ct6_entry *e;
	__u32 to_hairpin, to_node;      /* 0: the packet is addressed to it */
	__u64 now;

	if (!a)
		return LB_NOT_A_REPLY;
	/* An unset (all-zero) node address matches only the unspecified address, which
	 * no reply is sent to: no separate "is it set" test needed. */
	to_hairpin = node_addr6_diff(p->daddr, a->hairpin6);
	to_node = node_addr6_diff(p->daddr, a->snat6);
	if ((to_hairpin && to_node) || lb6_merge_paths(p))
		return LB_NOT_A_REPLY;
	ct6_key_reply(&rk, p);
	e = ct6_lookup_at(&rk, clk);
	if (!e)
		return LB_NOT_A_REPLY;
	now = lb_clock_ns(clk);
	if (e->flags & CT_F_HAIRPIN)
		return to_hairpin ? LB_NOT_A_REPLY : lb6_hairpin_reply(skb, p, e, now);
	if (!to_node && lb6_is_host_flow(e))
		return lb6_host_reply_xlate(skb, p, e, now) ? lb_drop(REASON_MALFORMED) : TC_ACT_OK;
	/* As lb4_reply_to_node: a local pod answering external traffic the uplink masqueraded
	 * to it (--masquerade-external-to-local-backends, which compiles only the uplink's side). */
	if (!to_node &&
	    (e->flags & (CT_F_NODEPORT | CT_F_SNAT)) == (CT_F_NODEPORT | CT_F_SNAT)) {
		const struct snat6_entry *client = lb6_snat.lookup(&rk);

		return client ? np6_snat_reply_to(skb, p, e, client, now) : TC_ACT_OK;
	}
	return LB_NOT_A_REPLY;
}

static __always_inline int lb6_from_pod(struct __sk_buff *skb)
{
	struct lb6_pkt p = {};
	struct ct6_key fk;
	struct ct6_entry *e;
	struct lb_clock clk = {};        /* read only if a decision needs it */
	int ret;

	ret = lb6_parse(skb, &p);
	if (ret != LB_PARSE_OK)
		return lb4_unparsed(ret);
	if (p.proto == LB_IPPROTO_ICMPV6)
		return lb6_icmp(skb, &p, CT_DIR_FORWARD);
	if (!lb4_proto_has_ports(p.proto))
		return TC_ACT_OK;
	if (p.frag == LB_FRAG_LATER && frag6_lookup_ports(&p)) {
		if (lb6_is_frontend_address(p.daddr, p.proto, LB_SCOPE_INTERNAL))
			return lb_drop(REASON_FRAG_UNTRACKED);
		return TC_ACT_OK;
	}

	e = ct6_flow_of_at(&fk, &p, &clk);
	if (e)
		return lb6_forward_tracked(skb, &p, &fk, e, lb_clock_ns(&clk));
	ret = lb6_reply_to_node(skb, &p, &clk);
	if (ret != LB_NOT_A_REPLY)
		return ret;
	return lb6_forward_new(skb, &p, &fk, &clk);
}

/* As lb4_reply_rev_nat: one translation of a reply for lb6_to_pod and np6_to_uplink. */
static __always_inline int lb6_reply_rev_nat(struct __sk_buff *skb, struct lb6_pkt *p,
					     struct ct6_entry *e, __u32 bytes, __u64 now)
{
	ct6_note_reply(e, p, p->daddr, p->dport, now);
	frag6_record(p);
	if (lb6_rewrite_src(skb, p, e->frontend_addr, e->frontend_port))
		return lb_drop(REASON_MALFORMED);
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return TC_ACT_OK;
}

static __always_inline int lb6_to_pod(struct __sk_buff *skb)
{
	struct lb6_pkt p = {};
	struct ct6_key rk;
	struct ct6_entry *e;
	struct lb_clock clk = {};        /* read only if a decision needs it */
	__u32 bytes = skb->len;
	int ret;

	ret = lb6_parse(skb, &p);
	if (ret != LB_PARSE_OK)
		return lb4_unparsed(ret);
	if (p.proto == LB_IPPROTO_ICMPV6)
		return lb6_icmp(skb, &p, CT_DIR_REPLY);
	if (!lb4_proto_has_ports(p.proto))
		return TC_ACT_OK;
	if (p.frag == LB_FRAG_LATER && frag6_lookup_ports(&p))
		return TC_ACT_OK;

	ct6_key_reply(&rk, &p);
	e = ct6_lookup_at(&rk, &clk);
	if (!e || ct6_reply_of_other_flow(e, &p))
		return TC_ACT_OK;
	return lb6_reply_rev_nat(skb, &p, e, bytes, lb_clock_ns(&clk));
}

#endif /* EBPFSVC_FLOW_H */
