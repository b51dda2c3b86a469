"""The node's own clients to its NodePorts, externalIPs and LoadBalancer IPs: bpf/lib/host.h.

kube-proxy serves these from iptables' OUTPUT chain. Here:

- to the node's own address (NodePorts on it): the kernel sends the packet through `lo`, where
  `from_loopback` runs at egress: DNAT and off to the backend (a pod veth, the uplink), or on
  through lo for a backend on the node's own address. The reply's source becomes the node's
  address again, so it is handed in through lo's ingress (zeroed MACs: lo's own address);
- to an externalIP or LoadBalancer IP the node routes out: `to_uplink` at the uplink's egress
  takes the Service's port only and sends the packet to the backend;
- the INTERNAL frontends of those addresses hold every endpoint, so externalTrafficPolicy Local
  is served from the node by any endpoint (kube-proxy's "route LOCAL traffic to the cluster
  chain"); loadBalancerSourceRanges and session affinity hold; no endpoint: refused at once.

Runs in the `uplink` fixture's namespace (node-1's view of the fabric), which a test gives a
pod veth of its own when it needs a local backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable
from ipaddress import ip_address, ip_network

import pytest
from pyroute2 import IPRoute
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6
from scapy.layers.l2 import Ether

from ebpfsvc import abi
from ebpfsvc.config import NodeConfig
from ebpfsvc.datapath.testrun import prog_test_run
from ebpfsvc.desired import desired_state
from ebpfsvc.datapath import nsenter
from ebpfsvc.lbmodel import Frontend, FrontendKey, FrontendKind, LBState, Protocol, Scope, ServicePortName
from ebpfsvc.sources.base import Event, EventType
from ebpfsvc.tracker import ClusterState

from .northsouth import (
    CLIENT, CLIENT_MAC, EXT_IP, LB_IP, LIMITS, LOCAL_BE, NODE, NODE2_MAC, NODE_MAC, OK, REDIRECT, REMOTE_BE,
    REMOTE_BE2, SHOT, A, be, ext_frontend, from_client, from_node2, pod_veth, snat_port, to_local_pod, to_node2,
)
from .northsouth import EXT_IP6, LB_IP6, LOCAL_BE6, NODE2_6, NODE6, REMOTE_BE6
from .packets import HAIRPIN, VIP, VIP6, expected_backend, frontend, from_pod, tcp, tcp6, udp, udp6
from .packets import be as any_be   # a backend of either family

__all__ = ["pod_veth"]      # a fixture

pytestmark = pytest.mark.root

LO_MAC = "00:00:00:00:00:00"          # lo's address: frames it carries, and frames handed in to it
NODE_PORT = 30080


def on_lo(l3):
    return Ether(src=LO_MAC, dst=LO_MAC) / l3


def out_to_node2(l3):
    """Sent on by the program itself: the node's own packet, TTL untouched."""
    return Ether(src=NODE_MAC, dst=NODE2_MAC) / l3


def leaving_uplink(l3):
    """The node's packet as routed out of the uplink, towards its gateway (the lab's upstream router)."""
    return Ether(src=NODE_MAC, dst=CLIENT_MAC) / l3


def internal(addr, port, backends, kind, proto=Protocol.TCP, name="web", **kw) -> Frontend:
    """An INTERNAL frontend as desired.py emits one for every NodePort address, externalIP and
    LoadBalancer IP: the Service's cluster-wide backends, whatever its traffic policies."""
    return Frontend(key=FrontendKey(ip_address(addr), port, proto, Scope.INTERNAL),
                    service=ServicePortName("default", name, "", proto), kind=kind, backends=tuple(backends), **kw)


def node_port(backends, proto=Protocol.TCP, name="web", **kw) -> Frontend:
    return internal(NODE, NODE_PORT, backends, FrontendKind.NODE_PORT, proto, name, **kw)


@pytest.fixture
def pod_side(uplink, compiled):
    """The pod programs (lb_pod.c) on the same maps, compiled with the node address, as the agent does."""
    return compiled.load(LIMITS, hairpin_addr=HAIRPIN, snat_addr=NODE)


def run_from_pod(dp, packet):
    res = prog_test_run(dp.programs["from_pod"].fd, bytes(packet))
    return res.verdict, res.data


def leave(uplink, desc, packet, verdict, expect=None):
    """Run to_uplink on `packet` as it leaves the uplink (skb->ifindex: eth0, the uplink)."""
    return uplink.check(desc, "to_uplink", packet, verdict, expect, ifindex=uplink.ifindex("eth0"))


