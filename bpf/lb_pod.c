/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ClusterIP datapath on a pod's veth (host side), replacing kube-proxy for
 * pod -> Service traffic. Two TC programs in direct-action mode:
 *
 *   from_pod  ingress: packets leaving the pod. DNAT to a backend.
 *   to_pod    egress:  packets entering the pod. Reverse NAT of replies.
 *
 * One object serves both families: IPv6 frames go to the lb6_* twins.
 *
 * The logic lives in lib/ (one header per concern); these stay thin.
 * ebpfsvc/datapath/loader.py compiles this file with bcc, passing limits,
 * LB_PIN_DIR as -D; the node's addresses are read from a map (lib/nodeaddr.h).
 */

/* SCTP service port != targetPort: keep the CRC32c right (lib/csum.h). */
#define LB_SCTP_PORT_CRC 1

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
/* np4_snat_reply_to, np6_snat_reply_to: a local pod's reply to external traffic the uplink
 * masqueraded to it (--masquerade-external-to-local-backends). */
#include "srcrange.h"
#include "nodeport.h"
#include "nodeport6.h"

/* nodeport.h's to_uplink path asks host.h about the node's own packets; this
 * object has no uplink program, so nothing calls it: a stub, no host.h. */
static __always_inline int hs4_to_uplink(struct __sk_buff *skb, struct lb4_pkt *p, __u64 now)
{
	return -1;
}

static __always_inline int hs6_to_uplink(struct __sk_buff *skb, struct lb6_pkt *p, __u64 now,
					 struct np6_scratch *s)
{
	return -1;
}

/* The socket path's fast exit (lib/sock.h) first: the sending socket's mark, when
 * connect() translated it, is looked up once per packet; a TCP socket's packet passes
 * unparsed, a UDP one's is checked against its peer once parsed. to_pod sees sockets
 * of the node's own processes only (a forwarded packet lost its socket in ip_rcv). */
int from_pod(struct __sk_buff *skb)
{
	struct lb_sock_path *m = lb_sock_path_of(skb);

	if (lb_sock_path_stream(m))
		return TC_ACT_OK;
	if (skb->protocol == lb_htons(ETH_P_IPV6))
		return lb6_from_pod(skb);
	return lb4_from_pod(skb, m);
}

int to_pod(struct __sk_buff *skb)
{
	struct lb_sock_path *m = lb_sock_path_of(skb);

	if (lb_sock_path_stream(m))
		return TC_ACT_OK;
	if (skb->protocol == lb_htons(ETH_P_IPV6))
		return lb6_to_pod(skb);
	return lb4_to_pod(skb, m);
}
