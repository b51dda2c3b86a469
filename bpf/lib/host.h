/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Clients in the node's own network namespace (hostNetwork pods, node
 * daemons), which kube-proxy serves from iptables' OUTPUT chain. Their packets
 * meet neither a pod veth nor an uplink's ingress, so they are met where they
 * leave, at three places (docs/northsouth.md, "Node clients"):
 *
 *   hs4_from_host      egress of the agent's device ebpfsvc0, where the agent
 *                      routes the service CIDRs (source: the node address,
 *                      node_snat4()): ClusterIPs;
 *   hs4_from_loopback  egress of lo: the node's own address, node_snat4(),
 *                      from itself (NodePorts on it, an externalIP or
 *                      LoadBalancer IP that is that address);
 *   hs4_to_uplink      egress of an uplink (called by np4_to_uplink): the
 *                      node's packets to an externalIP or LoadBalancer IP that
 *                      the node routes out, caught on their service port only,
 *                      as kube-proxy's OUTPUT rules match address and port.
 *
 * All three do the same (hs4_forward): a tracked flow keeps its backend (a
 * removed backend: TCP reset into the host, UDP balanced again); otherwise an
 * INTERNAL frontend starts one as on the pod side (source ranges, affinity,
 * Maglev or random, conntrack, fail closed). INTERNAL frontends of NodePorts,
 * externalIPs and LoadBalancer IPs hold every endpoint of the cluster, so an
 * externalTrafficPolicy Local Service is served from the node by any endpoint,
 * as kube-proxy sends node-originated traffic to its cluster chain. No
 * backend: rejected into the host (RST / port unreachable). Then DNAT, and
 * out towards the backend (hs4_send: FIB lookup, redirect; no hop, the packet
 * is the node's own).
 *
 * Replies come back through a pod veth (local backend: lb4_from_pod), the
 * uplink (remote backend: np4_from_uplink) or lo (a backend on the node's own
 * address), addressed to the node; each finds the flow by its reply key and
 * restores the frontend as source (lb4_host_reply), handing the packet in
 * through lo when that source is the node's own address. A backend on the
 * node address itself (a hostNetwork endpoint of this node) is a local
 * destination: the packet goes in through lo, and its replies pass lo's egress
 * (hs4_from_loopback). Not handled: fragments (dropped on ebpfsvc0, passed
 * elsewhere), clients from another source than the node address.
 *
 * IPv6: the hs6_* twins do the same at the same three places, with the node's
 * IPv6 address (node_snat6()) where IPv4 has node_snat4(). What does not depend
 * on the family (which packets are not ours, what a frontend admits before a
 * backend is chosen, where a reject and a packet to the node itself go) lives
 * once, in the hs_* helpers both twins call.
 */
#ifndef EBPFSVC_HOST_H
#define EBPFSVC_HOST_H

/* Feature gate: with the agent's --no-host-clients (no LB_CFG_HOST_CLIENTS),
 * to_uplink lets the node's own packets to externalIPs and LoadBalancer IPs
 * leave untranslated (from_host and from_loopback are then simply not attached).
 * Asked last: only a node's own packet to a frontend address pays the lookup. */

/* Where a node client's packet was met (how to answer and send it). */
#define HS_HOST_DEVICE 0   /* ebpfsvc0 egress: only service addresses are routed there */
#define HS_LOOPBACK    1   /* lo egress: the node's packets to its own addresses */
#define HS_UPLINK      2   /* uplink egress: the node's packets to routed external addresses */

/* hs_admit's answers besides a TC verdict (those are -1..8). */
#define HS_START  (-1100)   /* balance the packet: a new flow */
#define HS_REJECT (-1101)   /* no backend: answer it (hs_rejected) */

/*
 * What a node client's packet to frontend `svc` (0: none) gets before a backend
 * is chosen, either family: not a frontend, not ours (dropped on ebpfsvc0, where
 * only service addresses are routed; passed elsewhere); loadBalancerSourceRanges
 * hold for the node too (kube-proxy's firewall chain sees its packets: the node
 * address must be in a range, `source_allowed`); no backend: a Local-only
 * frontend drops, the others answer (HS_REJECT); else HS_START.
 */
static __always_inline int hs_admit(const struct lb4_service *svc, int source_allowed, __u8 where)
{
	if (!svc || (svc->flags & LB_SVC_F_ADDRESS))
		return where == HS_HOST_DEVICE ? TC_ACT_SHOT : TC_ACT_OK;
	if (!source_allowed)
		return lb_drop(REASON_SOURCE_RANGE);
	if (!svc->backend_count || !svc->maglev_size) {
		if (svc->flags & LB_SVC_F_LOCAL_ONLY)
			return lb_drop(REASON_NO_LOCAL_BACKEND);
		return HS_REJECT;
	}
	return HS_START;
}

/*
 * Where a reject built in place (`built`: the family's lb*_reject_build, 0 when
 * built) goes. The answer comes from the frontend, to the node: on ebpfsvc0 and
 * the uplink it is sent back in through the same device (its MACs swapped:
 * addressed to that device); on lo it simply carries on, since lo delivers to
 * the host anyway and the packet keeps the route the kernel gave it (a local one).
 */
static __always_inline int hs_rejected(struct __sk_buff *skb, int built, __u8 where)
{
	if (built)
		return TC_ACT_SHOT;
	if (where == HS_LOOPBACK)
		return TC_ACT_OK;
	return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}

/*
 * A translated packet whose backend is on the node address itself (a
 * hostNetwork endpoint of this node) is a local destination: on lo it carries
 * on (its route is a local one already); from elsewhere it goes in through lo.
 */
static __always_inline int hs_to_node_itself(struct __sk_buff *skb, __u8 where)
{
	return where == HS_LOOPBACK ? TC_ACT_OK : lb4_to_loopback(skb);
}

/* Reject a node client's packet (no backend, backend gone): hs_rejected. */
static __always_inline int hs4_reject(struct __sk_buff *skb, const struct lb4_pkt *p, __u32 reason, __u8 where)
{
	return hs_rejected(skb, lb4_reject_build(skb, p, reason), where);
}

/*
 * Send a node client's translated packet towards its backend: FIB lookup for
 * the egress interface and MACs, redirect (the kernel resolves a missing
 * neighbour: bpf_redirect_neigh); out of the uplink it was met on, it just
 * carries on. A backend on the node address itself: hs_to_node_itself.
 */
static __always_inline int hs4_send(struct __sk_buff *skb, const struct lb4_pkt *p, __u8 where)
{
	if (p->daddr == node_snat4())
		return hs_to_node_itself(skb, where);
	return np4_fib_send(skb, p, where == HS_UPLINK);
}

/* No flow yet: a node client's packet to a frontend starts one (hs_admit). */
static __always_inline int hs4_new(struct __sk_buff *skb, struct lb4_pkt *p, struct ct4_key *fk, __u64 now,
				   __u8 where)
{
	struct lb4_service *svc;
	struct ct4_entry e = {};
	__u32 bytes = skb->len;
	int ret;

	svc = lb4_lookup_frontend(p->daddr, p->dport, p->proto, LB_SCOPE_INTERNAL);
	ret = hs_admit(svc, svc && lb4_source_allowed(svc, p->saddr), where);
	if (ret == HS_REJECT)
		return hs4_reject(skb, p, REASON_NO_BACKEND, where);
	if (ret != HS_START)
		return ret;
	if (!lb4_flow_begin(svc, p, now, &e))
		return lb_drop(REASON_NO_BACKEND);
	if (ct4_create(fk, &e, p->saddr))
		return lb_drop(REASON_CT_CREATE_FAILED);
	lb4_affinity_update(svc, p->saddr, e.backend_id, now);
	if (lb4_rewrite_dst(skb, p, e.backend_addr, e.backend_port))
		return lb_drop(REASON_MALFORMED);
	lb_count_traffic(e.frontend_id, e.backend_id, bytes);
	return hs4_send(skb, p, where);
}

/* A packet of tracked node-client flow `e` (forward key `fk`). */
static __always_inline int hs4_tracked(struct __sk_buff *skb, struct lb4_pkt *p, struct ct4_key *fk,
				       struct ct4_entry *e, __u64 now, __u8 where)
{
	__u32 bytes = skb->len;

	if (!lb4_flow_keeps_backend(e->backend_id, p->proto)) {
		ct4_delete_flow(fk, e);
		if (p->proto == IPPROTO_TCP)
			return hs4_reject(skb, p, REASON_BACKEND_GONE, where);
		return hs4_new(skb, p, fk, now, where);     /* a datagram flow is balanced again */
	}
	lb4_note_forward(p, e, now);
	if (lb4_rewrite_dst(skb, p, e->backend_addr, e->backend_port))
		return lb_drop(REASON_MALFORMED);
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return hs4_send(skb, p, where);
}

/* A node client's packet: its tracked flow, or a new one. */
static __always_inline int hs4_forward(struct __sk_buff *skb, struct lb4_pkt *p, __u64 now, __u8 where)
{
	struct ct4_entry *e;
	struct ct4_key fk;

	e = ct4_flow_of(&fk, p, now);
	if (e)
		return hs4_tracked(skb, p, &fk, e, now, where);
	return hs4_new(skb, p, &fk, now, where);
}

/* ebpfsvc0 egress: only packets to service addresses are routed here. */
static __always_inline int hs4_from_host(struct __sk_buff *skb)
{
	struct lb4_pkt p = {};

	if (lb4_parse(skb, &p) != LB_PARSE_OK || !lb4_proto_has_ports(p.proto))
		return TC_ACT_SHOT;                     /* the device would drop it anyway */
	if (p.frag != LB_FRAG_NONE)
		return lb_drop(REASON_FRAG_UNTRACKED);
	return hs4_forward(skb, &p, bpf_ktime_get_ns(), HS_HOST_DEVICE);
}

/*
 * lo egress: every packet the node sends to itself passes here. Only those
 * from the node address to the node address are looked at (a client's default
 * source for a local destination is that destination): a backend on the node's
 * own address answering a node client (its reply stays on lo: the frontend back
 * as source, and on it goes), or a node client's packet to a frontend there.
 * The rest (127.0.0.0/8, other addresses) passes at the cost of a comparison.
 */
static __always_inline int hs4_from_loopback(struct __sk_buff *skb)
{
	struct lb4_pkt p = {};
	struct ct4_entry *e;
	struct ct4_key fk, rk;
	__u64 now;
	int ret;

	ret = lb4_parse(skb, &p);
	if (ret != LB_PARSE_OK)
		return lb4_unparsed(ret);
	if (!p.saddr || p.saddr != node_snat4() || p.daddr != p.saddr ||
	    !lb4_proto_has_ports(p.proto) || p.frag != LB_FRAG_NONE)
		return TC_ACT_OK;                       /* lo's MTU is 64k: the node's own datagrams are whole */
	now = bpf_ktime_get_ns();
	e = ct4_flow_of(&fk, &p, now);
	if (e)
		return hs4_tracked(skb, &p, &fk, e, now, HS_LOOPBACK);
	ct4_key_reply(&rk, &p);
	e = ct4_lookup(&rk, now);
	if (e && lb4_is_host_flow(e))
		return lb4_host_reply_xlate(skb, &p, e, now) ? lb_drop(REASON_MALFORMED) : TC_ACT_OK;
	return hs4_new(skb, &p, &fk, now, HS_LOOPBACK);
}

/*
 * Uplink egress (np4_to_uplink), a packet that is no reply of a north-south
 * flow: the node's own packet to an address that is an INTERNAL frontend (an
 * externalIP or LoadBalancer IP the node routes out of this uplink) is a node
 * client's. Only that address and service port are taken (kube-proxy matches
 * both), so another port of the same address, maybe a real host's, goes on
 * untouched. -1: not a node client's packet.
 */
static __always_inline int hs4_to_uplink(struct __sk_buff *skb, struct lb4_pkt *p, __u64 now)
{
	if (!p->saddr || p->saddr != node_snat4() || p->frag != LB_FRAG_NONE ||
	    !lb4_is_frontend_address(p->daddr, p->proto, LB_SCOPE_INTERNAL) || !lb_option(LB_CFG_HOST_CLIENTS))
		return -1;
	return hs4_forward(skb, p, now, HS_UPLINK);
}

/* ---- IPv6 twins: the same three places, the same decisions (hs_admit,
 * hs_rejected, hs_to_node_itself), the node's IPv6 address node_snat6() for
 * node_snat4(). Their larger locals (forward and reply keys, the new flow's
 * entry, the FIB lookup) live in nodeport6.h's per-CPU scratch, as the uplink's
 * IPv6 path keeps them: to_uplink holds both families' paths in one 512-byte
 * stack. Replies come back through a pod veth (lb6_from_pod: lb6_reply_to_node),
 * the uplink (hs6_uplink_reply) or lo (hs6_from_loopback), and get their
 * frontend back (lb6_host_reply_xlate). Unlike IPv4's, a reply whose source is
 * then the node's own address (its NodePort, reached by the node itself) is
 * delivered where it arrives: IPv6 input has no check of a local source (the
 * kernel's ip6_rcv_core refuses only ::1 off lo; no accept_local, no
 * rp_filter), so it needs no detour through lo. ---- */

static __always_inline int hs6_reject(struct __sk_buff *skb, const struct lb6_pkt *p, __u32 reason, __u8 where)
{
	return hs_rejected(skb, lb6_reject_build(skb, p, reason), where);
}

/* As hs4_send. */
static __always_inline int hs6_send(struct __sk_buff *skb, const struct lb6_pkt *p, __u8 where,
				    struct np6_scratch *s)
{
	if (np6_is_node_addr(p->daddr))
		return hs_to_node_itself(skb, where);
	__builtin_memset(&s->fib, 0, sizeof(s->fib));
	np6_fib_params(&s->fib, skb, p);
	return np_fib_send(skb, &s->fib, where == HS_UPLINK);
}

/* As hs4_new (the packet's forward key in s->fk). */
static __always_inline int hs6_new(struct __sk_buff *skb, struct lb6_pkt *p, __u64 now, __u8 where,
				   struct np6_scratch *s)
{
	struct lb4_service *svc;
	struct ct6_entry *e = &s->e;
	__u32 bytes = skb->len;
	int ret;

	svc = lb6_lookup_frontend(p->daddr, p->dport, p->proto, LB_SCOPE_INTERNAL);
	ret = hs_admit(svc, svc && lb6_source_allowed(svc, p->saddr), where);
	if (ret == HS_REJECT)
		return hs6_reject(skb, p, REASON_NO_BACKEND, where);
	if (ret != HS_START)
		return ret;
	__builtin_memset(e, 0, sizeof(*e));
	if (!lb6_flow_begin(svc, p, now, e))
		return lb_drop(REASON_NO_BACKEND);
	if (ct6_create(&s->fk, e, p->saddr))
		return lb_drop(REASON_CT_CREATE_FAILED);
	lb6_affinity_update(svc, p->saddr, e->backend_id, now);
	if (lb6_rewrite_dst(skb, p, e->backend_addr, e->backend_port))
		return lb_drop(REASON_MALFORMED);
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return hs6_send(skb, p, where, s);
}

/* As hs4_tracked: a packet of tracked flow `e` (forward key s->fk). */
static __always_inline int hs6_tracked(struct __sk_buff *skb, struct lb6_pkt *p, struct ct6_entry *e, __u64 now,
				       __u8 where, struct np6_scratch *s)
{
	__u32 bytes = skb->len;

	if (!lb6_flow_keeps_backend(e->backend_id, p->proto)) {
		ct6_delete_flow(&s->fk, e);
		if (p->proto == IPPROTO_TCP)
			return hs6_reject(skb, p, REASON_BACKEND_GONE, where);
		return hs6_new(skb, p, now, where, s);  /* a datagram flow is balanced again */
	}
	lb6_note_forward(p, e, now);
	if (lb6_rewrite_dst(skb, p, e->backend_addr, e->backend_port))
		return lb_drop(REASON_MALFORMED);
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return hs6_send(skb, p, where, s);
}

/* As hs4_forward. */
static __always_inline int hs6_forward(struct __sk_buff *skb, struct lb6_pkt *p, __u64 now, __u8 where,
				       struct np6_scratch *s)
{
	struct ct6_entry *e = ct6_flow_of(&s->fk, p, now);

	if (e)
		return hs6_tracked(skb, p, e, now, where, s);
	return hs6_new(skb, p, now, where, s);
}

/* As hs4_from_host: ebpfsvc0 egress, where the IPv6 service CIDRs are routed. */
static __always_inline int hs6_from_host(struct __sk_buff *skb)
{
	struct lb6_pkt p = {};
	struct np6_scratch *s = 0;

	if (np6_parse(skb, &p, &s) != LB_PARSE_OK || !lb4_proto_has_ports(p.proto))
		return TC_ACT_SHOT;                     /* the device would drop it anyway */
	if (p.frag != LB_FRAG_NONE)
		return lb_drop(REASON_FRAG_UNTRACKED);
	return hs6_forward(skb, &p, bpf_ktime_get_ns(), HS_HOST_DEVICE, s);
}

/* As hs4_from_loopback: of what lo carries, only the node's IPv6 address to
 * itself is looked at (::1 and the rest pass at the cost of a comparison). */
static __always_inline int hs6_from_loopback(struct __sk_buff *skb)
{
	struct lb6_pkt p = {};
	struct np6_scratch *s = 0;
	struct ct6_entry *e;
	__u64 now;
	int ret;

	ret = np6_parse(skb, &p, &s);
	if (ret != LB_PARSE_OK)
		return lb4_unparsed(ret);
	if (!np6_is_node_addr(p.saddr) || !lb6_addr_equal(p.daddr, p.saddr) ||
	    !lb4_proto_has_ports(p.proto) || p.frag != LB_FRAG_NONE)
		return TC_ACT_OK;                       /* lo's MTU is 64k: the node's own datagrams are whole */
	now = bpf_ktime_get_ns();
	e = ct6_flow_of(&s->fk, &p, now);
	if (e)
		return hs6_tracked(skb, &p, e, now, HS_LOOPBACK, s);
	ct6_key_reply(&s->rk, &p);
	e = ct6_lookup(&s->rk, now);
	if (e && lb6_is_host_flow(e))
		return lb6_host_reply_xlate(skb, &p, e, now) ? lb_drop(REASON_MALFORMED) : TC_ACT_OK;
	return hs6_new(skb, &p, now, HS_LOOPBACK, s);
}

/* As hs4_to_uplink, from np6_to_uplink: the node's own IPv6 packet to an
 * externalIP or LoadBalancer IP it routes out, on the service port only. -1:
 * not a node client's packet. */
static __always_inline int hs6_to_uplink(struct __sk_buff *skb, struct lb6_pkt *p, __u64 now,
					 struct np6_scratch *s)
{
	if (p->frag != LB_FRAG_NONE || !np6_is_node_addr(p->saddr) ||
	    !lb6_is_frontend_address(p->daddr, p->proto, LB_SCOPE_INTERNAL) || !lb_option(LB_CFG_HOST_CLIENTS))
		return -1;
	return hs6_forward(skb, p, now, HS_UPLINK, s);
}

/* Uplink ingress, IPv6: a remote backend's reply to a node client (addressed to
 * node_snat6()) gets its frontend back as source, as np4_from_uplink does for IPv4;
 * anything else is not this function's: -1 (from_uplink then gives it to
 * np6_from_uplink, NodePorts and the rest). */
static __always_inline int hs6_uplink_reply(struct __sk_buff *skb)
{
	struct lb6_pkt p = {};
	struct ct6_entry *e;
	struct ct6_key rk;
	__u64 now;

	if (lb6_parse(skb, &p) != LB_PARSE_OK || !lb4_proto_has_ports(p.proto) || p.frag == LB_FRAG_LATER ||
	    !np6_is_node_addr(p.daddr))
		return -1;
	now = bpf_ktime_get_ns();
	ct6_key_reply(&rk, &p);
	e = ct6_lookup(&rk, now);
	if (!e || !lb6_is_host_flow(e))
		return -1;
	return lb6_host_reply_xlate(skb, &p, e, now) ? lb_drop(REASON_MALFORMED) : TC_ACT_OK;
}

#endif /* EBPFSVC_HOST_H */
