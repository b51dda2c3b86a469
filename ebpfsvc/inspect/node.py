"""A node's live datapath state, read from its pinned maps and decoded into rows.

    with NodeMaps.open("/sys/fs/bpf/ebpfsvc") as node:
        node.frontends()      # [FrontendRow], with the service port name
        node.backends()       # {id: BackendRow}
        node.ct()             # [CtEntry], with age
        node.traffic("frontend", fid)   # (packets, bytes) summed over CPUs

Everything here is read-only and reads the kernel's current values at call
time: the CLI and the metrics collector (ebpfsvc/collectors.py) share it.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from pathlib import Path

from ebpfsvc import abi
from ebpfsvc.datapath.bpfsys import PinnedMap

ffi = abi.ffi
PROTO_NAMES = {6: "TCP", 17: "UDP", 132: "SCTP"}
PROTO_NUMBERS = {v: k for k, v in PROTO_NAMES.items()}
SCOPES = {abi.LB_SCOPE_EXTERNAL: "external", abi.LB_SCOPE_INTERNAL: "internal"}

_SVC_FLAGS = [
    (abi.LB_SVC_F_AFFINITY, "affinity"), (abi.LB_SVC_F_RANDOM, "random"),
    (abi.LB_SVC_F_LOCAL_ONLY, "local-only"), (abi.LB_SVC_F_NODEPORT, "nodeport"),
    (abi.LB_SVC_F_EXTERNAL_IP, "external-ip"), (abi.LB_SVC_F_LOADBALANCER, "loadbalancer"),
    (abi.LB_SVC_F_ADDRESS, "address"),
] + ([(abi.LB_SVC_F_SOURCE_RANGES, "source-ranges")] if hasattr(abi, "LB_SVC_F_SOURCE_RANGES") else [])
_CT_FLAGS = [
    (abi.CT_F_SEEN_SYN, "SYN"), (abi.CT_F_SEEN_FIN_FWD, "FIN-fwd"), (abi.CT_F_SEEN_FIN_REV, "FIN-rev"),
    (abi.CT_F_SEEN_RST, "RST"), (abi.CT_F_ESTABLISHED, "established"), (abi.CT_F_HAIRPIN, "hairpin"),
] + [(getattr(abi, name), label) for name, label in (("CT_F_NODEPORT", "nodeport"), ("CT_F_SNAT", "snat"))
     if hasattr(abi, name)]


def flag_names(value: int, table) -> list[str]:
    names = [n for bit, n in table if value & bit]
    rest = value & ~sum(bit for bit, _ in table)
    return names + ([f"{rest:#x}"] if rest else [])


# The __be32/__be16 conversions have their home in ebpfsvc.abi; these are the inspection side's names.
ip_str = abi.ip_of_be32          # a __be32 field -> dotted quad
port_int = abi.port_of_be16      # a __be16 field -> port
raw_ip = abi.be32                # an address -> the __be32 field's value
raw_port = abi.be16              # a port -> the __be16 field's value


def ip6_str(words) -> str:
    """A __be32[4] field (a cffi array) -> IPv6 text."""
    return abi.ip_of_be128(list(words))


# The IPv6 twins: read when pinned (the views skip them otherwise).
_IPV6_MAPS = frozenset(name for name in abi.MAP_TYPES if name.startswith(("lb6_", "ct6", "frag6")))
# Read when pinned: absent with an agent of a version before them.
_OPTIONAL_MAPS = _IPV6_MAPS | {"lb_agent_config", "lb_agent_cluster_cidr"}


@dataclass(frozen=True)
class AgentOptions:
    """The agent's datapath options, the word its programs read (lb_agent_config,
    loader.agent_options); None from NodeMaps.agent_options when it published nothing, and then
    the programs run with the defaults, AgentOptions() (abi.h LB_CFG_DEFAULTS)."""

    reset_removed_endpoint_tcp: bool = True
    masquerade_external_to_local_backends: bool = False
    cluster_cidr: ipaddress.IPv4Network | None = None     # --cluster-cidr (lb_agent_cluster_cidr)
    snat_keep_client_port: bool = True
    host_clients: bool = True

    @classmethod
    def from_word(cls, word: int, cluster_cidr: ipaddress.IPv4Network | None = None) -> "AgentOptions":
        """The options of an LB_CFG_* word (the cluster CIDR, when the word says there is one)."""
        return cls(bool(word & abi.LB_CFG_RESET_REMOVED_TCP), bool(word & abi.LB_CFG_MASQUERADE_LOCAL_BACKENDS),
                   cluster_cidr if word & abi.LB_CFG_CLUSTER_CIDR else None,
                   bool(word & abi.LB_CFG_SNAT_KEEP_CLIENT_PORT), bool(word & abi.LB_CFG_HOST_CLIENTS))


def hostport(address: str, port: int) -> str:
    """address:port, an IPv6 address bracketed (as in a URL, and a Maglev backend name)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _decode(ctype: str, data: bytes):
    """A struct view of raw map bytes: no copy, and the view keeps `data` alive."""
    return ffi.from_buffer(ctype + " *", data)


