"""Truncated and inconsistent headers: never a crash, never a write past what
the header says; IPv4 that cannot be parsed is dropped and counted as
malformed (the kernel would drop it too, and offsets from a lying header must
not be used to rewrite anything). Non-IPv4 is not ours and passes."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import ICMP, IP, IPOption_NOP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ebpfsvc.datapath import stats
from ebpfsvc.lbmodel import Protocol

from .packets import (
    BACKEND1, CLIENT, HOST_MAC, OK, POD_MAC, SHOT, VIP, Case, be, check, from_pod,
    frontend, run, state, tcp, udp,
)

pytestmark = pytest.mark.root

WEB = frontend(VIP, 80, [be(BACKEND1)])


def _bad(desc, raw_ip: bytes):
    return Case(desc, "from_pod", Ether(src=POD_MAC, dst=HOST_MAC, type=0x0800) / Raw(raw_ip), SHOT)


def _ip(**kw):
    return bytes(IP(src=CLIENT, dst=VIP, **kw))


_SYN = bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="S"))


def _patch(raw: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(raw)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


# BPF_PROG_TEST_RUN itself refuses an IPv4 frame shorter than Ethernet + 20
# bytes (EINVAL, before any program runs), so cuts inside the fixed IP header
# are not reachable here; the parser still checks them (lb4_parse).
MALFORMED = [
    _bad("version 6 in an IPv4 frame", _patch(_SYN, 0, "B", 0x65)),
    _bad("IHL 4 (shorter than the fixed header)", _patch(_SYN, 0, "B", 0x44)),
    _bad("IHL 15 but no options present", _patch(_SYN[:40], 0, "B", 0x4F)),
    _bad("total length beyond the frame", _patch(_SYN, 2, "!H", 1500)),
    _bad("total length shorter than the IP header", _patch(_SYN, 2, "!H", 16)),
    _bad("TCP header cut at 10 bytes", _patch(_SYN[:30], 2, "!H", 30)),
    _bad("TCP data offset 4", _patch(_SYN, 32, "B", 0x40)),
    _bad("TCP data offset 15 beyond the datagram", _patch(_SYN, 32, "B", 0xF0)),
    _bad("UDP header cut at 4 bytes",
         _patch(bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=1, dport=53))[:24], 2, "!H", 24)),
    _bad("SCTP common header cut at 8 bytes",
         _patch(bytes(IP(src=CLIENT, dst=VIP, proto=132) / Raw(b"\0" * 12))[:28], 2, "!H", 28)),
    _bad("ICMP header cut at 4 bytes",
         _patch(bytes(IP(src=CLIENT, dst=VIP) / ICMP())[:24], 2, "!H", 24)),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c.desc for c in MALFORMED])
@pytest.mark.parametrize("prog", ["from_pod", "to_pod"])
def test_malformed_is_dropped_and_counted(datapath, writer, case, prog):
    writer.apply(state(WEB))
    case.prog = prog
    check(datapath, case)
    assert stats.drops(datapath.maps)["malformed"] == 1


def test_every_truncation_point(datapath, writer):
    """Cut a SYN with IP options after every byte from the end of the fixed IP
    header on (the kernel's test runner refuses shorter IPv4 frames): each cut
    is dropped as malformed (options, TCP header or the IP total length no
    longer fit), and the whole packet is translated."""
    writer.apply(state(WEB))
    pkt = bytes(from_pod(tcp(CLIENT, VIP, 40000, 80, "S", options=[IPOption_NOP()] * 4, payload=b"abcd")))
    first = 14 + 20
    for n in range(first, len(pkt)):
        res = run(datapath, "from_pod", pkt[:n])
        assert res.verdict == "TC_ACT_SHOT", f"cut at {n} bytes"
    assert stats.drops(datapath.maps)["malformed"] == len(pkt) - first
    res = run(datapath, "from_pod", pkt)
    assert res.verdict == "TC_ACT_OK" and Ether(res.data)[IP].dst == BACKEND1
    assert stats.drops(datapath.maps)["malformed"] == len(pkt) - first


def test_ethernet_only_non_ip_passes(datapath, writer):
    writer.apply(state(WEB))
    check(datapath, Case("bare Ethernet header, ARP ethertype", "from_pod",
                         Ether(src=POD_MAC, dst=HOST_MAC, type=0x0806), OK))
    assert stats.drops(datapath.maps)["malformed"] == 0


def test_ethernet_padding_is_kept(datapath, writer):
    """A short frame padded to 60 bytes: the IP total length is what counts."""
    writer.apply(state(frontend(VIP, 53, [be(BACKEND1, 5353, proto=Protocol.UDP)],
                                proto=Protocol.UDP, name="dns")))
    pkt = from_pod(udp(CLIENT, VIP, 5000, 53, b"q")) / Raw(b"\0" * 17)
    pkt[IP].len = 29
    want = from_pod(udp(CLIENT, BACKEND1, 5000, 5353, b"q")) / Raw(b"\0" * 17)
    want[IP].len = 29
    check(datapath, Case("padded UDP frame", "from_pod", pkt, OK, want))
