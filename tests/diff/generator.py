"""Seeded packet generator for the differential run: flows that start, carry data, get replies and
close (and reuse their ports), datagrams, packets for no Service, mid-stream segments of
connections never balanced here, rejects, fragments (first, later, orphaned), IP options, ICMP,
non-IPv4 frames and hostile headers (a valid packet with a lying IHL, total length or TCP data
offset, cut short, or with random bytes flipped). The same seed gives the same packets as long
as both sides answer the same (replies are addressed to the backend the model's conntrack holds).
"""

from __future__ import annotations

import struct

import numpy as np

from . import model as M

POD_MAC = bytes.fromhex("020000000105")
HOST_MAC = bytes.fromhex("0200000000fe")
CLIENTS = [bytes([198, 18, 1, i]) for i in range(1, 17)]
OTHER = [bytes([198, 18, 3, i]) for i in range(1, 5)] + [bytes([198, 19, 0, 99])]
BACKENDS = [bytes([198, 18, 2, i]) for i in range(1, 7)]
HAIRPIN = bytes([198, 18, 0, 1])          # the node's hairpin address (tests/diff/runner.py HAIRPIN)

# kind -> weight; each a method _k_<kind> returning (prog, frame)
KINDS = {
    "syn": 14, "datagram": 10, "hairpin": 3, "sctp": 4, "data": 20, "reply": 20, "stray_reply": 3, "midstream": 3,
    "other": 3, "fragments": 6, "orphan_fragment": 2, "icmp_echo": 2, "icmp_error": 8, "not_ipv4": 1, "ipv6": 2, "hostile": 16,
}


def ip_packet(src: bytes, dst: bytes, proto: int, l4: bytes, *, ip_id=1, frag=0, ttl=64, tos=0,
              options=b"", tot_len=None) -> bytes:
    ihl = 5 + len(options) // 4
    total = 4 * ihl + len(l4) if tot_len is None else tot_len
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, total, ip_id, frag, ttl, proto, 0, src, dst) + options
    return h[:10] + M.csum(h).to_bytes(2, "big") + h[12:] + l4


def _l4_csum(src, dst, proto, l4: bytes, at: int) -> bytes:
    pseudo = src + dst + struct.pack("!BBH", 0, proto, len(l4))
    c = M.csum(pseudo + l4)
    if proto == M.UDP and c == 0:
        c = 0xFFFF
    return l4[:at] + c.to_bytes(2, "big") + l4[at + 2:]


def tcp_seg(src, dst, sport, dport, flags, seq=1000, ack=0, payload=b"", tcp_options=b"") -> bytes:
    doff = 5 + len(tcp_options) // 4
    th = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, 65535, 0, 0) + tcp_options
    return _l4_csum(src, dst, M.TCP, th + payload, 16)


def udp_dgram(src, dst, sport, dport, payload=b"hello", no_csum=False) -> bytes:
    uh = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return uh if no_csum else _l4_csum(src, dst, M.UDP, uh, 6)


