"""ICMP read only inside the IP datagram: bytes past the IP total length are Ethernet padding, which
the receiver trims, so the datapath neither takes them for an ICMP header nor reads or rewrites a
quoted packet there. Both were found by the differential run (tests/diff): the parser checked the
ICMP header against the frame only, and an error whose quote was cut by the total length was
translated from (and written into) the padding."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ebpfsvc.datapath import stats
from ebpfsvc.lbmodel import Protocol

from .packets import (
    BACKEND1, CLIENT, OK, SHOT, VIP, Case, be, check, from_pod, frontend, state, tcp, to_pod, udp,
)

pytestmark = pytest.mark.root

WEB = frontend(VIP, 80, [be(BACKEND1)])
DNS = frontend(VIP, 53, [be(BACKEND1, 5353, Protocol.UDP)], proto=Protocol.UDP, name="dns")


def _padded(frame: bytes, total_length: int) -> bytes:
    """`frame` with its IP total length lowered to `total_length` (IP checksum kept right): what
    follows reads as padding."""
    pkt = Ether(frame)
    pkt[IP].len = total_length
    pkt[IP].chksum = None
    return bytes(Ether(bytes(pkt)))


def test_icmp_header_cut_by_the_total_length_is_malformed(datapath, writer):
    writer.apply(state(WEB))
    frame = _padded(bytes(to_pod(IP(src=BACKEND1, dst=CLIENT, id=9) / ICMP(type=3, code=3) / Raw(b"\0" * 28))), 27)
    check(datapath, Case("7 bytes of ICMP inside the datagram, the rest padding", "to_pod",
                         Ether(frame), SHOT))
    assert stats.drops(datapath.maps)["malformed"] == 1


def test_quote_cut_by_the_total_length_is_not_translated(datapath, writer):
    writer.apply(state(WEB, DNS))
    check(datapath, Case("SYN", "from_pod", from_pod(tcp(CLIENT, VIP, 40000, 80, "S")), OK,
                         from_pod(tcp(CLIENT, BACKEND1, 40000, 8080, "S"))))
    check(datapath, Case("query", "from_pod", from_pod(udp(CLIENT, VIP, 5000, 53, b"q")), OK,
                         from_pod(udp(CLIENT, BACKEND1, 5000, 5353, b"q"))))
    inner = IP(src=CLIENT, dst=BACKEND1, id=1) / TCP(sport=40000, dport=8080, flags="PA", seq=1001, ack=1)
    whole = bytes(to_pod(IP(src=BACKEND1, dst=CLIENT, id=9) / ICMP(type=3, code=3) / inner))
    # The quoted IP header ends 14 bytes into the padding: untouched, not translated.
    frame = _padded(whole, 20 + 8 + 6)
    check(datapath, Case("to_pod: quoted IP header in the padding", "to_pod", Ether(frame), OK))
    # Quoted IP header inside, its ports in the padding.
    frame = _padded(whole, 20 + 8 + 20 + 2)
    check(datapath, Case("to_pod: quoted ports in the padding", "to_pod", Ether(frame), OK))
    # From the client about the VIP's reply: the same.
    reply = IP(src=VIP, dst=CLIENT, id=1) / UDP(sport=53, dport=5000) / Raw(b"a")
    whole = bytes(from_pod(IP(src=CLIENT, dst=VIP, id=9) / ICMP(type=3, code=3) / reply))
    frame = _padded(whole, 20 + 8 + 20)
    check(datapath, Case("from_pod: quoted ports in the padding", "from_pod", Ether(frame), OK))


def test_quoted_checksum_in_the_padding_is_left_alone(datapath, writer):
    """The quote's ports are inside the datagram, its UDP checksum in the padding: the ports and
    addresses are translated, the bytes past the total length are not written."""
    writer.apply(state(DNS))
    check(datapath, Case("query", "from_pod", from_pod(udp(CLIENT, VIP, 5000, 53, b"q")), OK,
                         from_pod(udp(CLIENT, BACKEND1, 5000, 5353, b"q"))))
    inner_in = bytes(IP(src=CLIENT, dst=BACKEND1, id=1) / UDP(sport=5000, dport=5353) / Raw(b"q"))
    inner_out = bytes(IP(src=CLIENT, dst=VIP, id=1) / UDP(sport=5000, dport=53) / Raw(b"q"))
    cut = 20 + 4                                # quoted IP header and ports; length and checksum beyond
    padding = inner_in[cut:]                    # what follows the datagram, as it was
    sent = bytes(to_pod(IP(src=BACKEND1, dst=CLIENT, id=9) / ICMP(type=3, code=3) / Raw(inner_in[:cut])))
    want = bytes(to_pod(IP(src=VIP, dst=CLIENT, id=9) / ICMP(type=3, code=3) / Raw(inner_out[:cut])))
    check(datapath, Case("quoted UDP checksum past the total length", "to_pod",
                         Ether(sent + padding), OK, Ether(want + padding)))
