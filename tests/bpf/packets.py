"""Packet fixtures for the datapath tests: addresses, packet builders, and the
table-row type the fixture runner understands.

Every address is from 198.18.0.0/15 (RFC 2544): clients 198.18.1.x, backends
198.18.2.x, ClusterIPs 198.19.0.x, the node's hairpin address 198.18.0.1.
Expected packets are built by scapy with their own checksums, so a wrong
incremental checksum update shows up as a byte difference.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from ebpfsvc.datapath.testrun import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, prog_test_run
from ebpfsvc.lbmodel import (
    Backend, Frontend, FrontendKey, LBState, Protocol, ServicePortName,
)

POD_MAC = "02:00:00:00:01:05"     # the client pod's eth0
HOST_MAC = "02:00:00:00:00:fe"    # the host side of its veth
CLIENT = "198.18.1.5"
CLIENT2 = "198.18.1.6"
VIP = "198.19.0.10"
VIP2 = "198.19.0.11"
BACKEND1 = "198.18.2.1"
BACKEND2 = "198.18.2.2"
BACKEND3 = "198.18.2.3"
HAIRPIN = "198.18.0.1"
OTHER = "198.18.3.9"              # some non-Service destination

__all__ = [
    "OK", "SHOT", "REDIRECT", "Case", "run", "check", "from_pod", "to_pod",
    "tcp", "udp", "frontend", "state", "be", "A",
]

OK, SHOT, REDIRECT = TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT
A = ipaddress.IPv4Address


def from_pod(l3: Packet) -> Packet:
    """A packet as the pod sends it: pod MAC -> host veth MAC."""
    return Ether(src=POD_MAC, dst=HOST_MAC) / l3


def to_pod(l3: Packet) -> Packet:
    """A packet going into the pod: host veth MAC -> pod MAC."""
    return Ether(src=HOST_MAC, dst=POD_MAC) / l3


def tcp(src, dst, sport, dport, flags="S", seq=1000, ack=0, payload=b"", ip_id=1, options=None, **ipkw):
    ip = IP(src=src, dst=dst, id=ip_id, **({"options": options} if options else {}), **ipkw)
    pkt = ip / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack)
    return pkt / Raw(payload) if payload else pkt


def udp(src, dst, sport, dport, payload=b"hello", ip_id=1, options=None, **ipkw):
    ip = IP(src=src, dst=dst, id=ip_id, **({"options": options} if options else {}), **ipkw)
    return ip / UDP(sport=sport, dport=dport) / Raw(payload)


def be(addr, port=8080, proto=Protocol.TCP, **kw) -> Backend:
    """A backend at an IPv4 or IPv6 address."""
    return Backend(ipaddress.ip_address(addr), port, proto, **kw)


def frontend(vip=VIP, port=80, backends=(), proto=Protocol.TCP, name="web", **kw) -> Frontend:
    """A ClusterIP frontend at an IPv4 or IPv6 address."""
    return Frontend(
        key=FrontendKey(ipaddress.ip_address(vip), port, proto),
        service=ServicePortName("default", name, "", proto),
        backends=tuple(backends),
        **kw,
    )


def state(*frontends: Frontend) -> LBState:
    return LBState.of(frontends)


@dataclass
class Case:
    """One fixture row: a packet in, the packet and verdict expected out."""

    desc: str
    prog: str                    # "from_pod" / "to_pod"
    packet: Packet
    verdict: int
    expect: Packet | None = None  # None: the packet must come out unchanged


def run(dp, prog: str, packet: Packet | bytes):
    return prog_test_run(dp.programs[prog].fd, bytes(packet))


def check(dp, case: Case):
    """Run a fixture row and compare verdict and exact output bytes."""
    res = run(dp, case.prog, case.packet)
    want = bytes(case.expect if case.expect is not None else case.packet)
    assert res.verdict == {OK: "TC_ACT_OK", SHOT: "TC_ACT_SHOT", REDIRECT: "TC_ACT_REDIRECT"}[case.verdict], \
        f"{case.desc}: verdict {res.verdict}"
    if case.verdict != SHOT:
        assert res.data == want, f"{case.desc}:\n got  {Ether(res.data)!r}\n want {Ether(want)!r}"
    return res


def expected_backend(fe: Frontend, client: str, sport: int) -> str:
    """The backend address a new flow gets by Maglev, predicted in Python.

    Mirrors the writer (table over lbmodel.table_backends, sorted by name)
    and the datapath (slot = flow hash % table size), so a fixture can name its
    expected output packet exactly.
    """
    from ebpfsvc import maglev
    from ebpfsvc.datapath.flowhash import flow_hash

    from ebpfsvc.lbmodel import table_backends

    usable = sorted(set(table_backends(fe.backends)), key=lambda b: b.name)
    size = maglev.table_size(len(usable))
    table = maglev.build_table([b.name for b in usable], size)
    slot = flow_hash(client, str(fe.key.address), sport, fe.key.port, fe.key.protocol.number) % size
    return str(usable[table[slot]].address)


def backend_port(fe: Frontend, addr: str) -> int:
    return next(b.port for b in fe.backends if str(b.address) == addr)


# ---- IPv6 (2001:2::/48, RFC 5180): clients 2001:2:0:1::x, backends 2001:2:0:2::x, ClusterIPs 2001:2:0:ff::x.
CLIENT6 = "2001:2:0:1::5"
CLIENT6_2 = "2001:2:0:1::6"
VIP6 = "2001:2:0:ff::10"
BACKEND6_1 = "2001:2:0:2::1"
BACKEND6_2 = "2001:2:0:2::2"
BACKEND6_3 = "2001:2:0:2::3"
OTHER6 = "2001:2:0:3::9"
A6 = ipaddress.IPv6Address


def tcp6(src, dst, sport, dport, flags="S", seq=1000, ack=0, payload=b"", ext=()):
    """An IPv6 TCP segment; `ext`: extension headers (scapy layers) between IPv6 and TCP."""
    from scapy.layers.inet6 import IPv6

    pkt = IPv6(src=src, dst=dst)
    for h in ext:
        pkt = pkt / h
    pkt = pkt / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack)
    return pkt / Raw(payload) if payload else pkt


def udp6(src, dst, sport, dport, payload=b"hello", ext=()):
    from scapy.layers.inet6 import IPv6

    pkt = IPv6(src=src, dst=dst)
    for h in ext:
        pkt = pkt / h
    return pkt / UDP(sport=sport, dport=dport) / Raw(payload)


be6 = be


def frontend6(vip=VIP6, port=80, backends=(), proto=Protocol.TCP, name="web6", **kw) -> Frontend:
    return frontend(vip, port, backends, proto, name, **kw)


def tcp_exchange_rows(client: str, vip: str, backend: str, segment=tcp, at="{}:80") -> list[Case]:
    """A TCP flow through a ClusterIP's port 80, both ways: the SYN DNATed to `backend`:8080, its
    SYN-ACK reverse-NATed, then a request and a reply with payload following the tracked flow.
    `segment` builds the packets (tcp, tcp6); `at` writes an address with port 80 (IPv6: "[{}]:80")."""
    req, resp = b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n"
    return [
        Case(f"SYN to {at.format('ClusterIP')} is DNATed to the Maglev backend's :8080", "from_pod",
             from_pod(segment(client, vip, 40000, 80, "S")), OK,
             from_pod(segment(client, backend, 40000, 8080, "S"))),
        Case(f"SYN-ACK from the backend gets {at.format('VIP')} back as its source", "to_pod",
             to_pod(segment(backend, client, 8080, 40000, "SA", seq=7000, ack=1001)), OK,
             to_pod(segment(vip, client, 80, 40000, "SA", seq=7000, ack=1001))),
        Case("a later segment with payload follows the tracked flow", "from_pod",
             from_pod(segment(client, vip, 40000, 80, "PA", seq=1001, ack=7001, payload=req)), OK,
             from_pod(segment(client, backend, 40000, 8080, "PA", seq=1001, ack=7001, payload=req))),
        Case("the reply with payload is reverse-NATed", "to_pod",
             to_pod(segment(backend, client, 8080, 40000, "PA", seq=7001, ack=1019, payload=resp)), OK,
             to_pod(segment(vip, client, 80, 40000, "PA", seq=7001, ack=1019, payload=resp))),
    ]


def udp_exchange_rows(client: str, vip: str, backend: str, datagram=udp, at="{}:53") -> list[Case]:
    """A UDP query to a ClusterIP's port 53 DNATed to `backend`:5353 and its answer reverse-NATed
    (from client port 5000). `datagram` builds the packets (udp, udp6)."""
    return [
        Case(f"UDP datagram to {at.format('ClusterIP')}", "from_pod",
             from_pod(datagram(client, vip, 5000, 53, b"query")), OK,
             from_pod(datagram(client, backend, 5000, 5353, b"query"))),
        Case("UDP answer reverse-NATed", "to_pod",
             to_pod(datagram(backend, client, 5353, 5000, b"answer")), OK,
             to_pod(datagram(vip, client, 53, 5000, b"answer"))),
    ]
