/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The kernel/user ABI of ebpfsvc: every struct that lives in a BPF map and is
 * read or written from Python is defined here, once.
 *
 * Python gets the same layout two ways and a test (tests/bpf/test_abi.py)
 * checks they agree: cffi parses this file (ebpfsvc/abi.py), and bcc builds
 * ctypes Key/Leaf types from the compiled program.  Nothing is copied by hand.
 *
 * Rules for this file:
 *  - plain fixed-width types only (__u8.. __u64, __be16, __be32), no pointers;
 *  - explicit padding, so no compiler ever inserts its own;
 *  - IPv4 structs are named lb4_* / ct4_*; their IPv6 twins (lb6_* / ct6_*) sit
 *    beside them with the same field order, as in Cilium. An IPv6 address is
 *    __be32[4] (wire order, compared a word at a time). Structs without an
 *    address (lb4_service, lb_affinity_val, lb4_affinity_match_key) serve both
 *    families: service, frontend and backend ids, and Maglev slots, are one
 *    space shared by IPv4 and IPv6 (one lb_maglev, one set of stats arrays).
 *
 * The preprocessor lines are kept to #ifndef/#define/#endif of constants so that
 * ebpfsvc/abi.py can read them without a C preprocessor.
 */
#ifndef EBPFSVC_ABI_H
#define EBPFSVC_ABI_H

/* ---- Limits: the loader overrides these with -D, so map sizes are config (the agent's --max-*
 * flags). The defaults serve 10,000 ClusterIP Services of 10 endpoints with room to spare:
 * 10,000 frontends, 100,000 backends, 10,000 x 1,009 Maglev slots (a table is the rung of a prime
 * ladder >= 100 x its backends: 251, 503, 1009, 2011...) = 10.1 M of 16.8 M.
 * docs/operations.md "Capacity" has the formula. ---- */
#ifndef LB_FRONTENDS_MAX
#define LB_FRONTENDS_MAX 65536        /* (address, port, proto, scope) entries */
#endif
#ifndef LB_SERVICES_MAX
#define LB_SERVICES_MAX 65536         /* service ports (namespace/name:port) */
#endif
#ifndef LB_BACKENDS_MAX
#define LB_BACKENDS_MAX 131072        /* distinct (address, port, proto) backends */
#endif
#ifndef LB_MAGLEV_SLOTS_MAX
#define LB_MAGLEV_SLOTS_MAX 16777216  /* all Maglev tables together, in slots (4 bytes, two to an lb_maglev element: 64 MiB) */
#endif
#ifndef CT_ENTRIES_MAX
#define CT_ENTRIES_MAX 262144         /* LRU: tracked flows, two entries each */
#endif
#ifndef AFFINITY_ENTRIES_MAX
#define AFFINITY_ENTRIES_MAX 65536    /* LRU: (service, client) session affinity */
#endif
#ifndef AFFINITY_MATCH_MAX
#define AFFINITY_MATCH_MAX 262144     /* (backend, service) pairs of sessionAffinity=ClientIP services */
#endif
#ifndef FRAG_ENTRIES_MAX
#define FRAG_ENTRIES_MAX 8192         /* LRU: datagrams whose first fragment was seen */
#endif
#ifndef SNAT_ENTRIES_MAX
#define SNAT_ENTRIES_MAX 131072       /* LRU: north-south SNAT, two entries per SNATed flow */
#endif
#ifndef SOURCE_RANGES_MAX
#define SOURCE_RANGES_MAX 16384       /* (frontend, prefix) pairs of loadBalancerSourceRanges */
#endif
#ifndef SOCK_REVNAT_ENTRIES_MAX
#define SOCK_REVNAT_ENTRIES_MAX 65536 /* LRU: (socket, backend) pairs the socket path translated */
#endif
#ifndef SOCK_PATH_SLOTS
#define SOCK_PATH_SLOTS 65536         /* lb_sock_path: slots by socket cookie (a power of 2) */
#endif

/* ---- Backend selection (bpf/lib/lb.h); Python reads them too: ebpfsvc/datapath/flowhash.py
 * predicts a flow's Maglev slot, `ebpfsvc why` walks the probes past terminating backends. ---- */
#ifndef LB_HASH_SEED
#define LB_HASH_SEED 0x5eed1e55       /* same on every node, so tables and hashes agree */
#endif
#ifndef LB_TERMINATING_PROBES
#define LB_TERMINATING_PROBES 4       /* slots tried past a terminating backend */
#endif