def _encode(obj) -> bytes:
    return bytes(ffi.buffer(obj))


def _ct_key(saddr: str, daddr: str, sport: int, dport: int, proto: str, direction: int) -> bytes:
    """A flow's conntrack key (struct ct4_key, or ct6_key for IPv6), which keys lb4_snat/lb6_snat too."""
    six = ":" in saddr
    return _encode(ffi.new("struct ct6_key *" if six else "struct ct4_key *", {
        "saddr": abi.be128(saddr) if six else raw_ip(saddr), "daddr": abi.be128(daddr) if six else raw_ip(daddr),
        "sport": raw_port(sport), "dport": raw_port(dport), "proto": PROTO_NUMBERS[proto], "dir": direction}))


def monotonic_ns() -> int:
    """bpf_ktime_get_ns() is CLOCK_MONOTONIC: comparable with the maps' timestamps."""
    return time.monotonic_ns()


# enum bpf_prog_type (uapi/linux/bpf.h): the socket path's programs (datapath/socklb.py).
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18


def _address_order(address: str) -> tuple[int, int]:
    """Sort key of an address of either family: IPv4 first, then by value."""
    addr = ipaddress.ip_address(address)
    return (addr.version, int(addr))


def address_port_name(address: str, port: int, proto: str) -> str:
    """ADDRESS:PORT/PROTO, as Backend.name ([2001:2::1]:80/TCP)."""
    return f"{hostport(address, port)}/{proto}"


@dataclass(frozen=True)
class FrontendRow:
    """A frontend as the pinned maps hold it, decoded for display (lbmodel.Frontend is the desired one)."""

    address: str
    port: int
    proto: str
    scope: str
    service_id: int
    frontend_id: int
    maglev_offset: int
    maglev_size: int
    backend_count: int
    affinity_timeout: int
    flags: int
    service: str = ""            # lb_service_names[service_id]: "namespace/name:port/PROTO"

    @property
    def is_marker(self) -> bool:
        """The writer's port-0 entry that only says "this address is a frontend"."""
        return bool(self.flags & abi.LB_SVC_F_ADDRESS)

    @property
    def kind(self) -> str:
        if self.flags & abi.LB_SVC_F_NODEPORT:
            return "NodePort"
        if self.flags & abi.LB_SVC_F_EXTERNAL_IP:
            return "ExternalIP"
        if self.flags & abi.LB_SVC_F_LOADBALANCER:
            return "LoadBalancer"
        return "ClusterIP"

    @property
    def algorithm(self) -> str:
        return "random" if self.flags & abi.LB_SVC_F_RANDOM else "maglev"

    @property
    def flag_names(self) -> list[str]:
        return flag_names(self.flags, _SVC_FLAGS)

    @property
    def name(self) -> str:
        return address_port_name(self.address, self.port, self.proto)

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.address

    def key_bytes(self) -> bytes:
        """The frontend's key in its family's map (struct lb4_key, or lb6_key)."""
        six = self.is_ipv6
        k = ffi.new("struct lb6_key *" if six else "struct lb4_key *", {
            "address": abi.be128(self.address) if six else raw_ip(self.address), "port": raw_port(self.port),
            "proto": PROTO_NUMBERS[self.proto], "scope": {v: k for k, v in SCOPES.items()}[self.scope]})
        return _encode(k)


