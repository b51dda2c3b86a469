"""A reference model of the pod-side datapath (bpf/lb_pod.c: from_pod, to_pod) in plain Python.

Written from what a Service load balancer must do (docs/datapath.md, docs/semantics.md) and the
map layouts of bpf/include/abi.h, not from the C: given the maps' contents and one packet, it says
what comes out (verdict and exact bytes) and which conntrack, affinity and fragment entries a
packet creates, updates or deletes. tests/diff/runner.py feeds the same packets to the real
programs through BPF_PROG_TEST_RUN and to this model and compares the two.

What it models: IPv4 TCP, UDP and SCTP to ClusterIPs (scope INTERNAL) balanced by Maglev (the
exact slot from the flow hash, ebpfsvc/datapath/flowhash.py), at random (any outcome of a random
slot is right: the caller says which one the kernel drew) and by ClientIP affinity; replies through
to_pod (reverse NAT); hairpin flows (a pod balanced to itself: SNAT to the hairpin address);
packets that are not for a Service (untouched); frontends without backends (TCP RST, ICMP port
unreachable; traffic policy Local: drop); TCP segments of connections never balanced here
(untouched); closing or answered flows reused by a new SYN, and a SYN-ACK on a closed flow (another
connection's, untouched); backends that are terminating, not ready or
removed; first and later fragments; truncated and inconsistent headers (dropped); ICMP errors
about translated flows (translated back); the drop counters. IPv6 only as far as the run's states
reach it: they hold no IPv6 frontend, so an IPv6 frame is passed untouched, or dropped when its
headers cannot be trusted (`check_ipv6`, the parser's rules).

Time is modelled in jumps: the runner moves every conntrack and fragment timestamp back by
`Lifetimes.jump_s` at once (as tests/bpf/conftest.py's `age`), and the model counts the jumps each
entry has missed since it was last refreshed (a packet refreshes only its own direction's entry).
An entry older than its lifetime (TCP by state, UDP before and after a reply, SCTP; fragments) is
treated as absent. The run's lifetimes are set far above the seconds a run takes, so only the
jumps age anything; affinity timeouts are hours and are not aged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from ebpfsvc import abi
from ebpfsvc.datapath.flowhash import flow_hash

OK, SHOT, REDIRECT = 0, 2, 7             # TC_ACT_*
TCP, UDP, ICMP, SCTP = 6, 17, 1, 132
# The map vocabulary (flags, directions, scopes) is abi.h's, read through ebpfsvc/abi.py.
FWD, REPLY = abi.CT_DIR_FORWARD, abi.CT_DIR_REPLY
F_SYN, F_FIN_FWD, F_FIN_REV = abi.CT_F_SEEN_SYN, abi.CT_F_SEEN_FIN_FWD, abi.CT_F_SEEN_FIN_REV
F_RST, F_ESTABLISHED, F_HAIRPIN = abi.CT_F_SEEN_RST, abi.CT_F_ESTABLISHED, abi.CT_F_HAIRPIN
SVC_AFFINITY, SVC_RANDOM = abi.LB_SVC_F_AFFINITY, abi.LB_SVC_F_RANDOM
SVC_LOCAL_ONLY, SVC_ADDRESS = abi.LB_SVC_F_LOCAL_ONLY, abi.LB_SVC_F_ADDRESS
BE_TERMINATING, BE_NOT_READY = abi.LB_BE_F_TERMINATING, abi.LB_BE_F_NOT_READY
BE_NO_NEW_FLOWS = BE_TERMINATING | BE_NOT_READY
SCOPE_INTERNAL = abi.LB_SCOPE_INTERNAL
# How far past a backend that takes no new flows a new flow looks (docs/datapath.md, "Backend
# choice": the moment between a backend changing and its table switch).
TERMINATING_PROBES = abi.LB_TERMINATING_PROBES
ICMP_ERRORS = (3, 11, 12)               # destination unreachable, time exceeded, parameter problem

# TCP header flag bits
T_FIN, T_SYN, T_RST, T_ACK = 0x01, 0x02, 0x04, 0x10


# ---------------------------------------------------------------- checksums (RFC 1071 / 1624)

def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def csum(data: bytes) -> int:
    """The Internet checksum of `data` (what goes into the header)."""
    if len(data) % 2:
        data += b"\0"
    return ~_fold(sum(struct.unpack(f"!{len(data) // 2}H", data))) & 0xFFFF


def csum_update(hc: int, old: bytes, new: bytes) -> int:
    """RFC 1624 eqn. 3: the checksum after 16-bit words `old` became `new`. A NAT keeps a
    checksum exactly as right, or as wrong, as it came in."""
    s = (~hc) & 0xFFFF
    for i in range(0, len(old), 2):
        s += (~int.from_bytes(old[i:i + 2], "big")) & 0xFFFF
        s += int.from_bytes(new[i:i + 2], "big")
    return (~_fold(s)) & 0xFFFF


# ---------------------------------------------------------------- the maps, as the model keeps them

@dataclass(frozen=True)
class Service:
    """lb4_service: what a frontend resolves to."""
    service_id: int
    frontend_id: int
    maglev_offset: int
    maglev_size: int
    backend_count: int
    affinity_timeout: int
    flags: int


@dataclass(frozen=True)
class BackendEntry:
    address: bytes          # 4 bytes, wire order
    port: int               # host order
    proto: int
    flags: int


@dataclass(frozen=True)
class Flow:
    """A ct4_entry without its timestamp: both entries of a flow hold this value."""
    backend_id: int
    service_id: int
    frontend_id: int
    frontend_addr: bytes
    backend_addr: bytes
    frontend_port: int
    backend_port: int
    flags: int


CtKey = tuple  # (saddr: bytes, daddr: bytes, sport: int, dport: int, proto: int, dir: int)


@dataclass
class Maps:
    frontends: dict = field(default_factory=dict)    # (addr, port, proto, scope) -> Service
    backends: dict = field(default_factory=dict)     # id -> BackendEntry
    maglev: dict = field(default_factory=dict)       # slot -> backend id
    ct: dict = field(default_factory=dict)           # CtKey -> Flow
    affinity: dict = field(default_factory=dict)     # (client addr, service id) -> backend id
    frag: dict = field(default_factory=dict)         # (saddr, daddr, ip id, proto) -> (sport, dport)
    members: set = field(default_factory=set)        # (backend id, frontend id): affinity frontends' tables
    age: dict = field(default_factory=dict)          # ct key -> time jumps since it was last refreshed
    frag_age: dict = field(default_factory=dict)     # frag key -> time jumps since it was recorded
    version: int = 0                                 # bumped whenever backends change (caches)


# ---------------------------------------------------------------- parsing

class Malformed(Exception):
    """IPv4 whose header fields contradict each other or the frame: dropped."""


@dataclass
class Pkt:
    ihl: int
    tot_len: int
    saddr: bytes
    daddr: bytes
    proto: int
    ip_id: int
    later_fragment: bool     # fragment offset > 0: no L4 header
    first_fragment: bool     # MF set, offset 0
    sport: int = 0
    dport: int = 0
    tcp_flags: int = 0
    tcp_doff: int = 0
    seq: int = 0
    ack: int = 0
    icmp_type: int = -1


L3 = 14


def parse(frame: bytes) -> Pkt | None:
    """None: not IPv4, not ours. Raises Malformed for IPv4 we cannot trust."""
    if len(frame) < L3 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[L3:]
    if len(ip) < 20 or ip[0] >> 4 != 4:
        raise Malformed("version")
    ihl = (ip[0] & 0xF) * 4
    if ihl < 20 or ihl > len(ip):
        raise Malformed("IHL")
    tot_len = int.from_bytes(ip[2:4], "big")
    if tot_len < ihl or tot_len > len(ip):
        raise Malformed("total length")
    frag = int.from_bytes(ip[6:8], "big")
    p = Pkt(ihl=ihl, tot_len=tot_len, saddr=ip[12:16], daddr=ip[16:20], proto=ip[9],
            ip_id=int.from_bytes(ip[4:6], "big"), later_fragment=bool(frag & 0x1FFF),
            first_fragment=not (frag & 0x1FFF) and bool(frag & 0x2000))
    if p.later_fragment:
        return p
    l4 = ip[ihl:tot_len]
    if p.proto == TCP:
        if len(l4) < 20 or (l4[12] >> 4) < 5 or (l4[12] >> 4) * 4 > len(l4):
            raise Malformed("TCP header")
        p.sport, p.dport, p.seq, p.ack = struct.unpack("!HHII", l4[:12])
        p.tcp_doff = (l4[12] >> 4) * 4
        p.tcp_flags = l4[13]
    elif p.proto == UDP:
        if len(l4) < 8:
            raise Malformed("UDP header")
        p.sport, p.dport = struct.unpack("!HH", l4[:4])
    elif p.proto == SCTP:
        if len(l4) < 12:
            raise Malformed("SCTP header")
        p.sport, p.dport = struct.unpack("!HH", l4[:4])
    elif p.proto == ICMP:
        if len(l4) < 8:
            raise Malformed("ICMP header")
        p.icmp_type = l4[0]
    return p


IPV6_MAX_HEADERS = 4             # extension headers the datapath walks (bpf/lib/parse.h)
_IPV6_EXT = {0, 43, 44, 51, 60}  # hop-by-hop, routing, fragment, authentication, destination options


def check_ipv6(frame: bytes) -> None:
    """An IPv6 frame's headers as the datapath trusts them: raises Malformed for a fixed header,
    extension header (at most IPV6_MAX_HEADERS walked; a longer chain is not looked into) or L4
    header that is cut short or lies about its length."""
    ip = frame[L3:]
    if len(ip) < 40 or ip[0] >> 4 != 6:
        raise Malformed("IPv6 version")
    end = 40 + int.from_bytes(ip[4:6], "big")
    if end > len(ip):
        raise Malformed("IPv6 payload length")
    nexthdr, off, later = ip[6], 40, False
    for _ in range(IPV6_MAX_HEADERS):
        if nexthdr not in _IPV6_EXT or later:
            break
        if off + 8 > end:
            raise Malformed("IPv6 extension header")
        if nexthdr == 44:
            later = bool(int.from_bytes(ip[off + 2:off + 4], "big") & 0xFFF8)
            step = 8
        else:
            step = (ip[off + 1] + 2) * 4 if nexthdr == 51 else (ip[off + 1] + 1) * 8
        nexthdr, off = ip[off], off + step
    if not later and nexthdr in _IPV6_EXT:
        return                      # a longer chain: not parsed, passed
    if off > end:
        raise Malformed("IPv6 extension header")
    if later:
        return
    need = {TCP: 20, UDP: 8, SCTP: 12, 58: 8}.get(nexthdr, 0)
    if off + need > end:
        raise Malformed("IPv6 L4 header")
    if nexthdr == TCP and ((ip[off + 12] >> 4) < 5 or off + (ip[off + 12] >> 4) * 4 > end):
        raise Malformed("TCP header")


# ---------------------------------------------------------------- rewriting

def _l4_csum_off(p: Pkt) -> int | None:
    """Offset (from the L4 header) of the checksum a NAT must fix; None: nothing to fix."""
    if p.later_fragment:
        return None              # the first fragment's checksum already covers the new addresses
    return {TCP: 16, UDP: 6}.get(p.proto)


def _fix_l4(buf: bytearray, p: Pkt, old: bytes, new: bytes) -> None:
    off = _l4_csum_off(p)
    if off is None:
        return
    at = L3 + p.ihl + off
    hc = int.from_bytes(buf[at:at + 2], "big")
    if p.proto == UDP and hc == 0:
        return                   # UDP checksum 0: the sender computed none
    nc = csum_update(hc, old, new)
    if p.proto == UDP and nc == 0:
        nc = 0xFFFF              # RFC 768: a computed 0 is sent as all ones
    buf[at:at + 2] = nc.to_bytes(2, "big")


SCTP_CRC_MAX_LEN = 16384     # longest SCTP packet whose CRC the datapath fixes (bpf/lib/maps.h)


def _sctp_crc(buf: bytearray, p: Pkt) -> int | None:
    """CRC32c of a whole (unfragmented) SCTP packet as its sender computes it (checksum zeroed),
    or None when the CRC is not to be fixed: a fragment's CRC covers a datagram the first fragment
    does not hold, and longer packets (GSO) get theirs computed after us."""
    if p.proto != SCTP or p.first_fragment or p.later_fragment:
        return None
    length = p.tot_len - p.ihl
    if length - 4 >= SCTP_CRC_MAX_LEN:
        return None
    from scapy.layers.sctp import crc32c
    at = L3 + p.ihl
    return crc32c(bytes(buf[at:at + 8]) + b"\0\0\0\0" + bytes(buf[at + 12:at + length]))


def _fix_sctp_crc(buf: bytearray, p: Pkt, before: int | None) -> None:
    """SCTP's CRC32c covers no pseudo-header (addresses change nothing) but does cover the
    ports: a port rewrite keeps the CRC exactly as right, or as wrong, as it came (CRC32c is
    linear: the stored value moves by the difference of the true CRCs)."""
    if before is None:
        return
    after = _sctp_crc(buf, p)
    at = L3 + p.ihl + 8
    stored = int.from_bytes(buf[at:at + 4], "big")
    buf[at:at + 4] = (stored ^ before ^ after).to_bytes(4, "big")


def rewrite(buf: bytearray, p: Pkt, *, src: tuple | None = None, dst: tuple | None = None) -> None:
    """NAT one or both ends: (address, port). The IP header checksum and the L4 checksum
    (pseudo-header and port) follow; a later fragment has no ports."""
    for end, nat in (("src", src), ("dst", dst)):
        if nat is None:
            continue
        addr, port = nat
        a_off = L3 + (12 if end == "src" else 16)
        old = bytes(buf[a_off:a_off + 4])
        if old != addr:
            buf[a_off:a_off + 4] = addr
            ipc = int.from_bytes(buf[L3 + 10:L3 + 12], "big")
            buf[L3 + 10:L3 + 12] = csum_update(ipc, old, addr).to_bytes(2, "big")
            _fix_l4(buf, p, old, addr)
        if not p.later_fragment:
            p_off = L3 + p.ihl + (0 if end == "src" else 2)
            oldp = bytes(buf[p_off:p_off + 2])
            newp = port.to_bytes(2, "big")
            if oldp != newp:
                crc_before = _sctp_crc(buf, p)
                buf[p_off:p_off + 2] = newp
                _fix_l4(buf, p, oldp, newp)
                _fix_sctp_crc(buf, p, crc_before)


def _swap_macs(frame: bytes) -> bytes:
    return frame[6:12] + frame[0:6] + b"\x08\x00"


def _ip_header(tos: int, total: int, proto: int, src: bytes, dst: bytes) -> bytes:
    h = struct.pack("!BBHHHBBH4s4s", 0x45, tos, total, 0, 0, 64, proto, 0, src, dst)
    return h[:10] + csum(h).to_bytes(2, "big") + h[12:]


def reject(frame: bytes, p: Pkt) -> tuple[int, bytes]:
    """kube-proxy's REJECT for a frontend without endpoints, answered from the VIP back out the
    same interface: TCP RST as Linux's tcp_v4_send_reset, else ICMP port unreachable quoting
    the IP header and 8 bytes (TOS 0xc0 as Linux's icmp_send). An RST is never answered."""
    eth = _swap_macs(frame)
    if p.proto == TCP:
        if p.tcp_flags & T_RST:
            return SHOT, b""
        if p.tcp_flags & T_ACK:
            seq, ack, flags = p.ack, 0, T_RST
        else:
            seglen = p.tot_len - p.ihl - p.tcp_doff
            seglen += bool(p.tcp_flags & T_SYN) + bool(p.tcp_flags & T_FIN)
            seq, ack, flags = 0, (p.seq + seglen) & 0xFFFFFFFF, T_RST | T_ACK
        th = struct.pack("!HHIIBBHHH", p.dport, p.sport, seq, ack, 5 << 4, flags, 0, 0, 0)
        pseudo = p.daddr + p.saddr + struct.pack("!BBH", 0, TCP, len(th))
        th = th[:16] + csum(pseudo + th).to_bytes(2, "big") + th[18:]
        return REDIRECT, eth + _ip_header(0, 20 + len(th), TCP, p.daddr, p.saddr) + th
    quote = frame[L3:L3 + p.ihl + 8]
    icmp = struct.pack("!BBHI", 3, 3, 0, 0) + quote
    icmp = icmp[:2] + csum(icmp).to_bytes(2, "big") + icmp[4:]
    return REDIRECT, eth + _ip_header(0xC0, 20 + len(icmp), ICMP, p.daddr, p.saddr) + icmp


# ---------------------------------------------------------------- the model

def tcp_state(p: Pkt, direction: int) -> int:
    """What a segment tells conntrack: SYN, RST, and FIN per direction."""
    if p.proto != TCP:
        return 0
    f = 0
    if p.tcp_flags & T_SYN:
        f |= F_SYN
    if p.tcp_flags & T_RST:
        f |= F_RST
    if p.tcp_flags & T_FIN:
        f |= F_FIN_FWD if direction == FWD else F_FIN_REV
    return f


def starts_flow(p: Pkt) -> bool:
    """Any datagram; of TCP only a SYN without ACK (a mid-stream segment is the kernel's)."""
    return p.proto != TCP or (p.tcp_flags & (T_SYN | T_ACK)) == T_SYN


def closing(flags: int) -> bool:
    return bool(flags & F_RST) or (flags & (F_FIN_FWD | F_FIN_REV)) == (F_FIN_FWD | F_FIN_REV)


def restarts_flow(flags: int, p: Pkt) -> bool:
    """A new SYN on the ports of a TCP flow that is closing or has seen a reply: a new connection
    (port reuse, or the SYN sent again: same backend, new entries)."""
    return p.proto == TCP and (closing(flags) or bool(flags & F_ESTABLISHED)) and starts_flow(p)


@dataclass(frozen=True)
class Lifetimes:
    """Conntrack lifetimes in seconds (loader.Limits' ct_* fields), the fragment timeout, and how
    far one time jump moves the clock."""
    tcp_syn: int
    tcp_established: int
    tcp_close_wait: int
    tcp_close: int
    udp: int
    udp_stream: int
    other: int
    frag: int
    jump_s: int

    def of(self, proto: int, flags: int) -> int:
        """How long an entry with `flags` lives: UDP by whether a reply was seen (a stream), TCP by
        its state (closing, half-closed, established, SYN only), anything else idle only."""
        if proto == UDP:
            return self.udp_stream if flags & F_ESTABLISHED else self.udp
        if proto != TCP:
            return self.other
        if closing(flags):
            return self.tcp_close
        if flags & (F_FIN_FWD | F_FIN_REV):
            return self.tcp_close_wait
        if flags & F_ESTABLISHED:
            return self.tcp_established
        return self.tcp_syn


class Model:
    """The datapath's behaviour over `maps`. `pick(outcomes)` tells which backend id a random
    frontend drew (the kernel's bpf_get_prandom_u32): any member of `outcomes` is right (None:
    no backend, the packet is dropped)."""

    def __init__(self, maps: Maps, hairpin_addr: bytes, lifetimes: Lifetimes):
        self.m = maps
        self.life = lifetimes
        self.hairpin = hairpin_addr
        self.touched: set = set()             # ("ct"|"affinity"|"frag", key) this packet changed
        self.drops: dict = {}                 # reason (lb_drops' names) -> packets dropped, rejected or reset
        self._outcomes: dict = {}             # (frontend id, maps version) -> outcomes of a random draw

    # -- helpers over the maps
    def _drop(self, reason: str, verdict=SHOT, data=b""):
        """Every packet dropped, rejected or reset is counted under its reason."""
        self.drops[reason] = self.drops.get(reason, 0) + 1
        return verdict, data

    def _reject(self, frame, p, reason: str):
        verdict, data = reject(frame, p)
        return self._drop(reason, verdict, data)

    def _frontend(self, addr, port, proto) -> Service | None:
        return self.m.frontends.get((addr, port, proto, SCOPE_INTERNAL))

    def _set_ct(self, key, flow: Flow | None):
        self.touched.add(("ct", key))
        if flow is None:
            self.m.ct.pop(key, None)
            self.m.age.pop(key, None)
        else:
            self.m.ct[key] = flow

    def _live(self, key) -> Flow | None:
        """The entry under `key` unless it outlived its lifetime (then it is as good as absent)."""
        flow = self.m.ct.get(key)
        if flow is None or self.m.age.get(key, 0) * self.life.jump_s > self.life.of(key[4], flow.flags):
            return None
        return flow

    def _refresh(self, key):
        self.m.age[key] = 0

    def _frag_ports(self, p: Pkt):
        k = (p.saddr, p.daddr, p.ip_id, p.proto)
        if k not in self.m.frag or self.m.frag_age.get(k, 0) * self.life.jump_s > self.life.frag:
            return None
        return self.m.frag[k]

    def time_passes(self):
        """One time jump: every conntrack and fragment entry is `jump_s` older."""
        for k in self.m.age:
            self.m.age[k] += 1
        for k in self.m.frag_age:
            self.m.frag_age[k] += 1

    def _reply_key(self, fk, flow: Flow) -> CtKey:
        """A backend answers its client, or the node's hairpin address when it is the client."""
        client = self.hairpin if flow.flags & F_HAIRPIN else fk[0]
        return (flow.backend_addr, client, flow.backend_port, fk[2], fk[4], REPLY)

    def _delete_flow(self, fk, flow: Flow):
        self._set_ct(self._reply_key(fk, flow), None)
        self._set_ct(fk, None)

    def _frag_record(self, p: Pkt, sport: int, dport: int):
        if p.first_fragment:
            k = (p.saddr, p.daddr, p.ip_id, p.proto)
            self.m.frag[k] = (sport, dport)
            self.m.frag_age[k] = 0
            self.touched.add(("frag", k))

    def _usable(self, bid: int, proto: int) -> bool:
        """May a tracked flow stay on backend `bid`? Not when it was removed; a UDP flow also
        moves off a not-ready backend (kube-proxy clears a not-ready endpoint's UDP conntrack
        entries, and only UDP's: TCP and SCTP associations carry on)."""
        be = self.m.backends.get(bid)
        if be is None:
            return False
        return not (proto == UDP and be.flags & BE_NOT_READY)

    def _select(self, svc: Service, p: Pkt, pick) -> int | None:
        """Affinity first, then the table: Maglev's slot from the flow hash (or any slot at random),
        skipping a few slots past a backend that takes no new flows; a terminating one is the
        fallback, a not-ready one never."""
        if svc.flags & SVC_AFFINITY and svc.affinity_timeout:
            # The remembered backend, while it is still in this frontend's set in use (another
            # service may keep the same backend alive after it left this one; the service's other
            # frontends may use another set) and takes new flows.
            bid = self.m.affinity.get((p.saddr, svc.service_id))
            be = self.m.backends.get(bid) if bid is not None else None
            if be is not None and (bid, svc.frontend_id) in self.m.members and not be.flags & BE_NO_NEW_FLOWS:
                return bid
        size = svc.maglev_size

        def walk(slot):
            fallback = None
            for _ in range(TERMINATING_PROBES):
                bid = self.m.maglev.get(svc.maglev_offset + slot)
                if bid is None:
                    break
                be = self.m.backends.get(bid)
                if be is not None:
                    if not be.flags & BE_NO_NEW_FLOWS:
                        return bid
                    if fallback is None and not be.flags & BE_NOT_READY:
                        fallback = bid
                slot = (slot + 1) % size
            return fallback

        if svc.flags & SVC_RANDOM:
            # Any slot may be drawn: every outcome of a walk is right, None (no backend within the
            # probes: dropped) included.
            key = (svc.frontend_id, svc.maglev_offset, self.m.version)
            if key not in self._outcomes:
                self._outcomes[key] = {walk(s) for s in range(size)}
            return pick(self._outcomes[key])
        h = flow_hash(_dotted(p.saddr), _dotted(p.daddr), p.sport, p.dport, p.proto)
        return walk(h % size)

    def _begin(self, frame: bytes, direction: int):
        """What both programs do first: drop a malformed packet, pass what is not IPv4 TCP, UDP,
        SCTP or ICMP, translate ICMP errors back. The (verdict, bytes) when that decided it, else
        the parsed packet."""
        self.touched = set()
        try:
            p = parse(frame)
        except Malformed:
            return self._drop("malformed")
        if p is None:
            if frame[12:14] == b"\x86\xdd":
                try:
                    check_ipv6(frame)
                except Malformed:
                    return self._drop("malformed")
            return OK, frame
        if p.proto == ICMP:
            return self._icmp(frame, p, direction)
        if p.proto not in (TCP, UDP, SCTP):
            return OK, frame
        return p

    def _begin_flow(self, frame: bytes, direction: int):
        """_begin, and a later fragment given its first fragment's ports (a tuple: the outcome
        of a fragment whose ports are unknown)."""
        p = self._begin(frame, direction)
        if isinstance(p, tuple) or not p.later_fragment:
            return p
        ports = self._frag_ports(p)
        if ports is None:
            # From a pod, sent to a frontend address: it must not wander off untranslated.
            if direction == FWD and any(k[0] == p.daddr and k[2] == p.proto and k[3] == SCOPE_INTERNAL
                                        for k in self.m.frontends):
                return self._drop("frag_untracked")
            return OK, frame
        p.sport, p.dport = ports
        return p

    # -- from_pod
    def from_pod(self, frame: bytes, pick=None) -> tuple[int, bytes]:
        p = self._begin_flow(frame, FWD)
        if isinstance(p, tuple):
            return p
        fk = (p.saddr, p.daddr, p.sport, p.dport, p.proto, FWD)
        flow = self.m.ct.get(fk)
        if flow is not None and (self._live(fk) is None or restarts_flow(flow.flags, p)):
            self._delete_flow(fk, flow)      # over: expired, or a new SYN on a connection's ports
            flow = None
        if flow is not None:
            if not self._usable(flow.backend_id, p.proto):
                self._delete_flow(fk, flow)
                if p.proto == TCP:       # it cannot move: reset it now (a later fragment: drop)
                    return self._reject(frame, p, "backend_gone")
                if p.later_fragment:
                    return self._drop("backend_gone")
                return self._new(frame, p, fk, pick)
            self._refresh(fk)
            flags = flow.flags | tcp_state(p, FWD)
            if flags != flow.flags:
                flow = replace(flow, flags=flags)
                self._set_ct(fk, flow)
                rk = self._reply_key(fk, flow)
                if rk in self.m.ct:
                    self._set_ct(rk, replace(self.m.ct[rk], flags=self.m.ct[rk].flags | flags))
            return self._forward(frame, p, flow)
        if self.hairpin != bytes(4) and p.daddr == self.hairpin:
            out = self._hairpin_reply(frame, p)
            if out is not None:
                return out
        return self._new(frame, p, fk, pick)

    def _forward(self, frame, p, flow: Flow):
        self._frag_record(p, p.sport, p.dport)
        buf = bytearray(frame)
        # A pod balanced to itself: its source becomes the node's hairpin address (port kept), as
        # kube-proxy masquerades, or the reply would come back from itself and be a martian.
        src = (self.hairpin, p.sport) if flow.flags & F_HAIRPIN else None
        rewrite(buf, p, src=src, dst=(flow.backend_addr, flow.backend_port))
        return OK, bytes(buf)

    def _hairpin_reply(self, frame, p: Pkt):
        """The pod answering itself (backend -> hairpin address): VIP:port -> the pod again.
        None when it is no reply of a hairpin flow."""
        rk = (p.saddr, p.daddr, p.sport, p.dport, p.proto, REPLY)
        flow = self._live(rk)
        if flow is None or not flow.flags & F_HAIRPIN:
            return None
        self._note_reply(rk, flow, p, client=(p.saddr, p.dport))
        self._frag_record(p, p.sport, p.dport)
        buf = bytearray(frame)
        rewrite(buf, p, src=(flow.frontend_addr, flow.frontend_port), dst=(p.saddr, p.dport))
        return OK, bytes(buf)

    def _note_reply(self, rk, flow: Flow, p: Pkt, client):
        """A reply was seen: the flow is established (and the segment's TCP state), on both entries;
        only the reply entry is refreshed."""
        self._refresh(rk)
        flags = flow.flags | F_ESTABLISHED | tcp_state(p, REPLY)
        if flags == flow.flags:
            return
        self._set_ct(rk, replace(flow, flags=flags))
        fk = (client[0], flow.frontend_addr, client[1], flow.frontend_port, p.proto, FWD)
        if fk in self.m.ct:
            self._set_ct(fk, replace(self.m.ct[fk], flags=self.m.ct[fk].flags | flags))

    def _new(self, frame, p: Pkt, fk, pick):
        svc = self._frontend(p.daddr, p.dport, p.proto)
        if svc is None or svc.flags & SVC_ADDRESS:
            return OK, frame
        if p.later_fragment:
            return self._drop("frag_untracked")
        if not svc.backend_count or not svc.maglev_size:
            if svc.flags & SVC_LOCAL_ONLY:
                return self._drop("no_local_backend")
            return self._reject(frame, p, "no_backend")
        if not starts_flow(p):
            return OK, frame
        bid = self._select(svc, p, pick)
        if bid is None:
            return self._drop("no_backend")
        be = self.m.backends[bid]
        hairpin = F_HAIRPIN if self.hairpin != bytes(4) and be.address == p.saddr else 0
        flow = Flow(backend_id=bid, service_id=svc.service_id, frontend_id=svc.frontend_id,
                    frontend_addr=p.daddr, backend_addr=be.address, frontend_port=p.dport,
                    backend_port=be.port, flags=tcp_state(p, FWD) | hairpin)
        self._set_ct(fk, flow)
        self._set_ct(self._reply_key(fk, flow), flow)
        self._refresh(fk)
        self._refresh(self._reply_key(fk, flow))
        if svc.flags & SVC_AFFINITY and svc.affinity_timeout:
            k = (p.saddr, svc.service_id)
            self.m.affinity[k] = bid
            self.touched.add(("affinity", k))
        return self._forward(frame, p, flow)

    # -- to_pod
    def to_pod(self, frame: bytes, pick=None) -> tuple[int, bytes]:
        p = self._begin_flow(frame, REPLY)
        if isinstance(p, tuple):
            return p
        rk = (p.saddr, p.daddr, p.sport, p.dport, p.proto, REPLY)
        flow = self._live(rk)
        if flow is None:
            return OK, frame
        if p.proto == TCP and closing(flow.flags) and p.tcp_flags & (T_SYN | T_ACK) == T_SYN | T_ACK:
            # A handshake answer on a flow that is over answers another connection: the client reused
            # the ports to reach the backend directly (pod to pod, or through the socket path), and
            # a new connection through the frontend would have replaced the flow. Untouched.
            return OK, frame
        self._note_reply(rk, flow, p, client=(p.daddr, p.dport))
        self._frag_record(p, p.sport, p.dport)
        buf = bytearray(frame)
        rewrite(buf, p, src=(flow.frontend_addr, flow.frontend_port))
        return OK, bytes(buf)

    # -- ICMP
    def _icmp(self, frame, p: Pkt, direction: int) -> tuple[int, bytes]:
        """An ICMP error about a translated flow is translated back, so its receiver can match it
        with its own socket: the packet it quotes went the other way, so its flow is found by the
        quoted tuple reversed, in `direction`.

        to_pod (REPLY): an error for a client about its packet to a VIP quotes client -> backend;
        the quote becomes client -> VIP, and the outer source the VIP when the backend itself sent
        it. from_pod (FORWARD): an error a client sends about a reply from the VIP quotes
        VIP -> client; the quote becomes backend -> client, and the outer destination the backend.
        The quoted IP checksum, the quoted L4 checksum when it was quoted, the ICMP checksum and
        the outer IP checksum stay as right as they were. Anything else passes untouched."""
        if p.icmp_type not in ICMP_ERRORS or p.first_fragment or p.later_fragment:
            return OK, frame
        end = L3 + p.tot_len                    # the quote is inside the ICMP message
        icmp_off = L3 + p.ihl
        q = icmp_off + 8                        # the quoted IP header
        if q + 20 > end:
            return OK, frame
        qihl = (frame[q] & 0xF) * 4
        qproto = frame[q + 9]
        if frame[q] >> 4 != 4 or qihl < 20 or qproto not in (TCP, UDP, SCTP) or q + qihl + 4 > end:
            return OK, frame
        ql4 = q + qihl
        qsrc, qdst = frame[q + 12:q + 16], frame[q + 16:q + 20]
        qsport, qdport = struct.unpack("!HH", frame[ql4:ql4 + 4])
        flow = self._live((qdst, qsrc, qdport, qsport, qproto, direction))
        if flow is None or flow.flags & F_HAIRPIN:   # a pod's error about itself: not translated
            return OK, frame
        buf = bytearray(frame)
        if direction == REPLY:
            a_off, p_off, frm, to, outer_off = 16, 2, (qdst, qdport), (flow.frontend_addr, flow.frontend_port), 12
        else:
            a_off, p_off, frm, to, outer_off = 12, 0, (qsrc, qsport), (flow.backend_addr, flow.backend_port), 16
        old_icmp = bytes(buf[icmp_off:end])
        # The quoted L4 checksum, if the quote reaches it (RFC 792 asks for 8 bytes only).
        l4c = {TCP: 16, UDP: 6}.get(qproto)
        if l4c is not None and ql4 + l4c + 2 <= end:
            hc = int.from_bytes(buf[ql4 + l4c:ql4 + l4c + 2], "big")
            if not (qproto == UDP and hc == 0):
                hc = csum_update(hc, frm[0] + frm[1].to_bytes(2, "big"), to[0] + to[1].to_bytes(2, "big"))
                buf[ql4 + l4c:ql4 + l4c + 2] = hc.to_bytes(2, "big")
        buf[ql4 + p_off:ql4 + p_off + 2] = to[1].to_bytes(2, "big")
        qc = int.from_bytes(buf[q + 10:q + 12], "big")
        buf[q + 10:q + 12] = csum_update(qc, frm[0], to[0]).to_bytes(2, "big")
        buf[q + a_off:q + a_off + 4] = to[0]
        ic = int.from_bytes(buf[icmp_off + 2:icmp_off + 4], "big")
        new_icmp = bytes(buf[icmp_off:end])
        if len(old_icmp) % 2:
            old_icmp, new_icmp = old_icmp + b"\0", new_icmp + b"\0"
        buf[icmp_off + 2:icmp_off + 4] = csum_update(ic, old_icmp, new_icmp).to_bytes(2, "big")
        outer = bytes(buf[L3 + outer_off:L3 + outer_off + 4])
        if outer == frm[0]:
            buf[L3 + outer_off:L3 + outer_off + 4] = to[0]
            oc = int.from_bytes(buf[L3 + 10:L3 + 12], "big")
            buf[L3 + 10:L3 + 12] = csum_update(oc, outer, to[0]).to_bytes(2, "big")
        return OK, bytes(buf)


def _dotted(a: bytes) -> str:
    return ".".join(str(b) for b in a)
