"""A SYN that arrives with no hop left leaves no flow behind (found by the uplink's differential run,
tests/diff/uplink.py): it is dropped (ttl_exceeded) before its flow is created, so it claims no SNAT
port.  Before, the flow and its port were created first and the packet dropped after: a stream of
TTL-1 SYNs held a backend's SNAT ports for the SYN lifetime each, and a client arriving next from the
same port was given a range port instead of its own."""

from __future__ import annotations

import pytest

from ebpfsvc import abi
from ebpfsvc.lbmodel import LBState

from .northsouth import (CLIENT, CLIENT2, CLIENT2_MAC, NODE, REDIRECT, REMOTE_BE, SHOT, XDP_PASS, XDP_REDIRECT, be, ext_frontend,
                         forwarded_to_client, from_client, from_node2, to_node2)
from .packets import tcp

pytestmark = pytest.mark.root

REMOTE = ext_frontend(NODE, 30080, [be(REMOTE_BE)])


def test_a_syn_without_hops_left_claims_no_snat_port(uplink):
    uplink.writer.apply(LBState.of([REMOTE]))
    before = uplink.drops(abi.REASON_TTL_EXCEEDED)
    uplink.check("TTL 1 SYN to a SNATed NodePort: dropped", "from_uplink",
                 from_client(tcp(CLIENT, NODE, 40000, 30080, "S", ttl=1)), SHOT)
    assert uplink.drops(abi.REASON_TTL_EXCEEDED) == before + 1
    assert list(uplink.dp.maps["ct4"].items()) == [] and list(uplink.dp.maps["lb4_snat"].items()) == []
    uplink.check("another client from the same port keeps it: nobody holds it", "from_uplink",
                 from_client(tcp(CLIENT2, NODE, 40000, 30080, "S"), mac=CLIENT2_MAC), REDIRECT,
                 to_node2(tcp(NODE, REMOTE_BE, 40000, 8080, "S")))
    uplink.check("and the backend's answer reaches that client", "from_uplink",
                 from_node2(tcp(REMOTE_BE, NODE, 8080, 40000, "SA")), REDIRECT,
                 forwarded_to_client(tcp(NODE, CLIENT2, 30080, 40000, "SA"), mac=CLIENT2_MAC))


def test_at_xdp_a_syn_without_hops_left_is_passed_to_tc_with_no_flow_made(uplink):
    """xdp_uplink made the flow (and claimed the port) before it saw the TTL, then passed the packet,
    which from_uplink then dropped as a tracked flow's: the same leak, one hook earlier."""
    uplink.writer.apply(LBState.of([REMOTE]))
    syn = from_client(tcp(CLIENT, NODE, 40000, 30080, "S", ttl=1))
    uplink.check_xdp("TTL 1 SYN at XDP: passed untouched, for TC to drop and count", syn, XDP_PASS)
    assert list(uplink.dp.maps["ct4"].items()) == [] and list(uplink.dp.maps["lb4_snat"].items()) == []
    uplink.check("TC drops it", "from_uplink", syn, SHOT)
    uplink.check_xdp("another client from the same port keeps it, at XDP",
                     from_client(tcp(CLIENT2, NODE, 40000, 30080, "S"), mac=CLIENT2_MAC), XDP_REDIRECT,
                     to_node2(tcp(NODE, REMOTE_BE, 40000, 8080, "S")))
