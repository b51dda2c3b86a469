"""Hairpin: a pod reaching itself through a Service. The source is SNATed to
the node's hairpin address (kube-proxy masquerades the same case), so the pod
does not receive a packet from itself; its reply, leaving the pod towards the
hairpin address, is turned back into VIP -> pod."""

from __future__ import annotations

import pytest

from ebpfsvc import abi

from .packets import CLIENT, HAIRPIN, OK, VIP, Case, be, check, from_pod, frontend, state, tcp

pytestmark = pytest.mark.root

SELF = frontend(VIP, 80, [be(CLIENT, 8080)])


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
