/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Conntrack for load-balanced flows.
 *
 * A flow has two entries with identical values: FORWARD keyed by the 5-tuple
 * the client sends (client -> VIP), REPLY keyed by the 5-tuple the backend
 * sends (backend -> client). The forward entry pins the backend, so an
 * established flow is unaffected by Maglev table changes; the reply entry gives
 * the VIP to restore as the reply's source.
 *
 * Lifetimes follow the state seen so far (CT_TIMEOUT_* in abi.h): for TCP
 * half-open, established, half-closed (close-wait) or closing; for UDP whether
 * a reply was seen (a stream). An expired entry is treated as absent; the LRU
 * reclaims its memory later, so there is no garbage collector to run.
 */
#ifndef EBPFSVC_CT_H
#define EBPFSVC_CT_H

#define LB_NSEC_PER_SEC 1000000000ULL

/*
 * Nanoseconds from `then` to `now`; 0 when `then` is later. A packet reads the
 * clock, then finds an entry another CPU stamped a moment after that read (the
 * other direction of the flow, or its next segment): an unsigned `now - then`
 * would wrap to "ages ago", and a busy established flow would be taken for
 * expired and started over mid-stream (seen: iperf3 through a SNATed NodePort
 * reset within a second once packets were MTU-sized). The difference is taken
 * modulo 2^64 and read as signed, so a stamp from before boot (the clock is
 * CLOCK_MONOTONIC; tests age entries that way) is still that old.
 */
static __always_inline __u64 lb_age_ns(__u64 now, __u64 then)
{
	__s64 d = (__s64)(now - then);

	return d > 0 ? (__u64)d : 0;
}

/*
 * A packet's clock, read on first use. Most packets a pod hook sees need no time:
 * a lookup that misses (pod-to-pod traffic, a Service-less port) decides nothing by
 * it, so the TC paths read the clock only where a found entry's age or a new
 * entry's stamp needs it (bpf_ktime_get_ns is a helper call on every packet
 * otherwise). `ns` 0: not read yet (the monotonic clock is never 0 once booted).
 */
struct lb_clock {
	__u64 ns;
};

static __always_inline __u64 lb_clock_ns(struct lb_clock *c)
{
	if (!c->ns)
		c->ns = bpf_ktime_get_ns();
	return c->ns;
}

/* How stale last_seen_ns may get before a packet rewrites it. Lifetimes are
 * 10 s and more, so a second of slack costs nothing, and most packets then
 * leave the entry's cache line clean instead of bouncing it between CPUs. */
#ifndef CT_REFRESH_NS
#define CT_REFRESH_NS LB_NSEC_PER_SEC
#endif

static __always_inline void ct4_key_forward(struct ct4_key *k, const struct lb4_pkt *p)
{
	k->saddr = p->saddr;
	k->daddr = p->daddr;
	k->sport = p->sport;
	k->dport = p->dport;
	k->proto = p->proto;
	k->dir = CT_DIR_FORWARD;
	k->pad0 = 0;
}

/* The key of a packet as it is on the wire, looked up as a reply (backend -> client). */
static __always_inline void ct4_key_reply(struct ct4_key *k, const struct lb4_pkt *p)
{
	ct4_key_forward(k, p);
	k->dir = CT_DIR_REPLY;
}

/* The key a reply of this flow will carry: backend -> client (or -> the hairpin address). */
static __always_inline void ct4_key_reply_of(struct ct4_key *k, const struct ct4_entry *e,
					     __be32 client_addr, __be16 client_port, __u8 proto)
{
	k->saddr = e->backend_addr;
	k->daddr = client_addr;
	k->sport = e->backend_port;
	k->dport = client_port;
	k->proto = proto;
	k->dir = CT_DIR_REPLY;
	k->pad0 = 0;
}

/* The forward key of a flow, rebuilt from a reply packet and its entry. */
static __always_inline void ct4_key_forward_of(struct ct4_key *k, const struct ct4_entry *e,
					       __be32 client_addr, __be16 client_port, __u8 proto)
{
	k->saddr = client_addr;
	k->daddr = e->frontend_addr;
	k->sport = client_port;
	k->dport = e->frontend_port;
	k->proto = proto;
	k->dir = CT_DIR_FORWARD;
	k->pad0 = 0;
}