/* ---- North-south SNAT source ports (externalTrafficPolicy Cluster, remote
 * backend). A TCP flow keeps the client's port when it is at least
 * SNAT_KEEP_PORT_MIN and no flow or node socket to the same backend holds it
 * (bpf/lib/nodeport.h np4_snat_alloc says why); otherwise it gets a port of
 * SNAT_PORT_MIN..MAX, above the kernel's default ephemeral range (32768-60999),
 * so a node process's own connection never shares a tuple with it. ---- */
#ifndef SNAT_KEEP_PORT_MIN
#define SNAT_KEEP_PORT_MIN 1024
#endif
#ifndef SNAT_PORT_MIN
#define SNAT_PORT_MIN 61000
#endif
#ifndef SNAT_PORT_MAX
#define SNAT_PORT_MAX 65535
#endif
#ifndef SNAT_PORT_PROBES
#define SNAT_PORT_PROBES 16           /* ports tried (hash, then linear) before giving up */
#endif

/* ---- Conntrack lifetimes in seconds (-D overridable: the agent's --conntrack-* flags, with
 * kube-proxy's names and defaults, ebpfsvc/datapath/loader.py conntrack_limits). An entry older
 * than its lifetime is treated as absent; LRU eviction reclaims the memory later. ---- */
#ifndef CT_TIMEOUT_TCP_SYN_S
#define CT_TIMEOUT_TCP_SYN_S 60       /* TCP, no reply seen yet: half-open, keep it short */
#endif
#ifndef CT_TIMEOUT_TCP_ESTABLISHED_S
#define CT_TIMEOUT_TCP_ESTABLISHED_S 86400 /* TCP, reply seen: kube-proxy's --conntrack-tcp-timeout-established (24h) */
#endif
#ifndef CT_TIMEOUT_TCP_CLOSE_WAIT_S
#define CT_TIMEOUT_TCP_CLOSE_WAIT_S 3600 /* TCP, FIN one way only (half-closed): --conntrack-tcp-timeout-close-wait (1h) */
#endif
#ifndef CT_TIMEOUT_TCP_CLOSE_S
#define CT_TIMEOUT_TCP_CLOSE_S 10     /* TCP after RST or FIN both ways: only stragglers left */
#endif
#ifndef FRAG_TIMEOUT_S
#define FRAG_TIMEOUT_S 30             /* Linux's ipfrag_time: a datagram's fragments come within it */
#endif
#ifndef CT_TIMEOUT_UDP_S
#define CT_TIMEOUT_UDP_S 30           /* UDP, no reply seen yet: --conntrack-udp-timeout (nf_conntrack's 30 s) */
#endif
#ifndef CT_TIMEOUT_UDP_STREAM_S
#define CT_TIMEOUT_UDP_STREAM_S 120   /* UDP, a reply seen: --conntrack-udp-timeout-stream (nf_conntrack's 120 s) */
#endif
#ifndef CT_TIMEOUT_OTHER_S
#define CT_TIMEOUT_OTHER_S 60         /* SCTP: no state followed, idle timeout only */
#endif

/* ---- Frontend scope: which side of the node a packet came from. ---- */
#define LB_SCOPE_EXTERNAL 0   /* entered from outside the cluster (externalTrafficPolicy) */
#define LB_SCOPE_INTERNAL 1   /* sent by a pod on this node (internalTrafficPolicy) */

/* ---- lb4_service.flags ---- */
#define LB_SVC_F_AFFINITY   0x0001  /* sessionAffinity=ClientIP */
#define LB_SVC_F_RANDOM     0x0002  /* backend by random slot, not by 5-tuple hash */
#define LB_SVC_F_LOCAL_ONLY 0x0004  /* traffic policy Local: drop, don't reject, when empty */
#define LB_SVC_F_NODEPORT   0x0008  /* frontend is NodeIP:nodePort */
#define LB_SVC_F_EXTERNAL_IP 0x0010 /* frontend is a spec.externalIPs address */
#define LB_SVC_F_LOADBALANCER 0x0020 /* frontend is a status.loadBalancer.ingress address */
#define LB_SVC_F_ADDRESS    0x0040  /* port-0 marker: "this address is a frontend", never balanced */
#define LB_SVC_F_SOURCE_RANGES 0x0080 /* loadBalancerSourceRanges enforced: client must match lb4_source_ranges */

