/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Bounds-checked L2-L4 parsing into struct lb4_pkt, the one description of a
 * packet every other header works from.
 *
 * Why a struct of offsets and values rather than header pointers: every
 * skb-modifying helper (store_bytes, csum_replace, change_tail) invalidates
 * packet pointers, so later stages re-derive pointers from offsets anyway.
 */
#ifndef EBPFSVC_PARSE_H
#define EBPFSVC_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

/* Byte order helpers: the datapath compares wire values (network order) with
 * map values that user space wrote in network order, so these are only needed
 * for arithmetic (lengths, sequence numbers, fragment offsets). */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define lb_htons(x) ((__u16)__builtin_bswap16((__u16)(x)))
#define lb_htonl(x) ((__u32)__builtin_bswap32((__u32)(x)))
#else
#define lb_htons(x) ((__u16)(x))
#define lb_htonl(x) ((__u32)(x))
#endif
#define lb_ntohs(x) lb_htons(x)
#define lb_ntohl(x) lb_htonl(x)

#ifndef IPPROTO_SCTP
#define IPPROTO_SCTP 132
#endif

/* Bytes the parser reads at most: Ethernet, IPv4 with the longest options, and
 * the fixed TCP header (the longest L4 header it reads). */
#define LB_PULL_LEN (ETH_HLEN + 60 + 20)

/* SCTP common header: source port, destination port, verification tag, CRC32c. */
#define LB_SCTP_COMMON_HLEN 12

#define LB_IP_MF     0x2000   /* more fragments, host order */
#define LB_IP_OFFSET 0x1fff   /* fragment offset in 8-byte units, host order */

#define LB_TCP_FIN 0x01
#define LB_TCP_SYN 0x02
#define LB_TCP_RST 0x04
#define LB_TCP_PSH 0x08
#define LB_TCP_ACK 0x10

/* Offsets of the fields we rewrite, relative to the L3 / L4 header. */
#define IP_TTL_OFF   8
#define IP_CSUM_OFF  10
#define IP_SADDR_OFF 12
#define IP_DADDR_OFF 16
#define TCP_CSUM_OFF 16
#define UDP_CSUM_OFF 6
#define ICMP_CSUM_OFF 2

enum lb_parse_result {
	LB_PARSE_OK = 0,        /* IPv4 / IPv6 with L4 ports (or ICMP / ICMPv6) parsed */
	LB_PARSE_PASS,          /* not ours to look at (ARP, IPv6, ...): leave untouched */
	LB_PARSE_MALFORMED,     /* truncated or inconsistent: drop, REASON_MALFORMED */
};

/* Fragment position of a packet. */
enum lb_frag {
	LB_FRAG_NONE = 0,       /* a whole datagram */
	LB_FRAG_FIRST,          /* MF set, offset 0: carries the L4 header */
	LB_FRAG_LATER,          /* offset > 0: no L4 header, ports come from frag4 */
};

struct lb4_pkt {
	__u32  l3_off;          /* IP header offset (ETH_HLEN) */
	__u32  l4_off;          /* l3_off + IHL * 4 */
	__u32  ip_len;          /* IP total length, host order */
	__be32 saddr;
	__be32 daddr;
	__be16 sport;           /* 0 for protocols without ports and for later fragments */
	__be16 dport;
	__be16 ip_id;
	__u8   proto;
	__u8   frag;            /* enum lb_frag */
	__u8   tcp_flags;       /* LB_TCP_* (TCP only) */
	__u8   tcp_doff;        /* TCP header length in bytes (TCP only) */
	__u8   ihl;             /* IP header length in bytes */
	__u8   icmp_type;       /* ICMP only */
	__u32  tcp_seq;         /* host order (TCP only): for RST generation */
	__u32  tcp_ack_seq;
};

/* The L4 fields of struct lb4_pkt and struct lb6_pkt (the same names in both), as
 * macros so that one definition serves either packet type: cleared before the L4
 * header is read, and set from a bounds-checked TCP header. */
#define LB_PKT_CLEAR_L4(p) do {					\
	(p)->sport = 0;							\
	(p)->dport = 0;							\
	(p)->tcp_flags = 0;						\
	(p)->tcp_doff = 0;						\
	(p)->icmp_type = 0;						\
	(p)->tcp_seq = 0;						\
	(p)->tcp_ack_seq = 0;						\
} while (0)

#define LB_PKT_SET_TCP(p, th) do {					\
	(p)->sport = (th)->source;					\
	(p)->dport = (th)->dest;					\
	(p)->tcp_doff = (th)->doff * 4;					\
	(p)->tcp_flags = ((const __u8 *)(th))[13];			\
	(p)->tcp_seq = lb_ntohl((th)->seq);				\
	(p)->tcp_ack_seq = lb_ntohl((th)->ack_seq);			\
} while (0)

