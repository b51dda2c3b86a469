"""IPv6 north-south translation on the uplink (bpf/lb_node.c, nodeport6.h) through
BPF_PROG_TEST_RUN, in the same BPF object as IPv4: NodePort TCP and UDP to a remote
backend (SNAT to the node's IPv6 address, the client's port kept when free) and their
replies, a local backend and externalTrafficPolicy Local (DNAT only, the reply's source
restored on to_uplink), loadBalancerSourceRanges refusing and admitting, ICMPv6 errors
about translated flows, a truncated header, and what passes untouched (neighbour
discovery, other destinations), and the same at XDP for plain IPv6 TCP/UDP.

Maps are filled through MapWriter.apply(LBState) only; each row names its input packet,
the exact output packet (scapy computes every checksum; a packet we forward ourselves
has one hop less) and the verdict.
"""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6ND_NS, ICMPv6PacketTooBig, IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import Ether

from ebpfsvc import abi
from ebpfsvc.lbmodel import Backend, Frontend, FrontendKey, FrontendKind, LBState, Protocol, Scope, ServicePortName

from .northsouth import (
    CLIENT2_6, CLIENT2_MAC, CLIENT6, CLIENT_MAC, LB_IP6, LOCAL_BE6, LOCAL_BE6_2, NODE2_MAC, NODE6, NODE_MAC, OK,
    REDIRECT, REMOTE_BE6, SHOT, XDP_DROP, XDP_PASS, XDP_REDIRECT, from_client, snat_port, to_client,
)
from .packets import tcp6, udp6

pytestmark = pytest.mark.root


def be6(addr, port=8080, proto=Protocol.TCP, local=False, **kw) -> Backend:
    return Backend(ipaddress.IPv6Address(addr), port, proto, local=local, **kw)


def _fe(addr, port, backends, proto=Protocol.TCP, kind=FrontendKind.NODE_PORT, name="web6", **kw) -> Frontend:
    """An EXTERNAL IPv6 frontend (NodePort on the node's IPv6 address by default)."""
    return Frontend(key=FrontendKey(ipaddress.IPv6Address(addr), port, proto, Scope.EXTERNAL),
                    service=ServicePortName("default", name, "", proto), kind=kind, backends=tuple(backends), **kw)


REMOTE = _fe(NODE6, 30080, [be6(REMOTE_BE6)])
LOCAL = _fe(NODE6, 30081, [be6(LOCAL_BE6, local=True)], name="local6")
LOCAL_POLICY = _fe(NODE6, 30082, [be6(LOCAL_BE6, local=True), be6(LOCAL_BE6_2, local=True)], local_only=True,
                   name="etp-local6")
EMPTY_LOCAL_POLICY = _fe(NODE6, 30083, [], local_only=True, name="etp-local6-empty")
DNS = _fe(NODE6, 30053, [be6(REMOTE_BE6, 5353, Protocol.UDP)], proto=Protocol.UDP, name="dns6")


def lb6(ranges=()):
    return _fe(LB_IP6, 443, [be6(LOCAL_BE6, local=True)], kind=FrontendKind.LOAD_BALANCER, name="lb6",
               source_ranges=tuple(ipaddress.IPv6Network(r) for r in ranges))


def state(*fes) -> LBState:
    return LBState.of(fes)


def hop6(l3):
    out = l3.copy()
    out[IPv6].hlim -= 1
    return out


def to_node2(l3):
    """A packet we forward to node-2 ourselves: one hop less."""
    return Ether(src=NODE_MAC, dst=NODE2_MAC) / hop6(l3)


def from_node2(l3):
    return Ether(src=NODE2_MAC, dst=NODE_MAC) / l3


def forwarded_to_client(l3, mac=CLIENT_MAC):
    return to_client(hop6(l3), mac)


def test_nodeport_tcp_remote_backend_is_snated_and_the_reply_reversed(uplink):
    uplink.writer.apply(state(REMOTE))
    req = b"GET / HTTP/1.1\r\n\r\n"
    uplink.check("SYN to [node]:30080, backend on node-2: SNAT to the node keeping port 40000 + DNAT, out to "
                 "node-2", "from_uplink", from_client(tcp6(CLIENT6, NODE6, 40000, 30080, "S")), REDIRECT,
                 to_node2(tcp6(NODE6, REMOTE_BE6, 40000, 8080, "S")))
    uplink.check("SYN-ACK to the SNAT port: back to the client from [node]:30080", "from_uplink",
                 from_node2(tcp6(REMOTE_BE6, NODE6, 8080, 40000, "SA", seq=7000, ack=1001)), REDIRECT,
                 forwarded_to_client(tcp6(NODE6, CLIENT6, 30080, 40000, "SA", seq=7000, ack=1001)))
    uplink.check("a later segment follows the flow", "from_uplink",
                 from_client(tcp6(CLIENT6, NODE6, 40000, 30080, "PA", seq=1001, ack=7001, payload=req)), REDIRECT,
                 to_node2(tcp6(NODE6, REMOTE_BE6, 40000, 8080, "PA", seq=1001, ack=7001, payload=req)))
    uplink.check("the egress program leaves SNATed packets alone", "to_uplink",
                 to_node2(tcp6(NODE6, REMOTE_BE6, 40000, 8080, "A")), OK)
    assert len(list(uplink.dp.maps["lb6_snat"].keys())) == 2
    assert not list(uplink.dp.maps["lb4_snat"].keys())


