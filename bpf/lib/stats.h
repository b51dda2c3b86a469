/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Counters: per-frontend and per-backend traffic, drops per reason.
 * Per-CPU maps, so no atomics on the packet path; user space sums the CPUs.
 */
#ifndef EBPFSVC_STATS_H
#define EBPFSVC_STATS_H

/* Count a packet that was dropped, rejected or reset, by REASON_*. */
static __always_inline void lb_count_drop(__u32 reason)
{
	__u64 *cnt = lb_drops.lookup(&reason);

	if (cnt)
		*cnt += 1;
}

/* Count a translated packet against its frontend and backend (id 0 = none). */
static __always_inline void lb_count_traffic(__u32 frontend_id, __u32 backend_id, __u32 bytes)
{
	struct lb_traffic *t;

	if (frontend_id) {
		t = lb_frontend_stats.lookup(&frontend_id);
		if (t) {
			t->packets += 1;
			t->bytes += bytes;
		}
	}
	if (backend_id) {
		t = lb_backend_stats.lookup(&backend_id);
		if (t) {
			t->packets += 1;
			t->bytes += bytes;
		}
	}
}

/* Count a connect() (or unconnected sendmsg()) the socket path translated for `frontend_id`:
 * its packets never meet a TC program, so lb_count_traffic never sees them. */
static __always_inline void lb_count_sock(__u32 frontend_id)
{
	__u64 *cnt = lb_sock_stats.lookup(&frontend_id);

	if (cnt)
		*cnt += 1;
}

/* Drop a packet and say why: the one way the datapath drops. */
static __always_inline int lb_drop(__u32 reason)
{
	lb_count_drop(reason);
	return TC_ACT_SHOT;
}

#endif /* EBPFSVC_STATS_H */
