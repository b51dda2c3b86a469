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
 * once (lb_sock_path_of), so nothing is translated twice, no conntrack entry is
 * made and neither a conntrack nor a frontend lookup is paid per packet.
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

/* ---- Marking a translated socket, and the TC programs' fast exit for its packets ---- */

/* bcc's declaration returns u32; the kernel's cookie is 64 bits. Any context with a
 * socket: sock_addr (the socket being connected), skb (skb->sk, 0 without one). */
static __u64 (*lb_get_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

/*
 * Remember whether this connect() was translated, in the socket's cookie slot
 * (lb_sock_path: a store, no allocation). A later connect() that the socket path
 * leaves alone (a UDP socket may connect again, elsewhere) frees the slot if it is
 * still this socket's.
 */
static __always_inline void lb_sock_path_set(__u64 cookie, __u8 proto, int translated)
{
	__u32 slot = (__u32)cookie & (SOCK_PATH_SLOTS - 1);
	struct lb_sock_path *m = lb_sock_path.lookup(&slot);

	if (!m)
		return;
	if (translated) {
		m->cookie = cookie;
		m->proto = proto;
	} else if (m->cookie == cookie) {
		m->cookie = 0;
	}
}

/*
 * The socket path's mark of the socket that sent `skb`, when its connect() was
 * translated; else 0. For either family (lb4_sock_path_packet, and the IPv6
 * twin's). skb->sk is still the sender's socket at TC ingress of the pod veth's
 * host side (the kernel orphans a forwarded packet only in ip_rcv, after TC) and at
 * egress for the node's own sockets. What the kernel sends on a socket's behalf
 * (a RST, a TIME_WAIT ACK) carries no socket or a control socket: no mark.
 */
static __always_inline struct lb_sock_path *lb_sock_path_of(struct __sk_buff *skb)
{
	__u64 cookie = lb_get_socket_cookie(skb);
	__u32 slot = (__u32)cookie & (SOCK_PATH_SLOTS - 1);
	struct lb_sock_path *m;

	if (!cookie)
		return 0;
	m = lb_sock_path.lookup(&slot);
	return (m && m->cookie == cookie) ? m : 0;
}

/*
 * `m` (lb_sock_path_of) marks a TCP socket: its packets can only go to the peer
 * connect() chose (a TCP socket sends to no one else), so the TC programs let
 * them pass before even parsing them. For either family; UDP needs the packet's
 * destination (lb4_sock_path_packet).
 */
static __always_inline int lb_sock_path_stream(const struct lb_sock_path *m)
{
	return m && m->proto == IPPROTO_TCP;
}

/*
 * A packet of a marked UDP socket (`m`) to the backend its connect() chose: nothing
 * for the TC programs to do, whatever their maps say. Only to that peer: a
 * connected UDP socket may still sendto() another address, which sendmsg4 may
 * have left to TC (a Service with sessionAffinity).
 */
static __always_inline int lb4_sock_path_packet(struct __sk_buff *skb, const struct lb_sock_path *m,
						const struct lb4_pkt *p)
{
	struct bpf_sock *sk;

	if (!m)
		return 0;
	sk = skb->sk;
	if (!sk)
		return 0;
	sk = bpf_sk_fullsock(sk);
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

	lb_sock_path_set(lb_get_socket_cookie(ctx), (__u8)ctx->protocol, translated);
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
