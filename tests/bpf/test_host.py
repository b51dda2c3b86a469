"""Clients in the node's own namespace (hostNetwork pods, node daemons) to ClusterIPs: bpf/lib/host.h.

from_host runs at the egress of the agent's node-client device (a veth), where the node routes the service
CIDR: it DNATs and sends the packet on itself (no hop: the packet is the node's own). Replies
come back addressed to the node, through the uplink (remote backend) or a pod veth (local
backend), and get the ClusterIP back as their source.
"""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from ebpfsvc import abi
from ebpfsvc.datapath import hostpath
from ebpfsvc.lbmodel import LBState, Protocol

from .northsouth import A, LIMITS, NODE, NODE2_MAC, NODE_MAC, OK, REDIRECT, REMOTE_BE, SHOT, from_node2
from .packets import CLIENT, HAIRPIN, VIP, be, frontend, from_pod, tcp, udp

pytestmark = pytest.mark.root

DUMMY_MAC = "02:00:00:00:00:99"        # the node-client device's own address: both ends of its frames
WEB = frontend(VIP, 80, [be(REMOTE_BE)])
DNS = frontend(VIP, 53, [be(REMOTE_BE, 5353, Protocol.UDP)], proto=Protocol.UDP, name="dns")


def from_host(l3):
    return Ether(src=DUMMY_MAC, dst=DUMMY_MAC) / l3


def out_to_node2(l3):
    """Sent on by the program itself, TTL untouched (the node's own packet, not a forwarded one)."""
    return Ether(src=NODE_MAC, dst=NODE2_MAC) / l3


def test_a_node_client_reaches_a_remote_backend_and_gets_the_clusterip_back(uplink):
    uplink.writer.apply(LBState.of([WEB]))
    uplink.check("SYN from the node to the ClusterIP: DNAT, straight to node-2", "from_host",
                 from_host(tcp(NODE, VIP, 45000, 80, "S")), REDIRECT,
                 out_to_node2(tcp(NODE, REMOTE_BE, 45000, 8080, "S")))
    uplink.check("SYN-ACK from the backend, on the uplink: the ClusterIP as source, for the node's socket",
                 "from_uplink", from_node2(tcp(REMOTE_BE, NODE, 8080, 45000, "SA", seq=7000, ack=1001)), OK,
                 from_node2(tcp(VIP, NODE, 80, 45000, "SA", seq=7000, ack=1001)))
    uplink.check("the next segment keeps its backend", "from_host",
                 from_host(tcp(NODE, VIP, 45000, 80, "A", seq=1001, ack=7001)), REDIRECT,
                 out_to_node2(tcp(NODE, REMOTE_BE, 45000, 8080, "A", seq=1001, ack=7001)))
    flows = {k.dir: v for k, v in uplink.dp.maps["ct4"].items()}
    assert flows[abi.CT_DIR_FORWARD].flags & abi.CT_F_ESTABLISHED
    assert not flows[abi.CT_DIR_FORWARD].flags & abi.CT_F_NODEPORT


def test_a_node_client_udp_flow(uplink):
    uplink.writer.apply(LBState.of([DNS]))
    uplink.check("query", "from_host", from_host(udp(NODE, VIP, 45001, 53, b"q")), REDIRECT,
                 out_to_node2(udp(NODE, REMOTE_BE, 45001, 5353, b"q")))
    uplink.check("answer", "from_uplink", from_node2(udp(REMOTE_BE, NODE, 5353, 45001, b"a")), OK,
                 from_node2(udp(VIP, NODE, 53, 45001, b"a")))


def test_no_backend_is_refused_into_the_host(uplink):
    uplink.writer.apply(LBState.of([frontend(VIP, 80, [])]))
    before = uplink.drops(abi.REASON_NO_BACKEND)
    uplink.check("SYN: RST from the ClusterIP, redirected into the host", "from_host",
                 from_host(tcp(NODE, VIP, 45002, 80, "S", seq=1000)), REDIRECT,
                 from_host(IP(src=VIP, dst=NODE, id=0, ttl=64) /
                           TCP(sport=80, dport=45002, flags="RA", seq=0, ack=1001, window=0)))
    assert uplink.drops(abi.REASON_NO_BACKEND) == before + 1
    uplink.check("an address of the service CIDR that is no Service: dropped", "from_host",
                 from_host(tcp(NODE, "198.19.0.99", 45003, 80, "S")), SHOT)


