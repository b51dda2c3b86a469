/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Clients in the node's own network namespace (hostNetwork pods, node
 * daemons) reaching ClusterIPs, which kube-proxy serves from iptables' OUTPUT
 * chain. Their packets meet neither a pod veth nor an uplink before routing,
 * so the agent routes the service CIDR to a dummy device (source: the node
 * address, NODE_SNAT_ADDR) and attaches hs4_from_host at its egress:
 *
 *   a tracked flow keeps its backend (a removed backend: TCP reset into the
 *   host, UDP balanced again); otherwise an INTERNAL frontend starts one as on
 *   the pod side (affinity, Maglev or random, conntrack, fail closed); no
 *   backend: rejected into the host (RST / port unreachable). Then DNAT and
 *   out towards the backend (np4_send: FIB lookup, redirect; no hop, the
 *   packet is the node's own).
 *
 * Replies come back through a pod veth (local backend: lb4_from_pod) or the
 * uplink (remote backend: np4_from_uplink), addressed to the node; both find
 * the flow by its reply key and restore the frontend as source
 * (lb4_host_reply). Not handled: fragments, and a backend on the node's own
 * address (hostNetwork endpoints of this node), whose replies never leave the
 * host. See docs/northsouth.md.
 */
#ifndef EBPFSVC_HOST_H
#define EBPFSVC_HOST_H

static __always_inline int hs4_from_host(struct __sk_buff *skb)
{
	struct lb4_pkt p = {};
	struct lb4_service *svc;
	struct ct4_entry *e, fresh = {};
	struct ct4_key fk;
	__u32 bytes = skb->len;
	__u64 now;

	if (lb4_parse(skb, &p) != LB_PARSE_OK || !lb4_proto_has_ports(p.proto))
		return TC_ACT_SHOT;                     /* the dummy would drop it anyway */
	if (p.frag != LB_FRAG_NONE)
		return lb_drop(REASON_FRAG_UNTRACKED);
	now = bpf_ktime_get_ns();
	e = ct4_flow_of(&fk, &p, now);
	if (e && !lb4_flow_keeps_backend(e->backend_id, p.proto)) {
		ct4_delete_flow(&fk, e);
		if (p.proto == IPPROTO_TCP)
			return lb4_reject_via(skb, &p, REASON_BACKEND_GONE, BPF_F_INGRESS);
		e = 0;                                  /* a datagram flow is balanced again */
	}
	if (e) {
		lb4_note_forward(&p, e, now);
	} else {
		svc = lb4_lookup_frontend(p.daddr, p.dport, p.proto, LB_SCOPE_INTERNAL);
		if (!svc || (svc->flags & LB_SVC_F_ADDRESS))
			return TC_ACT_SHOT;             /* an unused service address */
		if (!svc->backend_count || !svc->maglev_size) {
			if (svc->flags & LB_SVC_F_LOCAL_ONLY)
				return lb_drop(REASON_NO_LOCAL_BACKEND);
			return lb4_reject_via(skb, &p, REASON_NO_BACKEND, BPF_F_INGRESS);
		}
		if (!lb4_flow_begin(svc, &p, now, &fresh))
			return lb_drop(REASON_NO_BACKEND);
		if (ct4_create(&fk, &fresh, p.saddr))
			return lb_drop(REASON_CT_CREATE_FAILED);
		lb4_affinity_update(svc, p.saddr, fresh.backend_id, now);
		e = &fresh;
	}
	if (lb4_rewrite_dst(skb, &p, e->backend_addr, e->backend_port))
		return lb_drop(REASON_MALFORMED);
	lb_count_traffic(e->frontend_id, e->backend_id, bytes);
	return np4_send(skb, &p);
}

#endif /* EBPFSVC_HOST_H */