/* A packet was seen in an entry's direction (either family): its last_seen_ns moves. */
static __always_inline void ct_touch(__u64 *last_seen_ns, __u64 now)
{
	if (lb_age_ns(now, *last_seen_ns) > CT_REFRESH_NS)
		*last_seen_ns = now;
}

static __always_inline void ct4_touch(struct ct4_entry *e, __u64 now)
{
	ct_touch(&e->last_seen_ns, now);
}

/*
 * Add CT_F_* bits to an entry's flags, atomically. The two directions of a flow run
 * on different CPUs at once (in a simultaneous close the client's FIN and the
 * backend's cross), and each adds its bits to both entries: a plain read-modify-write
 * loses the other side's. Seen on 2026-12-03 under wrk: forward entries left
 * "established" without the FIN their reply entries had, so when the reply entry
 * expired, a new connection on the same ports kept the forward entry and its SYN-ACK
 * went back untranslated (a reset, retried on every SYN). BPF before -mcpu=v3 has
 * atomic OR on 64-bit words only: `flags` opens its entry's last 8 bytes (asserted
 * below), whose other bytes, padding, are OR-ed with zero.
 */
static __always_inline void ct_flags_add(__u8 *flags, __u8 bits)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	__sync_fetch_and_or((__u64 *)flags, (__u64)bits);
#else
	__sync_fetch_and_or((__u64 *)flags, (__u64)bits << 56);
#endif
}

_Static_assert(__builtin_offsetof(struct ct4_entry, flags) == sizeof(struct ct4_entry) - 8,
	       "ct_flags_add: ct4_entry's flags must open its last 8 bytes");
_Static_assert(__builtin_offsetof(struct ct6_entry, flags) == sizeof(struct ct6_entry) - 8,
	       "ct_flags_add: ct6_entry's flags must open its last 8 bytes");

static __always_inline int ct4_closing(__u8 flags)
{
	return (flags & CT_F_SEEN_RST) ||
	       ((flags & CT_F_SEEN_FIN_FWD) && (flags & CT_F_SEEN_FIN_REV));
}

static __always_inline __u64 ct4_lifetime_ns(__u8 proto, __u8 flags)
{
	if (proto == IPPROTO_UDP)	/* a reply seen makes it a stream, as in nf_conntrack */
		return (flags & CT_F_ESTABLISHED ? CT_TIMEOUT_UDP_STREAM_S : CT_TIMEOUT_UDP_S) * LB_NSEC_PER_SEC;
	if (proto != IPPROTO_TCP)
		return CT_TIMEOUT_OTHER_S * LB_NSEC_PER_SEC;
	if (ct4_closing(flags))
		return CT_TIMEOUT_TCP_CLOSE_S * LB_NSEC_PER_SEC;
	if (flags & (CT_F_SEEN_FIN_FWD | CT_F_SEEN_FIN_REV))
		return CT_TIMEOUT_TCP_CLOSE_WAIT_S * LB_NSEC_PER_SEC;
	if (flags & CT_F_ESTABLISHED)
		return CT_TIMEOUT_TCP_ESTABLISHED_S * LB_NSEC_PER_SEC;
	return CT_TIMEOUT_TCP_SYN_S * LB_NSEC_PER_SEC;
}

static __always_inline int ct4_expired(const struct ct4_entry *e, __u8 proto, __u64 now)
{
	return lb_age_ns(now, e->last_seen_ns) > ct4_lifetime_ns(proto, e->flags);
}

/*
 * Can a client packet start a flow? Any datagram can; a TCP segment only if it
 * is a SYN (without ACK). Any other segment that finds no entry belongs to a
 * connection this datapath never balanced: typically one kube-proxy's rules
 * translated before ebpfsvc took over. Balancing it now would hand it to a
 * backend that may not hold the connection, and even the right backend would
 * see it under another source port (nf_conntrack remaps the new tuple, whose
 * reply clashes with its own entry's): a reset either way. Left to the kernel,
 * nf_conntrack's entry keeps translating the connection, also after
 * `kube-proxy --cleanup`, since entries outlive rules. Calico's eBPF dataplane
 * does the same ("CT mid-flow miss; fall through to iptables").
 */
static __always_inline int ct_starts_flow(__u8 proto, __u8 tcp_flags)
{
	return proto != IPPROTO_TCP || (tcp_flags & (LB_TCP_SYN | LB_TCP_ACK)) == LB_TCP_SYN;
}

static __always_inline int ct4_starts_flow(const struct lb4_pkt *p)
{
	return ct_starts_flow(p->proto, p->tcp_flags);
}