def test_a_second_client_on_the_same_port_gets_a_snat_range_port(uplink):
    uplink.writer.apply(state(REMOTE))
    second = snat_port(CLIENT2_6, NODE6, 40000, 30080, probe=0)
    assert abi.SNAT_PORT_MIN <= second <= abi.SNAT_PORT_MAX
    uplink.check("first client keeps 40000", "from_uplink", from_client(tcp6(CLIENT6, NODE6, 40000, 30080, "S")),
                 REDIRECT, to_node2(tcp6(NODE6, REMOTE_BE6, 40000, 8080, "S")))
    uplink.check("second client, same port: the range port its hash names", "from_uplink",
                 from_client(tcp6(CLIENT2_6, NODE6, 40000, 30080, "S"), mac=CLIENT2_MAC), REDIRECT,
                 to_node2(tcp6(NODE6, REMOTE_BE6, second, 8080, "S")))
    uplink.check("the second one's reply finds the second client", "from_uplink",
                 from_node2(tcp6(REMOTE_BE6, NODE6, 8080, second, "SA")), REDIRECT,
                 forwarded_to_client(tcp6(NODE6, CLIENT2_6, 30080, 40000, "SA"), CLIENT2_MAC))


def test_nodeport_udp_snat_and_answer(uplink):
    uplink.writer.apply(state(DNS))
    port = snat_port(CLIENT6, NODE6, 5000, 30053, 17)
    uplink.check("UDP to [node]:30053, backend on node-2: SNAT (a range port) + DNAT", "from_uplink",
                 from_client(udp6(CLIENT6, NODE6, 5000, 30053, b"query")), REDIRECT,
                 to_node2(udp6(NODE6, REMOTE_BE6, port, 5353, b"query")))
    uplink.check("the answer: to the client from [node]:30053", "from_uplink",
                 from_node2(udp6(REMOTE_BE6, NODE6, 5353, port, b"answer")), REDIRECT,
                 forwarded_to_client(udp6(NODE6, CLIENT6, 30053, 5000, b"answer")))


def test_local_backend_dnat_only_and_reply_restored_on_egress(uplink):
    uplink.writer.apply(state(LOCAL))
    uplink.check("SYN, backend on this node: DNAT only, client address kept", "from_uplink",
                 from_client(tcp6(CLIENT6, NODE6, 40000, 30081, "S")), OK,
                 from_client(tcp6(CLIENT6, LOCAL_BE6, 40000, 8080, "S")))
    uplink.check("the pod's reply leaving the uplink gets [node]:30081 back", "to_uplink",
                 to_client(tcp6(LOCAL_BE6, CLIENT6, 8080, 40000, "SA")), OK,
                 to_client(tcp6(NODE6, CLIENT6, 30081, 40000, "SA")))
    uplink.check("the next segment follows the flow", "from_uplink",
                 from_client(tcp6(CLIENT6, NODE6, 40000, 30081, "A", seq=1001)), OK,
                 from_client(tcp6(CLIENT6, LOCAL_BE6, 40000, 8080, "A", seq=1001)))


def test_local_policy_keeps_the_client_and_drops_without_local_backend(uplink):
    from .packets import expected_backend

    uplink.writer.apply(state(LOCAL_POLICY, EMPTY_LOCAL_POLICY))
    for sport in (41000, 41001, 41002):
        b = expected_backend(LOCAL_POLICY, CLIENT6, sport)
        uplink.check(f"Local policy, flow {sport}: DNAT to {b}, client kept", "from_uplink",
                     from_client(tcp6(CLIENT6, NODE6, sport, 30082, "S")), OK,
                     from_client(tcp6(CLIENT6, b, sport, 8080, "S")))
    before = uplink.drops(abi.REASON_NO_LOCAL_BACKEND)
    uplink.check("Local policy, no backend here: dropped", "from_uplink",
                 from_client(tcp6(CLIENT6, NODE6, 40000, 30083, "S")), SHOT)
    assert uplink.drops(abi.REASON_NO_LOCAL_BACKEND) == before + 1


