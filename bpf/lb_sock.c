/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Socket-level load balancing: cgroup/sock_addr programs attached at a node's
 * cgroup (the lab's or the kubelet's pods, and the node's own processes), on
 * the same pinned maps as the TC programs (lib/maps.h), so the writer feeds
 * both. Everything is in lib/sock.h; these stay thin.
 *
 *   connect4      BPF_CGROUP_INET4_CONNECT      TCP and connected UDP
 *   sendmsg4      BPF_CGROUP_UDP4_SENDMSG       unconnected UDP
 *   recvmsg4      BPF_CGROUP_UDP4_RECVMSG       reply source -> Service
 *   getpeername4  BPF_CGROUP_INET4_GETPEERNAME  peer -> Service
 *   connect6      BPF_CGROUP_INET6_CONNECT      the same for IPv6 sockets, over lb6_* maps;
 *   sendmsg6      BPF_CGROUP_UDP6_SENDMSG       an IPv4-mapped address (::ffff:a.b.c.d)
 *   recvmsg6      BPF_CGROUP_UDP6_RECVMSG       takes the IPv4 logic and maps
 *   getpeername6  BPF_CGROUP_INET6_GETPEERNAME
 *   sock_ops      BPF_CGROUP_SOCK_OPS           a server's accepted TCP connection that
 *                                               no conntrack entry describes: marked, so
 *                                               its replies pass from_pod at once
 *
 * ebpfsvc/datapath/socklb.py compiles this file and attaches the programs.
 */

#include "abi.h"
#include "parse.h"
#include "maps.h"
#include "nodeaddr.h"
#include "stats.h"
#include "lb.h"
#include "sock.h"

int connect4(struct bpf_sock_addr *ctx)
{
	return lb4_sock_hook(ctx, LB_SOCK_CONNECT);
}

int sendmsg4(struct bpf_sock_addr *ctx)
{
	return lb4_sock_hook(ctx, LB_SOCK_SENDMSG);
}

int recvmsg4(struct bpf_sock_addr *ctx)
{
	return lb4_sock_hook(ctx, LB_SOCK_REVERSE);
}

int getpeername4(struct bpf_sock_addr *ctx)
{
	return lb4_sock_hook(ctx, LB_SOCK_REVERSE);
}

int connect6(struct bpf_sock_addr *ctx)
{
	return lb6_sock_hook(ctx, LB_SOCK_CONNECT);
}

int sendmsg6(struct bpf_sock_addr *ctx)
{
	return lb6_sock_hook(ctx, LB_SOCK_SENDMSG);
}

int recvmsg6(struct bpf_sock_addr *ctx)
{
	return lb6_sock_hook(ctx, LB_SOCK_REVERSE);
}

int getpeername6(struct bpf_sock_addr *ctx)
{
	return lb6_sock_hook(ctx, LB_SOCK_REVERSE);
}

int sock_ops(struct bpf_sock_ops *ctx)
{
	return lb_sock_ops(ctx);
}
