/* SPDX-License-Identifier: GPL-2.0 */
/*
 * North-south datapath on a node's uplink (NodePort, externalIPs,
 * LoadBalancer ingress addresses), replacing kube-proxy for traffic from
 * outside the cluster:
 *
 * Both families: IPv4 (nodeport.h np4_*) and IPv6 (nodeport6.h np6_*), chosen
 * by the EtherType.
 *
 *   from_uplink  TC ingress: new flows to EXTERNAL frontends and ClusterIPs (DNAT, plus SNAT
 *                when the backend is on another node), tracked flows, replies
 *                of SNATed flows, ICMP errors about them.
 *   to_uplink    TC egress: replies of source-preserving flows (local backend)
 *                get the frontend back as their source; the node's own packets
 *                to an externalIP or LoadBalancer IP it routes out (host.h).
 *   xdp_uplink   XDP: the same translations for the common case, earlier;
 *                whatever it does not handle it passes to from_uplink.
 *   from_host    TC egress of the agent's device ebpfsvc0: clients in the
 *                node's own namespace to ClusterIPs (host.h), both families.
 *   from_loopback TC egress of lo: the node's clients to its own address
 *                (NodePorts on it; host.h), both families.
 *
 * Shares every pinned map with lb_pod.c (ebpfsvc/datapath/loader.py loads it
 * with NODE_SOURCE; the node address is read from lb_node_addrs, lib/nodeaddr.h).
 * See docs/northsouth.md.
 */
#include "abi.h"
#include "parse.h"
#include "maps.h"
#include "nodeaddr.h"
#include "stats.h"
#include "csum.h"
#include "nat.h"
#include "ct.h"
#include "frag.h"
#include "lb.h"
#include "affinity.h"
#include "icmp.h"
#include "sock.h"
#include "flow.h"
#include "srcrange.h"
#include "nodeport.h"
#include "nodeport6.h"
#include "nodeport_xdp.h"
#include "host.h"

int from_uplink(struct __sk_buff *skb)
{
	int ret;

	if (skb->protocol == lb_htons(ETH_P_IPV6)) {
		ret = hs6_uplink_reply(skb);    /* a node client's reply (host.h), else NodePorts */
		return ret >= 0 ? ret : np6_from_uplink(skb);
	}
	return np4_from_uplink(skb);
}

int to_uplink(struct __sk_buff *skb)
{
	if (skb->protocol == lb_htons(ETH_P_IPV6))
		return np6_to_uplink(skb);
	return np4_to_uplink(skb);
}

int xdp_uplink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) <= (void *)(long)ctx->data_end && eth->h_proto == lb_htons(ETH_P_IPV6))
		return np6_xdp_uplink(ctx);
	return np4_xdp_uplink(ctx);
}

int from_host(struct __sk_buff *skb)
{
	if (skb->protocol == lb_htons(ETH_P_IPV6))
		return hs6_from_host(skb);
	return hs4_from_host(skb);
}

int from_loopback(struct __sk_buff *skb)
{
	if (skb->protocol == lb_htons(ETH_P_IPV6))
		return hs6_from_loopback(skb);
	return hs4_from_loopback(skb);
}