def flows(uplink):
    return {k.dir: v for k, v in uplink.dp.maps["ct4"].items()}


@dataclass(frozen=True)
class Family:
    """One IP family's addresses and packets, for the tests that run the same walk on both (the hs4_ and
    hs6_ twins share their decisions, host.h's hs_* helpers)."""
    node: str
    remote_be: str
    local_be: str
    vip: str
    ext_ip: str
    lb_ip: str
    ranges: tuple[str, str]     # a source range without the node address, and one with it
    tcp: Callable
    udp: Callable
    reply_ip: Callable          # (src, dst): the header of an answer we build (RST, port unreachable)
    port_unreachable: Callable  # the answer to a datagram (ICMP / ICMPv6 port unreachable), from its destination
    loopback: str
    other_local: str            # a source other than the node address, to the node address
    ct: str
    # A remote backend's reply to the node's own NodePort, on the uplink, once translated (its source the
    # node's own address again): IPv4 hands it in through lo (a martian elsewhere), IPv6 delivers it where
    # it arrives (no local-source check in IPv6 input). (verdict, the packet out).
    self_reply: Callable


V4 = Family(node=NODE, remote_be=REMOTE_BE, local_be=LOCAL_BE, vip=VIP, ext_ip=EXT_IP, lb_ip=LB_IP,
            ranges=("198.18.100.0/24", "198.18.0.0/24"), tcp=tcp, udp=udp,
            reply_ip=lambda s, d: IP(src=s, dst=d, id=0, ttl=64),
            port_unreachable=lambda q: IP(src=q[IP].dst, dst=q[IP].src, id=0, ttl=64, tos=0xc0) /
            ICMP(type=3, code=3) / bytes(q)[:28],
            loopback="127.0.0.1", other_local=HAIRPIN, ct="ct4",
            self_reply=lambda l3: (REDIRECT, on_lo(l3)))
V6 = Family(node=NODE6, remote_be=REMOTE_BE6, local_be=LOCAL_BE6, vip=VIP6, ext_ip=EXT_IP6, lb_ip=LB_IP6,
            ranges=("2001:2:0:64::/64", "2001:2::/64"), tcp=tcp6, udp=udp6,
            reply_ip=lambda s, d: IPv6(src=s, dst=d, hlim=64),
            port_unreachable=lambda q: IPv6(src=q[IPv6].dst, dst=q[IPv6].src, hlim=64) /
            ICMPv6DestUnreach(code=4) / bytes(q),
            loopback="::1", other_local=NODE2_6, ct="ct6",
            self_reply=lambda l3: (OK, from_node2(l3)))
BOTH = pytest.mark.parametrize("fam", [V4, V6], ids=["ipv4", "ipv6"])


# ---- the node's own NodePort: lo ------------------------------------------------------------------

@BOTH
def test_the_node_reaches_its_own_nodeport_with_a_remote_backend(uplink, fam):
    n, b, t = fam.node, fam.remote_be, fam.tcp
    uplink.writer.apply(LBState.of([internal(n, NODE_PORT, [any_be(b)], FrontendKind.NODE_PORT)]))
    uplink.check("SYN from the node to its own NodePort, on lo: DNAT, straight to node-2", "from_loopback",
                 on_lo(t(n, n, 45100, NODE_PORT, "S")), REDIRECT, out_to_node2(t(n, b, 45100, 8080, "S")))
    uplink.check("SYN-ACK on the uplink: source node:nodePort again (fam.self_reply)", "from_uplink",
                 from_node2(t(b, n, 8080, 45100, "SA", seq=7000, ack=1001)),
                 *fam.self_reply(t(n, n, NODE_PORT, 45100, "SA", seq=7000, ack=1001)))
    uplink.check("the next segment keeps its backend", "from_loopback",
                 on_lo(t(n, n, 45100, NODE_PORT, "A", seq=1001, ack=7001)), REDIRECT,
                 out_to_node2(t(n, b, 45100, 8080, "A", seq=1001, ack=7001)))
    fwd = {k.dir: v for k, v in uplink.dp.maps[fam.ct].items()}[abi.CT_DIR_FORWARD]
    assert fwd.flags & abi.CT_F_ESTABLISHED and not fwd.flags & (abi.CT_F_NODEPORT | abi.CT_F_SNAT)