def test_a_local_backend_answers_through_its_veth(uplink, compiled):
    """The reply of a backend on this node arrives on its pod veth (from_pod), addressed to the node."""
    pod_side = compiled.load(LIMITS, hairpin_addr=HAIRPIN, snat_addr=NODE)    # on the uplink's maps
    uplink.writer.apply(LBState.of([WEB]))
    uplink.check("SYN", "from_host", from_host(tcp(NODE, VIP, 45004, 80, "S")), REDIRECT,
                 out_to_node2(tcp(NODE, REMOTE_BE, 45004, 8080, "S")))
    from ebpfsvc.datapath.testrun import prog_test_run
    res = prog_test_run(pod_side.programs["from_pod"].fd, bytes(from_pod(tcp(REMOTE_BE, NODE, 8080, 45004, "SA"))))
    assert res.verdict == "TC_ACT_OK"
    assert res.data == bytes(from_pod(tcp(VIP, NODE, 80, 45004, "SA")))
    # A pod's packet to the node that belongs to no such flow passes untouched (kubelet probes...).
    probe = from_pod(tcp(REMOTE_BE, NODE, 8080, 45999, "SA"))
    res = prog_test_run(pod_side.programs["from_pod"].fd, bytes(probe))
    assert (res.verdict, res.data) == ("TC_ACT_OK", bytes(probe))


def test_with_the_node_address_as_hairpin_source_both_replies_to_the_node_are_told_apart(uplink, compiled):
    """No --hairpin-address: hairpin flows take the node address as source, as kube-proxy's
    masquerade does, so a pod's packet to the node address may be a hairpin reply, a local
    backend's reply to a node client, or a new connection to a NodePort on that address."""
    pod_side = compiled.load(LIMITS, hairpin_addr=NODE, snat_addr=NODE)      # on the uplink's maps
    from ebpfsvc.datapath.testrun import prog_test_run

    def from_pod_prog(packet):
        res = prog_test_run(pod_side.programs["from_pod"].fd, bytes(packet))
        return res.verdict, res.data

    node_port = frontend(NODE, 30080, [be(CLIENT)], name="np")
    uplink.writer.apply(LBState.of([WEB, frontend(VIP, 81, [be(CLIENT)], name="self"), node_port]))
    # Hairpin: the pod reaches itself through its Service and sees the node address.
    assert from_pod_prog(from_pod(tcp(CLIENT, VIP, 40000, 81, "S"))) == \
        ("TC_ACT_OK", bytes(from_pod(tcp(NODE, CLIENT, 40000, 8080, "S"))))
    assert from_pod_prog(from_pod(tcp(CLIENT, NODE, 8080, 40000, "SA"))) == \
        ("TC_ACT_OK", bytes(from_pod(tcp(VIP, CLIENT, 81, 40000, "SA"))))
    # A node client's flow to a backend on this node: its reply, addressed to the node too.
    uplink.check("SYN from the node", "from_host", from_host(tcp(NODE, VIP, 45004, 80, "S")), REDIRECT,
                 out_to_node2(tcp(NODE, REMOTE_BE, 45004, 8080, "S")))
    assert from_pod_prog(from_pod(tcp(REMOTE_BE, NODE, 8080, 45004, "SA"))) == \
        ("TC_ACT_OK", bytes(from_pod(tcp(VIP, NODE, 80, 45004, "SA"))))
    # A pod's new connection to a NodePort on the node address is balanced like any frontend.
    verdict, data = from_pod_prog(from_pod(tcp("198.18.1.9", NODE, 41000, 30080, "S")))
    assert (verdict, data) == ("TC_ACT_OK", bytes(from_pod(tcp("198.18.1.9", CLIENT, 41000, 8080, "S"))))
    # Anything else to the node (a kubelet probe's answer) passes untouched.
    probe = from_pod(tcp(REMOTE_BE, NODE, 8080, 45999, "SA"))
    assert from_pod_prog(probe) == ("TC_ACT_OK", bytes(probe))