@dataclass(frozen=True)
class BackendRow:
    """A backend as the pinned maps hold it, decoded for display (lbmodel.Backend is the desired one)."""

    id: int
    address: str
    port: int
    proto: str
    flags: int

    @property
    def terminating(self) -> bool:
        return bool(self.flags & abi.LB_BE_F_TERMINATING)

    @property
    def local(self) -> bool:
        return bool(self.flags & abi.LB_BE_F_LOCAL)

    @property
    def not_ready(self) -> bool:
        return bool(self.flags & abi.LB_BE_F_NOT_READY)

    @property
    def takes_new_flows(self) -> bool:
        """bpf/lib/lb.h LB_BE_F_NO_NEW_FLOWS: neither terminating nor not ready."""
        return not (self.terminating or self.not_ready)

    @property
    def state(self) -> str:
        return "not-ready" if self.not_ready else "terminating" if self.terminating else "active"

    @property
    def name(self) -> str:
        return address_port_name(self.address, self.port, self.proto)


@dataclass(frozen=True)
class CtEntry:
    saddr: str
    daddr: str
    sport: int
    dport: int
    proto: str
    direction: str               # "forward" (client -> frontend) / "reply" (backend -> client)
    last_seen_ns: int
    backend_id: int
    service_id: int
    frontend_id: int
    frontend: str                # "VIP:port"
    backend: str                 # "address:port"
    flags: int
    age_s: float = 0.0
    expired: bool = False        # older than its lifetime: the datapath treats it as absent

    @property
    def flag_names(self) -> list[str]:
        return flag_names(self.flags, _CT_FLAGS)


@dataclass(frozen=True)
class Affinity:
    client: str
    service_id: int
    backend_id: int
    last_used_ns: int
    age_s: float = 0.0


def ct_lifetime_s(proto: str, flags: int) -> int:
    """bpf/lib/ct.h ct4_lifetime_ns, with abi.h's default lifetimes."""
    if proto == "UDP":
        return abi.CT_TIMEOUT_UDP_STREAM_S if flags & abi.CT_F_ESTABLISHED else abi.CT_TIMEOUT_UDP_S
    if proto != "TCP":
        return abi.CT_TIMEOUT_OTHER_S
    if ct_closing(flags):
        return abi.CT_TIMEOUT_TCP_CLOSE_S
    if flags & (abi.CT_F_SEEN_FIN_FWD | abi.CT_F_SEEN_FIN_REV):
        return abi.CT_TIMEOUT_TCP_CLOSE_WAIT_S
    if flags & abi.CT_F_ESTABLISHED:
        return abi.CT_TIMEOUT_TCP_ESTABLISHED_S
    return abi.CT_TIMEOUT_TCP_SYN_S


def ct_closing(flags: int) -> bool:
    return bool((flags & abi.CT_F_SEEN_RST) or
                ((flags & abi.CT_F_SEEN_FIN_FWD) and (flags & abi.CT_F_SEEN_FIN_REV)))


def _age_s(now_ns: int, then_ns: int) -> float:
    # The datapath computes now - then modulo 2**64; so do we (an entry aged by a test can lie).
    return ((now_ns - then_ns) % (1 << 64)) / 1e9


