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
#include "flow.h"

int from_pod(struct __sk_buff *skb)
{
	if (skb->protocol == lb_htons(ETH_P_IPV6))
		return lb6_from_pod(skb);
	return lb4_from_pod(skb);
}

int to_pod(struct __sk_buff *skb)
{
	if (skb->protocol == lb_htons(ETH_P_IPV6))
		return lb6_to_pod(skb);
	return lb4_to_pod(skb);
}
