/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Every map of the datapath, one comment line each.
 *
 * All maps are pinned under LB_PIN_DIR (a loader -D, one directory per node),
 * so that a restarted agent finds the same frontends, backends, Maglev tables,
 * flows and counters, and established connections survive the restart.
 * bcc reuses a pinned map when the path exists and creates + pins it otherwise.
 */
#ifndef EBPFSVC_MAPS_H
#define EBPFSVC_MAPS_H

#ifndef LB_PIN_DIR
#define LB_PIN_DIR "/sys/fs/bpf/ebpfsvc"
#endif

/* (VIP, port, proto, scope) -> service entry: what a new flow is balanced by.
 * Twice the frontends: room for the port-0 address marker of each (at most one per frontend). */
BPF_TABLE_PINNED("hash", struct lb4_key, struct lb4_service, lb4_frontends, 2 * LB_FRONTENDS_MAX, LB_PIN_DIR "/lb4_frontends");
/* backend id -> endpoint address, target port and state. */
BPF_TABLE_PINNED("hash", __u32, struct lb4_backend, lb4_backends, LB_BACKENDS_MAX, LB_PIN_DIR "/lb4_backends");
/* Maglev slot / 2 -> backend ids of slots 2k and 2k + 1 (abi.h struct lb_maglev_pair); one flat array of
 * slots, each frontend owns slots [offset, offset + size). */
BPF_TABLE_PINNED("array", __u32, struct lb_maglev_pair, lb_maglev, (LB_MAGLEV_SLOTS_MAX + 1) / 2, LB_PIN_DIR "/lb_maglev", BPF_F_MMAPABLE);
/* 5-tuple + direction -> flow: forward entry (client -> VIP) and reply entry (backend -> client). */
BPF_TABLE_PINNED("lru_hash", struct ct4_key, struct ct4_entry, ct4, CT_ENTRIES_MAX, LB_PIN_DIR "/ct4");
/* (client address, service id) -> last backend, for sessionAffinity=ClientIP. */
BPF_TABLE_PINNED("lru_hash", struct lb4_affinity_key, struct lb_affinity_val, lb4_affinity, AFFINITY_ENTRIES_MAX, LB_PIN_DIR "/lb4_affinity");
/* (backend id, frontend id) -> 1 for every backend in a sessionAffinity=ClientIP frontend's table: affinity's membership check. */
BPF_TABLE_PINNED("hash", struct lb4_affinity_match_key, __u32, lb4_affinity_match, AFFINITY_MATCH_MAX, LB_PIN_DIR "/lb4_affinity_match");
/* (saddr, daddr, IP id, proto) -> L4 ports, learnt from a datagram's first fragment. */
BPF_TABLE_PINNED("lru_hash", struct frag4_key, struct frag4_ports, frag4, FRAG_ENTRIES_MAX, LB_PIN_DIR "/frag4");
/* service id -> "namespace/name:port/PROTO": owner of stable ids, read back on agent start. */
BPF_TABLE_PINNED("hash", __u32, struct lb_service_name, lb_service_names, LB_SERVICES_MAX, LB_PIN_DIR "/lb_service_names");
/* "namespace/name" -> why that Service is not programmed (agent admission; read by `service list`, never by programs). */
BPF_TABLE_PINNED("hash", struct lb_service_name, struct lb_service_status, lb_service_status, LB_SERVICES_MAX, LB_PIN_DIR "/lb_service_status");
/* 0 -> the agent's LB_CFG_* options (abi.h), read by the programs at run time (lb.h lb_option). */
BPF_TABLE_PINNED("array", __u32, __u32, lb_agent_config, 1, LB_PIN_DIR "/lb_agent_config");
/* 0 -> the agent's --cluster-cidr network (host order), 1 -> its prefix length, when lb_agent_config has
 * LB_CFG_CLUSTER_CIDR (nodeport.h np4_from_cluster). */
BPF_TABLE_PINNED("array", __u32, __u32, lb_agent_cluster_cidr, 2, LB_PIN_DIR "/lb_agent_cluster_cidr");
/* frontend id -> packets/bytes of its translated flows, both directions (per CPU). */
BPF_TABLE_PINNED("percpu_array", __u32, struct lb_traffic, lb_frontend_stats, LB_FRONTENDS_MAX, LB_PIN_DIR "/lb_frontend_stats");
/* backend id -> packets/bytes of the flows it serves, both directions (per CPU). */
BPF_TABLE_PINNED("percpu_array", __u32, struct lb_traffic, lb_backend_stats, LB_BACKENDS_MAX, LB_PIN_DIR "/lb_backend_stats");
/* North-south SNAT: (client -> frontend) -> node address:port given, and
 * (backend -> node address:port) -> client address:port (struct snat4_entry). */