def test_source_ranges_refuse_and_admit(uplink):
    uplink.writer.apply(state(lb6(["2001:2::100/128", "2001:2:0:7::/64"])))
    before = uplink.drops(abi.REASON_SOURCE_RANGE)
    uplink.check("client in a /128 range: DNAT", "from_uplink",
                 from_client(tcp6(CLIENT6, LB_IP6, 40000, 443, "S")), OK,
                 from_client(tcp6(CLIENT6, LOCAL_BE6, 40000, 8080, "S")))
    uplink.check("client in the /64 range: DNAT", "from_uplink",
                 from_client(tcp6("2001:2:0:7::99", LB_IP6, 40000, 443, "S")), OK,
                 from_client(tcp6("2001:2:0:7::99", LOCAL_BE6, 40000, 8080, "S")))
    uplink.check("client outside every range: dropped", "from_uplink",
                 from_client(tcp6(CLIENT2_6, LB_IP6, 40000, 443, "S"), mac=CLIENT2_MAC), SHOT)
    assert uplink.drops(abi.REASON_SOURCE_RANGE) == before + 1


def _icmp6(src, dst, quoted, kind=None):
    """An ICMPv6 error from src to dst quoting `quoted` (an IPv6 packet)."""
    return IPv6(src=src, dst=dst) / (kind or ICMPv6DestUnreach(code=4)) / quoted


def test_icmpv6_error_from_the_backend_about_a_snated_flow_goes_to_the_client(uplink):
    uplink.writer.apply(state(DNS))
    port = snat_port(CLIENT6, NODE6, 5000, 30053, 17)
    uplink.check("UDP query, SNATed", "from_uplink", from_client(udp6(CLIENT6, NODE6, 5000, 30053, b"query")),
                 REDIRECT, to_node2(udp6(NODE6, REMOTE_BE6, port, 5353, b"query")))
    uplink.check("the backend's port unreachable about node:port -> backend becomes the frontend's about "
                 "client -> frontend, sent to the client", "from_uplink",
                 from_node2(_icmp6(REMOTE_BE6, NODE6, udp6(NODE6, REMOTE_BE6, port, 5353, b"query"))), REDIRECT,
                 forwarded_to_client(_icmp6(NODE6, CLIENT6, udp6(CLIENT6, NODE6, 5000, 30053, b"query"))))


def test_icmpv6_packet_too_big_about_a_reply_reaches_the_local_backend(uplink):
    uplink.writer.apply(state(LOCAL))
    router = "2001:2::1"
    uplink.check("SYN", "from_uplink", from_client(tcp6(CLIENT6, NODE6, 40000, 30081, "S")), OK,
                 from_client(tcp6(CLIENT6, LOCAL_BE6, 40000, 8080, "S")))
    quoted = tcp6(NODE6, CLIENT6, 30081, 40000, "A", seq=7001, payload=b"x" * 16)
    uplink.check("packet too big about frontend -> client: about backend -> client, to the backend", "from_uplink",
                 from_client(_icmp6(router, NODE6, quoted, ICMPv6PacketTooBig(mtu=1280))), OK,
                 from_client(_icmp6(router, LOCAL_BE6,
                                    tcp6(LOCAL_BE6, CLIENT6, 8080, 40000, "A", seq=7001, payload=b"x" * 16),
                                    ICMPv6PacketTooBig(mtu=1280))))


def test_hop_limit_one_starts_no_snat_flow(uplink):
    uplink.writer.apply(state(REMOTE))
    before = uplink.drops(abi.REASON_TTL_EXCEEDED)
    syn = IPv6(src=CLIENT6, dst=NODE6, hlim=1) / TCP(sport=40000, dport=30080, flags="S", seq=1000)
    uplink.check("hop limit 1: not forwarded, no flow, no SNAT port", "from_uplink", from_client(syn), SHOT)
    assert uplink.drops(abi.REASON_TTL_EXCEEDED) == before + 1
    assert not list(uplink.dp.maps["lb6_snat"].keys()) and not list(uplink.dp.maps["ct6"].keys())


