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

/* Offset of the L4 checksum from the L4 header, 0 when there is none we keep
 * with the Internet checksum helpers. SCTP's CRC32c covers no pseudo-header,
 * so an address rewrite keeps it valid; a port rewrite is compensated by
 * lb4_sctp_crc_port_update below. */
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
	/* Without an Internet checksum to compensate (SCTP), a CHECKSUM_COMPLETE
	 * skb's csum must follow the change. */
	if (bpf_skb_store_bytes(skb, off, &new, sizeof(new), l4_csum_off ? 0 : BPF_F_RECOMPUTE_CSUM) < 0)
		return -1;
	return 0;
}

/*
 * SCTP CRC32c, updated for a port change without reading the payload.
 * Feature gate LB_SCTP_PORT_CRC (an entry program defines it before the
 * includes); programs without it get the stub below.
 *
 * CRC32c is linear over GF(2): changing bytes 0..3 of an L-byte packet by
 * `delta` changes its CRC by crc(delta, then L-4 zero bytes) with zero
 * init and final xor, that is crc0(delta) * x^(8(L-4)) mod P. The factor
 * x^(8n) mod P depends on the length only: the loader tabulates it in
 * lb_sctp_crc_shift (ebpfsvc/datapath/loader.py), so a packet pays one lookup
 * and 64 shift-xor steps, and the verifier walks short loops. Polynomials are
 * in the reflected representation (x^0 is bit 31), as the CRC is computed
 * LSB first. The CRC is stored little-endian; reading it, and the delta word,
 * as native u32 assumes a little-endian host (x86-64, arm64).
 */
#ifdef LB_SCTP_PORT_CRC
#define LB_CRC32C_POLY 0x82f63b78     /* Castagnoli, reflected */

/* a * b mod P, branch free. */
static __always_inline __u32 lb_crc32c_mul(__u32 a, __u32 b)
{
	__u32 p = 0;
	int i;

	/* Kept a loop: unrolled, every rewrite site would carry ~300 insns. */
#pragma clang loop unroll(disable)
	for (i = 31; i >= 0; i--) {
		p ^= b & -((a >> i) & 1);
		b = (b >> 1) ^ (LB_CRC32C_POLY & -(b & 1));
	}
	return p;
}

/* CRC of 4 bytes (read as a little-endian word) with zero init and final xor. */
static __always_inline __u32 lb_crc32c_word(__u32 w)
{
	int i;

#pragma clang loop unroll(disable)
	for (i = 0; i < 32; i++)
		w = (w >> 1) ^ (LB_CRC32C_POLY & -(w & 1));
	return w;
}

/*
 * Fix the CRC32c of an SCTP packet whose port at `port_off` (0: source,
 * 2: destination) changes from `old` to `new`. Packets longer than the table
 * (GSO: their CRC is computed after us, on offload) are left as they are; so
 * are fragments (the caller does not call): a fragment's CRC covers the whole
 * datagram, whose length the first fragment does not tell.
 */
static __always_inline int lb4_sctp_crc_port_update(struct __sk_buff *skb, __u32 l4_off, __u32 sctp_len,
						    __u32 port_off, __be16 old, __be16 new)
{
	__u32 crc, delta, zeros;
	__u32 *shift;

	if (sctp_len < 12)
		return -1;
	zeros = sctp_len - 4;
	shift = lb_sctp_crc_shift.lookup(&zeros);
	if (!shift)
		return 0;
	if (bpf_skb_load_bytes(skb, l4_off + 8, &crc, sizeof(crc)))
		return -1;
	delta = (__u32)(__u16)(old ^ new) << (8 * (port_off & 2));
	crc ^= lb_crc32c_mul(*shift, lb_crc32c_word(delta));
	return bpf_skb_store_bytes(skb, l4_off + 8, &crc, sizeof(crc), BPF_F_RECOMPUTE_CSUM) < 0 ? -1 : 0;
}
#else
static __always_inline int lb4_sctp_crc_port_update(struct __sk_buff *skb, __u32 l4_off, __u32 sctp_len,
						    __u32 port_off, __be16 old, __be16 new)
{
	return 0;
}
#endif /* LB_SCTP_PORT_CRC */

/* Checksum of a 20-byte IPv4 header built on the stack (check field zero). */
static __always_inline __u16 lb4_ip_hdr_csum(struct iphdr *iph)
{
	return lb_csum_fold(bpf_csum_diff(0, 0, (__be32 *)iph, sizeof(*iph), 0));
}

/*
 * IPv6: replace a 16-byte address at `off` (absolute). IPv6 has no header
 * checksum; the L4 checksum (TCP, UDP: mandatory over IPv6) covers the
 * pseudo-header, so it gets the difference of the two addresses, summed once
 * by csum_diff and applied as a precomputed diff (size 0 in the flags).
 */
static __always_inline int lb6_csum_store_addr(struct __sk_buff *skb, __u32 off, const __be32 *old,
					       const __be32 *new, __u32 l4_csum_off, __u64 l4_flags)
{
	__be32 from[4], to[4];
	__s64 diff;

	lb6_addr_copy(from, old);       /* csum_diff reads the stack: map values and ctx copied first */
	lb6_addr_copy(to, new);
	if (l4_csum_off) {
		diff = bpf_csum_diff(from, sizeof(from), to, sizeof(to), 0);
		if (diff < 0 ||
		    bpf_l4_csum_replace(skb, l4_csum_off, 0, diff, BPF_F_PSEUDO_HDR | l4_flags) < 0)
			return -1;
	}
	if (bpf_skb_store_bytes(skb, off, to, sizeof(to), 0) < 0)
		return -1;
	return 0;
}

#endif /* EBPFSVC_CSUM_H */