def test_the_node_reaches_its_own_nodeport_with_a_local_backend(uplink, pod_veth, pod_side):
    uplink.writer.apply(LBState.of([node_port([be(LOCAL_BE, local=True)])]))
    uplink.check("SYN on lo: DNAT, to the pod's veth", "from_loopback",
                 on_lo(tcp(NODE, NODE, 45101, NODE_PORT, "S")), REDIRECT,
                 to_local_pod(tcp(NODE, LOCAL_BE, 45101, 8080, "S")))
    # The pod answers the node address; its veth's from_pod hands the reply in through lo.
    assert run_from_pod(pod_side, from_pod(tcp(LOCAL_BE, NODE, 8080, 45101, "SA"))) == \
        ("TC_ACT_REDIRECT", bytes(on_lo(tcp(NODE, NODE, NODE_PORT, 45101, "SA"))))


@BOTH
def test_a_udp_nodeport_from_the_node(uplink, fam):
    n, b, u = fam.node, fam.remote_be, fam.udp
    uplink.writer.apply(LBState.of([internal(n, NODE_PORT, [any_be(b, 5353, Protocol.UDP)], FrontendKind.NODE_PORT,
                                             Protocol.UDP, "dns")]))
    uplink.check("query", "from_loopback", on_lo(u(n, n, 45102, NODE_PORT, b"q")), REDIRECT,
                 out_to_node2(u(n, b, 45102, 5353, b"q")))
    uplink.check("answer, source node:nodePort", "from_uplink", from_node2(u(b, n, 5353, 45102, b"a")),
                 *fam.self_reply(u(n, n, NODE_PORT, 45102, b"a")))


@BOTH
def test_a_backend_on_the_node_address_is_served_through_lo(uplink, fam):
    """A hostNetwork endpoint of this node (its address is the node's): the packet carries on
    through lo to it, and its reply, on lo too, gets the frontend back. Through a ClusterIP
    (from_host on ebpfsvc0) the packet is handed in through lo, and the reply is the same."""
    n, v, t = fam.node, fam.vip, fam.tcp
    host_be = any_be(n, 10250, local=True)
    uplink.writer.apply(LBState.of([internal(n, NODE_PORT, [host_be], FrontendKind.NODE_PORT),
                                    frontend(v, 80, [host_be], name="host")]))
    uplink.check("NodePort: DNAT to the node's own port, on through lo", "from_loopback",
                 on_lo(t(n, n, 45103, NODE_PORT, "S")), OK, on_lo(t(n, n, 45103, 10250, "S")))
    uplink.check("its reply on lo: the NodePort as source", "from_loopback",
                 on_lo(t(n, n, 10250, 45103, "SA")), OK, on_lo(t(n, n, NODE_PORT, 45103, "SA")))
    dummy = "02:00:00:00:00:99"
    uplink.check("ClusterIP from ebpfsvc0: DNAT, handed in through lo", "from_host",
                 Ether(src=dummy, dst=dummy) / t(n, v, 45104, 80, "S"), REDIRECT, on_lo(t(n, n, 45104, 10250, "S")))
    uplink.check("its reply on lo: the ClusterIP as source", "from_loopback",
                 on_lo(t(n, n, 10250, 45104, "SA")), OK, on_lo(t(v, n, 80, 45104, "SA")))


@BOTH
def test_no_endpoint_is_refused_on_lo(uplink, fam):
    n = fam.node
    uplink.writer.apply(LBState.of([internal(n, NODE_PORT, [], FrontendKind.NODE_PORT),
                                    internal(n, NODE_PORT, [], FrontendKind.NODE_PORT, Protocol.UDP, "dns")]))
    before = uplink.drops(abi.REASON_NO_BACKEND)
    uplink.check("SYN: the RST from node:nodePort carries on through lo to the client", "from_loopback",
                 on_lo(fam.tcp(n, n, 45105, NODE_PORT, "S", seq=1000)), OK,
                 on_lo(fam.reply_ip(n, n) / TCP(sport=NODE_PORT, dport=45105, flags="RA", seq=0, ack=1001, window=0)))
    query = fam.udp(n, n, 45106, NODE_PORT, b"q")
    uplink.check("UDP: port unreachable from node:nodePort", "from_loopback", on_lo(query), OK,
                 on_lo(fam.port_unreachable(query)))
    assert uplink.drops(abi.REASON_NO_BACKEND) == before + 2


