/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Socket-level load balancing (cgroup/sock_addr hooks): a socket's destination
 * is translated once, when the application names a Service, instead of every
 * packet at TC.
 *
 *   lb4_sock_connect   connect() of TCP and UDP sockets: ClusterIP:port ->
 *                      backend, or ECONNREFUSED for a Service with no endpoints.
 *   lb4_sock_sendmsg   sendto()/sendmsg() of an unconnected UDP socket, per
 *                      datagram (no conntrack: a removed backend is simply
 *                      not chosen for the next one).
 *   lb4_sock_recvmsg   recvfrom() of UDP: a backend's datagram shows the
 *                      Service address it was sent to as its source.
 *   lb4_sock_getpeername  getpeername(): the Service, not the backend.
 *
 * The packets of such a socket then carry the backend's address, and connect4
 * marks the socket (lb_sock_path_set): the TC programs let its packets pass at
 * once (lb4_sock_path_packet), so nothing is translated twice, no conntrack
 * entry is made and no lookup is paid per packet.
 *
 * The frontend lookup, Maglev table, backend states and counters are the TC
 * path's (lb.h, maps.h), fed by the same writer; only the table key differs:
 * at connect() the source port is usually not chosen yet, so the slot comes
 * from the socket cookie (one socket, one backend; sockets spread like
 * connections). A socket already bound to an address and port hashes its
 * 5-tuple exactly as the TC path does and lands on the same backend.
 */
#ifndef EBPFSVC_SOCK_H
#define EBPFSVC_SOCK_H

#include <uapi/linux/bpf.h>

/* Verdicts of cgroup sock_addr programs: 0 fails the syscall (with the errno
 * given by bpf_set_retval, -EPERM when none is), 1 lets it go on. */
#define LB_SYS_REJECT  0
#define LB_SYS_PROCEED 1

#define LB_AF_INET 2                  /* the uapi headers bcc sees do not carry AF_* */

#ifndef ECONNREFUSED
#define ECONNREFUSED 111
#endif

