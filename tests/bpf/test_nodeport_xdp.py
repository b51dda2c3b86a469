"""The XDP uplink program (xdp_uplink) through BPF_PROG_TEST_RUN: the same translations as
TC for the common case, the same bytes out, and everything else passed up untouched to the TC
program (which the rows then run, to show the two together make the complete path).

In the test namespace the XDP "ingress" device is lo, so a frame for the uplink is
XDP_REDIRECT here; on the real uplink (the same device) it is XDP_TX.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, IPOption_NOP, TCP

from ebpfsvc import abi
from ebpfsvc.lbmodel import FrontendKind, LBState

from .northsouth import (
    CLIENT, CLIENT2, CLIENT2_MAC, LB_IP, LOCAL_BE, NODE, OK, REDIRECT, REMOTE_BE, SHOT, XDP_DROP, XDP_PASS,
    XDP_REDIRECT, be, ext_frontend, forwarded_to_client, from_client, from_node2, remote_tcp_flow, snat_port,
    to_client, to_node2,
)
from .packets import expected_backend, tcp, udp
from .test_nodeport import DNS, EMPTY_LOCAL_POLICY, LOCAL, MIXED_LOCAL_POLICY, REMOTE

pytestmark = pytest.mark.root
N = __import__("ipaddress").IPv4Network


def test_snat_flow_both_ways(uplink):
    uplink.writer.apply(LBState.of([REMOTE]))
    port = remote_tcp_flow(uplink, NODE, 30080, xdp=True, payload=b"y" * 300)
    # TC continues the flow XDP created: same port, same backend.
    uplink.check("TC on a packet XDP passed up (e.g. unresolved neighbour)", "from_uplink",
                 from_client(tcp(CLIENT, NODE, 40000, 30080, "A", seq=1301)), REDIRECT,
                 to_node2(tcp(NODE, REMOTE_BE, port, 8080, "A", seq=1301)))


def test_udp_snat(uplink):
    uplink.writer.apply(LBState.of([DNS]))
    port = snat_port(CLIENT, NODE, 5000, 30053, 17)
    uplink.check_xdp("UDP to NodePort", from_client(udp(CLIENT, NODE, 5000, 30053, b"query")), XDP_REDIRECT,
                     to_node2(udp(NODE, REMOTE_BE, port, 5353, b"query")))
    pkt = from_node2(udp(REMOTE_BE, NODE, 5353, port, b"answer"))
    pkt[IP].payload.chksum = 0
    want = forwarded_to_client(udp(NODE, CLIENT, 30053, 5000, b"answer"))
    want[IP].payload.chksum = 0
    uplink.check_xdp("UDP answer without checksum: stays without", pkt, XDP_REDIRECT, want)


def test_local_backend_dnat_then_kernel(uplink):
    uplink.writer.apply(LBState.of([LOCAL, MIXED_LOCAL_POLICY]))
    uplink.check_xdp("local backend: DNAT at XDP, passed to the kernel to deliver",
                     from_client(tcp(CLIENT, NODE, 40000, 30081, "S")), XDP_PASS,
                     from_client(tcp(CLIENT, LOCAL_BE, 40000, 8080, "S")))
    uplink.check("the reply is TC egress's, as in TC mode", "to_uplink",
                 to_client(tcp(LOCAL_BE, CLIENT, 8080, 40000, "SA")), OK,
                 to_client(tcp(NODE, CLIENT, 30081, 40000, "SA")))
    b = expected_backend(MIXED_LOCAL_POLICY, CLIENT, 41000)
    uplink.check_xdp("Local policy: the same Maglev choice as TC",
                     from_client(tcp(CLIENT, NODE, 41000, 30082, "S")), XDP_PASS,
                     from_client(tcp(CLIENT, b, 41000, 8080, "S")))


def test_collision_same_as_tc(uplink):
    uplink.writer.apply(LBState.of([REMOTE]))
    uplink.check_xdp("first client keeps its port", from_client(tcp(CLIENT, NODE, 40000, 30080, "S")),
                     XDP_REDIRECT, to_node2(tcp(NODE, REMOTE_BE, 40000, 8080, "S")))
    uplink.check_xdp("second client, same port: the range port its hash names",
                     from_client(tcp(CLIENT2, NODE, 40000, 30080, "S"), mac=CLIENT2_MAC), XDP_REDIRECT,
                     to_node2(tcp(NODE, REMOTE_BE, snat_port(CLIENT2, NODE, 40000, 30080, probe=0), 8080, "S")))
    first = snat_port(CLIENT, NODE, 1000, 30080)          # below SNAT_KEEP_PORT_MIN: a range port
    sport = next(p for p in range(1024, 65536) if snat_port(CLIENT2, NODE, p, 30080, probe=0) == first)
    uplink.check_xdp("a range port by hash", from_client(tcp(CLIENT, NODE, 1000, 30080, "S")), XDP_REDIRECT,
                     to_node2(tcp(NODE, REMOTE_BE, first, 8080, "S")))
    uplink.check_xdp("a client holding that port itself keeps it: the hash is only the fallback",
                     from_client(tcp(CLIENT2, NODE, sport, 30080, "S"), mac=CLIENT2_MAC), XDP_REDIRECT,
                     to_node2(tcp(NODE, REMOTE_BE, sport, 8080, "S")))


def test_ttl_at_xdp(uplink):
    """XDP_TX forwards with TTL - 1, like TC; a packet without a hop left goes to TC untouched,
    which drops and counts it."""
    uplink.writer.apply(LBState.of([REMOTE]))
    uplink.check_xdp("TTL 1: passed up untouched", from_client(tcp(CLIENT, NODE, 40000, 30080, "S", ttl=1)),
                     XDP_PASS, from_client(tcp(CLIENT, NODE, 40000, 30080, "S", ttl=1)))
    uplink.check_xdp("TTL 9: forwarded with TTL 8", from_client(tcp(CLIENT, NODE, 40002, 30080, "S", ttl=9)),
                     XDP_REDIRECT, to_node2(tcp(NODE, REMOTE_BE, 40002, 8080, "S", ttl=9)))


def test_source_range_refused_at_xdp(uplink):
    fe = ext_frontend(LB_IP, 443, [be(LOCAL_BE, local=True)], kind=FrontendKind.LOAD_BALANCER, name="lb",
                      source_ranges=(N("198.18.0.100/32"),))
    uplink.writer.apply(LBState.of([fe]))
    before = uplink.drops(abi.REASON_SOURCE_RANGE)
    uplink.check_xdp("outside the ranges: dropped before an skb exists",
                     from_client(tcp(CLIENT2, LB_IP, 40000, 443, "S"), mac=CLIENT2_MAC), XDP_DROP)
    assert uplink.drops(abi.REASON_SOURCE_RANGE) == before + 1
    uplink.check_xdp("inside: DNAT", from_client(tcp(CLIENT, LB_IP, 40000, 443, "S")), XDP_PASS,
                     from_client(tcp(CLIENT, LOCAL_BE, 40000, 8080, "S")))


def test_passed_up_untouched_then_tc(uplink):
    uplink.writer.apply(LBState.of([REMOTE, LOCAL, EMPTY_LOCAL_POLICY]))
    before = uplink.drops(abi.REASON_NO_LOCAL_BACKEND)
    pkt = from_client(tcp(CLIENT, NODE, 40000, 30083, "S"))
    uplink.check_xdp("Local policy without local backend: left to TC", pkt, XDP_PASS)
    uplink.check("... which drops and counts it", "from_uplink", pkt, SHOT)
    assert uplink.drops(abi.REASON_NO_LOCAL_BACKEND) == before + 1

    opts = from_client(tcp(CLIENT, NODE, 40001, 30081, "S", options=[IPOption_NOP()] * 4))
    uplink.check_xdp("IP options: left to TC", opts, XDP_PASS)
    uplink.check("... which translates it", "from_uplink", opts, OK,
                 from_client(tcp(CLIENT, LOCAL_BE, 40001, 8080, "S", options=[IPOption_NOP()] * 4)))

    for desc, pkt in [
        ("another port of the node address", from_client(tcp(CLIENT, NODE, 40000, 22, "S"))),
        ("ICMP echo", from_client(IP(src=CLIENT, dst=NODE) / ICMP())),
        ("first fragment", from_client(IP(src=CLIENT, dst=NODE, flags="MF", id=7) / TCP(sport=1, dport=30080))),
        ("pod traffic from node-2", from_node2(tcp(REMOTE_BE, LOCAL_BE, 8080, 40000))),
    ]:
        uplink.check_xdp(f"{desc}: untouched", pkt, XDP_PASS)


def test_partial_checksum_goes_to_tc(uplink):
    """A segment sent with checksum offload on veth carries only the pseudo-header sum:
    XDP cannot complete it (a transmitted frame loses the skb's checksum state), TC can."""
    import struct

    from ebpfsvc.datapath.loader import be32

    uplink.writer.apply(LBState.of([REMOTE]))
    pkt = from_client(tcp(CLIENT, NODE, 40000, 30080, "S"))
    raw = bytearray(bytes(pkt))
    s = 0
    for word in struct.unpack("!4H", struct.pack("=II", be32(CLIENT), be32(NODE))):
        s += word
    s += 6 + 20                                  # proto, TCP length (header only)
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    raw[14 + 20 + 16: 14 + 20 + 18] = struct.pack("!H", s)   # what the sender's offload would leave
    uplink.check_xdp("partial checksum: passed up untouched", bytes(raw), XDP_PASS)


def test_mid_stream_without_conntrack_is_passed_up_and_left_to_the_kernel(uplink):
    """A segment of a NodePort connection kube-proxy translated: XDP passes it up unchanged, and
    so does TC (test_nodeport.py), to the kernel's conntrack."""
    uplink.writer.apply(LBState.of([REMOTE, LOCAL]))
    for pkt in (from_client(tcp(CLIENT, NODE, 40000, 30080, "A", seq=1001, ack=7001)),
                from_client(tcp(CLIENT, NODE, 40001, 30081, "PA", seq=1001, ack=7001, payload=b"more"))):
        uplink.check_xdp("mid-stream, no ebpfsvc conntrack: passed up", pkt, XDP_PASS)
        uplink.check("... and TC leaves it too", "from_uplink", pkt, OK)
    assert list(uplink.dp.maps["ct4"].items()) == []