/* Record a bounds-checked TCP header's ports and state in `p` (TC parser and XDP fast path). */
static __always_inline void lb4_pkt_set_tcp(struct lb4_pkt *p, const struct tcphdr *th)
{
	LB_PKT_SET_TCP(p, th);
}

/* Has L4 ports the load balancer translates. */
static __always_inline int lb4_proto_has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

/*
 * The bytes lb4_parse needs in the linear part of the skb. A TCP, UDP or SCTP
 * packet needs its IP header and the fixed L4 header, no more: bpf_skb_pull_data
 * also makes what it covers writable, and a packet a local TCP socket sent is a
 * clone (the original waits in the retransmit queue) whose linear part ends
 * where its payload begins, so pulling LB_PULL_LEN un-cloned every data segment
 * (pskb_expand_head: an allocation and a copy of the head), also those that
 * pass untouched, pod to pod. A packet that is translated is made writable by
 * the rewrite anyway. ICMP errors (their quote is read too) and a head too
 * short to tell keep LB_PULL_LEN.
 */
static __always_inline __u32 lb4_linear_want(const struct __sk_buff *skb, void *data, void *data_end)
{
	struct iphdr *iph = data + ETH_HLEN;
	__u32 want = LB_PULL_LEN, l4 = 0;

	if ((void *)(iph + 1) <= data_end && ((struct ethhdr *)data)->h_proto == lb_htons(ETH_P_IP) &&
	    iph->ihl >= 5) {
		if (iph->protocol == IPPROTO_TCP)
			l4 = sizeof(struct tcphdr);
		else if (iph->protocol == IPPROTO_UDP)
			l4 = sizeof(struct udphdr);
		else if (iph->protocol == IPPROTO_SCTP)
			l4 = LB_SCTP_COMMON_HLEN;
		if (l4)
			want = ETH_HLEN + iph->ihl * 4 + l4;
	}
	return skb->len < want ? skb->len : want;
}

/*
 * Parse Ethernet + IPv4 (with options) + the L4 header start.
 * Everything is checked against data_end before it is read; inconsistent
 * length fields are MALFORMED, because rewriting offsets computed from them
 * would write outside the header we think we have.
 */
static __always_inline int lb4_parse(struct __sk_buff *skb, struct lb4_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth;
	struct iphdr *iph;
	__u32 ihl, frag_off, want;

	/* Direct packet access sees only the linear part of the skb. Headers are
	 * normally there, but not always (GRO, header split): make them linear
	 * rather than mistake a non-linear packet for a truncated one. A head that
	 * holds LB_PULL_LEN already is read as it is; a shorter one is pulled only
	 * as far as the parser reads (lb4_linear_want). */
	want = skb->len < LB_PULL_LEN ? skb->len : LB_PULL_LEN;
	if (data + want > data_end) {
		want = lb4_linear_want(skb, data, data_end);
		if (data + want > data_end) {
			if (bpf_skb_pull_data(skb, want))
				return LB_PARSE_MALFORMED;
			data = (void *)(long)skb->data;
			data_end = (void *)(long)skb->data_end;
		}
	}
	eth = data;
	if (data + ETH_HLEN > data_end)
		return LB_PARSE_PASS;           /* cannot even tell the ethertype */
	if (eth->h_proto != lb_htons(ETH_P_IP))
		return LB_PARSE_PASS;           /* ARP, IPv6, LLDP...: not ours */

	p->l3_off = ETH_HLEN;
	iph = data + ETH_HLEN;
	if ((void *)(iph + 1) > data_end)
		return LB_PARSE_MALFORMED;
	if (iph->version != 4)
		return LB_PARSE_MALFORMED;
	ihl = iph->ihl * 4;
	if (ihl < sizeof(*iph))
		return LB_PARSE_MALFORMED;
	if (data + ETH_HLEN + ihl > data_end)
		return LB_PARSE_MALFORMED;      /* options announced but cut off */
	p->ip_len = lb_ntohs(iph->tot_len);
	if (p->ip_len < ihl || ETH_HLEN + p->ip_len > skb->len)
		return LB_PARSE_MALFORMED;

	p->ihl = ihl;
	p->l4_off = ETH_HLEN + ihl;
	p->saddr = iph->saddr;
	p->daddr = iph->daddr;
	p->proto = iph->protocol;
	p->ip_id = iph->id;
	LB_PKT_CLEAR_L4(p);

	frag_off = lb_ntohs(iph->frag_off);
	if (frag_off & LB_IP_OFFSET) {
		p->frag = LB_FRAG_LATER;
		return LB_PARSE_OK;             /* no L4 header in this one */
	}
	p->frag = (frag_off & LB_IP_MF) ? LB_FRAG_FIRST : LB_FRAG_NONE;

	/* Re-derive the L4 pointer with a bounded offset the verifier can follow. */
	void *l4 = data + ETH_HLEN + (ihl & 0x3c);
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end)
			return LB_PARSE_MALFORMED;
		if (th->doff < 5 || ihl + th->doff * 4 > p->ip_len)
			return LB_PARSE_MALFORMED;
		lb4_pkt_set_tcp(p, th);
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > data_end || ihl + sizeof(*uh) > p->ip_len)
			return LB_PARSE_MALFORMED;
		p->sport = uh->source;
		p->dport = uh->dest;
	} else if (p->proto == IPPROTO_SCTP) {
		__be16 *ports = l4;

		if (l4 + LB_SCTP_COMMON_HLEN > data_end || ihl + LB_SCTP_COMMON_HLEN > p->ip_len)
			return LB_PARSE_MALFORMED;
		p->sport = ports[0];
		p->dport = ports[1];
	} else if (p->proto == IPPROTO_ICMP) {
		struct icmphdr *ih = l4;

		if ((void *)(ih + 1) > data_end || ihl + sizeof(*ih) > p->ip_len)
			return LB_PARSE_MALFORMED;
		p->icmp_type = ih->type;
	}
	return LB_PARSE_OK;
}

