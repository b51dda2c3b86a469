"""ClusterIP traffic from off the node (issue 17 item 2) on the uplink (bpf/lb_node.c) through
BPF_PROG_TEST_RUN: a static route or a BGP-advertised service range sends a ClusterIP to the
node's uplink, and the node serves it as kube-proxy does in PREROUTING, like an externalIP with
externalTrafficPolicy Cluster: DNAT for a backend on this node (the client address kept, as for
NodePorts), SNAT to the node + DNAT for a backend on another node, and the replies reversed.

The ClusterIP's frontend is the one the pod side uses (scope INTERNAL, kind ClusterIP): its
backends follow internalTrafficPolicy. Maps are filled through MapWriter.apply(LBState) only.
"""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import IP, TCP

from ebpfsvc import abi
from ebpfsvc.lbmodel import Frontend, FrontendKey, FrontendKind, LBState, Protocol, Scope, ServicePortName

from .northsouth import (
    CLIENT, LOCAL_BE, NODE, OK, REDIRECT, REMOTE_BE, SHOT, XDP_PASS, be, ext_frontend, from_client,
    local_tcp_flow, remote_tcp_flow, remote_udp_exchange, to_client, to_node2,
)
from .packets import tcp, udp

pytestmark = pytest.mark.root

VIP = "198.19.0.10"       # a ClusterIP of the lab's service CIDR 198.19.0.0/16


def cluster_ip(port=80, backends=(), proto=Protocol.TCP, name="web", **kw) -> Frontend:
    return Frontend(key=FrontendKey(ipaddress.IPv4Address(VIP), port, proto, Scope.INTERNAL),
                    service=ServicePortName("default", name, "", proto), kind=FrontendKind.CLUSTER_IP,
                    backends=tuple(backends), **kw)


REMOTE = cluster_ip(80, [be(REMOTE_BE)])
LOCAL = cluster_ip(81, [be(LOCAL_BE, local=True)], name="local")
DNS_REMOTE = cluster_ip(53, [be(REMOTE_BE, 5353, Protocol.UDP)], Protocol.UDP, name="dns")
DNS_LOCAL = cluster_ip(54, [be(LOCAL_BE, 5353, Protocol.UDP, local=True)], Protocol.UDP, name="dns-local")
# internalTrafficPolicy Local, the endpoints on other nodes: the desired state leaves no backend
# and marks it local_only (drop, as kube-proxy's internal chain with no local endpoint).
ITP_LOCAL_ELSEWHERE = cluster_ip(82, [], local_only=True, name="itp-local")
EMPTY = cluster_ip(83, [], name="empty")


def test_tcp_to_a_clusterip_remote_backend_is_snated_and_the_reply_reversed(uplink):
    uplink.writer.apply(LBState.of([REMOTE]))
    port = remote_tcp_flow(uplink, VIP, 80)
    uplink.check("the egress program leaves SNATed packets alone", "to_uplink",
                 to_node2(tcp(NODE, REMOTE_BE, port, 8080, "A")), OK)


def test_udp_to_a_clusterip_remote_backend_is_snated_and_the_answer_reversed(uplink):
    uplink.writer.apply(LBState.of([DNS_REMOTE]))
    remote_udp_exchange(uplink, VIP, 53)


def test_tcp_to_a_clusterip_local_backend_keeps_the_client_address(uplink):
    uplink.writer.apply(LBState.of([LOCAL]))
    local_tcp_flow(uplink, VIP, 81)


def test_udp_to_a_clusterip_local_backend_and_its_answer(uplink):
    uplink.writer.apply(LBState.of([DNS_LOCAL]))
    uplink.check("UDP to a ClusterIP, backend on this node: DNAT only", "from_uplink",
                 from_client(udp(CLIENT, VIP, 5000, 54, b"query")), OK,
                 from_client(udp(CLIENT, LOCAL_BE, 5000, 5353, b"query")))
    uplink.check("the answer leaving the uplink comes from ClusterIP:port", "to_uplink",
                 to_client(udp(LOCAL_BE, CLIENT, 5353, 5000, b"answer")), OK,
                 to_client(udp(VIP, CLIENT, 54, 5000, b"answer")))


def test_clusterip_policies_from_off_the_node(uplink):
    uplink.writer.apply(LBState.of([REMOTE, ITP_LOCAL_ELSEWHERE, EMPTY]))
    before = uplink.drops(abi.REASON_NO_LOCAL_BACKEND)
    uplink.check("internalTrafficPolicy Local, endpoints only elsewhere: dropped, as kube-proxy's internal chain",
                 "from_uplink", from_client(tcp(CLIENT, VIP, 40000, 82, "S")), SHOT)
    assert uplink.drops(abi.REASON_NO_LOCAL_BACKEND) == before + 1
    uplink.check("no endpoints at all: RST from ClusterIP:port, back out the uplink", "from_uplink",
                 from_client(tcp(CLIENT, VIP, 40000, 83, "S", seq=5)), REDIRECT,
                 to_client(IP(src=VIP, dst=CLIENT, id=0) / TCP(sport=83, dport=40000, flags="RA", seq=0, ack=6,
                                                               window=0)))
    uplink.check("another port of the ClusterIP: not a Service port, passes untouched", "from_uplink",
                 from_client(tcp(CLIENT, VIP, 40000, 8443, "S")), OK)


def test_an_externalip_internal_entry_is_not_served_as_a_clusterip(uplink):
    """An externalIP's INTERNAL twin (pods' short-circuit) must not make a port the EXTERNAL
    entry does not have reachable from outside: only ClusterIP frontends are looked up there."""
    ext = ext_frontend("198.18.200.32", 80, [be(REMOTE_BE)], kind=FrontendKind.EXTERNAL_IP, name="ext")
    internal_only = Frontend(key=FrontendKey(ipaddress.IPv4Address("198.18.200.32"), 81, Protocol.TCP,
                                             Scope.INTERNAL),
                             service=ServicePortName("default", "ext", "", Protocol.TCP),
                             kind=FrontendKind.EXTERNAL_IP, backends=(be(REMOTE_BE),))
    uplink.writer.apply(LBState.of([ext, internal_only]))
    uplink.check("externalIP port with only an INTERNAL entry: not ours from the uplink", "from_uplink",
                 from_client(tcp(CLIENT, "198.18.200.32", 40000, 81, "S")), OK)


def test_xdp_serves_a_clusterip_as_tc_does(uplink):
    uplink.writer.apply(LBState.of([REMOTE, LOCAL]))
    remote_tcp_flow(uplink, VIP, 80, xdp=True)
    uplink.check_xdp("SYN to a ClusterIP, local backend: DNAT at XDP, passed to the kernel",
                     from_client(tcp(CLIENT, VIP, 40001, 81, "S")), XDP_PASS,
                     from_client(tcp(CLIENT, LOCAL_BE, 40001, 8080, "S")))