@BOTH
def test_lo_passes_everything_else(uplink, fam):
    n, t = fam.node, fam.tcp
    uplink.writer.apply(LBState.of([internal(n, NODE_PORT, [any_be(fam.remote_be)], FrontendKind.NODE_PORT)]))
    for desc, packet in [
        ("loopback addresses", t(fam.loopback, fam.loopback, 45107, NODE_PORT, "S")),
        ("another port of the node address", t(n, n, 45107, 22, "S")),
        ("the NodePort's port for another protocol", fam.udp(n, n, 45107, NODE_PORT)),
        ("the NodePort from another local source", t(fam.other_local, n, 45107, NODE_PORT, "S")),
        ("an answer of the node's own server", t(n, n, 22, 45107, "SA")),
    ]:
        uplink.check(desc, "from_loopback", on_lo(packet), OK)
    assert not list(uplink.dp.maps[fam.ct].items())


# ---- Service semantics from the node ------------------------------------------------------------

def _snapshot(*docs):
    state = ClusterState(NodeConfig("any"))
    for doc in docs:
        state.on_event(Event(doc["kind"], EventType.ADDED, doc))
    assert state.problems == []
    return state.snapshot()


LOCAL_POLICY = [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
     "spec": {"type": "NodePort", "clusterIP": VIP, "externalTrafficPolicy": "Local",
              "ports": [{"port": 80, "targetPort": 8080, "nodePort": NODE_PORT}]}},
    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
     "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
     "addressType": "IPv4", "ports": [{"name": "", "protocol": "TCP", "port": 8080}],
     "endpoints": [{"addresses": [REMOTE_BE], "conditions": {"ready": True}, "nodeName": "node-2"}]},
]


def test_local_policy_nodeport_from_the_node_is_served_by_any_endpoint(uplink):
    """externalTrafficPolicy Local, the only endpoint on node-2, the state from the real control
    plane (desired_state): an external client through node-1 is dropped, node-1 itself is served
    by node-2's endpoint, as kube-proxy routes node-originated traffic to the cluster chain."""
    state = desired_state(_snapshot(*LOCAL_POLICY), NodeConfig("node-1", node_addresses=(A(NODE),)))
    uplink.writer.apply(state)
    uplink.check("an external client through node-1: no local endpoint, dropped", "from_uplink",
                 from_client(tcp(CLIENT, NODE, 40000, NODE_PORT, "S")), SHOT)
    uplink.check("node-1 itself: served by the endpoint on node-2", "from_loopback",
                 on_lo(tcp(NODE, NODE, 45108, NODE_PORT, "S")), REDIRECT,
                 out_to_node2(tcp(NODE, REMOTE_BE, 45108, 8080, "S")))


def test_session_affinity_holds_for_the_node(uplink):
    sticky = node_port([be(REMOTE_BE), be(REMOTE_BE2)], affinity_timeout=10800)
    uplink.writer.apply(LBState.of([sticky]))
    first = expected_backend(sticky, NODE, 45110)
    other = next(p for p in range(45111, 46000) if expected_backend(sticky, NODE, p) != first)
    for sport in (45110, other):
        uplink.check(f"from port {sport}: the first flow's backend", "from_loopback",
                     on_lo(tcp(NODE, NODE, sport, NODE_PORT, "S")), REDIRECT,
                     out_to_node2(tcp(NODE, first, sport, 8080, "S")))


def test_a_snated_flow_never_takes_a_node_clients_tuple(uplink):
    """The node's own connection through its NodePort runs NODE:45200 -> REMOTE_BE:8080 on the
    wire; an external client from port 45200 through the same NodePort, SNATed to the node, would
    keep its port and share that tuple: it gets a port of the SNAT range instead."""
    uplink.writer.apply(LBState.of([node_port([be(REMOTE_BE)]), ext_frontend(NODE, NODE_PORT, [be(REMOTE_BE)])]))
    uplink.check("the node's own SYN", "from_loopback", on_lo(tcp(NODE, NODE, 45200, NODE_PORT, "S")), REDIRECT,
                 out_to_node2(tcp(NODE, REMOTE_BE, 45200, 8080, "S")))
    port = snat_port(CLIENT, NODE, 45200, NODE_PORT, probe=0)
    uplink.check("an external client from the same port: a range port", "from_uplink",
                 from_client(tcp(CLIENT, NODE, 45200, NODE_PORT, "S")), REDIRECT,
                 to_node2(tcp(NODE, REMOTE_BE, port, 8080, "S")))