def test_node_client_routes_follow_the_wanted_set(uplink):
    """hostpath: the device, its routes from the node address, a previous run's routes read back,
    and the ones no longer wanted removed (in the test's namespace)."""
    ns = uplink.netns
    hostpath.setup(uplink.dp, A(NODE), netns=ns)
    assert hostpath.routes(ns) == set()
    wanted = {ipaddress.IPv4Network("198.19.0.0/16"), ipaddress.IPv4Network("10.96.0.10/32")}
    installed = hostpath.sync_routes(set(), wanted, A(NODE), ns)
    assert installed == wanted and hostpath.routes(ns) == wanted           # what a restarted agent finds
    installed = hostpath.sync_routes(hostpath.routes(ns), {ipaddress.IPv4Network("10.96.0.10/32")}, A(NODE), ns)
    assert hostpath.routes(ns) == installed == {ipaddress.IPv4Network("10.96.0.10/32")}
    assert hostpath.teardown(ns) and hostpath.routes(ns) == set()


# ---- IPv6 node clients: ClusterIPs through ebpfsvc0 (hs6_from_host), source the node's IPv6 address ----

NODE6 = "2001:2::11"
NODE2_6 = "2001:2::12"
REMOTE_BE6 = "2001:2:0:2::2"
VIP6 = "2001:2:0:ff::10"
WEB6 = frontend(VIP6, 80, [be(REMOTE_BE6)], name="web6")


@pytest.fixture
def uplink6(uplink):
    """The uplink namespace, which has node-1's IPv6 view of the fabric too (northsouth.build_netns: its
    address, a route to node-2's pod prefix, node-2 resolved, forwarding on: an IPv6 FIB lookup needs
    it), with the node's IPv6 address in lb_node_addrs."""
    from ebpfsvc.datapath import nodeaddrs

    nodeaddrs.write(uplink.dp.maps, nodeaddrs.NodeAddrs(hairpin4=HAIRPIN, snat4=NODE, snat6=NODE6))
    return uplink


def tcp6(src, dst, sport, dport, flags="S", seq=1000, ack=0):
    from scapy.layers.inet6 import IPv6
    return IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack)