BPF_TABLE_PINNED("lru_hash", struct ct4_key, struct snat4_entry, lb4_snat, SNAT_ENTRIES_MAX, LB_PIN_DIR "/lb4_snat");
/* (frontend id, client prefix) -> 1: loadBalancerSourceRanges of frontends flagged LB_SVC_F_SOURCE_RANGES. */
BPF_TABLE_PINNED("lpm_trie", struct lb4_src_range_key, __u32, lb4_source_ranges, SOURCE_RANGES_MAX, LB_PIN_DIR "/lb4_source_ranges", BPF_F_NO_PREALLOC);
/* (socket cookie, backend) -> frontend the socket asked for: getpeername/recvmsg of the socket path (lb_sock.c). */
BPF_TABLE_PINNED("lru_hash", struct lb4_sock_key, struct lb4_sock_revnat, lb4_sock_revnat, SOCK_REVNAT_ENTRIES_MAX, LB_PIN_DIR "/lb4_sock_revnat");
/* frontend id -> sockets the socket path translated to it: connect() and unconnected sendmsg() (per CPU). */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, lb_sock_stats, LB_FRONTENDS_MAX, LB_PIN_DIR "/lb_sock_stats");
/* socket cookie % SOCK_PATH_SLOTS -> the socket whose connect() the socket path translated, for the
 * TC programs' fast exit (sock.h). An array: marking a socket is a store, no allocation, no lock. */
BPF_TABLE_PINNED("array", __u32, struct lb_sock_path, lb_sock_path, SOCK_PATH_SLOTS, LB_PIN_DIR "/lb_sock_path");
/* ---- IPv6 twins, sized by the same limits (ids, lb_maglev and the stats arrays are shared).
 * The two control-plane hash maps are not preallocated: at the default limits that is 27 MiB an
 * IPv4-only node would hold for nothing; only the agent writes them, so no packet pays for it
 * (LRU maps cannot opt out: ct6 and lb6_affinity are preallocated). ---- */
/* (VIP, port, proto, scope) -> service entry, as lb4_frontends (port-0 address markers included). */
BPF_TABLE_PINNED("hash", struct lb6_key, struct lb4_service, lb6_frontends, 2 * LB_FRONTENDS_MAX, LB_PIN_DIR "/lb6_frontends", BPF_F_NO_PREALLOC);
/* backend id -> IPv6 endpoint address, target port and state (ids unique across both families). */
BPF_TABLE_PINNED("hash", __u32, struct lb6_backend, lb6_backends, LB_BACKENDS_MAX, LB_PIN_DIR "/lb6_backends", BPF_F_NO_PREALLOC);
/* IPv6 5-tuple + direction -> flow, as ct4. */
BPF_TABLE_PINNED("lru_hash", struct ct6_key, struct ct6_entry, ct6, CT_ENTRIES_MAX, LB_PIN_DIR "/ct6");
/* (IPv6 client /128, service id) -> last backend, for sessionAffinity=ClientIP. */
BPF_TABLE_PINNED("lru_hash", struct lb6_affinity_key, struct lb_affinity_val, lb6_affinity, AFFINITY_ENTRIES_MAX, LB_PIN_DIR "/lb6_affinity");
/* (saddr, daddr, fragment id, proto) -> L4 ports, learnt from an IPv6 datagram's first fragment. */
BPF_TABLE_PINNED("lru_hash", struct frag6_key, struct frag4_ports, frag6, FRAG_ENTRIES_MAX, LB_PIN_DIR "/frag6");
/* (frontend id, IPv6 client prefix) -> 1: loadBalancerSourceRanges of IPv6 frontends. */
BPF_TABLE_PINNED("lpm_trie", struct lb6_src_range_key, __u32, lb6_source_ranges, SOURCE_RANGES_MAX, LB_PIN_DIR "/lb6_source_ranges", BPF_F_NO_PREALLOC);
/* North-south SNAT of IPv6 flows, as lb4_snat: (client -> frontend) -> node address:port given,
 * (backend -> node address:port) -> client address:port. */
BPF_TABLE_PINNED("lru_hash", struct ct6_key, struct snat6_entry, lb6_snat, SNAT_ENTRIES_MAX, LB_PIN_DIR "/lb6_snat");
/* 0 -> the node's own addresses (struct lb_node_addrs; bpf/lib/nodeaddr.h reads it, the agent writes it). */
BPF_TABLE_PINNED("array", __u32, struct lb_node_addrs, lb_node_addrs, 1, LB_PIN_DIR "/lb_node_addrs");
/* (socket cookie, IPv6 backend) -> frontend the socket asked for, as lb4_sock_revnat (LRU: preallocated). */
BPF_TABLE_PINNED("lru_hash", struct lb6_sock_key, struct lb6_sock_revnat, lb6_sock_revnat, SOCK_REVNAT_ENTRIES_MAX, LB_PIN_DIR "/lb6_sock_revnat");
/* REASON_* -> packets dropped, rejected or reset for that reason (per CPU). */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, lb_drops, REASON_MAX, LB_PIN_DIR "/lb_drops");

#ifdef LB_SCTP_PORT_CRC
#ifndef LB_SCTP_CRC_MAX_LEN
#define LB_SCTP_CRC_MAX_LEN 16384     /* longest SCTP packet whose CRC we fix (jumbo MTU fits) */
#endif
/* n -> x^(8n) mod P (CRC32c): what n zero bytes do to a CRC. Not pinned: the
 * loader fills it at every load (derived data, no state). */
BPF_ARRAY(lb_sctp_crc_shift, __u32, LB_SCTP_CRC_MAX_LEN);
#endif

#endif /* EBPFSVC_MAPS_H */