# ---- externalIPs and LoadBalancer IPs the node routes out: the uplink's egress ----------------------

@BOTH
def test_an_external_ip_from_the_node_is_served_on_its_port_only(uplink, fam):
    n, x, b, t = fam.node, fam.ext_ip, fam.remote_be, fam.tcp
    uplink.writer.apply(LBState.of([internal(x, 80, [any_be(b)], FrontendKind.EXTERNAL_IP)]))
    leave(uplink, "SYN to the externalIP leaving the uplink: DNAT, on to node-2 from here",
          leaving_uplink(t(n, x, 45120, 80, "S")), OK, out_to_node2(t(n, b, 45120, 8080, "S")))
    uplink.check("SYN-ACK: the externalIP as source, for the node's socket", "from_uplink",
                 from_node2(t(b, n, 8080, 45120, "SA")), OK, from_node2(t(x, n, 80, 45120, "SA")))
    leave(uplink, "another port of the same address (a real host's, maybe) goes on untouched",
          leaving_uplink(t(n, x, 45121, 22, "S")), OK)
    leave(uplink, "a pod's packet to it, forwarded out of the uplink, is not the node's",
          leaving_uplink(t(fam.local_be, x, 45122, 80, "S")), OK)


@BOTH
def test_without_host_clients_the_nodes_own_packet_to_an_external_ip_leaves_untouched(uplink, fam):
    """--no-host-clients (no LB_CFG_HOST_CLIENTS in lb_agent_config, which the programs read): to_uplink
    leaves the node's own packets to externalIPs alone, and translates them again once the default
    is published back, with the same programs."""
    from ebpfsvc.datapath import loader

    n, x, b, t = fam.node, fam.ext_ip, fam.remote_be, fam.tcp
    uplink.writer.apply(LBState.of([internal(x, 80, [any_be(b)], FrontendKind.EXTERNAL_IP)]))
    loader.publish_options(uplink.dp.maps, host_clients=False)
    leave(uplink, "SYN to the externalIP leaving the uplink: untouched", leaving_uplink(t(n, x, 45130, 80, "S")), OK)
    assert not uplink.dp.maps[fam.ct].items(), "no flow tracked"
    loader.publish_options(uplink.dp.maps, host_clients=True)
    leave(uplink, "the same SYN with node clients on: DNAT, on to node-2 from here",
          leaving_uplink(t(n, x, 45130, 80, "S")), OK, out_to_node2(t(n, b, 45130, 8080, "S")))


def test_a_load_balancer_ip_from_the_node_reaches_a_local_backend(uplink, pod_veth, pod_side):
    uplink.writer.apply(LBState.of([internal(LB_IP, 3000, [be(LOCAL_BE, local=True)], FrontendKind.LOAD_BALANCER)]))
    leave(uplink, "SYN to the LB IP: DNAT, to the pod's veth",
          leaving_uplink(tcp(NODE, LB_IP, 45123, 3000, "S")), REDIRECT,
          to_local_pod(tcp(NODE, LOCAL_BE, 45123, 8080, "S")))
    assert run_from_pod(pod_side, from_pod(tcp(LOCAL_BE, NODE, 8080, 45123, "SA"))) == \
        ("TC_ACT_OK", bytes(from_pod(tcp(LB_IP, NODE, 3000, 45123, "SA"))))


@BOTH
def test_load_balancer_source_ranges_hold_for_the_node(uplink, fam):
    n, lb_ip, t = fam.node, fam.lb_ip, fam.tcp
    elsewhere, node_net = fam.ranges

    def lb(ranges):
        return internal(lb_ip, 3000, [any_be(fam.remote_be)], FrontendKind.LOAD_BALANCER,
                        source_ranges=tuple(ip_network(r) for r in ranges))

    uplink.writer.apply(LBState.of([lb([elsewhere])]))
    before = uplink.drops(abi.REASON_SOURCE_RANGE)
    leave(uplink, "the node address is in no range: dropped", leaving_uplink(t(n, lb_ip, 45124, 3000, "S")), SHOT)
    assert uplink.drops(abi.REASON_SOURCE_RANGE) == before + 1
    uplink.writer.apply(LBState.of([lb([elsewhere, node_net])]))
    leave(uplink, "a range holds the node address: served",
          leaving_uplink(t(n, lb_ip, 45125, 3000, "S")), OK, out_to_node2(t(n, fam.remote_be, 45125, 8080, "S")))


