"""Hairpin: a pod reaching itself through a Service. The source is SNATed to
the node's hairpin address (kube-proxy masquerades the same case), so the pod
does not receive a packet from itself; its reply, leaving the pod towards the
hairpin address, is turned back into VIP -> pod. IPv6 alike, to the node's IPv6 hairpin
address (lb_node_addrs.hairpin6)."""

from __future__ import annotations

import pytest

from ebpfsvc import abi
from ebpfsvc.datapath.writer import MapWriter
from ebpfsvc.lbmodel import Protocol

from .conftest import TEST_LIMITS
from .packets import (
    CLIENT, CLIENT6, HAIRPIN, OK, VIP, VIP6, Case, be, be6, check, from_pod, frontend, frontend6, state, tcp, tcp6,
    udp6,
)

pytestmark = pytest.mark.root

SELF = frontend(VIP, 80, [be(CLIENT, 8080)])
HAIRPIN6 = "2001:2::1"
SELF6 = frontend6(VIP6, 80, [be6(CLIENT6, 8080)])


def test_pod_to_itself_through_its_service(datapath, writer):
    writer.apply(state(SELF))
    rows = [
        Case("SYN: DNAT to the pod itself, source becomes the hairpin address", "from_pod",
             from_pod(tcp(CLIENT, VIP, 40000, 80, "S")), OK,
             from_pod(tcp(HAIRPIN, CLIENT, 40000, 8080, "S"))),
        Case("the pod's SYN-ACK to the hairpin address is turned into VIP -> pod", "from_pod",
             from_pod(tcp(CLIENT, HAIRPIN, 8080, 40000, "SA", seq=7000, ack=1001)), OK,
             from_pod(tcp(VIP, CLIENT, 80, 40000, "SA", seq=7000, ack=1001))),
        Case("later client segments are SNATed too", "from_pod",
             from_pod(tcp(CLIENT, VIP, 40000, 80, "A", seq=1001, ack=7001)), OK,
             from_pod(tcp(HAIRPIN, CLIENT, 40000, 8080, "A", seq=1001, ack=7001))),
    ]
    for row in rows:
        check(datapath, row)
    fwd = [v for k, v in datapath.maps["ct4"].items() if k.dir == abi.CT_DIR_FORWARD]
    assert len(fwd) == 1 and fwd[0].flags & abi.CT_F_HAIRPIN and fwd[0].flags & abi.CT_F_ESTABLISHED


def test_traffic_to_the_hairpin_address_of_no_flow_passes(datapath, writer):
    writer.apply(state(SELF))
    check(datapath, Case("unrelated packet to the hairpin address", "from_pod",
                         from_pod(tcp(CLIENT, HAIRPIN, 8080, 40001, "SA")), OK))


@pytest.fixture
def datapath6(compiled):
    """The pod programs on a node with an IPv6 hairpin address too."""
    return compiled.load(TEST_LIMITS, hairpin_addr=HAIRPIN, hairpin6=HAIRPIN6)


@pytest.fixture
def writer6(datapath6):
    return MapWriter(datapath6.maps)


def test_ipv6_pod_to_itself_through_its_service(datapath6, writer6):
    writer6.apply(state(SELF6))
    rows = [
        Case("SYN: DNAT to the pod itself, source becomes the IPv6 hairpin address", "from_pod",
             from_pod(tcp6(CLIENT6, VIP6, 40000, 80, "S")), OK,
             from_pod(tcp6(HAIRPIN6, CLIENT6, 40000, 8080, "S"))),
        Case("the pod's SYN-ACK to the hairpin address is turned into VIP -> pod", "from_pod",
             from_pod(tcp6(CLIENT6, HAIRPIN6, 8080, 40000, "SA", seq=7000, ack=1001)), OK,
             from_pod(tcp6(VIP6, CLIENT6, 80, 40000, "SA", seq=7000, ack=1001))),
        Case("later client segments are SNATed too", "from_pod",
             from_pod(tcp6(CLIENT6, VIP6, 40000, 80, "A", seq=1001, ack=7001)), OK,
             from_pod(tcp6(HAIRPIN6, CLIENT6, 40000, 8080, "A", seq=1001, ack=7001))),
        Case("FIN both ways: the flow is closing, still translated", "from_pod",
             from_pod(tcp6(CLIENT6, VIP6, 40000, 80, "FA", seq=1001, ack=7001)), OK,
             from_pod(tcp6(HAIRPIN6, CLIENT6, 40000, 8080, "FA", seq=1001, ack=7001))),
    ]
    for row in rows:
        check(datapath6, row)
    fwd = [v for k, v in datapath6.maps["ct6"].items() if k.dir == abi.CT_DIR_FORWARD]
    assert len(fwd) == 1 and fwd[0].flags & abi.CT_F_HAIRPIN and fwd[0].flags & abi.CT_F_ESTABLISHED
    replies = [k for k in datapath6.maps["ct6"].keys() if k.dir == abi.CT_DIR_REPLY]
    assert [abi.ip_of_be128(k.daddr) for k in replies] == [HAIRPIN6]


def test_ipv6_udp_hairpin(datapath6, writer6):
    fe = frontend6(VIP6, 53, [be6(CLIENT6, 5353, proto=Protocol.UDP)], proto=Protocol.UDP, name="dns6")
    writer6.apply(state(fe))
    check(datapath6, Case("UDP to its own Service: DNAT + SNAT to the IPv6 hairpin address", "from_pod",
                          from_pod(udp6(CLIENT6, VIP6, 5000, 53)), OK, from_pod(udp6(HAIRPIN6, CLIENT6, 5000, 5353))))
    check(datapath6, Case("its answer comes from the Service", "from_pod",
                          from_pod(udp6(CLIENT6, HAIRPIN6, 5353, 5000, b"answer")), OK,
                          from_pod(udp6(VIP6, CLIENT6, 53, 5000, b"answer"))))


def test_ipv6_without_a_hairpin_address_a_pod_reaching_itself_is_only_dnated(datapath, writer):
    """No IPv6 node address (an IPv4-only node's map): the flow is balanced as any other, no SNAT."""
    writer.apply(state(SELF6))
    check(datapath, Case("SYN to its own Service: DNAT only", "from_pod",
                         from_pod(tcp6(CLIENT6, VIP6, 40000, 80, "S")), OK,
                         from_pod(tcp6(CLIENT6, CLIENT6, 40000, 8080, "S"))))
    fwd = [v for k, v in datapath.maps["ct6"].items() if k.dir == abi.CT_DIR_FORWARD]
    assert len(fwd) == 1 and not fwd[0].flags & abi.CT_F_HAIRPIN


def test_ipv6_traffic_to_the_hairpin_address_of_no_flow_passes(datapath6, writer6):
    writer6.apply(state(SELF6))
    check(datapath6, Case("unrelated packet to the IPv6 hairpin address", "from_pod",
                          from_pod(tcp6(CLIENT6, HAIRPIN6, 8080, 40001, "SA")), OK))