/* ---- lb4_backend.flags ---- */
#define LB_BE_F_TERMINATING 0x01    /* serving but terminating: keeps flows, gets no new ones */
#define LB_BE_F_LOCAL       0x02    /* runs on this node */
#define LB_BE_F_NOT_READY   0x04    /* not ready: no new flows; TCP flows kept, UDP flows move on */

/* ---- ct4_key.dir ---- */
#define CT_DIR_FORWARD 0      /* client -> frontend, as the client sent it */
#define CT_DIR_REPLY   1      /* backend -> client, as the backend sends it */

/* ---- ct4_entry.flags ---- */
#define CT_F_SEEN_SYN      0x01
#define CT_F_SEEN_FIN_FWD  0x02
#define CT_F_SEEN_FIN_REV  0x04
#define CT_F_SEEN_RST      0x08
#define CT_F_ESTABLISHED   0x10   /* a packet was seen in the reply direction */
#define CT_F_HAIRPIN       0x20   /* client == backend: source was SNATed to the node's hairpin address */
#define CT_F_NODEPORT      0x40   /* north-south flow, created by the uplink program (lb_node.c) */
#define CT_F_SNAT          0x80   /* north-south, remote backend: source SNATed to the node (lb4_snat) */

/* ---- Drop and verdict counters: index into lb_drops / metrics label. ---- */
#define REASON_NO_BACKEND        0  /* frontend with no usable backend: rejected (RST / ICMP) */
#define REASON_BACKEND_GONE      1  /* tracked TCP flow whose backend was removed: reset */
#define REASON_MALFORMED         2  /* truncated or inconsistent L3/L4 header */
#define REASON_FRAG_UNTRACKED    3  /* non-first fragment of a datagram whose first was not seen */
#define REASON_NO_LOCAL_BACKEND  4  /* traffic policy Local and no backend on this node */
#define REASON_SOURCE_RANGE      5  /* loadBalancerSourceRanges refused the client */
#define REASON_CT_CREATE_FAILED  6  /* conntrack insert failed: fail closed */
#define REASON_REJECT_FAILED     7  /* could not build the RST / ICMP reject: dropped instead */
#define REASON_SNAT_EXHAUSTED    8  /* no free SNAT source port for this backend: dropped */
#define REASON_FIB_LOOKUP        9  /* no route / neighbour towards a SNATed flow's next hop */
#define REASON_TTL_EXCEEDED     10  /* a packet we forward ourselves arrived with TTL 1: not forwarded */
#define REASON_MAX               11

/* Frontend: what a packet's destination is matched against. */
struct lb4_key {
	__be32 address;        /* ClusterIP, node IP, externalIP or LB ingress IP */
	__be16 port;           /* service port, or nodePort */
	__u8   proto;          /* IPPROTO_TCP / IPPROTO_UDP / IPPROTO_SCTP */
	__u8   scope;          /* LB_SCOPE_* */
};

/* What a frontend resolves to. Written whole by the control plane; the Maglev
 * range is switched by writing a new range first, then this entry. */
struct lb4_service {
	__u32 service_id;       /* service port id: affinity key and lb_service_names key */
	__u32 frontend_id;      /* index into lb_frontend_stats */
	__u32 maglev_offset;    /* first slot of this frontend's table in lb_maglev (struct lb_maglev_pair) */
	__u32 maglev_size;      /* prime table size M; 0 when backend_count is 0 */
	__u32 backend_count;    /* usable backends behind the table */
	__u32 affinity_timeout; /* sessionAffinityConfig.clientIP.timeoutSeconds; 0 = off */
	__u16 flags;            /* LB_SVC_F_* */
	__u16 pad0;
	__u32 pad1;
};

/* A backend (endpoint address + target port), keyed by backend id (__u32). */
struct lb4_backend {
	__be32 address;         /* endpoint address */
	__be16 port;            /* resolved targetPort */
	__u8   proto;
	__u8   flags;           /* LB_BE_F_* */
};

/* Name of a service port, for inspection and for stable ids across restarts;
 * keyed by service id (__u32). */
struct lb_service_name {
	char name[128];         /* "namespace/name:portname/PROTO" (portname may be empty), NUL-padded */
};

/* Why a Service is not in the maps (lb_service_status, keyed by struct
 * lb_service_name holding "namespace/name"): written by the agent's admission
 * (ebpfsvc/admission.py) for `ebpfsvc service list`; the datapath never reads it. */
