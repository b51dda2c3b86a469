/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Checksum helpers. Rewrites use the kernel's incremental helpers
 * (bpf_l3_csum_replace / bpf_l4_csum_replace) rather than recomputing: they are
 * O(1) in the packet size and handle CHECKSUM_PARTIAL / CHECKSUM_COMPLETE skbs
 * (BPF_F_PSEUDO_HDR tells them an address is part of the L4 pseudo-header).
 * Headers we build from scratch (RST, ICMP errors) are summed with csum_diff.
 */
#ifndef EBPFSVC_CSUM_H
#define EBPFSVC_CSUM_H

/* Offset of the L4 checksum from the L4 header, 0 when there is none we keep.
 * SCTP's CRC32c covers no pseudo-header, so an address rewrite keeps it valid;
 * a port rewrite does not, and is left to CRC offload (see docs/datapath.md). */
static __always_inline __u32 lb4_l4_csum_off(__u8 proto)
{
	if (proto == IPPROTO_TCP)
		return TCP_CSUM_OFF;
	if (proto == IPPROTO_UDP)
		return UDP_CSUM_OFF;
	return 0;
}

/* UDP checksum 0 means "none": leave it 0, and never produce 0 (write 0xffff). */
static __always_inline __u64 lb4_l4_csum_flags(__u8 proto)
{
	return proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/* Fold a 32-bit one's-complement sum (as bpf_csum_diff returns) to 16 bits. */
static __always_inline __u16 lb_csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/*
 * Replace a 4-byte address at `off` (absolute), fixing the IP header checksum
 * and, when the packet carries its L4 header (`l4_csum_off` != 0), the
 * pseudo-header part of the L4 checksum.
 */
static __always_inline int lb4_csum_store_addr(struct __sk_buff *skb, __u32 l3_off, __u32 off,
					       __be32 old, __be32 new, __u32 l4_csum_off, __u64 l4_flags)
{
	if (l4_csum_off &&
	    bpf_l4_csum_replace(skb, l4_csum_off, old, new, BPF_F_PSEUDO_HDR | l4_flags | sizeof(new)) < 0)
		return -1;
	if (bpf_l3_csum_replace(skb, l3_off + IP_CSUM_OFF, old, new, sizeof(new)) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0) < 0)
		return -1;
	return 0;
}

/* Replace a 2-byte port at `off` (absolute), fixing the L4 checksum if any. */
static __always_inline int lb4_csum_store_port(struct __sk_buff *skb, __u32 off, __be16 old, __be16 new,
					       __u32 l4_csum_off, __u64 l4_flags)
{
	if (l4_csum_off &&
	    bpf_l4_csum_replace(skb, l4_csum_off, old, new, l4_flags | sizeof(new)) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0) < 0)
		return -1;
	return 0;
}

/* Checksum of a 20-byte IPv4 header built on the stack (check field zero). */
static __always_inline __u16 lb4_ip_hdr_csum(struct iphdr *iph)
{
	return lb_csum_fold(bpf_csum_diff(0, 0, (__be32 *)iph, sizeof(*iph), 0));
}

#endif /* EBPFSVC_CSUM_H */