class Generator:
    def __init__(self, seed: int, maps: M.Maps):
        self.rng = np.random.default_rng(seed)
        self.maps = maps
        self.kinds = list(KINDS)
        w = np.array([KINDS[k] for k in self.kinds], dtype=float)
        self.weights = w / w.sum()
        self.flows: list[tuple] = []       # (client, sport, vip, vport, proto) the run started
        self.pending: list[tuple] = []     # later fragments still to send: (prog, frame)
        # Frontends pods can reach, by protocol (the address markers are not balanced).
        self.frontends = {M.TCP: [], M.UDP: [], M.SCTP: []}
        for (addr, port, proto, scope), svc in maps.frontends.items():
            if scope == M.SCOPE_INTERNAL and not svc.flags & M.SVC_ADDRESS and proto in self.frontends:
                self.frontends[proto].append((addr, port))
        for v in self.frontends.values():
            v.sort()

    def forget_flows(self):
        self.flows.clear()
        self.pending.clear()

    # -- small random helpers
    def _choice(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def _payload(self, hi=64) -> bytes:
        return self.rng.integers(0, 256, int(self.rng.integers(0, hi)), dtype=np.uint8).tobytes()

    def _options(self) -> bytes:
        if self.rng.random() >= 0.1:
            return b""
        n = int(self.rng.integers(1, 11))               # 4..40 bytes: IHL 6..15
        return b"\x01" * (4 * n - 1) + b"\x00"          # NOPs, then end of options

    def _ip_id(self) -> int:
        return int(self.rng.integers(0, 65536))

    def _sport(self) -> int:
        return int(self.rng.integers(1024, 65536))

    def _from_pod(self, l3: bytes):
        return "from_pod", struct.pack("!6s6sH", HOST_MAC, POD_MAC, 0x0800) + l3

    def _to_pod(self, l3: bytes):
        return "to_pod", struct.pack("!6s6sH", POD_MAC, HOST_MAC, 0x0800) + l3

    def _target(self, proto):
        """A frontend of `proto`, now and then a port or protocol no Service has."""
        addr, port = self._choice(self.frontends[proto])
        if self.rng.random() < 0.08:
            port = int(self.rng.integers(1, 65536))
        return addr, port

    def _tcp_flags(self):
        return self._choice([0x10, 0x18, 0x18, 0x10, 0x11, 0x14, 0x04, 0x02, 0x12, 0x19])

    # -- kinds
    def next(self) -> tuple[str, str, bytes]:
        if self.pending and self.rng.random() < 0.7:
            prog, frame = self.pending.pop(int(self.rng.integers(len(self.pending))))
            return "fragments", prog, frame
        kind = self.kinds[int(self.rng.choice(len(self.kinds), p=self.weights))]
        prog, frame = getattr(self, "_k_" + kind)()
        return kind, prog, frame

    def _k_syn(self):
        c, sp = self._choice(CLIENTS), self._sport()
        vip, vport = self._target(M.TCP)
        self.flows.append((c, sp, vip, vport, M.TCP))
        seq = int(self.rng.integers(0, 1 << 32))
        return self._from_pod(ip_packet(c, vip, M.TCP, tcp_seg(c, vip, sp, vport, 0x02, seq=seq),
                                        ip_id=self._ip_id(), options=self._options()))

    def _k_sctp(self):
        """SCTP: a packet of an association (new or known) or the backend's answer; the CRC32c
        right, or now and then wrong (it must stay as wrong)."""
        f = self._flow()
        if f is not None and f[4] == M.SCTP and self.rng.random() < 0.6:
            c, sp, vip, vport, _ = f
            if self.rng.random() < 0.5:
                b, bp = self._backend_of(f)
                c, wrap = self._reply_to(f)
                return wrap(ip_packet(b, c, M.SCTP, self._sctp(bp, sp), ip_id=self._ip_id()))
        else:
            c, sp = self._choice(CLIENTS), self._sport()
            vip, vport = self._target(M.SCTP)
            self.flows.append((c, sp, vip, vport, M.SCTP))
        return self._from_pod(ip_packet(c, vip, M.SCTP, self._sctp(sp, vport), ip_id=self._ip_id(),
                                        options=self._options()))

    def _sctp(self, sport, dport) -> bytes:
        from scapy.layers.sctp import crc32c
        chunk = self._payload(120)
        body = struct.pack("!HHI", sport, dport, int(self.rng.integers(0, 1 << 32))) + b"\0\0\0\0" + chunk
        crc = crc32c(body)
        if self.rng.random() < 0.1:
            crc ^= int(self.rng.integers(1, 1 << 32))
        return body[:8] + struct.pack(">I", crc) + body[12:]

    def _k_hairpin(self):
        """A backend pod reaching a Service it is a backend of: balanced to itself or not."""
        c = self._choice(BACKENDS[:4])
        proto = self._choice([M.TCP, M.UDP])
        vip, vport = self._target(proto)
        sp = self._sport()
        self.flows.append((c, sp, vip, vport, proto))
        l4 = (tcp_seg(c, vip, sp, vport, 0x02, seq=int(self.rng.integers(0, 1 << 32))) if proto == M.TCP
              else udp_dgram(c, vip, sp, vport, self._payload()))
        return self._from_pod(ip_packet(c, vip, proto, l4, ip_id=self._ip_id(), options=self._options()))

    def _k_datagram(self):
        c, sp = self._choice(CLIENTS), self._sport()
        vip, vport = self._target(M.UDP)
        self.flows.append((c, sp, vip, vport, M.UDP))
        return self._from_pod(ip_packet(c, vip, M.UDP, udp_dgram(c, vip, sp, vport, self._payload(),
                                                                 no_csum=self.rng.random() < 0.1),
                                        ip_id=self._ip_id(), options=self._options()))

    def _flow(self):
        if not self.flows:
            return None
        return self._choice(self.flows)

    def _k_data(self):
        f = self._flow()
        if f is None:
            return self._k_syn()
        c, sp, vip, vport, proto = f
        if proto == M.TCP:
            l4 = tcp_seg(c, vip, sp, vport, self._tcp_flags(), seq=int(self.rng.integers(0, 1 << 32)),
                         ack=int(self.rng.integers(0, 1 << 32)), payload=self._payload(200))
        elif proto == M.UDP:
            l4 = udp_dgram(c, vip, sp, vport, self._payload(200))
        else:
            l4 = self._sctp(sp, vport)
        return self._from_pod(ip_packet(c, vip, proto, l4, ip_id=self._ip_id(), options=self._options()))

    def _backend_of(self, f):
        c, sp, vip, vport, proto = f
        flow = self.maps.ct.get((c, vip, sp, vport, proto, M.FWD))
        if flow is None:
            return self._choice(BACKENDS), int(self.rng.integers(1, 65536))
        return flow.backend_addr, flow.backend_port

    def _reply_to(self, f):
        """Where a backend's reply goes, and through which program: to the client, into its pod
        (to_pod); for a pod balanced to itself, to the hairpin address, out of the pod (from_pod)."""
        c, sp, vip, vport, proto = f
        flow = self.maps.ct.get((c, vip, sp, vport, proto, M.FWD))
        if flow is not None and flow.flags & M.F_HAIRPIN:
            return HAIRPIN, self._from_pod
        return c, self._to_pod

    def _k_reply(self):
        f = self._flow()
        if f is None:
            return self._k_stray_reply()
        c, sp, vip, vport, proto = f
        b, bp = self._backend_of(f)
        c, wrap = self._reply_to(f)
        if proto == M.TCP:
            l4 = tcp_seg(b, c, bp, sp, self._choice([0x12, 0x10, 0x18, 0x11, 0x14, 0x04]),
                         seq=int(self.rng.integers(0, 1 << 32)), ack=int(self.rng.integers(0, 1 << 32)),
                         payload=self._payload(200))
        elif proto == M.UDP:
            l4 = udp_dgram(b, c, bp, sp, self._payload(200))
        else:
            l4 = self._sctp(bp, sp)
        return wrap(ip_packet(b, c, proto, l4, ip_id=self._ip_id(), options=self._options()))

    def _k_stray_reply(self):
        b, c = self._choice(BACKENDS), self._choice(CLIENTS)
        proto = self._choice([M.TCP, M.UDP])
        l4 = (tcp_seg(b, c, 8080, self._sport(), 0x12) if proto == M.TCP
              else udp_dgram(b, c, 5353, self._sport()))
        return self._to_pod(ip_packet(b, c, proto, l4, ip_id=self._ip_id()))

    def _k_midstream(self):
        c, sp = self._choice(CLIENTS), self._sport()
        vip, vport = self._target(M.TCP)
        return self._from_pod(ip_packet(c, vip, M.TCP, tcp_seg(c, vip, sp, vport, 0x10, payload=self._payload()),
                                        ip_id=self._ip_id()))

    def _k_other(self):
        c, dst = self._choice(CLIENTS), self._choice(OTHER)
        proto = self._choice([M.TCP, M.UDP])
        l4 = (tcp_seg(c, dst, self._sport(), 80, 0x02) if proto == M.TCP
              else udp_dgram(c, dst, self._sport(), 53))
        return self._from_pod(ip_packet(c, dst, proto, l4, ip_id=self._ip_id()))

    def _k_fragments(self):
        """A UDP datagram in fragments, from a client (a flow's or a new one) or as a reply: the
        first now, the later ones queued (so other packets come in between)."""
        if self.rng.random() < 0.35 and self.flows:
            f = self._flow()
            if f[4] == M.UDP:
                c, sp, vip, vport, _ = f
                b, bp = self._backend_of(f)
                c, wrap = self._reply_to(f)
                return self._fragmented("to_pod" if wrap == self._to_pod else "from_pod", b, c, bp, sp)
        c, sp = self._choice(CLIENTS), self._sport()
        vip, vport = self._target(M.UDP)
        self.flows.append((c, sp, vip, vport, M.UDP))
        return self._fragmented("from_pod", c, vip, sp, vport)

    def _fragmented(self, prog, src, dst, sport, dport):
        ip_id = self._ip_id()
        whole = udp_dgram(src, dst, sport, dport, self._payload(120) + b"x" * 64)
        cut = 8 * int(self.rng.integers(1, len(whole) // 8))
        wrap = self._from_pod if prog == "from_pod" else self._to_pod
        first = wrap(ip_packet(src, dst, M.UDP, whole[:cut], ip_id=ip_id, frag=0x2000))
        pieces = [whole[cut:]]
        if len(pieces[0]) > 16 and self.rng.random() < 0.5:
            mid = 8 * int(self.rng.integers(1, len(pieces[0]) // 8))
            pieces = [pieces[0][:mid], pieces[0][mid:]]
        off = cut
        for i, piece in enumerate(pieces):
            more = 0x2000 if i < len(pieces) - 1 else 0
            self.pending.append(wrap(ip_packet(src, dst, M.UDP, piece, ip_id=ip_id, frag=more | (off // 8))))
            off += len(piece)
        return first

    def _k_orphan_fragment(self):
        c = self._choice(CLIENTS)
        dst = self._choice([a for a, _ in self.frontends[M.UDP]] + OTHER)
        return self._from_pod(ip_packet(c, dst, self._choice([M.UDP, M.TCP]), self._payload(100) + b"y" * 8,
                                        ip_id=self._ip_id(), frag=int(self.rng.integers(1, 200))))

    def _k_icmp_echo(self):
        c = self._choice(CLIENTS)
        vip, _ = self._target(M.TCP)
        icmp = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + self._payload()
        icmp = icmp[:2] + M.csum(icmp).to_bytes(2, "big") + icmp[4:]
        return self._from_pod(ip_packet(c, vip, M.ICMP, icmp, ip_id=self._ip_id()))

    def _k_icmp_error(self):
        """An ICMP error about a packet of a flow (or of no flow): to the client about its packet
        to the backend, from the backend or a router on the way (to_pod); or from the client about
        a reply it got from the VIP (from_pod). The quote is the IP header and 8 bytes, or more."""
        f = self._flow()
        if f is None:
            c, sp, vip, vport, proto = self._choice(CLIENTS), self._sport(), *self._target(M.TCP), M.TCP
        else:
            c, sp, vip, vport, proto = f
        b, bp = self._backend_of((c, sp, vip, vport, proto))
        to_client = self.rng.random() < 0.6
        if to_client:          # the client's packet, after DNAT: client -> backend
            qsrc, qdst, qs, qd = c, b, sp, bp
        else:                  # the reply the client got, after reverse NAT: VIP -> client
            qsrc, qdst, qs, qd = vip, c, vport, sp
        l4 = (tcp_seg(qsrc, qdst, qs, qd, 0x18, payload=self._payload(40)) if proto == M.TCP
              else udp_dgram(qsrc, qdst, qs, qd, self._payload(40), no_csum=self.rng.random() < 0.1))
        quoted = ip_packet(qsrc, qdst, proto, l4, ip_id=self._ip_id(), options=self._options())
        qlen = ((quoted[0] & 0xF) * 4) + self._choice([8, 8, 8, 12, 20, len(l4)])
        icmp_type, code = self._choice([(3, 3), (3, 1), (3, 4), (11, 0), (12, 0)])
        icmp = struct.pack("!BBHI", icmp_type, code, 0, 1400 if (icmp_type, code) == (3, 4) else 0) + quoted[:qlen]
        icmp = icmp[:2] + M.csum(icmp).to_bytes(2, "big") + icmp[4:]
        if to_client:
            sender = b if self.rng.random() < 0.6 else self._choice(OTHER)
            return self._to_pod(ip_packet(sender, c, M.ICMP, icmp, ip_id=self._ip_id(), tos=0xC0))
        return self._from_pod(ip_packet(c, vip, M.ICMP, icmp, ip_id=self._ip_id(), tos=0xC0))

    def _k_not_ipv4(self):
        ethertype = self._choice([0x86DD, 0x0806, 0x88CC, 0x8100])
        prog = self._choice(["from_pod", "to_pod"])
        return prog, struct.pack("!6s6sH", HOST_MAC, POD_MAC, ethertype) + self._payload(80) + b"\0" * 40

    def _k_ipv6(self):
        """An IPv6 packet (the run's states have no IPv6 frontend: passed, or dropped when its
        headers lie): a chain of 0-6 extension headers, some L4 header, sometimes cut short or
        with a payload length that does not fit."""
        body = b""
        kinds = [self._choice([0, 43, 44, 51, 60]) for _ in range(int(self.rng.integers(0, 7)))]
        last = self._choice([M.TCP, M.UDP, M.SCTP, 58, 59])
        for i, kind in enumerate(kinds):
            nh = kinds[i + 1] if i + 1 < len(kinds) else last
            if kind == 44:
                frag = (int(self.rng.integers(0, 4)) << 3) | int(self.rng.integers(0, 2))
                body += struct.pack("!BBHI", nh, 0, frag, int(self.rng.integers(0, 1 << 32)))
            elif kind == 51:
                body += struct.pack("!BB", nh, 1) + bytes(10)         # AH: (1 + 2) * 4 bytes
            else:
                body += struct.pack("!BB", nh, 0) + bytes(6)
        l4 = bytearray(self._payload(40))
        if last == M.TCP and len(l4) >= 13:
            l4[12] = self._choice([4, 5, 5, 5, 8, 15]) << 4
        body += bytes(l4)
        plen = len(body) if self.rng.random() < 0.8 else int(self.rng.integers(0, len(body) + 16))
        first = kinds[0] if kinds else last
        ip6 = struct.pack("!IHBB16s16s", 6 << 28, plen, first, 64, b"\x20\x01\x00\x02" + bytes(11) + b"\x05",
                          b"\x20\x01\x00\x02" + bytes(11) + b"\x10")
        prog = self._choice(["from_pod", "to_pod"])
        src, dst = (POD_MAC, HOST_MAC) if prog == "from_pod" else (HOST_MAC, POD_MAC)
        return prog, struct.pack("!6s6sH", dst, src, 0x86DD) + ip6 + body

    def _k_hostile(self):
        """A packet of another kind with its headers made to lie."""
        base = self._choice(["syn", "datagram", "data", "reply", "midstream", "icmp_error"])
        saved = list(self.flows)
        prog, frame = getattr(self, "_k_" + base)()
        self.flows = saved                     # a broken packet starts no flow the generator follows
        b = bytearray(frame)
        how = int(self.rng.integers(8))
        if how == 0:                           # IHL anything
            b[14] = 0x40 | int(self.rng.integers(0, 16))
        elif how == 1:                         # total length anything
            b[16:18] = int(self.rng.integers(0, 65536)).to_bytes(2, "big")
        elif how == 2:                         # cut short (BPF_PROG_TEST_RUN wants Ethernet + 20)
            b = b[:int(self.rng.integers(34, len(b) + 1))]
        elif how == 3:                         # cut short, total length agrees
            b = b[:int(self.rng.integers(34, len(b) + 1))]
            b[16:18] = (len(b) - 14).to_bytes(2, "big")
        elif how == 4:                         # TCP data offset / UDP length anything
            ihl = (b[14] & 0xF) * 4
            if 14 + ihl + 13 <= len(b):
                b[14 + ihl + 12] = int(self.rng.integers(0, 256))
        elif how == 6:                         # total length a little short: the rest reads as padding
            tot = int.from_bytes(b[16:18], "big")
            b[16:18] = max(0, tot - int(self.rng.integers(1, 40))).to_bytes(2, "big")
        elif how == 5:                         # version anything
            b[14] = (int(self.rng.integers(0, 16)) << 4) | (b[14] & 0xF)
        else:                                  # a few random bytes of the headers flipped
            for _ in range(int(self.rng.integers(1, 4))):
                i = int(self.rng.integers(14, min(len(b), 14 + 60 + 20)))
                b[i] = int(self.rng.integers(0, 256))
        if self.rng.random() < 0.5 and how in (0, 1, 4, 5, 6):     # and sometimes an honest IP checksum
            ihl = (b[14] & 0xF) * 4
            if ihl >= 20 and 14 + ihl <= len(b):
                b[24:26] = b"\0\0"
                b[24:26] = M.csum(bytes(b[14:14 + ihl])).to_bytes(2, "big")
        return prog, bytes(b)
