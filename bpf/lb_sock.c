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
 *
 * The IPv6 twins (connect6, ...) will sit beside these over lb6_* maps.
 * ebpfsvc/datapath/socklb.py compiles this file and attaches the programs.
 */

#include "abi.h"
#include "parse.h"
#include "maps.h"
#include "stats.h"
#include "lb.h"
#include "sock.h"

int connect4(struct bpf_sock_addr *ctx)
{
	return lb4_sock_connect(ctx);
}

int sendmsg4(struct bpf_sock_addr *ctx)
{
	return lb4_sock_sendmsg(ctx);
}

int recvmsg4(struct bpf_sock_addr *ctx)
{
	return lb4_sock_recvmsg(ctx);
}

int getpeername4(struct bpf_sock_addr *ctx)
{
	return lb4_sock_getpeername(ctx);
}