#define LB_STATUS_CONFLICT 1    /* another, older Service holds one of its frontends */
#define LB_STATUS_CAPACITY 2    /* the maps are full (the agent's --max-* flags) */
#define LB_STATUS_FAILURE  3    /* its frontends could not be computed */
#define LB_STATUS_KEPT     4    /* current version invalid: the last good one (from these maps) stays */

/*
 * lb_maglev's element: two consecutive Maglev slots (backend ids), slot s in
 * element s / 2 at half s % 2. The kernel keeps array elements 8-byte aligned,
 * so one slot an element would cost 8 bytes a slot; two cost 4. Mapped
 * (BPF_F_MMAPABLE), the array is then one dense __u32 run of slots.
 */
struct lb_maglev_pair {
	__u32 slot[2];
};

struct lb_service_status {
	__u32 reason;           /* LB_STATUS_* */
	char  detail[124];      /* one line, NUL-padded (cut to fit) */
};

/* lb_agent_config[0]: the agent's datapath options, which the programs read at run
 * time (lb.h lb_option), so that one compiled object serves every node whatever
 * its options, and a restart with other options needs no compile. The agent
 * writes the word before it attaches anything; `ebpfsvc why` reads it back.
 * 0 (no LB_CFG_PUBLISHED: maps as created, or an agent that writes none): the
 * defaults, LB_CFG_DEFAULTS. */
#define LB_CFG_PUBLISHED                 0x1   /* the word below was written */
#define LB_CFG_RESET_REMOVED_TCP         0x2   /* --reset-removed-endpoint-tcp (lb.h lb4_flow_keeps_backend) */
#define LB_CFG_MASQUERADE_LOCAL_BACKENDS 0x4   /* --masquerade-external-to-local-backends (nodeport.h) */
#define LB_CFG_CLUSTER_CIDR              0x8   /* --cluster-cidr, in lb_agent_cluster_cidr (nodeport.h np4_from_cluster) */
#define LB_CFG_SNAT_KEEP_CLIENT_PORT     0x10  /* --nodeport-snat-keep-client-port (nodeport.h np4_snat_alloc) */
#define LB_CFG_HOST_CLIENTS              0x20  /* --host-clients (host.h) */
#define LB_CFG_DEFAULTS (LB_CFG_RESET_REMOVED_TCP | LB_CFG_SNAT_KEEP_CLIENT_PORT | LB_CFG_HOST_CLIENTS)

/* Conntrack key: the 5-tuple as seen on the wire in one direction. */
struct ct4_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8   proto;
	__u8   dir;             /* CT_DIR_* */
	__u16  pad0;
};

/* Conntrack entry. Both entries of a flow carry the same values, so either
 * one finds the other: the forward entry's key is (client, frontend), the reply
 * entry's key is (backend, client, or the hairpin address for a hairpin flow). */
struct ct4_entry {
	__u64  last_seen_ns;    /* bpf_ktime_get_ns() of the last packet in this entry's direction */
	__u32  backend_id;      /* chosen backend: a flow keeps it whatever the tables say now */
	__u32  service_id;      /* service port, for affinity */
	__u32  frontend_id;     /* index into lb_frontend_stats for packets of this flow */
	__be32 frontend_addr;   /* the address the client sent to (VIP): restored on replies */
	__be32 backend_addr;    /* the DNAT target: to find the reply entry from the forward one */
	__be16 frontend_port;
	__be16 backend_port;
	__u8   flags;           /* CT_F_* */
	__u8   pad0;
	__u16  pad1;
	__u32  pad2;
};

/* Session affinity: one entry per (service port, client address). */
struct lb4_affinity_key {
	__be32 client_addr;
	__u32  service_id;
};

struct lb_affinity_val {
	__u64 last_used_ns;     /* refreshed on every new flow; entry stale after the timeout */
	__u32 backend_id;
	__u32 pad0;
};

/* A backend in the set a session-affinity frontend currently balances to (its
 * Maglev table's backends; lb4_affinity_match, value unused: 1). An affinity
 * entry's backend is used only while this pair exists: as kube-proxy's affinity
 * lives inside the chain of the set in use, a backend outside that set (it left
 * the service but serves another one, or this frontend uses the local set, or
 * the terminating fallback ended) must not keep receiving the client. */
struct lb4_affinity_match_key {
	__u32 backend_id;
	__u32 frontend_id;      /* per frontend, not per service: its scope and traffic policy pick the set */
};

/* Fragment tracking: ports of a datagram, from its first fragment. */
struct frag4_key {
	__be32 saddr;
	__be32 daddr;
	__be16 id;
	__u8   proto;
	__u8   pad0;
};

