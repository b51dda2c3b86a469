/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Frontend lookup and backend selection for new flows.
 *
 * A frontend's Maglev table is the range [maglev_offset, maglev_offset +
 * maglev_size) of the flat lb_maglev array. A new flow takes the slot
 * hash(5-tuple) % size (consistent: every packet of a flow, and every node,
 * picks the same slot), or a random slot with LB_SVC_F_RANDOM (kube-proxy's
 * iptables probability rules, spread without stickiness).
 */
#ifndef EBPFSVC_LB_H
#define EBPFSVC_LB_H

/* LB_HASH_SEED and LB_TERMINATING_PROBES are in abi.h: Python predicts slots with them too. */

#define lb_rol32(x, k) (((x) << (k)) | ((x) >> (32 - (k))))

/* Bob Jenkins' lookup3 final mix over three words (the kernel's jhash_3words).
 * ebpfsvc/datapath/flowhash.py has the Python twin, so tests can predict a slot. */
static __always_inline __u32 lb_jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	a += 0xdeadbeef + (3 << 2) + initval;
	b += 0xdeadbeef + (3 << 2) + initval;
	c += 0xdeadbeef + (3 << 2) + initval;
	c ^= b; c -= lb_rol32(b, 14);
	a ^= c; a -= lb_rol32(c, 11);
	b ^= a; b -= lb_rol32(a, 25);
	c ^= b; c -= lb_rol32(b, 16);
	a ^= c; a -= lb_rol32(c, 4);
	b ^= a; b -= lb_rol32(a, 14);
	c ^= b; c -= lb_rol32(b, 24);
	return c;
}

/* Hash of a flow's 5-tuple as the client sent it (wire byte order words). */
static __always_inline __u32 lb4_flow_hash(const struct lb4_pkt *p)
{
	return lb_jhash_3words(p->saddr, p->daddr, ((__u32)p->sport << 16) | p->dport,
			       LB_HASH_SEED ^ p->proto);
}

static __always_inline struct lb4_service *lb4_lookup_frontend(__be32 addr, __be16 port, __u8 proto, __u8 scope)
{
	struct lb4_key key = {
		.address = addr,
		.port = port,
		.proto = proto,
		.scope = scope,
	};

	return lb4_frontends.lookup(&key);
}

/* Is `addr` a frontend address at all (the writer's port-0 marker entry)? */
static __always_inline int lb4_is_frontend_address(__be32 addr, __u8 proto, __u8 scope)
{
	struct lb4_service *svc = lb4_lookup_frontend(addr, 0, proto, scope);

	return svc && (svc->flags & LB_SVC_F_ADDRESS);
}

/* Backends that take no new flows: terminating (unless nothing else is left)
 * and not ready (never). */
#define LB_BE_F_NO_NEW_FLOWS (LB_BE_F_TERMINATING | LB_BE_F_NOT_READY)

/*
 * Is the agent's option `flag` (LB_CFG_*, abi.h) on? Read at run time, not
 * compiled in, so that one object serves every node; a word without
 * LB_CFG_PUBLISHED (maps as created) means the defaults. An array lookup with a
 * constant key: the verifier inlines it.
 */
static __always_inline int lb_option(__u32 flag)
{
	__u32 k = 0;
	__u32 *word = lb_agent_config.lookup(&k);
	__u32 w = word ? *word : 0;

	if (!(w & LB_CFG_PUBLISHED))
		w = LB_CFG_DEFAULTS;
	return (w & flag) != 0;
}

/*
 * May an established flow of protocol `proto` stay on backend `id`? Not when
 * the backend was removed, unless TCP without LB_CFG_RESET_REMOVED_TCP (the
 * agent's --no-reset-removed-endpoint-tcp: the flow goes on to the address its
 * conntrack entry holds until it closes or expires, as kube-proxy never flushes
 * TCP conntrack; by default the client learns at once that the pod is gone:
 * docs/semantics.md); not for a UDP
 * flow when the backend is not ready (kube-proxy clears a not-ready endpoint's
 * UDP conntrack entries, so the next datagram is balanced again, while TCP
 * connections carry on).
 */
static __always_inline int lb4_flow_keeps_backend(__u32 id, __u8 proto)
{
	struct lb4_backend *be = lb4_backends.lookup(&id);

	if (!be)
		return proto == IPPROTO_TCP && !lb_option(LB_CFG_RESET_REMOVED_TCP);
	return !(proto == IPPROTO_UDP && (be->flags & LB_BE_F_NOT_READY));
}

/*
 * Pick a backend for a new flow from the frontend's table, at slot `hash` % size.
 *
 * A terminating or not-ready backend gets no new flows while another one is
 * usable: the writer leaves them out of a table (terminating ones unless
 * nothing else is left), but a backend can change before its table is
 * rebuilt, so the next few slots are tried. If every probe is terminating, the
 * first one is used (kube-proxy's terminating fallback); a not-ready backend
 * is never a fallback.
 */
