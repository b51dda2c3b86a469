/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Fragments of translated flows (IPv4, and IPv6's fragment header alike).
 *
 * Only the first fragment carries the ports, so the ports of a fragmented
 * datagram are remembered under (saddr, daddr, IP id, proto) when its first
 * fragment passes, and later fragments borrow them to find their flow and get
 * the same translation (IP header only). A later fragment that arrives before
 * its first (or whose first was never seen) cannot be placed: if it is bound to
 * a frontend address it is dropped (REASON_FRAG_UNTRACKED), never sent to a
 * guessed backend; reassembly at the receiver then fails and the sender
 * retransmits, as through any middlebox that needs ports.
 */
#ifndef EBPFSVC_FRAG_H
#define EBPFSVC_FRAG_H

static __always_inline void frag4_key_of(struct frag4_key *k, const struct lb4_pkt *p)
{
	k->saddr = p->saddr;
	k->daddr = p->daddr;
	k->id = p->ip_id;
	k->proto = p->proto;
	k->pad0 = 0;
}

/* First fragment: remember its ports (call before any rewrite). */
static __always_inline void frag4_record(const struct lb4_pkt *p)
{
	struct frag4_key k;
	struct frag4_ports ports = { .sport = p->sport, .dport = p->dport };

	if (p->frag != LB_FRAG_FIRST)
		return;
	ports.first_seen_ns = bpf_ktime_get_ns();
	frag4_key_of(&k, p);
	frag4.update(&k, &ports);
}

/* Later fragment: fill in the ports of its datagram; -1 when unknown. An entry
 * older than the reassembly timeout belongs to an earlier datagram that had the
 * same IP id (ids wrap after 65536 datagrams): never borrow its ports. */
static __always_inline int frag4_lookup_ports(struct lb4_pkt *p)
{
	struct frag4_key k;
	struct frag4_ports *ports;

	frag4_key_of(&k, p);
	ports = frag4.lookup(&k);
	if (!ports || lb_age_ns(bpf_ktime_get_ns(), ports->first_seen_ns) > FRAG_TIMEOUT_S * LB_NSEC_PER_SEC)
		return -1;
	p->sport = ports->sport;
	p->dport = ports->dport;
	return 0;
}

/* IPv6: the same, keyed by the fragment header's 32-bit identification. */
static __always_inline void frag6_key_of(struct frag6_key *k, const struct lb6_pkt *p)
{
	lb6_addr_copy(k->saddr, p->saddr);
	lb6_addr_copy(k->daddr, p->daddr);
	k->id = p->frag_id;
	k->proto = p->proto;
	k->pad0 = 0;
	k->pad1 = 0;
}

static __always_inline void frag6_record(const struct lb6_pkt *p)
{
	struct frag6_key k;
	struct frag4_ports ports = { .sport = p->sport, .dport = p->dport };

	if (p->frag != LB_FRAG_FIRST)
		return;
	ports.first_seen_ns = bpf_ktime_get_ns();
	frag6_key_of(&k, p);
	frag6.update(&k, &ports);
}

static __always_inline int frag6_lookup_ports(struct lb6_pkt *p)
{
	struct frag6_key k;
	struct frag4_ports *ports;

	frag6_key_of(&k, p);
	ports = frag6.lookup(&k);
	if (!ports || lb_age_ns(bpf_ktime_get_ns(), ports->first_seen_ns) > FRAG_TIMEOUT_S * LB_NSEC_PER_SEC)
		return -1;
	p->sport = ports->sport;
	p->dport = ports->dport;
	return 0;
}

#endif /* EBPFSVC_FRAG_H */
