/* SPDX-License-Identifier: GPL-2.0 */
/*
 * sessionAffinity: ClientIP. A new flow from a client that used a backend of
 * this service less than timeoutSeconds ago goes to the same backend, as
 * kube-proxy's "recent" match does. The timestamp is refreshed by every new
 * flow (not every packet), which is kube-proxy's semantics too.
 */
#ifndef EBPFSVC_AFFINITY_H
#define EBPFSVC_AFFINITY_H

static __always_inline int lb_affinity_enabled(const struct lb4_service *svc)
{
	return (svc->flags & LB_SVC_F_AFFINITY) && svc->affinity_timeout;
}

/* The backend id of a remembered (client, service) entry of either family, 0 when
 * none, stale, or not in the set this frontend balances to now (lb4_affinity_match:
 * the backend may have left this service while another one keeps it in lb4_backends,
 * or be one of the service's backends that this frontend's traffic policy leaves out:
 * the entry is shared by the service's frontends, the set in use is not). */
static __always_inline __u32 lb_affinity_still_valid(const struct lb4_service *svc,
						     const struct lb_affinity_val *val, __u64 now)
{
	struct lb4_affinity_match_key match = {};

	if (!val)
		return 0;
	if (lb_age_ns(now, val->last_used_ns) >= (__u64)svc->affinity_timeout * LB_NSEC_PER_SEC)
		return 0;
	match.backend_id = val->backend_id;
	match.frontend_id = svc->frontend_id;
	if (!lb4_affinity_match.lookup(&match))
		return 0;
	return val->backend_id;
}

/* Backend id remembered for (client, service), 0 when none (lb_affinity_still_valid). */
static __always_inline __u32 lb4_affinity_backend(const struct lb4_service *svc, __be32 client, __u64 now)
{
	struct lb4_affinity_key key = { .client_addr = client, .service_id = svc->service_id };

	if (!lb_affinity_enabled(svc))
		return 0;
	return lb_affinity_still_valid(svc, lb4_affinity.lookup(&key), now);
}

static __always_inline void lb4_affinity_update(const struct lb4_service *svc, __be32 client,
						__u32 backend_id, __u64 now)
{
	struct lb4_affinity_key key = { .client_addr = client, .service_id = svc->service_id };
	struct lb_affinity_val val = { .last_used_ns = now, .backend_id = backend_id };

	if (!lb_affinity_enabled(svc))
		return;
	lb4_affinity.update(&key, &val);
}

/* IPv6: per /128 client (struct lb6_affinity_key says why); membership in the shared
 * lb4_affinity_match (backend and frontend ids are one space for both families). */
static __always_inline __u32 lb6_affinity_backend(const struct lb4_service *svc, const __be32 *client, __u64 now)
{
	struct lb6_affinity_key key = { .service_id = svc->service_id };

	if (!lb_affinity_enabled(svc))
		return 0;
	lb6_addr_copy(key.client_addr, client);
	return lb_affinity_still_valid(svc, lb6_affinity.lookup(&key), now);
}

static __always_inline void lb6_affinity_update(const struct lb4_service *svc, const __be32 *client,
						__u32 backend_id, __u64 now)
{
	struct lb6_affinity_key key = { .service_id = svc->service_id };
	struct lb_affinity_val val = { .last_used_ns = now, .backend_id = backend_id };

	if (!lb_affinity_enabled(svc))
		return;
	lb6_addr_copy(key.client_addr, client);
	lb6_affinity.update(&key, &val);
}

#endif /* EBPFSVC_AFFINITY_H */