static __always_inline void *lb_select_backend_by_hash(const struct lb4_service *svc, __u32 hash,
							 __u32 *backend_id, int ipv6)
{
	void *fallback = 0, *be;
	__u32 fallback_id = 0, size = svc->maglev_size, slot, idx, half, i, id;
	struct lb_maglev_pair *pair;
	__u8 flags;

	if (!size)
		return 0;
	if (svc->flags & LB_SVC_F_RANDOM)
		slot = bpf_get_prandom_u32() % size;
	else
		slot = hash % size;

#pragma unroll
	for (i = 0; i < LB_TERMINATING_PROBES; i++) {
		idx = svc->maglev_offset + slot;
		half = idx & 1;
		idx >>= 1;
		pair = lb_maglev.lookup(&idx);
		if (!pair)
			break;
		id = half ? pair->slot[1] : pair->slot[0];
		/* `ipv6` is a constant at every call: the other family's branch is compiled out. */
		if (ipv6) {
			be = lb6_backends.lookup(&id);
			flags = be ? ((struct lb6_backend *)be)->flags : 0;
		} else {
			be = lb4_backends.lookup(&id);
			flags = be ? ((struct lb4_backend *)be)->flags : 0;
		}
		if (be) {
			if (!(flags & LB_BE_F_NO_NEW_FLOWS)) {
				*backend_id = id;
				return be;
			}
			if (!fallback && !(flags & LB_BE_F_NOT_READY)) {
				fallback = be;
				fallback_id = id;
			}
		}
		slot = slot + 1 == size ? 0 : slot + 1;
	}
	*backend_id = fallback_id;
	return fallback;
}

static __always_inline struct lb4_backend *lb4_select_backend_by_hash(const struct lb4_service *svc,
								     __u32 hash, __u32 *backend_id)
{
	return lb_select_backend_by_hash(svc, hash, backend_id, 0);
}

/* The same for a packet: the slot of its 5-tuple hash. The socket hooks
 * (lib/sock.h) key the table by something else, since at connect() the source
 * port may not be chosen yet. */
static __always_inline struct lb4_backend *lb4_select_backend(const struct lb4_service *svc,
							     const struct lb4_pkt *p, __u32 *backend_id)
{
	return lb4_select_backend_by_hash(svc, (svc->flags & LB_SVC_F_RANDOM) ? 0 : lb4_flow_hash(p), backend_id);
}

/* ---- IPv6 twins: the same tables (lb_maglev holds backend ids of either family),
 * frontends in lb6_frontends, backends in lb6_backends. ---- */

/* An IPv6 address folded to one word for the flow hash (ebpfsvc/datapath/flowhash.py folds alike). */
static __always_inline __u32 lb6_addr_fold(const __be32 *a)
{
	return a[0] ^ a[1] ^ a[2] ^ a[3];
}

static __always_inline __u32 lb6_flow_hash(const struct lb6_pkt *p)
{
	return lb_jhash_3words(lb6_addr_fold(p->saddr), lb6_addr_fold(p->daddr),
			       ((__u32)p->sport << 16) | p->dport, LB_HASH_SEED ^ p->proto);
}

static __always_inline struct lb4_service *lb6_lookup_frontend(const __be32 *addr, __be16 port, __u8 proto,
							       __u8 scope)
{
	struct lb6_key key = {
		.port = port,
		.proto = proto,
		.scope = scope,
	};

	lb6_addr_copy(key.address, addr);
	return lb6_frontends.lookup(&key);
}

static __always_inline int lb6_is_frontend_address(const __be32 *addr, __u8 proto, __u8 scope)
{
	struct lb4_service *svc = lb6_lookup_frontend(addr, 0, proto, scope);

	return svc && (svc->flags & LB_SVC_F_ADDRESS);
}

/* As lb4_flow_keeps_backend. */
static __always_inline int lb6_flow_keeps_backend(__u32 id, __u8 proto)
{
	struct lb6_backend *be = lb6_backends.lookup(&id);

	return be && !(proto == IPPROTO_UDP && (be->flags & LB_BE_F_NOT_READY));
}

/* As lb4_select_backend, over lb6_backends. */
static __always_inline struct lb6_backend *lb6_select_backend(const struct lb4_service *svc,
							     const struct lb6_pkt *p, __u32 *backend_id)
{
	return lb_select_backend_by_hash(svc, (svc->flags & LB_SVC_F_RANDOM) ? 0 : lb6_flow_hash(p), backend_id, 1);
}

#endif /* EBPFSVC_LB_H */
