/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Socket-level load balancing (cgroup/sock_addr hooks): a socket's destination
 * is translated once, when the application names a Service, instead of every
 * packet at TC.
 *
 *   LB_SOCK_CONNECT    connect() of TCP and UDP sockets: ClusterIP:port ->
 *                      backend, or ECONNREFUSED for a Service with no endpoints.
 *   LB_SOCK_SENDMSG    sendto()/sendmsg() of an unconnected UDP socket, per
 *                      datagram (no conntrack: a removed backend is simply
 *                      not chosen for the next one).
 *   LB_SOCK_REVERSE    recvfrom() of UDP: a backend's datagram shows the
 *                      Service address it was sent to as its source;
 *                      getpeername(): the Service, not the backend.
 *
 * lb4_sock_hook serves IPv4 sockets; lb6_sock_hook IPv6 ones, over lb6_frontends,
 * lb6_backends and lb6_sock_revnat. An IPv4-mapped address (::ffff:a.b.c.d: a
 * dual-stack socket naming an IPv4 ClusterIP) is served by the IPv4 logic and
 * maps, as Cilium does, since its packets are IPv4 on the wire.
 *
 * The packets of such a socket then carry the backend's address, and connect()
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
 *
 * One core for both families (lb_sock_xlate, lb_sock_revnat_xlate, the family a
 * constant argument as in lb_select_backend_by_hash); lb4_sock_hook and
 * lb6_sock_hook are the only code that knows the context's user_ip4/user_ip6.
 */
#ifndef EBPFSVC_SOCK_H
#define EBPFSVC_SOCK_H

#include <uapi/linux/bpf.h>

/* Verdicts of cgroup sock_addr programs: 0 fails the syscall (with the errno
 * given by bpf_set_retval, -EPERM when none is), 1 lets it go on. */
#define LB_SYS_REJECT  0
#define LB_SYS_PROCEED 1

#define LB_AF_INET 2                  /* the uapi headers bcc sees do not carry AF_* */
#define LB_AF_INET6 10

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
static __always_inline void lb_sock_path_set(__u64 cookie, __u8 proto, int translated, __u8 flags)
{
	__u32 slot = (__u32)cookie & (SOCK_PATH_SLOTS - 1);
	struct lb_sock_path *m = lb_sock_path.lookup(&slot);

	if (!m)
		return;
	if (translated) {
		/* The flags before the cookie: a reader that finds this cookie finds its flags
		 * (the compiler keeps volatile stores in order; x86 keeps stores in order). */
		*(volatile __u8 *)&m->flags = flags;
		*(volatile __u8 *)&m->proto = proto;
		*(volatile __u64 *)&m->cookie = cookie;
	} else if (m->cookie == cookie) {
		m->cookie = 0;
	}
}

/* The slot of socket `cookie` when it holds that socket's mark; else 0 (a free slot, or another
 * socket's: the mark is a cache, lossy by design). */
