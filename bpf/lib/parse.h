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
	LB_PARSE_OK = 0,        /* IPv4 with L4 ports (or ICMP) parsed */
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

/* Record a bounds-checked TCP header's ports and state in `p` (TC parser and XDP fast path). */
static __always_inline void lb4_pkt_set_tcp(struct lb4_pkt *p, const struct tcphdr *th)
{
	p->sport = th->source;
	p->dport = th->dest;
	p->tcp_doff = th->doff * 4;
	p->tcp_flags = ((const __u8 *)th)[13];
	p->tcp_seq = lb_ntohl(th->seq);
	p->tcp_ack_seq = lb_ntohl(th->ack_seq);
}

/* Has L4 ports the load balancer translates. */
static __always_inline int lb4_proto_has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
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
	 * rather than mistake a non-linear packet for a truncated one. */
	want = skb->len < LB_PULL_LEN ? skb->len : LB_PULL_LEN;
	if (data + want > data_end) {
		if (bpf_skb_pull_data(skb, want))
			return LB_PARSE_MALFORMED;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
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
	p->sport = 0;
	p->dport = 0;
	p->tcp_flags = 0;
	p->tcp_doff = 0;
	p->icmp_type = 0;
	p->tcp_seq = 0;
	p->tcp_ack_seq = 0;

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
		/* SCTP common header: source port, destination port, tag, CRC32c. */
		__be16 *ports = l4;

		if (l4 + 12 > data_end || ihl + 12 > p->ip_len)
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

#endif /* EBPFSVC_PARSE_H */