/* ---- IPv6 ---- */

/* Extension headers walked before the parser gives up on a packet (Cilium's
 * IPV6_MAX_HEADERS): each costs a load, and real traffic carries one or two.
 * A longer chain is passed untouched (LB_PARSE_PASS): not translated, never
 * rewritten at a guessed offset. */
#ifndef IPV6_MAX_HEADERS
#define IPV6_MAX_HEADERS 4
#endif

#define LB_NEXTHDR_HOP      0     /* hop-by-hop options */
#define LB_NEXTHDR_ROUTING  43
#define LB_NEXTHDR_FRAGMENT 44
#define LB_NEXTHDR_AUTH     51
#define LB_NEXTHDR_NONE     59
#define LB_NEXTHDR_DEST     60    /* destination options */
#define LB_IPPROTO_ICMPV6   58

#define LB_IP6_HLEN    40
#define IP6_SADDR_OFF  8
#define IP6_DADDR_OFF  24
#define LB_IP6_MF      0x0001   /* fragment header: more fragments, host order */
#define LB_IP6_OFFSET  0xfff8   /* fragment header: offset in 8-byte units << 3, host order */

/* The IPv6 twin of struct lb4_pkt. */
struct lb6_pkt {
	__u32  l3_off;          /* IPv6 header offset (ETH_HLEN) */
	__u32  l4_off;          /* past the extension headers */
	__u32  ip_len;          /* 40 + payload length, host order */
	__be32 saddr[4];
	__be32 daddr[4];
	__be32 frag_id;         /* fragment header's identification (fragments only) */
	__be16 sport;           /* 0 for protocols without ports and for later fragments */
	__be16 dport;
	__u8   proto;           /* upper-layer protocol, the last next-header */
	__u8   frag;            /* enum lb_frag */
	__u8   tcp_flags;       /* LB_TCP_* (TCP only) */
	__u8   tcp_doff;        /* TCP header length in bytes (TCP only) */
	__u8   icmp_type;       /* ICMPv6 only */
	__u8   pad0[3];
	__u32  tcp_seq;         /* host order (TCP only) */
	__u32  tcp_ack_seq;
};