static __always_inline struct lb_sock_path *lb_sock_path_find(__u64 cookie)
{
	__u32 slot = (__u32)cookie & (SOCK_PATH_SLOTS - 1);
	struct lb_sock_path *m;

	if (!cookie)
		return 0;
	m = lb_sock_path.lookup(&slot);
	return (m && m->cookie == cookie) ? m : 0;
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
	return lb_sock_path_find(lb_get_socket_cookie(skb));
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

/* What the family-neutral core (lb_sock_xlate, lb_sock_revnat_xlate) did with a call. */
#define LB_SOCK_UNTOUCHED 0   /* not a Service port the socket path serves: goes on as named */
#define LB_SOCK_REWRITTEN 1   /* address and port now the backend's (or, reversed, the Service's) */
#define LB_SOCK_REFUSED   2   /* a Service with no endpoints: the call fails with ECONNREFUSED */

/* A sock_addr call's address, as the core reads and rewrites it: an IPv4 address
 * in address[0] (`ipv6` 0), or an IPv6 one. The hooks copy it from and back to
 * their own context field (user_ip4, user_ip6), the only family-specific part. */
struct lb_sock_addr {
	__be32 address[4];
	__be16 port;
};

static __always_inline int lb_sock_verdict(int done)
{
	return done == LB_SOCK_REFUSED ? LB_SYS_REJECT : LB_SYS_PROCEED;
}

static __always_inline int lb6_addr_is_v4mapped(const __be32 *a)
{
	return !a[0] && !a[1] && a[2] == lb_htonl(0x0000ffff);
}

/* Slot key of a socket to `dst` (see the top of this file); `ipv6` is a constant at every
 * call, so the other family's branch is compiled out. A socket bound to an address and a
 * port hashes as lb4_flow_hash / lb6_flow_hash hash its first packet. */
static __always_inline __u32 lb_sock_hash(struct bpf_sock_addr *ctx, __u64 cookie,
					  const struct lb_sock_addr *dst, __u8 proto, int ipv6)
{
	struct bpf_sock *sk = ctx->sk;
	__u32 ports = 0, src = 0;

	if (sk && sk->src_port) {
		/* the flow hash's words: wire-order addresses and ports */
		ports = ((__u32)lb_htons((__u16)sk->src_port) << 16) | dst->port;
		if (ipv6)
			src = sk->src_ip6[0] | sk->src_ip6[1] | sk->src_ip6[2] | sk->src_ip6[3] ?
			      sk->src_ip6[0] ^ sk->src_ip6[1] ^ sk->src_ip6[2] ^ sk->src_ip6[3] : 0;
		else
			src = sk->src_ip4;  /* also a dual-stack socket's IPv4 source (skc_rcv_saddr) */
	}
	if (src)
		return lb_jhash_3words(src, ipv6 ? lb6_addr_fold(dst->address) : dst->address[0], ports,
				       LB_HASH_SEED ^ proto);
	return lb_jhash_3words((__u32)cookie, (__u32)(cookie >> 32), dst->port, LB_HASH_SEED ^ proto);
}

/* The frontend `dst` names, for protocol `proto`; 0 when it is no Service port the socket
 * path serves (then the TC path, if any, sees the packets as before). */
static __always_inline struct lb4_service *lb_sock_frontend(const struct lb_sock_addr *dst, __u8 proto, int ipv6)
{
	struct lb4_service *svc;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 0;                       /* SCTP and the rest: the TC path */
	if (ipv6)
		svc = lb6_lookup_frontend(dst->address, dst->port, proto, LB_SCOPE_INTERNAL);
	else
		svc = lb4_lookup_frontend(dst->address[0], dst->port, proto, LB_SCOPE_INTERNAL);
	if (!svc || (svc->flags & LB_SVC_F_ADDRESS))
		return 0;
	/* sessionAffinity ClientIP is keyed by the client's address, which an
	 * unbound socket does not have yet: such Services stay with the TC path,
	 * which keeps one affinity per client whichever path it came by. */
	if (svc->flags & LB_SVC_F_AFFINITY)
		return 0;
	return svc;
}

/* Remember which Service (`svc_addr`) the socket asked for, under (cookie, backend).
 * 0, or nonzero when the entry cannot be written. */
static __always_inline int lb_sock_revnat_remember(__u64 cookie, const struct lb_sock_addr *backend,
						   const struct lb_sock_addr *svc_addr, int ipv6)
{
	if (ipv6) {
		struct lb6_sock_revnat rev = { .port = svc_addr->port };
		struct lb6_sock_key key = { .cookie = cookie, .port = backend->port };

		lb6_addr_copy(key.address, backend->address);
		lb6_addr_copy(rev.address, svc_addr->address);
		return lb6_sock_revnat.update(&key, &rev);
	} else {
		struct lb4_sock_revnat rev = { .address = svc_addr->address[0], .port = svc_addr->port };
		struct lb4_sock_key key = { .cookie = cookie, .address = backend->address[0],
					    .port = backend->port };

		return lb4_sock_revnat.update(&key, &rev);
	}
}

/*
 * Translate `dst` to a backend of its frontend (family `ipv6`, a constant).
 * `refuse_empty`: a Service with no endpoints fails the call with ECONNREFUSED
 * (connect(), as the TC path's RST or ICMP port unreachable would make it fail);
 * otherwise the call goes on untranslated and the TC path answers as before.
 */
static __always_inline int lb_sock_xlate(struct bpf_sock_addr *ctx, struct lb_sock_addr *dst, int ipv6,
					 int refuse_empty)
{
	struct lb_sock_addr backend = {};
	struct lb4_service *svc;
	void *be;
	__u64 cookie;
	__u32 id;
	__u8 proto = ctx->protocol;

	svc = lb_sock_frontend(dst, proto, ipv6);
	if (!svc)
		return LB_SOCK_UNTOUCHED;
	if (!svc->backend_count || !svc->maglev_size) {
		/* Traffic policy Local with no local endpoint: the TC path drops,
		 * as kube-proxy does; a refusal here would tell the client more. */
		if (!refuse_empty || (svc->flags & LB_SVC_F_LOCAL_ONLY))
			return LB_SOCK_UNTOUCHED;
		lb_count_drop(REASON_NO_BACKEND);
		bpf_set_retval(-ECONNREFUSED);
		return LB_SOCK_REFUSED;
	}
	cookie = lb_get_socket_cookie(ctx);
	be = lb_select_backend_by_hash(svc, lb_sock_hash(ctx, cookie, dst, proto, ipv6), &id, ipv6);
	if (!be)
		return LB_SOCK_UNTOUCHED;       /* table names a missing backend: leave it to TC */
	if (ipv6) {
		lb6_addr_copy(backend.address, ((struct lb6_backend *)be)->address);
		backend.port = ((struct lb6_backend *)be)->port;
	} else {
		backend.address[0] = ((struct lb4_backend *)be)->address;
		backend.port = ((struct lb4_backend *)be)->port;
	}
	/* Without the reverse entry getpeername/recvmsg would show the backend:
	 * rather than that, leave this socket to the TC path. */
	if (lb_sock_revnat_remember(cookie, &backend, dst, ipv6))
		return LB_SOCK_UNTOUCHED;
	*dst = backend;
	lb_count_sock(svc->frontend_id);
	return LB_SOCK_REWRITTEN;
}

/* A backend address:port this socket was sent to -> the Service it named. A server's
 * accepted socket that sock_ops marked never went through connect4: accept() asks for its
 * peer (the kernel runs getpeername4 for it), and the reverse lookup, a miss in a map that
 * every translated connect() fills, cost 0.5 µs of each accepted connection (2026-12-04). */
static __always_inline int lb_sock_revnat_xlate(struct bpf_sock_addr *ctx, struct lb_sock_addr *peer, int ipv6)
{
	__u64 cookie = lb_get_socket_cookie(ctx);
	struct lb_sock_path *m = lb_sock_path_find(cookie);

	if (m && (m->flags & LB_SOCK_PATH_F_ACCEPTED))
		return LB_SOCK_UNTOUCHED;

	if (ipv6) {
		struct lb6_sock_key key = { .cookie = cookie, .port = peer->port };
		struct lb6_sock_revnat *rev;

		lb6_addr_copy(key.address, peer->address);
		rev = lb6_sock_revnat.lookup(&key);
		if (!rev)
			return LB_SOCK_UNTOUCHED;
		lb6_addr_copy(peer->address, rev->address);
		peer->port = rev->port;
	} else {
		struct lb4_sock_key key = { .cookie = cookie, .address = peer->address[0], .port = peer->port };
		struct lb4_sock_revnat *rev;

		rev = lb4_sock_revnat.lookup(&key);
		if (!rev)
			return LB_SOCK_UNTOUCHED;
		peer->address[0] = rev->address;
		peer->port = rev->port;
	}
	return LB_SOCK_REWRITTEN;
}

/* What a hook does with the call's address. */
#define LB_SOCK_CONNECT 0     /* connect() of TCP and UDP: Service -> backend; no endpoints: ECONNREFUSED */
#define LB_SOCK_SENDMSG 1     /* an unconnected UDP datagram: Service -> backend; no endpoints: the
			       * datagram goes on to the TC path, which answers ICMP port unreachable
			       * as before (an unconnected socket does not see it: sendto() succeeds
			       * either way) */
#define LB_SOCK_REVERSE 2     /* recvfrom() and getpeername(): backend -> the Service the socket named */

static __always_inline int lb_sock_work(struct bpf_sock_addr *ctx, struct lb_sock_addr *a, int ipv6, int op)
{
	int done;

	if (op == LB_SOCK_REVERSE)
		return lb_sock_revnat_xlate(ctx, a, ipv6);
	done = lb_sock_xlate(ctx, a, ipv6, op == LB_SOCK_CONNECT);
	/* connect() marks the socket it translated, for the TC programs' fast exit (and
	 * unmarks one it leaves alone: a UDP socket may connect again, elsewhere). */
	if (op == LB_SOCK_CONNECT)
		lb_sock_path_set(lb_get_socket_cookie(ctx), (__u8)ctx->protocol, done == LB_SOCK_REWRITTEN, 0);
	return done;
}

/*
 * The hooks of either family (`op` LB_SOCK_*): the call's address read from the context
 * field of its family, the core's work on it, the result written back. Only these two
 * know user_ip4 / user_ip6.
 */
static __always_inline int lb4_sock_hook(struct bpf_sock_addr *ctx, int op)
{
	struct lb_sock_addr a = { .address = { ctx->user_ip4 }, .port = (__be16)ctx->user_port };
	int done;

	if (ctx->user_family != LB_AF_INET)
		return LB_SYS_PROCEED;
	done = lb_sock_work(ctx, &a, 0, op);
	if (done == LB_SOCK_REWRITTEN) {
		ctx->user_ip4 = a.address[0];
		ctx->user_port = (__u32)a.port;
	}
	return lb_sock_verdict(done);
}

/* An IPv4-mapped address (a dual-stack socket and an IPv4 Service, or an IPv4 backend's
 * datagram) takes the IPv4 logic on its last word, which alone is rewritten. */
static __always_inline int lb6_sock_hook(struct bpf_sock_addr *ctx, int op)
{
	struct lb_sock_addr a = { .port = (__be16)ctx->user_port };
	int done;

	if (ctx->user_family != LB_AF_INET6)
		return LB_SYS_PROCEED;
	a.address[0] = ctx->user_ip6[0];
	a.address[1] = ctx->user_ip6[1];
	a.address[2] = ctx->user_ip6[2];
	a.address[3] = ctx->user_ip6[3];
	if (lb6_addr_is_v4mapped(a.address)) {
		a.address[0] = a.address[3];
		done = lb_sock_work(ctx, &a, 0, op);
		if (done == LB_SOCK_REWRITTEN) {
			ctx->user_ip6[3] = a.address[0];
			ctx->user_port = (__u32)a.port;
		}
		return lb_sock_verdict(done);
	}
	done = lb_sock_work(ctx, &a, 1, op);
	if (done == LB_SOCK_REWRITTEN) {
		ctx->user_ip6[0] = a.address[0];
		ctx->user_ip6[1] = a.address[1];
		ctx->user_ip6[2] = a.address[2];
		ctx->user_ip6[3] = a.address[3];
		ctx->user_port = (__u32)a.port;
	}
	return lb_sock_verdict(done);
}

/* ---- The server side: accepted sockets (sock_ops) ---- */

#define LB_SOCK_OPS_PASSIVE_ESTABLISHED 5     /* BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB */
#define LB_SOCK_OPS_OK 1                      /* a sock_ops program's "carry on" */

/*
 * Would the pod hooks leave every packet of this accepted TCP socket alone, for its
 * whole life? Its packets go from `local` to `remote` (the peer the server sees), in
 * the family `ipv6` (a constant). lb4_from_pod/lb6_from_pod would act on one of them
 * only through a conntrack entry of this 5-tuple, or when it is addressed to the
 * hairpin or node address (lb4_reply_to_node: a hairpin reply, a node client's, a
 * masqueraded north-south one); lb4_to_pod (a node process serving a pod) only through
 * the flow's reply entry. Entries of a flow are made by its first SYN, so by the time
 * the handshake ends they exist or never will: with none, and a peer that is not the
 * node, the socket is marked (lb_sock_path_set) and its packets pass the pod hooks
 * unparsed, as a translated client socket's do.
 * What the mark skips besides: lb4_forward_new's check that a packet to a frontend
 * with no backends is refused, which could only apply if the peer's own address and
 * source port were a Service's frontend.
 */
static __always_inline int lb_sock_accepted_untracked(const __be32 *local, __be16 lport, const __be32 *remote,
						      __be16 rport, int ipv6)
{
	const struct lb_node_addrs *a = node_addrs();

	if (!a)
		return 0;               /* an array of one: never, but the verifier wants it checked */
	if (ipv6) {
		struct ct6_key k = { .sport = lport, .dport = rport, .proto = IPPROTO_TCP, .dir = CT_DIR_FORWARD };

		if (!node_addr6_diff(remote, a->hairpin6) || !node_addr6_diff(remote, a->snat6))
			return 0;
		lb6_addr_copy(k.saddr, local);
		lb6_addr_copy(k.daddr, remote);
		if (ct6.lookup(&k))
			return 0;
		k.dir = CT_DIR_REPLY;
		return !ct6.lookup(&k);
	} else {
		struct ct4_key k = { .saddr = local[0], .daddr = remote[0], .sport = lport, .dport = rport,
				     .proto = IPPROTO_TCP, .dir = CT_DIR_FORWARD };

		if ((a->hairpin4 && remote[0] == a->hairpin4) || (a->snat4 && remote[0] == a->snat4))
			return 0;
		if (ct4.lookup(&k))
			return 0;
		k.dir = CT_DIR_REPLY;
		return !ct4.lookup(&k);
	}
}

/*
 * sock_ops at the node's cgroup: a server's accepted connection (PASSIVE_ESTABLISHED)
 * that no conntrack entry of ours describes is marked, so the server veth's from_pod
 * lets its replies pass at once (the request side, to_pod, still runs: a forwarded
 * packet carries no socket there). A dual-stack socket's IPv4-mapped peer takes the
 * IPv4 logic, as its packets are IPv4. Every other callback passes.
 * remote_port is the peer's port in network order, in the field's upper half on a
 * little-endian CPU (the kernel shifts it there); local_port is in host order.
 */
static __always_inline int lb_sock_ops(struct bpf_sock_ops *ctx)
{
	__be32 local[4], remote[4];
	__be16 lport, rport;
	int ipv6;

	if (ctx->op != LB_SOCK_OPS_PASSIVE_ESTABLISHED)
		return LB_SOCK_OPS_OK;
	lport = lb_htons((__u16)ctx->local_port);
	rport = (__be16)(ctx->remote_port >> 16);
	if (ctx->family == LB_AF_INET) {
		local[0] = ctx->local_ip4;
		remote[0] = ctx->remote_ip4;
		ipv6 = 0;
	} else if (ctx->family == LB_AF_INET6) {
		remote[0] = ctx->remote_ip6[0];
		remote[1] = ctx->remote_ip6[1];
		remote[2] = ctx->remote_ip6[2];
		remote[3] = ctx->remote_ip6[3];
		local[0] = ctx->local_ip6[0];
		local[1] = ctx->local_ip6[1];
		local[2] = ctx->local_ip6[2];
		local[3] = ctx->local_ip6[3];
		ipv6 = !lb6_addr_is_v4mapped(remote);
		if (!ipv6) {
			local[0] = local[3];
			remote[0] = remote[3];
		}
	} else {
		return LB_SOCK_OPS_OK;
	}
	if (ipv6 ? lb_sock_accepted_untracked(local, lport, remote, rport, 1)
		 : lb_sock_accepted_untracked(local, lport, remote, rport, 0))
		lb_sock_path_set(lb_get_socket_cookie(ctx), IPPROTO_TCP, 1, LB_SOCK_PATH_F_ACCEPTED);
	return LB_SOCK_OPS_OK;
}

#endif /* EBPFSVC_SOCK_H */
