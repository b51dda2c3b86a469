"""Frontends without backends: reject new flows at once, as kube-proxy's REJECT
does. TCP gets a RST from VIP:port, everything else an ICMP port unreachable
from the VIP; the reply is built in place and redirected back out the same
interface (TC_ACT_REDIRECT). Counted as no_backend."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, IPOption_NOP, TCP
from scapy.packet import Raw

from ebpfsvc.datapath import stats
from ebpfsvc.lbmodel import Protocol

from .packets import (
    CLIENT, OK, REDIRECT, SHOT, VIP, Case, check, from_pod, frontend, state, tcp, to_pod, udp,
)

pytestmark = pytest.mark.root

EMPTY_TCP = frontend(VIP, 80, [])
EMPTY_UDP = frontend(VIP, 53, [], proto=Protocol.UDP, name="dns")
EMPTY_SCTP = frontend(VIP, 3868, [], proto=Protocol.SCTP, name="diameter")


def rst(sport, dport, seq=0, ack=0, flags="R"):
    """The RST the VIP answers with: a reply into the pod (MACs swapped)."""
    return to_pod(IP(src=VIP, dst=CLIENT, id=0, ttl=64) /
                  TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, window=0))


def port_unreachable(original):
    """ICMP port unreachable from the VIP quoting the client's IP header + 8 bytes."""
    ihl = original[IP].ihl * 4 if original[IP].ihl else len(original[IP]) - len(original[IP].payload)
    quote = bytes(original[IP])[: ihl + 8]
    return to_pod(IP(src=VIP, dst=CLIENT, id=0, ttl=64, tos=0xC0) / ICMP(type=3, code=3) / Raw(quote))


def _syn_with_options():
    return from_pod(tcp(CLIENT, VIP, 40002, 80, "S", seq=4242, options=[IPOption_NOP()] * 4))


ROWS = [
    Case("SYN: RST+ACK acknowledging the SYN", "from_pod",
         from_pod(tcp(CLIENT, VIP, 40000, 80, "S", seq=1000)), REDIRECT,
         rst(80, 40000, seq=0, ack=1001, flags="RA")),
    Case("ACK with payload: RST with the segment's ack number as sequence", "from_pod",
         from_pod(tcp(CLIENT, VIP, 40001, 80, "PA", seq=1001, ack=9001, payload=b"x" * 100)), REDIRECT,
         rst(80, 40001, seq=9001)),
    Case("SYN with IP options: plain 20-byte reply header", "from_pod", _syn_with_options(), REDIRECT,
         rst(80, 40002, ack=4243, flags="RA")),
    Case("FIN without ACK: FIN counts one", "from_pod",
         from_pod(tcp(CLIENT, VIP, 40003, 80, "F", seq=500, payload=b"abc")), REDIRECT,
         rst(80, 40003, ack=504, flags="RA")),
    Case("UDP: ICMP port unreachable", "from_pod",
         from_pod(udp(CLIENT, VIP, 5000, 53, b"q" * 64)), REDIRECT,
         port_unreachable(udp(CLIENT, VIP, 5000, 53, b"q" * 64))),
    Case("UDP shorter than the reply: packet grows", "from_pod",
         from_pod(udp(CLIENT, VIP, 5001, 53, b"")), REDIRECT,
         port_unreachable(udp(CLIENT, VIP, 5001, 53, b""))),
    Case("UDP with IP options: the quote carries them", "from_pod",
         from_pod(udp(CLIENT, VIP, 5002, 53, b"q", options=[IPOption_NOP()] * 8)), REDIRECT,
         port_unreachable(udp(CLIENT, VIP, 5002, 53, b"q", options=[IPOption_NOP()] * 8))),
]


@pytest.mark.parametrize("case", ROWS, ids=[c.desc for c in ROWS])
def test_reject_without_backends(datapath, writer, case):
    writer.apply(state(EMPTY_TCP, EMPTY_UDP))
    check(datapath, case)
    assert stats.drops(datapath.maps)["no_backend"] == 1
    # Nothing was tracked: the next packet is rejected again.
    check(datapath, case)
    assert stats.drops(datapath.maps)["no_backend"] == 2
    assert len(list(datapath.maps["ct4"].items())) == 0


def test_sctp_without_backends_gets_port_unreachable(datapath, writer):
    from scapy.layers.sctp import SCTP
    writer.apply(state(EMPTY_SCTP))
    pkt = IP(src=CLIENT, dst=VIP, id=7) / SCTP(sport=3000, dport=3868)
    check(datapath, Case("SCTP INIT to an empty frontend", "from_pod", from_pod(pkt), REDIRECT,
                         port_unreachable(pkt)))


def test_rst_is_never_answered(datapath, writer):
    writer.apply(state(EMPTY_TCP))
    check(datapath, Case("RST to an empty frontend: dropped, not answered", "from_pod",
                         from_pod(tcp(CLIENT, VIP, 40000, 80, "R", seq=1)), SHOT))
    assert stats.drops(datapath.maps)["no_backend"] == 1


def test_local_policy_drops_instead_of_rejecting(datapath, writer):
    writer.apply(state(frontend(VIP, 80, [], local_only=True)))
    check(datapath, Case("traffic policy Local, no local backend: silent drop", "from_pod",
                         from_pod(tcp(CLIENT, VIP, 40000, 80, "S")), SHOT))
    counts = stats.drops(datapath.maps)
    assert counts["no_local_backend"] == 1 and counts["no_backend"] == 0


def test_reply_direction_is_not_rejected(datapath, writer):
    writer.apply(state(EMPTY_TCP))
    pkt = to_pod(tcp(VIP, CLIENT, 80, 40000, "SA"))
    check(datapath, Case("packet from the VIP into a pod is not the VIP's to reject", "to_pod", pkt, OK))