/* Is a client packet (`proto`, `tcp_flags`) the end of a tracked flow whose entry
 * has `last_seen_ns` and `flags`: the entry expired, or a fresh SYN on a TCP flow
 * that is closed or has seen a reply (port reuse: it starts a new one)? Both families.
 * Not only a closed one: the two entries of a flow are separate LRU elements, and
 * when the reply entry is gone (evicted, or expired before a forward entry that
 * missed a FIN), keeping the forward entry would send every later SYN on these ports
 * to a backend whose SYN-ACK nothing translates back. A SYN the client sends again
 * because its SYN-ACK was lost starts over too: the same backend (the same 5-tuple
 * hashes to the same Maglev slot; affinity names it again), new entries. */
static __always_inline int ct_flow_over(__u64 last_seen_ns, __u8 flags, __u8 proto, __u8 tcp_flags, __u64 now)
{
	return lb_age_ns(now, last_seen_ns) > ct4_lifetime_ns(proto, flags) ||
	       (proto == IPPROTO_TCP && (ct4_closing(flags) || (flags & CT_F_ESTABLISHED)) &&
		ct_starts_flow(proto, tcp_flags));
}

static __always_inline int ct4_flow_over(const struct ct4_entry *e, const struct lb4_pkt *p, __u64 now)
{
	return ct_flow_over(e->last_seen_ns, e->flags, p->proto, p->tcp_flags, now);
}

/*
 * Is a packet from a backend, found under reply entry `e`, the answer to another
 * connection than the one `e` translated? A SYN-ACK on a closed flow is: the
 * client reused the flow's ports for a new connection straight to the backend
 * (the socket path, lib/sock.h, or plain pod-to-pod traffic), whose SYN never
 * met this entry; a new connection through the frontend would have replaced
 * the entry (ct4_flow_over). Translated, that SYN-ACK would come from the
 * frontend and the client would answer it with a reset.
 */
static __always_inline int ct_reply_of_other_flow(__u8 flags, __u8 proto, __u8 tcp_flags)
{
	return proto == IPPROTO_TCP && ct4_closing(flags) &&
	       (tcp_flags & (LB_TCP_SYN | LB_TCP_ACK)) == (LB_TCP_SYN | LB_TCP_ACK);
}

static __always_inline int ct4_reply_of_other_flow(const struct ct4_entry *e, const struct lb4_pkt *p)
{
	return ct_reply_of_other_flow(e->flags, p->proto, p->tcp_flags);
}

/* Look up an entry, treating an expired one as absent; the clock is read only on a hit. */
static __always_inline struct ct4_entry *ct4_lookup_at(struct ct4_key *k, struct lb_clock *clk)
{
	struct ct4_entry *e = ct4.lookup(k);

	if (e && ct4_expired(e, k->proto, lb_clock_ns(clk)))
		return 0;
	return e;
}

static __always_inline struct ct4_entry *ct4_lookup(struct ct4_key *k, __u64 now)
{
	struct lb_clock clk = { .ns = now };

	return ct4_lookup_at(k, &clk);
}

/* CT_F_* bits a TCP segment (LB_TCP_* `tcp_flags`) adds, seen in direction `dir`. */
static __always_inline __u8 ct_tcp_flags(__u8 proto, __u8 tcp_flags, __u8 dir)
{
	__u8 f = 0;

	if (proto != IPPROTO_TCP)
		return 0;
	if (tcp_flags & LB_TCP_SYN)
		f |= CT_F_SEEN_SYN;
	if (tcp_flags & LB_TCP_RST)
		f |= CT_F_SEEN_RST;
	if (tcp_flags & LB_TCP_FIN)
		f |= dir == CT_DIR_FORWARD ? CT_F_SEEN_FIN_FWD : CT_F_SEEN_FIN_REV;
	return f;
}

static __always_inline __u8 ct4_tcp_flags(const struct lb4_pkt *p, __u8 dir)
{
	return ct_tcp_flags(p->proto, p->tcp_flags, dir);
}

/* Remove both entries of a flow, given its forward key and entry. */
static __always_inline void ct4_delete_flow(struct ct4_key *fwd, const struct ct4_entry *e)
{
	struct ct4_key rk;
	__be32 client = (e->flags & CT_F_HAIRPIN) ? node_hairpin4() : fwd->saddr;

	ct4_key_reply_of(&rk, e, client, fwd->sport, fwd->proto);
	ct4.delete(&rk);
	ct4.delete(fwd);
}