@BOTH
def test_no_endpoint_behind_an_external_ip_is_refused_into_the_host(uplink, fam):
    n, x = fam.node, fam.ext_ip
    uplink.writer.apply(LBState.of([internal(x, 80, [], FrontendKind.EXTERNAL_IP)]))
    leave(uplink, "SYN: RST from the externalIP, back in through the uplink (addressed to it)",
          leaving_uplink(fam.tcp(n, x, 45126, 80, "S", seq=1000)), REDIRECT,
          Ether(src=CLIENT_MAC, dst=NODE_MAC) / fam.reply_ip(x, n) /
          TCP(sport=80, dport=45126, flags="RA", seq=0, ack=1001, window=0))


# ---- a removed backend ---------------------------------------------------------------------------

@BOTH
def test_a_removed_backend_resets_the_nodes_tcp_flow_and_rebalances_udp(uplink, fam):
    n, b, t, u = fam.node, fam.remote_be, fam.tcp, fam.udp
    other = {V4.remote_be: REMOTE_BE2, V6.remote_be: "2001:2:0:2::3"}[b]

    def node_ports(backend):
        return LBState.of([internal(n, NODE_PORT, [any_be(backend)], FrontendKind.NODE_PORT),
                           internal(n, NODE_PORT, [any_be(backend, 5353, Protocol.UDP)], FrontendKind.NODE_PORT,
                                    Protocol.UDP, "dns")])

    uplink.writer.apply(node_ports(b))
    uplink.check("SYN", "from_loopback", on_lo(t(n, n, 45130, NODE_PORT, "S")), REDIRECT,
                 out_to_node2(t(n, b, 45130, 8080, "S")))
    uplink.check("query", "from_loopback", on_lo(u(n, n, 45131, NODE_PORT, b"q")), REDIRECT,
                 out_to_node2(u(n, b, 45131, 5353, b"q")))
    uplink.writer.apply(node_ports(other))
    uplink.check("TCP: the RST from node:nodePort, on through lo", "from_loopback",
                 on_lo(t(n, n, 45130, NODE_PORT, "A", seq=1001, ack=7001)), OK,
                 on_lo(fam.reply_ip(n, n) / TCP(sport=NODE_PORT, dport=45130, flags="R", seq=7001, ack=0, window=0)))
    uplink.check("UDP: balanced again, to the backend left", "from_loopback",
                 on_lo(u(n, n, 45131, NODE_PORT, b"q")), REDIRECT, out_to_node2(u(n, other, 45131, 5353, b"q")))


# ---- the agent's side: attach, and `ebpfsvc cleanup` -------------------------------------------------

def test_setup_attaches_to_lo_and_cleanup_removes_everything(uplink, pin_dir):
    """hostpath.setup: from_host on ebpfsvc0, from_loopback on lo's egress, accept_local on lo (set
    through netlink); `ebpfsvc cleanup` removes the filter, lo's clsact, the device, and sets
    accept_local back to 0."""
    from pathlib import Path

    from ebpfsvc.datapath import hostpath, tc
    from ebpfsvc.datapath.cleanup import cleanup

    ns = uplink.netns
    lo = uplink.ifindex("lo")
    accept_local = lambda: nsenter.run_in(ns, Path("/proc/sys/net/ipv4/conf/lo/accept_local").read_text).strip()  # noqa: E731
    hostpath.setup(uplink.dp, A(NODE), netns=ns)
    hostpath.setup(uplink.dp, A(NODE), netns=ns)                 # again: replaced in place
    assert [(f.direction, f.name) for f in tc.list_filters(lo, netns=ns)] == [(tc.EGRESS, "from_loopback")]
    assert accept_local() == "1"

    report = cleanup(pin_dir, netns=ns)
    assert any(line.startswith("tc program lo egress from_loopback") for line in report.filters), report.filters
    assert any(hostpath.LO_SYSCTL in line for line in report.filters), report.filters
    assert tc.list_filters(lo, netns=ns) == [] and accept_local() == "0"

    def links_and_lo_qdiscs():
        with IPRoute() as ipr:
            return ({link.get_attr("IFLA_IFNAME") for link in ipr.get_links()},
                    [q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index=lo)])

    names, qdiscs = nsenter.run_in(ns, links_and_lo_qdiscs)
    assert hostpath.DEVICE not in names and "clsact" not in qdiscs