static __always_inline int lb6_addr_equal(const __be32 *a, const __be32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline void lb6_addr_copy(__be32 *dst, const __be32 *src)
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

static __always_inline int lb6_is_ext_header(__u8 nexthdr)
{
	return nexthdr == LB_NEXTHDR_HOP || nexthdr == LB_NEXTHDR_ROUTING || nexthdr == LB_NEXTHDR_FRAGMENT ||
	       nexthdr == LB_NEXTHDR_AUTH || nexthdr == LB_NEXTHDR_DEST;
}

/* The first 8 bytes of any extension header (a fragment header is exactly these). */
struct lb6_ext_hdr {
	__u8   nexthdr;
	__u8   len;             /* in 8-byte units past the first 8 (AH: 4-byte units past the first 8, minus 2) */
	__be16 frag_off;        /* fragment header only */
	__be32 frag_id;         /* fragment header only */
};

/*
 * Parse Ethernet + IPv6 + its extension headers (at most IPV6_MAX_HEADERS) +
 * the L4 header start, into `p`. Headers are read with bpf_skb_load_bytes (the
 * chain's offsets are data-dependent; the helper checks each read), and no
 * header may reach past the payload length: a truncated or overlong header is
 * MALFORMED, as for IPv4. A payload length of 0 on a GSO packet is BIG TCP's
 * (the length is the skb's).
 */
static __always_inline int lb6_parse(struct __sk_buff *skb, struct lb6_pkt *p)
{
	struct ipv6hdr ip6;
	struct lb6_ext_hdr eh;
	__be16 h_proto;
	__u32 off, end;
	__u8 nexthdr;
	int i;

	if (bpf_skb_load_bytes(skb, 12, &h_proto, sizeof(h_proto)) || h_proto != lb_htons(ETH_P_IPV6))
		return LB_PARSE_PASS;
	p->l3_off = ETH_HLEN;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) || ip6.version != 6)
		return LB_PARSE_MALFORMED;
	p->ip_len = LB_IP6_HLEN + lb_ntohs(ip6.payload_len);
	if (!ip6.payload_len && skb->gso_size)
		p->ip_len = skb->len - ETH_HLEN;
	if (ETH_HLEN + p->ip_len > skb->len)
		return LB_PARSE_MALFORMED;
	end = ETH_HLEN + p->ip_len;
	__builtin_memcpy(p->saddr, &ip6.saddr, 16);
	__builtin_memcpy(p->daddr, &ip6.daddr, 16);
	p->frag = LB_FRAG_NONE;
	p->frag_id = 0;

	nexthdr = ip6.nexthdr;
	off = ETH_HLEN + LB_IP6_HLEN;
#pragma unroll
	for (i = 0; i < IPV6_MAX_HEADERS; i++) {
		if (!lb6_is_ext_header(nexthdr) || p->frag == LB_FRAG_LATER)
			break;
		if (off + sizeof(eh) > end || bpf_skb_load_bytes(skb, off, &eh, sizeof(eh)))
			return LB_PARSE_MALFORMED;
		if (nexthdr == LB_NEXTHDR_FRAGMENT) {
			__u16 fo = lb_ntohs(eh.frag_off);

			p->frag_id = eh.frag_id;
			if (fo & LB_IP6_OFFSET)
				p->frag = LB_FRAG_LATER;        /* what follows is payload, not headers */
			else if (fo & LB_IP6_MF)
				p->frag = LB_FRAG_FIRST;
			off += sizeof(eh);
		} else if (nexthdr == LB_NEXTHDR_AUTH) {
			off += ((__u32)eh.len + 2) * 4;
		} else {
			off += ((__u32)eh.len + 1) * 8;
		}
		nexthdr = eh.nexthdr;
	}
	if (p->frag != LB_FRAG_LATER && lb6_is_ext_header(nexthdr))
		return LB_PARSE_PASS;           /* a longer chain than we walk: left to the kernel */
	if (off > end)
		return LB_PARSE_MALFORMED;

	p->l4_off = off;
	p->proto = nexthdr;
	LB_PKT_CLEAR_L4(p);
	if (p->frag == LB_FRAG_LATER)
		return LB_PARSE_OK;             /* no L4 header in this one */

	if (p->proto == IPPROTO_TCP) {
		struct tcphdr th;

		if (off + sizeof(th) > end || bpf_skb_load_bytes(skb, off, &th, sizeof(th)))
			return LB_PARSE_MALFORMED;
		if (th.doff < 5 || off + th.doff * 4 > end)
			return LB_PARSE_MALFORMED;
		LB_PKT_SET_TCP(p, &th);
	} else if (p->proto == IPPROTO_UDP || p->proto == IPPROTO_SCTP) {
		/* UDP header, or SCTP's common header: source port, destination port first. */
		__be16 ports[2];
		__u32 need = p->proto == IPPROTO_UDP ? 8 : 12;

		if (off + need > end || bpf_skb_load_bytes(skb, off, ports, sizeof(ports)))
			return LB_PARSE_MALFORMED;
		p->sport = ports[0];
		p->dport = ports[1];
	} else if (p->proto == LB_IPPROTO_ICMPV6) {
		__u8 type;

		if (off + 8 > end || bpf_skb_load_bytes(skb, off, &type, 1))
			return LB_PARSE_MALFORMED;
		p->icmp_type = type;
	}
	return LB_PARSE_OK;
}

#endif /* EBPFSVC_PARSE_H */