/* The tracked flow a client packet belongs to (its forward key in `fk`), or 0:
 * none, or one that is over, whose entries are then deleted. */
static __always_inline struct ct4_entry *ct4_flow_of_at(struct ct4_key *fk, const struct lb4_pkt *p,
						       struct lb_clock *clk)
{
	struct ct4_entry *e;

	ct4_key_forward(fk, p);
	e = ct4.lookup(fk);
	if (e && ct4_flow_over(e, p, lb_clock_ns(clk))) {
		ct4_delete_flow(fk, e);
		return 0;
	}
	return e;
}

static __always_inline struct ct4_entry *ct4_flow_of(struct ct4_key *fk, const struct lb4_pkt *p, __u64 now)
{
	struct lb_clock clk = { .ns = now };

	return ct4_flow_of_at(fk, p, &clk);
}

/*
 * Create both entries of a new flow. Fail closed: if either insert fails the
 * caller drops the packet (REASON_CT_CREATE_FAILED), because a translated flow
 * whose replies cannot be reverse-NATed is worse than a retransmission.
 */
static __always_inline int ct4_create(struct ct4_key *fwd, struct ct4_entry *e, __be32 reply_daddr)
{
	struct ct4_key rk;

	ct4_key_reply_of(&rk, e, reply_daddr, fwd->sport, fwd->proto);
	if (ct4.update(fwd, e))
		return -1;
	if (ct4.update(&rk, e)) {
		ct4.delete(fwd);
		return -1;
	}
	return 0;
}

/*
 * A reply was seen: mark the flow established / closing in the reply entry
 * and, when its state changed, in the forward entry too (whose lifetime the
 * client side checks). Only state changes pay for the second lookup.
 */
static __always_inline void ct4_note_reply(struct ct4_entry *re, const struct lb4_pkt *p,
					   __be32 client_addr, __be16 client_port, __u64 now)
{
	__u8 flags = re->flags | CT_F_ESTABLISHED | ct4_tcp_flags(p, CT_DIR_REPLY);
	struct ct4_key fk;
	struct ct4_entry *fe;

	ct4_touch(re, now);
	if (flags == re->flags)
		return;
	ct_flags_add(&re->flags, flags);
	ct4_key_forward_of(&fk, re, client_addr, client_port, p->proto);
	fe = ct4.lookup(&fk);
	if (fe)
		ct_flags_add(&fe->flags, flags);
}

/* ---- IPv6 twins (ct6): the same two entries per flow, lifetimes and rules; the
 * state helpers above that take flags (ct4_closing, ct4_lifetime_ns) serve both. ---- */

static __always_inline void ct6_key_forward(struct ct6_key *k, const struct lb6_pkt *p)
{
	lb6_addr_copy(k->saddr, p->saddr);
	lb6_addr_copy(k->daddr, p->daddr);
	k->sport = p->sport;
	k->dport = p->dport;
	k->proto = p->proto;
	k->dir = CT_DIR_FORWARD;
	k->pad0 = 0;
}

static __always_inline void ct6_key_reply(struct ct6_key *k, const struct lb6_pkt *p)
{
	ct6_key_forward(k, p);
	k->dir = CT_DIR_REPLY;
}

static __always_inline void ct6_key_reply_of(struct ct6_key *k, const struct ct6_entry *e,
					     const __be32 *client_addr, __be16 client_port, __u8 proto)
{
	lb6_addr_copy(k->saddr, e->backend_addr);
	lb6_addr_copy(k->daddr, client_addr);
	k->sport = e->backend_port;
	k->dport = client_port;
	k->proto = proto;
	k->dir = CT_DIR_REPLY;
	k->pad0 = 0;
}

static __always_inline void ct6_key_forward_of(struct ct6_key *k, const struct ct6_entry *e,
					       const __be32 *client_addr, __be16 client_port, __u8 proto)
{
	lb6_addr_copy(k->saddr, client_addr);
	lb6_addr_copy(k->daddr, e->frontend_addr);
	k->sport = client_port;
	k->dport = e->frontend_port;
	k->proto = proto;
	k->dir = CT_DIR_FORWARD;
	k->pad0 = 0;
}

static __always_inline void ct6_touch(struct ct6_entry *e, __u64 now)
{
	ct_touch(&e->last_seen_ns, now);
}