def udp6(src, dst, sport, dport, payload):
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import IPv6
    from scapy.packet import Raw
    return IPv6(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(payload)


def test_an_ipv6_node_client_reaches_a_remote_backend_and_gets_the_clusterip_back(uplink6):
    uplink6.writer.apply(LBState.of([WEB6]))
    uplink6.check("SYN from the node to the IPv6 ClusterIP: DNAT, straight to node-2", "from_host",
                  from_host(tcp6(NODE6, VIP6, 45000, 80, "S")), REDIRECT,
                  out_to_node2(tcp6(NODE6, REMOTE_BE6, 45000, 8080, "S")))
    uplink6.check("SYN-ACK from the backend, on the uplink: the ClusterIP as source", "from_uplink",
                  from_node2(tcp6(REMOTE_BE6, NODE6, 8080, 45000, "SA", seq=7000, ack=1001)), OK,
                  from_node2(tcp6(VIP6, NODE6, 80, 45000, "SA", seq=7000, ack=1001)))
    uplink6.check("the next segment keeps its backend", "from_host",
                  from_host(tcp6(NODE6, VIP6, 45000, 80, "A", seq=1001, ack=7001)), REDIRECT,
                  out_to_node2(tcp6(NODE6, REMOTE_BE6, 45000, 8080, "A", seq=1001, ack=7001)))
    flows = {k.dir: v for k, v in uplink6.dp.maps["ct6"].items()}
    assert flows[abi.CT_DIR_FORWARD].flags & abi.CT_F_ESTABLISHED
    assert not flows[abi.CT_DIR_FORWARD].flags & (abi.CT_F_NODEPORT | abi.CT_F_HAIRPIN)
    stray = from_node2(tcp6(REMOTE_BE6, NODE6, 8080, 45999, "SA"))
    uplink6.check("an IPv6 packet to the node of no such flow passes the uplink untouched", "from_uplink",
                  stray, OK, stray)


def test_an_ipv6_node_client_udp_flow(uplink6):
    uplink6.writer.apply(LBState.of([frontend(VIP6, 53, [be(REMOTE_BE6, 5353, Protocol.UDP)],
                                              proto=Protocol.UDP, name="dns6")]))
    uplink6.check("query", "from_host", from_host(udp6(NODE6, VIP6, 45001, 53, b"q")), REDIRECT,
                  out_to_node2(udp6(NODE6, REMOTE_BE6, 45001, 5353, b"q")))
    uplink6.check("answer", "from_uplink", from_node2(udp6(REMOTE_BE6, NODE6, 5353, 45001, b"a")), OK,
                  from_node2(udp6(VIP6, NODE6, 53, 45001, b"a")))


def test_an_ipv6_clusterip_without_backend_is_refused_into_the_host(uplink6):
    from scapy.layers.inet6 import IPv6
    uplink6.writer.apply(LBState.of([frontend(VIP6, 80, [], name="web6")]))
    before = uplink6.drops(abi.REASON_NO_BACKEND)
    uplink6.check("SYN: RST from the ClusterIP, redirected into the host", "from_host",
                  from_host(tcp6(NODE6, VIP6, 45002, 80, "S", seq=1000)), REDIRECT,
                  from_host(IPv6(src=VIP6, dst=NODE6, hlim=64) /
                            TCP(sport=80, dport=45002, flags="RA", seq=0, ack=1001, window=0)))
    assert uplink6.drops(abi.REASON_NO_BACKEND) == before + 1
    uplink6.check("an address of the service CIDR that is no Service: dropped", "from_host",
                  from_host(tcp6(NODE6, "2001:2:0:ff::99", 45003, 80, "S")), SHOT)


def test_an_ipv6_local_backend_answers_a_node_client_through_its_veth(uplink6, compiled):
    from ebpfsvc.datapath.testrun import prog_test_run
    pod_side = compiled.load(LIMITS, hairpin_addr=HAIRPIN, snat_addr=NODE, snat6=NODE6)   # on the uplink's maps
    uplink6.writer.apply(LBState.of([WEB6]))
    uplink6.check("SYN", "from_host", from_host(tcp6(NODE6, VIP6, 45004, 80, "S")), REDIRECT,
                  out_to_node2(tcp6(NODE6, REMOTE_BE6, 45004, 8080, "S")))
    res = prog_test_run(pod_side.programs["from_pod"].fd, bytes(from_pod(tcp6(REMOTE_BE6, NODE6, 8080, 45004, "SA"))))
    assert (res.verdict, res.data) == ("TC_ACT_OK", bytes(from_pod(tcp6(VIP6, NODE6, 80, 45004, "SA"))))
    probe = from_pod(tcp6(REMOTE_BE6, NODE6, 8080, 45999, "SA"))
    res = prog_test_run(pod_side.programs["from_pod"].fd, bytes(probe))
    assert (res.verdict, res.data) == ("TC_ACT_OK", bytes(probe))


def test_ipv6_node_client_routes_have_the_nodes_ipv6_address_as_source(uplink6):
    """hostpath routes both families to the device, each from the node's address of its family; a
    family without a node address is not routed."""
    from pyroute2 import IPRoute

    from ebpfsvc.datapath import nsenter

    ns = uplink6.netns
    hostpath.setup(uplink6.dp, A(NODE), netns=ns)
    v4, v6 = ipaddress.IPv4Network("198.19.0.0/16"), ipaddress.IPv6Network("2001:2:0:ff::/108")
    assert hostpath.sync_routes(set(), {v4, v6}, A(NODE), ns) == {v4}            # no IPv6 address given
    installed = hostpath.sync_routes({v4}, {v4, v6}, (A(NODE), ipaddress.IPv6Address(NODE6)), ns)
    assert installed == {v4, v6} and hostpath.routes(ns) == {v4, v6}

    def source_of(dst):
        with IPRoute() as ipr:
            return ipr.route("get", dst=dst)[0].get_attr("RTA_PREFSRC")
    assert nsenter.run_in(ns, lambda: (source_of("2001:2:0:ff::10"), source_of("198.19.0.10"))) == (NODE6, NODE)
    assert hostpath.sync_routes(installed, {v4}, (A(NODE), ipaddress.IPv6Address(NODE6)), ns) == {v4}
    assert hostpath.routes(ns) == {v4}
    assert hostpath.teardown(ns) and hostpath.routes(ns) == set()