@dataclass
class NodeMaps:
    """The pinned maps of one node (one pin directory), opened read-only."""

    pin_dir: Path
    maps: dict[str, PinnedMap] = field(default_factory=dict)
    # Maglev slots read by prefetch_maglev(); dropped whenever frontends are read again, so a
    # copy never outlives the view that made it.
    _slots: object = None

    @classmethod
    def open(cls, pin_dir, names=None) -> "NodeMaps":
        pin_dir = Path(pin_dir)
        if not pin_dir.is_dir():
            raise FileNotFoundError(f"{pin_dir}: no such pin directory (is the agent running with this --pin-dir?)")
        node = cls(pin_dir)
        try:
            for name in names or abi.MAP_TYPES:
                if names is None and name in _OPTIONAL_MAPS and not (pin_dir / name).exists():
                    continue        # an agent of a version before IPv6 (or before the map): not there
                m = PinnedMap.open(pin_dir / name)
                key_t, val_t = abi.MAP_TYPES[name]
                if (m.info.key_size, m.info.value_size) != (ffi.sizeof(key_t), ffi.sizeof(val_t)):
                    raise ValueError(f"{pin_dir / name}: key/value size {m.info.key_size}/{m.info.value_size}, "
                                     f"abi.h says {ffi.sizeof(key_t)}/{ffi.sizeof(val_t)}: "
                                     "the agent runs another datapath version")
                node.maps[name] = m
        except BaseException:
            node.close()
            raise
        return node

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()

    def __enter__(self) -> "NodeMaps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- control-plane maps --------------------------------------------------------------

    def service_names(self) -> dict[int, str]:
        out = {}
        for k, v in self.maps["lb_service_names"].items():
            name = _decode("struct lb_service_name", v)
            out[_decode("__u32", k)[0]] = ffi.string(name.name).decode(errors="replace")
        return out

    def frontends(self, names: dict[int, str] | None = None) -> list[FrontendRow]:
        names = self.service_names() if names is None else names
        self._slots = None
        out = []
        for k, v in self.maps["lb4_frontends"].items():
            out.append(self._frontend(k, v, names))
        for k, v in self.maps["lb6_frontends"].items() if "lb6_frontends" in self.maps else ():
            out.append(self._frontend(k, v, names, six=True))
        return sorted(out, key=lambda f: (f.service, _address_order(f.address), f.port, f.proto, f.scope))

    def frontend(self, address: str, port: int, proto: str, scope: str) -> FrontendRow | None:
        self._slots = None
        probe = FrontendRow(address, port, proto, scope, 0, 0, 0, 0, 0, 0, 0)
        key = probe.key_bytes()
        table = self.maps.get("lb6_frontends" if probe.is_ipv6 else "lb4_frontends")
        v = table.lookup(key) if table is not None else None
        if v is None:
            return None
        sid = _decode("struct lb4_service", v).service_id
        raw = self.maps["lb_service_names"].lookup(_encode(ffi.new("__u32 *", sid)))
        names = {sid: ffi.string(_decode("struct lb_service_name", raw).name).decode()} if raw else {}
        return self._frontend(key, v, names, six=probe.is_ipv6)

    @staticmethod
    def _frontend(k: bytes, v: bytes, names: dict[int, str], six: bool = False) -> FrontendRow:
        key = _decode("struct lb6_key" if six else "struct lb4_key", k)
        val = _decode("struct lb4_service", v)
        return FrontendRow(
            address=ip6_str(key.address) if six else ip_str(key.address), port=port_int(key.port),
            proto=PROTO_NAMES.get(key.proto, str(key.proto)), scope=SCOPES.get(key.scope, str(key.scope)),
            service_id=val.service_id, frontend_id=val.frontend_id, maglev_offset=val.maglev_offset,
            maglev_size=val.maglev_size, backend_count=val.backend_count,
            affinity_timeout=val.affinity_timeout, flags=val.flags,
            service=names.get(val.service_id, "") if not val.flags & abi.LB_SVC_F_ADDRESS else "")

    def backends(self) -> dict[int, BackendRow]:
        out = {}
        for k, v in self.maps["lb4_backends"].items():
            ident = _decode("__u32", k)[0]
            b = _decode("struct lb4_backend", v)
            out[ident] = BackendRow(ident, ip_str(b.address), port_int(b.port),
                                 PROTO_NAMES.get(b.proto, str(b.proto)), b.flags)
        for k, v in self.maps["lb6_backends"].items() if "lb6_backends" in self.maps else ():
            ident = _decode("__u32", k)[0]
            b = _decode("struct lb6_backend", v)
            out[ident] = BackendRow(ident, ip6_str(b.address), port_int(b.port),
                                    PROTO_NAMES.get(b.proto, str(b.proto)), b.flags)
        return dict(sorted(out.items()))

    def backend(self, ident: int) -> BackendRow | None:
        """Backend `ident` of either family (ids are one space)."""
        key = _encode(ffi.new("__u32 *", ident))
        v = self.maps["lb4_backends"].lookup(key)
        if v is not None:
            b = _decode("struct lb4_backend", v)
            return BackendRow(ident, ip_str(b.address), port_int(b.port), PROTO_NAMES.get(b.proto, str(b.proto)),
                              b.flags)
        v = self.maps["lb6_backends"].lookup(key) if "lb6_backends" in self.maps else None
        if v is None:
            return None
        b = _decode("struct lb6_backend", v)
        return BackendRow(ident, ip6_str(b.address), port_int(b.port), PROTO_NAMES.get(b.proto, str(b.proto)), b.flags)

    def maglev_table(self, fe: FrontendRow) -> list[int]:
        """Backend id per slot of a frontend's Maglev table (from prefetch_maglev's copy when it has one)."""
        slots = self._slots
        if slots is not None and fe.maglev_offset + fe.maglev_size <= len(slots):
            return slots[fe.maglev_offset:fe.maglev_offset + fe.maglev_size].tolist()
        return self.maps["lb_maglev"].read_slots(fe.maglev_offset, fe.maglev_size).tolist()

    def prefetch_maglev(self, fes: list[FrontendRow]) -> None:
        """Read every slot the frontends own in one pass, for commands that look at all tables."""
        high = max((f.maglev_offset + f.maglev_size for f in fes), default=0)
        self._slots = self.maps["lb_maglev"].read_slots(0, high)

    # ---- datapath-owned maps ---------------------------------------------------------------

    def ct(self, now_ns: int | None = None) -> list[CtEntry]:
        now_ns = monotonic_ns() if now_ns is None else now_ns
        rows = [self._ct(k, v, now_ns) for k, v in self.maps["ct4"].items()]
        rows += [self._ct(k, v, now_ns, six=True) for k, v in self.maps["ct6"].items()] if "ct6" in self.maps else []
        return sorted(rows, key=lambda e: (e.age_s, e.saddr, e.sport, e.direction))

    def ct_lookup(self, saddr: str, daddr: str, sport: int, dport: int, proto: str, direction: str,
                  now_ns: int | None = None) -> CtEntry | None:
        six = ":" in saddr
        if six and "ct6" not in self.maps:
            return None
        key = _ct_key(saddr, daddr, sport, dport, proto, abi.CT_DIR_FORWARD if direction == "forward" else
                      abi.CT_DIR_REPLY)
        v = self.maps["ct6" if six else "ct4"].lookup(key)
        return None if v is None else self._ct(key, v, monotonic_ns() if now_ns is None else now_ns, six=six)

    @staticmethod
    def _ct(k: bytes, v: bytes, now_ns: int, six: bool = False) -> CtEntry:
        key = _decode("struct ct6_key" if six else "struct ct4_key", k)
        e = _decode("struct ct6_entry" if six else "struct ct4_entry", v)
        proto = PROTO_NAMES.get(key.proto, str(key.proto))
        age = _age_s(now_ns, e.last_seen_ns)
        ip = ip6_str if six else ip_str
        # An IPv6 endpoint is bracketed before its port, as in a URL (and a Maglev name).
        fe_addr, be_addr = (f"[{ip(e.frontend_addr)}]", f"[{ip(e.backend_addr)}]") if six else \
            (ip(e.frontend_addr), ip(e.backend_addr))
        return CtEntry(
            saddr=ip(key.saddr), daddr=ip(key.daddr), sport=port_int(key.sport),
            dport=port_int(key.dport), proto=proto,
            direction="forward" if key.dir == abi.CT_DIR_FORWARD else "reply",
            last_seen_ns=e.last_seen_ns, backend_id=e.backend_id, service_id=e.service_id,
            frontend_id=e.frontend_id, frontend=f"{fe_addr}:{port_int(e.frontend_port)}",
            backend=f"{be_addr}:{port_int(e.backend_port)}", flags=e.flags,
            age_s=age, expired=age > ct_lifetime_s(proto, e.flags))

    def affinity(self, client: str, service_id: int, now_ns: int | None = None) -> Affinity | None:
        six = ":" in client         # IPv6: per /128 client (lb6_affinity)
        if six and "lb6_affinity" not in self.maps:
            return None
        key = ffi.new("struct lb6_affinity_key *" if six else "struct lb4_affinity_key *",
                      {"client_addr": abi.be128(client) if six else raw_ip(client), "service_id": service_id})
        v = self.maps["lb6_affinity" if six else "lb4_affinity"].lookup(_encode(key))
        if v is None:
            return None
        val = _decode("struct lb_affinity_val", v)
        now_ns = monotonic_ns() if now_ns is None else now_ns
        return Affinity(client, service_id, val.backend_id, val.last_used_ns, _age_s(now_ns, val.last_used_ns))

    def affinity_matches(self, backend_id: int, frontend_id: int) -> bool:
        """Whether the backend is in the set the (affinity) frontend balances to now:
        lb4_affinity_match (bpf/lib/affinity.h)."""
        key = ffi.new("struct lb4_affinity_match_key *", {"backend_id": backend_id, "frontend_id": frontend_id})
        return self.maps["lb4_affinity_match"].lookup(_encode(key)) is not None

    def service_status(self) -> dict[str, tuple[str, str]]:
        """"namespace/name" -> (reason, detail) of every Service the agent left out of the maps
        (lb_service_status, written by its admission)."""
        reasons = {abi.LB_STATUS_CONFLICT: "conflict", abi.LB_STATUS_CAPACITY: "capacity",
                   abi.LB_STATUS_FAILURE: "failure", abi.LB_STATUS_KEPT: "kept"}
        out = {}
        for k, v in self.maps["lb_service_status"].items():
            name = ffi.string(_decode("struct lb_service_name", k).name).decode(errors="replace")
            val = _decode("struct lb_service_status", v)
            out[name] = (reasons.get(val.reason, str(val.reason)), ffi.string(val.detail).decode(errors="replace"))
        return dict(sorted(out.items()))

    def affinities(self, now_ns: int | None = None) -> list[Affinity]:
        now_ns = monotonic_ns() if now_ns is None else now_ns
        out = []
        for k, v in self.maps["lb4_affinity"].items():
            key = _decode("struct lb4_affinity_key", k)
            val = _decode("struct lb_affinity_val", v)
            out.append(Affinity(ip_str(key.client_addr), key.service_id, val.backend_id, val.last_used_ns,
                                _age_s(now_ns, val.last_used_ns)))
        return out

    def source_allowed(self, fe: FrontendRow, client: str) -> bool:
        """bpf/lib/srcrange.h lb4_source_allowed / lb6_source_allowed: may `client` start a flow to
        `fe`? The client's family is the frontend's (a key of the frontend's family map)."""
        flag = getattr(abi, "LB_SVC_F_SOURCE_RANGES", 0)
        six = ":" in client
        table = "lb6_source_ranges" if six else "lb4_source_ranges"
        if not flag or not fe.flags & flag or table not in self.maps:
            return True
        # prefixlen: the frontend id (32 bits) and the whole client address, as the program asks.
        key = ffi.new("struct lb6_src_range_key *" if six else "struct lb4_src_range_key *", {
            "prefixlen": 32 + (128 if six else 32), "frontend_id": fe.frontend_id,
            "address": abi.be128(client) if six else raw_ip(client)})
        return self.maps[table].lookup(_encode(key)) is not None

    def snat_entry(self, saddr: str, daddr: str, sport: int, dport: int, proto: str) -> tuple[str, int] | None:
        """The node address:port a SNATed north-south flow (forward key) was given, None when absent
        (lb4_snat, or lb6_snat for an IPv6 flow)."""
        six = ":" in saddr
        table = "lb6_snat" if six else "lb4_snat"
        if table not in self.maps:
            return None
        v = self.maps[table].lookup(_ct_key(saddr, daddr, sport, dport, proto, abi.CT_DIR_FORWARD))
        if v is None:
            return None
        e = _decode("struct snat6_entry" if six else "struct snat4_entry", v)
        return (ip6_str if six else ip_str)(e.address), port_int(e.port)

    # ---- counters ---------------------------------------------------------------------------

    def traffic(self, kind: str, ident: int) -> tuple[int, int]:
        """(packets, bytes) of frontend or backend `ident`, summed over CPUs."""
        m = self.maps["lb_frontend_stats" if kind == "frontend" else "lb_backend_stats"]
        vals = m.lookup(_encode(ffi.new("__u32 *", ident)))
        if vals is None:
            return 0, 0
        pk = by = 0
        for raw in vals:
            t = _decode("struct lb_traffic", raw)
            pk += t.packets
            by += t.bytes
        return int(pk), int(by)

    def traffic_all(self, kind: str, high: int) -> dict[int, tuple[int, int]]:
        """(packets, bytes) of every id in [0, high], summed over CPUs, in one batched read."""
        m = self.maps["lb_frontend_stats" if kind == "frontend" else "lb_backend_stats"]
        size = min(high + 1, m.max_entries)
        ncpu = m.value_bytes // ffi.sizeof("struct lb_traffic")    # per-CPU slots are 8-aligned: 16 bytes
        vals = ffi.from_buffer("struct lb_traffic[]", m.read_array(0, size))
        out = {}
        for ident in range(size):
            pk = by = 0
            for cpu in range(ident * ncpu, (ident + 1) * ncpu):
                pk += vals[cpu].packets
                by += vals[cpu].bytes
            out[ident] = (int(pk), int(by))
        return out

    def socket_programs(self) -> list[str]:
        """Names of the socket path's programs (bpf/lb_sock.c: cgroup sock_addr programs) that look
        up these maps' frontends (lb4_frontends or lb6_frontends: connect4/6, sendmsg4/6): the agent
        holds them while it runs and a cgroup holds them once attached, so they are loaded exactly
        while --socket-lb serves (or an agent failed to attach them, which it logs)."""
        from ebpfsvc.datapath.bpfsys import programs_using_map

        names = set()
        for table in ("lb4_frontends", "lb6_frontends"):
            if table in self.maps:
                names.update(name for _, name in programs_using_map(self.maps[table].info.id,
                                                                    BPF_PROG_TYPE_CGROUP_SOCK_ADDR))
        return sorted(names)

    def socket_connects_all(self, high: int) -> dict[int, int]:
        """Sockets the socket path translated (connect(), unconnected sendmsg()) per frontend id in
        [0, high], summed over CPUs."""
        m = self.maps["lb_sock_stats"]
        size = min(high + 1, m.max_entries)
        ncpu = m.value_bytes // 8
        vals = ffi.from_buffer("__u64[]", m.read_array(0, size))
        return {ident: int(sum(vals[ident * ncpu:(ident + 1) * ncpu])) for ident in range(size)}

    def agent_options(self) -> AgentOptions | None:
        """The options the agent published (lb_agent_config), or None: it published nothing."""
        m = self.maps.get("lb_agent_config")
        raw = m.lookup(_encode(ffi.new("__u32 *", 0))) if m is not None else None
        word = _decode("__u32", raw)[0] if raw is not None else 0
        if not word & abi.LB_CFG_PUBLISHED:
            return None
        cidr = self.maps.get("lb_agent_cluster_cidr")
        cluster_cidr = None
        if word & abi.LB_CFG_CLUSTER_CIDR and cidr is not None:
            net, prefix = (_decode("__u32", cidr.lookup(_encode(ffi.new("__u32 *", i))))[0] for i in (0, 1))
            cluster_cidr = ipaddress.IPv4Network((int(net), int(prefix)))
        return AgentOptions.from_word(word, cluster_cidr)

    def drops(self) -> dict[str, int]:
        m = self.maps["lb_drops"]
        out = {}
        for code, name in sorted(abi.REASONS.items()):
            vals = m.lookup(_encode(ffi.new("__u32 *", code))) or []
            out[name] = int(sum(_decode("__u64", raw)[0] for raw in vals))
        return out

    def fill(self, frontends: list[FrontendRow] | None = None) -> dict[str, tuple[int, int]]:
        """Map -> (entries in use, max_entries), the kernel's count (Maglev: slots owned by frontends;
        per-CPU stats arrays are indexed by ids and have no fill level of their own)."""
        out = {}
        for name, m in self.maps.items():
            if name in ("lb_frontend_stats", "lb_backend_stats", "lb_drops", "lb_sock_stats"):
                continue
            if name == "lb_maglev":      # in slots, not elements (abi.slots_per_element)
                fes = self.frontends(names={}) if frontends is None else frontends
                out[name] = (sum(f.maglev_size for f in fes), m.max_entries * abi.slots_per_element(m.info.value_size))
            else:
                out[name] = (m.count(), m.max_entries)
        return out