struct frag4_ports {
	__u64  first_seen_ns;   /* when the first fragment passed: older than FRAG_TIMEOUT_S = absent */
	__be16 sport;
	__be16 dport;
	__u32  pad0;
};

/* North-south SNAT (lb4_snat), keyed by struct ct4_key. Two entries per
 * SNATed flow, like conntrack: CT_DIR_FORWARD keyed (client -> frontend) holds
 * the node address and source port the flow was given; CT_DIR_REPLY keyed
 * (backend -> node address:port), the post-NAT tuple, holds the client's
 * address and port. The reply entry is what makes a port taken. */
struct snat4_entry {
	__be32 address;
	__be16 port;
	__u16  pad0;
};

/* loadBalancerSourceRanges (LPM trie): prefixlen = 32 + the range's prefix
 * length, so the frontend id always matches whole and the client address by
 * the range. The value is unused (1). */
struct lb4_src_range_key {
	__u32  prefixlen;
	__u32  frontend_id;     /* matched whole (the first 32 bits of the prefix) */
	__be32 address;
};

/* Socket-level load balancing (bpf/lb_sock.c): the Service address a socket
 * asked for, keyed by the socket and the backend it was sent to instead, so that
 * getpeername() and recvmsg() on that socket show the Service again. */
struct lb4_sock_key {
	__u64  cookie;          /* bpf_get_socket_cookie(): unique per socket, never reused */
	__be32 address;         /* backend address */
	__be16 port;            /* backend port */
	__u16  pad0;
};

struct lb4_sock_revnat {
	__be32 address;         /* the frontend (ClusterIP) the application named */
	__be16 port;
	__u16  pad0;
};

/* A socket whose connect() the socket path translated (lb_sock_path, an array
 * indexed by socket cookie % SOCK_PATH_SLOTS), so the TC programs let its packets
 * pass without a lookup (bpf/lib/sock.h, lb_sock_path_of). A cookie is never
 * reused: a slot names one socket or none, and a later socket taking the slot
 * only costs the earlier one its fast exit. Either family. */
struct lb_sock_path {
	__u64  cookie;          /* bpf_get_socket_cookie() of the socket; 0: free */
	__u8   proto;           /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   flags;           /* LB_SOCK_PATH_F_* */
	__u8   pad0[6];
};

/* A server's accepted socket, marked by sock_ops (no conntrack entry of ours describes it), not a
 * socket connect() translated: getpeername4's reverse lookup (lb4_sock_revnat) can only miss for
 * it, and is skipped (bpf/lib/sock.h lb_sock_revnat_xlate). */
#define LB_SOCK_PATH_F_ACCEPTED 0x01

/* ---- IPv6 twins. The value of lb6_frontends is struct lb4_service (it holds no
 * address); lb6_affinity's is struct lb_affinity_val; affinity membership is
 * lb4_affinity_match for both families (backend and frontend ids are shared). ---- */

/* Frontend: (ClusterIP, port, proto, scope), as struct lb4_key. */
struct lb6_key {
	__be32 address[4];
	__be16 port;
	__u8   proto;
	__u8   scope;          /* LB_SCOPE_* */
};

/* An IPv6 backend, keyed by backend id (__u32, the same id space as lb4_backends). */
struct lb6_backend {
	__be32 address[4];
	__be16 port;            /* resolved targetPort */
	__u8   proto;
	__u8   flags;           /* LB_BE_F_* */
};

/* Conntrack key of an IPv6 flow, as struct ct4_key. */
struct ct6_key {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8   proto;
	__u8   dir;             /* CT_DIR_* */
	__u16  pad0;
};

/* Conntrack entry of an IPv6 flow, as struct ct4_entry (same meaning, same order). */
struct ct6_entry {
	__u64  last_seen_ns;
	__u32  backend_id;
	__u32  service_id;
	__u32  frontend_id;
	__be32 frontend_addr[4];
	__be32 backend_addr[4];
	__be16 frontend_port;
	__be16 backend_port;
	__u8   flags;           /* CT_F_* */
	__u8   pad0;
	__u16  pad1;
	__u32  pad2;
};

/* Session affinity of an IPv6 client: per /128 (kube-proxy's ip6tables "recent" match
 * is per source address too; a /64 would merge the clients of a node-wide prefix). */
struct lb6_affinity_key {
	__be32 client_addr[4];
	__u32  service_id;
};