static __always_inline int ct6_expired(const struct ct6_entry *e, __u8 proto, __u64 now)
{
	return lb_age_ns(now, e->last_seen_ns) > ct4_lifetime_ns(proto, e->flags);
}

/* As ct4_starts_flow: only a SYN (or any datagram) starts a flow. */
static __always_inline int ct6_starts_flow(const struct lb6_pkt *p)
{
	return ct_starts_flow(p->proto, p->tcp_flags);
}

static __always_inline int ct6_flow_over(const struct ct6_entry *e, const struct lb6_pkt *p, __u64 now)
{
	return ct_flow_over(e->last_seen_ns, e->flags, p->proto, p->tcp_flags, now);
}

/* As ct4_reply_of_other_flow. */
static __always_inline int ct6_reply_of_other_flow(const struct ct6_entry *e, const struct lb6_pkt *p)
{
	return ct_reply_of_other_flow(e->flags, p->proto, p->tcp_flags);
}

/* As ct4_lookup_at. */
static __always_inline struct ct6_entry *ct6_lookup_at(struct ct6_key *k, struct lb_clock *clk)
{
	struct ct6_entry *e = ct6.lookup(k);

	if (e && ct6_expired(e, k->proto, lb_clock_ns(clk)))
		return 0;
	return e;
}

static __always_inline struct ct6_entry *ct6_lookup(struct ct6_key *k, __u64 now)
{
	struct lb_clock clk = { .ns = now };

	return ct6_lookup_at(k, &clk);
}

static __always_inline __u8 ct6_tcp_flags(const struct lb6_pkt *p, __u8 dir)
{
	return ct_tcp_flags(p->proto, p->tcp_flags, dir);
}

/* Both entries of a flow: a hairpin flow's reply entry is keyed by node_hairpin6(), the
 * address its reply goes to, the others' by the client's. */
static __always_inline void ct6_delete_flow(struct ct6_key *fwd, const struct ct6_entry *e)
{
	struct ct6_key rk;
	__be32 hairpin[4];

	if ((e->flags & CT_F_HAIRPIN) && !node_hairpin6(hairpin))
		ct6_key_reply_of(&rk, e, hairpin, fwd->sport, fwd->proto);
	else
		ct6_key_reply_of(&rk, e, fwd->saddr, fwd->sport, fwd->proto);
	ct6.delete(&rk);
	ct6.delete(fwd);
}

/* As ct4_flow_of_at. */
static __always_inline struct ct6_entry *ct6_flow_of_at(struct ct6_key *fk, const struct lb6_pkt *p,
						       struct lb_clock *clk)
{
	struct ct6_entry *e;

	ct6_key_forward(fk, p);
	e = ct6.lookup(fk);
	if (e && ct6_flow_over(e, p, lb_clock_ns(clk))) {
		ct6_delete_flow(fk, e);
		return 0;
	}
	return e;
}

static __always_inline struct ct6_entry *ct6_flow_of(struct ct6_key *fk, const struct lb6_pkt *p, __u64 now)
{
	struct lb_clock clk = { .ns = now };

	return ct6_flow_of_at(fk, p, &clk);
}

/* As ct4_create: both entries, or neither (fail closed); replies come to `reply_daddr`. */
static __always_inline int ct6_create(struct ct6_key *fwd, struct ct6_entry *e, const __be32 *reply_daddr)
{
	struct ct6_key rk;

	ct6_key_reply_of(&rk, e, reply_daddr, fwd->sport, fwd->proto);
	if (ct6.update(fwd, e))
		return -1;
	if (ct6.update(&rk, e)) {
		ct6.delete(fwd);
		return -1;
	}
	return 0;
}

static __always_inline void ct6_note_reply(struct ct6_entry *re, const struct lb6_pkt *p,
					   const __be32 *client_addr, __be16 client_port, __u64 now)
{
	__u8 flags = re->flags | CT_F_ESTABLISHED | ct6_tcp_flags(p, CT_DIR_REPLY);
	struct ct6_key fk;
	struct ct6_entry *fe;

	ct6_touch(re, now);
	if (flags == re->flags)
		return;
	ct_flags_add(&re->flags, flags);
	ct6_key_forward_of(&fk, re, client_addr, client_port, p->proto);
	fe = ct6.lookup(&fk);
	if (fe)
		ct_flags_add(&fe->flags, flags);
}

#endif /* EBPFSVC_CT_H */