def test_truncated_and_untouched(uplink):
    uplink.writer.apply(state(REMOTE))
    before = uplink.drops(abi.REASON_MALFORMED)
    cut = bytes(from_client(tcp6(CLIENT6, NODE6, 40000, 30080, "S")))[:14 + 40 + 10]
    uplink.check("a TCP header cut short: dropped", "from_uplink", cut, SHOT)
    assert uplink.drops(abi.REASON_MALFORMED) == before + 1
    ns = from_client(IPv6(src=CLIENT6, dst="ff02::1:ff00:11", hlim=255) / ICMPv6ND_NS(tgt=NODE6))
    uplink.check("neighbour solicitation: untouched", "from_uplink", ns, OK)
    uplink.check("neighbour solicitation out: untouched", "to_uplink",
                 to_client(IPv6(src=NODE6, dst=CLIENT6, hlim=255) / ICMPv6ND_NS(tgt=CLIENT6)), OK)
    uplink.check("another port of the node: untouched", "from_uplink",
                 from_client(tcp6(CLIENT6, NODE6, 40000, 22, "S")), OK)
    uplink.check("not a Service address: untouched", "from_uplink",
                 from_client(udp6(CLIENT6, "2001:2:0:9::1", 5000, 30080)), OK)


def test_xdp_snat_flow_both_ways(uplink):
    """At XDP: the SNATed TCP flow and its reply, as at TC (same maps, same bytes out)."""
    uplink.writer.apply(state(REMOTE))
    uplink.check_xdp("SYN: SNAT + DNAT, redirected to node-2 with one hop less",
                     from_client(tcp6(CLIENT6, NODE6, 40000, 30080, "S")), XDP_REDIRECT,
                     to_node2(tcp6(NODE6, REMOTE_BE6, 40000, 8080, "S")))
    uplink.check_xdp("SYN-ACK: back to the client from [node]:30080",
                     from_node2(tcp6(REMOTE_BE6, NODE6, 8080, 40000, "SA", seq=7000, ack=1001)), XDP_REDIRECT,
                     forwarded_to_client(tcp6(NODE6, CLIENT6, 30080, 40000, "SA", seq=7000, ack=1001)))
    uplink.check_xdp("a data segment follows the flow",
                     from_client(tcp6(CLIENT6, NODE6, 40000, 30080, "PA", seq=1001, ack=7001, payload=b"hi")),
                     XDP_REDIRECT, to_node2(tcp6(NODE6, REMOTE_BE6, 40000, 8080, "PA", seq=1001, ack=7001,
                                                 payload=b"hi")))
    uplink.check("TC sees the flow XDP made: the same translation", "from_uplink",
                 from_client(tcp6(CLIENT6, NODE6, 40000, 30080, "A", seq=1003, ack=7001)), REDIRECT,
                 to_node2(tcp6(NODE6, REMOTE_BE6, 40000, 8080, "A", seq=1003, ack=7001)))


def test_xdp_udp_local_backend_and_what_it_passes(uplink):
    uplink.writer.apply(state(DNS, LOCAL, lb6(["2001:2::100/128"])))
    port = snat_port(CLIENT6, NODE6, 5000, 30053, 17)
    uplink.check_xdp("UDP, remote backend: SNAT + DNAT", from_client(udp6(CLIENT6, NODE6, 5000, 30053, b"q")),
                     XDP_REDIRECT, to_node2(udp6(NODE6, REMOTE_BE6, port, 5353, b"q")))
    uplink.check_xdp("UDP answer", from_node2(udp6(REMOTE_BE6, NODE6, 5353, port, b"a")), XDP_REDIRECT,
                     forwarded_to_client(udp6(NODE6, CLIENT6, 30053, 5000, b"a")))
    uplink.check_xdp("local backend: DNAT in place, passed up for the kernel to deliver",
                     from_client(tcp6(CLIENT6, NODE6, 40000, 30081, "S")), XDP_PASS,
                     from_client(tcp6(CLIENT6, LOCAL_BE6, 40000, 8080, "S")))
    before = uplink.drops(abi.REASON_SOURCE_RANGE)
    uplink.check_xdp("outside the source ranges: dropped at XDP",
                     from_client(tcp6(CLIENT2_6, LB_IP6, 40000, 443, "S"), mac=CLIENT2_MAC), XDP_DROP)
    assert uplink.drops(abi.REASON_SOURCE_RANGE) == before + 1
    uplink.check_xdp("an extension header: left to TC, untouched",
                     from_client(tcp6(CLIENT6, NODE6, 40001, 30081, "S", ext=[IPv6ExtHdrDestOpt()])), XDP_PASS)
    uplink.check_xdp("neighbour solicitation: untouched",
                     from_client(IPv6(src=CLIENT6, dst="ff02::1:ff00:11", hlim=255) / ICMPv6ND_NS(tgt=NODE6)),
                     XDP_PASS)
    uplink.check_xdp("hop limit 1 to a remote backend: left to TC (which drops and counts it)",
                     from_client(IPv6(src=CLIENT6, dst=NODE6, hlim=1) / UDP(sport=5001, dport=30053) / b"q"),
                     XDP_PASS)
