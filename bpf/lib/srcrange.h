/* SPDX-License-Identifier: GPL-2.0 */
/*
 * loadBalancerSourceRanges: which clients may use a LoadBalancer frontend.
 *
 * A frontend whose entry carries LB_SVC_F_SOURCE_RANGES admits a new flow only
 * when the client address falls in one of its prefixes in lb4_source_ranges
 * (LPM trie keyed by frontend id + client prefix; lb6_source_ranges for IPv6). The flag lives in the
 * frontend entry, which the writer switches last: ranges are written before
 * the flag is set and removed only after it is cleared, so a change of ranges
 * never leaves the frontend enforcing nothing (see docs/northsouth.md).
 * Established flows are not re-checked (as kube-proxy: the filter is on new
 * connections, conntrack lets the rest through).
 */
#ifndef EBPFSVC_SRCRANGE_H
#define EBPFSVC_SRCRANGE_H

/* May `client` start a flow to `svc`? */
static __always_inline int lb4_source_allowed(const struct lb4_service *svc, __be32 client)
{
	struct lb4_src_range_key key = {
		.prefixlen = 64,                /* frontend id (32) + the full client address (32) */
		.frontend_id = svc->frontend_id,
		.address = client,
	};

	if (!(svc->flags & LB_SVC_F_SOURCE_RANGES))
		return 1;
	return lb4_source_ranges.lookup(&key) != 0;
}

/* The same for an IPv6 client of an IPv6 frontend (lb6_source_ranges). */
static __always_inline int lb6_source_allowed(const struct lb4_service *svc, const __be32 *client)
{
	struct lb6_src_range_key key = {
		.prefixlen = 160,               /* frontend id (32) + the full client address (128) */
		.frontend_id = svc->frontend_id,
	};

	if (!(svc->flags & LB_SVC_F_SOURCE_RANGES))
		return 1;
	lb6_addr_copy(key.address, client);
	return lb6_source_ranges.lookup(&key) != 0;
}

#endif /* EBPFSVC_SRCRANGE_H */