/* bcc's declaration returns u32; the kernel's cookie is 64 bits. */
static __u64 (*lb_get_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

/* ---- Marking a translated socket, and the TC programs' fast exit for its packets ---- */

/*
 * Remember on the socket whether this connect() was translated (socket-local
 * storage: it goes with the socket, nothing to expire). A later connect() that
 * the socket path leaves alone (a UDP socket may connect again, elsewhere)
 * clears it; a socket never translated gets no storage at all.
 */
static __always_inline void lb_sock_path_set(struct bpf_sock *sk, int translated)
{
	struct lb_sock_path *m;

	if (!sk)
		return;
	m = lb_sock_path.sk_storage_get(sk, 0, translated ? BPF_SK_STORAGE_GET_F_CREATE : 0);
	if (m)
		m->flags = translated ? LB_SOCK_F_TRANSLATED : 0;
}

/*
 * The socket that sent `skb` when the socket path translated its connect(), else 0.
 * For either family (lb4_sock_path_packet, and the IPv6 twin's).
 * skb->sk is still the sender's socket at TC ingress of the pod veth's host side
 * (the kernel orphans a forwarded packet only in ip_rcv, after TC) and at egress for
 * the node's own sockets. What the kernel sends on a socket's behalf (a RST, a
 * TIME_WAIT ACK) carries no socket or a control socket: it takes the TC path.
 */
static __always_inline struct bpf_sock *lb_sock_path_sk(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	struct lb_sock_path *m;

	if (!sk)
		return 0;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 0;
	m = lb_sock_path.sk_storage_get(sk, 0, 0);
	return (m && (m->flags & LB_SOCK_F_TRANSLATED)) ? sk : 0;
}

/*
 * A packet of a translated socket to the backend its connect() chose: nothing
 * for the TC programs to do, whatever their maps say. Only to that peer: a
 * connected UDP socket may still sendto() another address, which sendmsg4 may
 * have left to TC (sessionAffinity, SCTP's neighbours...).
 */
static __always_inline int lb4_sock_path_packet(struct __sk_buff *skb, const struct lb4_pkt *p)
{
	struct bpf_sock *sk = lb_sock_path_sk(skb);

	return sk && sk->dst_ip4 == p->daddr && (__be16)sk->dst_port == p->dport;
}

/* ---- The sock_addr hooks ---- */

/* Slot key of a socket to `svc` (see the top of this file). */
static __always_inline __u32 lb4_sock_hash(struct bpf_sock_addr *ctx, __u64 cookie, __u8 proto)
{
	struct bpf_sock *sk = ctx->sk;
	__u32 ports;

	if (sk && sk->src_ip4 && sk->src_port) {
		/* lb4_flow_hash's words: wire-order addresses and ports */
		ports = ((__u32)lb_htons((__u16)sk->src_port) << 16) | (__u16)ctx->user_port;
		return lb_jhash_3words(sk->src_ip4, ctx->user_ip4, ports, LB_HASH_SEED ^ proto);
	}
	return lb_jhash_3words((__u32)cookie, (__u32)(cookie >> 32), (__u16)ctx->user_port,
			       LB_HASH_SEED ^ proto);
}

/* The frontend `ctx` names, for the socket's protocol; 0 when it is no Service port
 * the socket path serves (then the TC path, if any, sees the packets as before). */
static __always_inline struct lb4_service *lb4_sock_frontend(struct bpf_sock_addr *ctx, __u8 *proto)
{
	struct lb4_service *svc;

	if (ctx->user_family != LB_AF_INET)
		return 0;
	*proto = ctx->protocol;
	if (*proto != IPPROTO_TCP && *proto != IPPROTO_UDP)
		return 0;                       /* SCTP and the rest: the TC path */
	svc = lb4_lookup_frontend(ctx->user_ip4, (__be16)ctx->user_port, *proto, LB_SCOPE_INTERNAL);
	if (!svc || (svc->flags & LB_SVC_F_ADDRESS))
		return 0;
	/* sessionAffinity ClientIP is keyed by the client's address, which an
	 * unbound socket does not have yet: such Services stay with the TC path,
	 * which keeps one affinity per client whichever path it came by. */
	if (svc->flags & LB_SVC_F_AFFINITY)
		return 0;
	return svc;
}

/*
 * Translate ctx's destination to a backend of its frontend. `refuse_empty`:
 * a Service with no endpoints fails the call with ECONNREFUSED (connect(), as
 * the TC path's RST or ICMP port unreachable would make it fail); otherwise
 * the call goes on untranslated and the TC path answers as before.
 */
static __always_inline int lb4_sock_xlate(struct bpf_sock_addr *ctx, int refuse_empty, int *translated)
{
	struct lb4_sock_revnat rev = {};
	struct lb4_sock_key key = {};
	struct lb4_backend *be;
	struct lb4_service *svc;
	__u64 cookie;
	__u32 id;
	__u8 proto = 0;

	svc = lb4_sock_frontend(ctx, &proto);
	if (!svc)
		return LB_SYS_PROCEED;
	if (!svc->backend_count || !svc->maglev_size) {
		/* Traffic policy Local with no local endpoint: the TC path drops,
		 * as kube-proxy does; a refusal here would tell the client more. */
		if (!refuse_empty || (svc->flags & LB_SVC_F_LOCAL_ONLY))
			return LB_SYS_PROCEED;
		lb_count_drop(REASON_NO_BACKEND);
		bpf_set_retval(-ECONNREFUSED);
		return LB_SYS_REJECT;
	}
	cookie = lb_get_socket_cookie(ctx);
	be = lb4_select_backend_by_hash(svc, lb4_sock_hash(ctx, cookie, proto), &id);
	if (!be)
		return LB_SYS_PROCEED;          /* table names a missing backend: leave it to TC */

	key.cookie = cookie;
	key.address = be->address;
	key.port = be->port;
	rev.address = ctx->user_ip4;
	rev.port = (__be16)ctx->user_port;
	/* Without the reverse entry getpeername/recvmsg would show the backend:
	 * rather than that, leave this socket to the TC path. */
	if (lb4_sock_revnat.update(&key, &rev))
		return LB_SYS_PROCEED;
	ctx->user_ip4 = be->address;
	ctx->user_port = (__u32)be->port;
	lb_count_sock(svc->frontend_id);
	*translated = 1;
	return LB_SYS_PROCEED;
}

static __always_inline int lb4_sock_connect(struct bpf_sock_addr *ctx)
{
	int translated = 0;
	int verdict = lb4_sock_xlate(ctx, 1, &translated);

	lb_sock_path_set(ctx->sk, translated);
	return verdict;
}

/* An unconnected UDP datagram. No endpoints: the datagram goes on to the TC
 * path, which answers with ICMP port unreachable as before (an unconnected
 * socket does not see it, so sendto() succeeds either way). */
static __always_inline int lb4_sock_sendmsg(struct bpf_sock_addr *ctx)
{
	int translated = 0;

	return lb4_sock_xlate(ctx, 0, &translated);
}

/* A backend address:port this socket was sent to -> the Service it named. */
static __always_inline int lb4_sock_revnat_xlate(struct bpf_sock_addr *ctx)
{
	struct lb4_sock_key key = {};
	struct lb4_sock_revnat *rev;

	if (ctx->user_family != LB_AF_INET)
		return LB_SYS_PROCEED;
	key.cookie = lb_get_socket_cookie(ctx);
	key.address = ctx->user_ip4;
	key.port = (__be16)ctx->user_port;
	rev = lb4_sock_revnat.lookup(&key);
	if (rev) {
		ctx->user_ip4 = rev->address;
		ctx->user_port = (__u32)rev->port;
	}
	return LB_SYS_PROCEED;
}

static __always_inline int lb4_sock_recvmsg(struct bpf_sock_addr *ctx)
{
	return lb4_sock_revnat_xlate(ctx);
}

static __always_inline int lb4_sock_getpeername(struct bpf_sock_addr *ctx)
{
	return lb4_sock_revnat_xlate(ctx);
}

#endif /* EBPFSVC_SOCK_H */