/* IPv6 fragment tracking: the fragment header's 32-bit identification. */
struct frag6_key {
	__be32 saddr[4];
	__be32 daddr[4];
	__be32 id;
	__u8   proto;
	__u8   pad0;
	__u16  pad1;
};

/* Socket-level load balancing of IPv6 sockets (bpf/lb_sock.c), as struct lb4_sock_key and
 * lb4_sock_revnat. A dual-stack socket naming an IPv4 Service (::ffff:a.b.c.d) goes through
 * the IPv4 logic and its lb4_sock_revnat entry. */
struct lb6_sock_key {
	__u64  cookie;          /* bpf_get_socket_cookie() */
	__be32 address[4];      /* backend address */
	__be16 port;            /* backend port */
	__u16  pad0;
	__u32  pad1;
};

struct lb6_sock_revnat {
	__be32 address[4];      /* the frontend (ClusterIP) the application named */
	__be16 port;
	__u16  pad0;
};

/* loadBalancerSourceRanges of IPv6 frontends: prefixlen = 32 + the range's prefix length. */
struct lb6_src_range_key {
	__u32  prefixlen;
	__u32  frontend_id;
	__be32 address[4];
};

/* North-south SNAT of IPv6 flows (lb6_snat), keyed by struct ct6_key, as struct
 * snat4_entry: the FORWARD entry holds the node address and port the flow was
 * given, the REPLY entry (backend -> node address:port) the client's. */
struct snat6_entry {
	__be32 address[4];
	__be16 port;
	__u16  pad0;
};

/* The node's own addresses the programs translate to and from (lb_node_addrs, one entry, key 0),
 * written by the agent whenever the node's addresses change (ebpfsvc/datapath/nodeaddrs.py), read
 * through bpf/lib/nodeaddr.h. A map, not -D constants, so a program is the same on every node: one
 * compiled-program cache entry serves them all, and a new address needs no reload. All zero = none. */
struct lb_node_addrs {
	__be32 hairpin4;        /* source of IPv4 hairpin flows (pod -> Service -> same pod) */
	__be32 snat4;           /* IPv4 source of the node's translated traffic: NodePort SNAT, node clients */
	__be32 hairpin6[4];     /* IPv6 twin of hairpin4 */
	__be32 snat6[4];        /* IPv6 twin of snat4 */
};

/* Per-CPU traffic counters (per frontend id, per backend id). */
struct lb_traffic {
	__u64 packets;
	__u64 bytes;
};

/* Every struct's size, checked when a program compiles: a layout change must be meant, and
 * made in ebpfsvc/abi.py's users too (they decode pinned maps by these layouts). abi.py skips
 * these lines; tests/unit/test_abi_sizes.py checks they match what cffi reads above. */
#define ABI_SIZE(name, size) _Static_assert(sizeof(struct name) == (size), "struct " #name " is not " #size " bytes")
ABI_SIZE(lb4_key, 8); ABI_SIZE(lb4_service, 32); ABI_SIZE(lb4_backend, 8); ABI_SIZE(lb_service_name, 128);
ABI_SIZE(ct4_key, 16); ABI_SIZE(ct4_entry, 40); ABI_SIZE(lb4_affinity_key, 8); ABI_SIZE(lb_affinity_val, 16);
ABI_SIZE(frag4_key, 12); ABI_SIZE(frag4_ports, 16); ABI_SIZE(snat4_entry, 8); ABI_SIZE(lb4_src_range_key, 12);
ABI_SIZE(lb_traffic, 16); ABI_SIZE(lb4_affinity_match_key, 8); ABI_SIZE(lb_service_status, 128); ABI_SIZE(lb_maglev_pair, 8);
ABI_SIZE(lb4_sock_key, 16); ABI_SIZE(lb4_sock_revnat, 8); ABI_SIZE(lb_sock_path, 16);
ABI_SIZE(lb6_key, 20); ABI_SIZE(lb6_backend, 20); ABI_SIZE(ct6_key, 40); ABI_SIZE(ct6_entry, 64);
ABI_SIZE(lb6_affinity_key, 20); ABI_SIZE(frag6_key, 40); ABI_SIZE(lb6_src_range_key, 24);
ABI_SIZE(snat6_entry, 20);
ABI_SIZE(lb_node_addrs, 40);
ABI_SIZE(lb6_sock_key, 32); ABI_SIZE(lb6_sock_revnat, 20);

#endif /* EBPFSVC_ABI_H */
