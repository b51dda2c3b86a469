"""IPv6 Services with real sockets and the kernel's own packets (neighbour discovery, offloaded
checksums: CHECKSUM_PARTIAL segments, which BPF_PROG_TEST_RUN never makes), through from_pod and
to_pod attached to pod veths as the agent attaches them:

    node namespace  <prefix>-n6: the pods' veths' host sides (h-cli, h-b1, h-b2), each with the
                    link-local gateway fe80::1, a /128 route per pod, IPv6 forwarding on
    pods            <prefix>-c6 (client 2001:2:0:1::5), <prefix>-b61 / -b62 (backends
                    2001:2:0:2::1 / ::2), default route via fe80::1

The maps are filled only through the real MapWriter; everything is in the test's namespaces and
removed afterwards, also on failure. (The lab goes dual-stack on its own branch; this is the
datapath's own proof with real traffic.)
"""

from __future__ import annotations

import socket

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as netns_mod

from ebpfsvc.datapath import loader, nsenter, stats, tc
from ebpfsvc.datapath.writer import MapWriter
from ebpfsvc.lbmodel import Protocol

from .conftest import TEST_LIMITS
from .packets import HAIRPIN, be6, frontend6, state
from .podservers import Servers

pytestmark = pytest.mark.root

VIP6, EMPTY6 = "2001:2:0:ff::10", "2001:2:0:ff::11"
HAIRPIN6 = "2001:2::1"          # the node's IPv6 address (on its lo here): the hairpin source
CLIENT6, B1, B2 = "2001:2:0:1::5", "2001:2:0:2::1", "2001:2:0:2::2"
GATEWAY = "fe80::1"
NAMES = {B1: "b1", B2: "b2"}
_NO_DAD = {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0}


@pytest.fixture
def pods6(unique_prefix, compiled):
    node = f"{unique_prefix}-n6"
    pods = {CLIENT6: (f"{unique_prefix}-c6", "h-cli"), B1: (f"{unique_prefix}-b61", "h-b1"),
            B2: (f"{unique_prefix}-b62", "h-b2")}
    made: list[str] = []
    servers = None
    dp = None
    try:
        for ns in [node] + [ns for ns, _ in pods.values()]:
            netns_mod.create(ns)
            made.append(ns)
            nsenter.write_sysctls(ns, {**_NO_DAD, **({"net.ipv6.conf.all.forwarding": 1} if ns == node else {})})
        # The run's programs (tests/bpf/conftest.py) on maps of these tests' own, emptied per test.
        dp = compiled.load(TEST_LIMITS, maps="ipv6-traffic", hairpin_addr=HAIRPIN, hairpin6=HAIRPIN6)
        with IPRoute(netns=node) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            ipr.addr("add", index=lo, address=HAIRPIN6, prefixlen=128)
            for addr, (ns, host) in pods.items():
                ipr.link("add", ifname=host, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
                idx = ipr.link_lookup(ifname=host)[0]
                ipr.addr("add", index=idx, address=GATEWAY, prefixlen=64)
                ipr.link("set", index=idx, state="up")
                ipr.route("add", dst=f"{addr}/128", oif=idx)
                tc.attach(idx, dp.programs["from_pod"].fd, "from_pod", tc.INGRESS, netns=node)
                tc.attach(idx, dp.programs["to_pod"].fd, "to_pod", tc.EGRESS, netns=node)
        for addr, (ns, _) in pods.items():
            with IPRoute(netns=ns) as ipr:
                idx = ipr.link_lookup(ifname="eth0")[0]
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                ipr.addr("add", index=idx, address=addr, prefixlen=128)
                ipr.link("set", index=idx, state="up")
                ipr.route("add", dst="::/0", gateway=GATEWAY, oif=idx)
        servers = Servers({B1: pods[B1][0], B2: pods[B2][0]}, NAMES, repeat=2000)
        yield dp, pods[CLIENT6][0]
    finally:
        if servers:
            servers.close()
        for ns in made:
            netns_mod.remove(ns)


def _tcp_get(ns: str, addr: str, port: int) -> bytes:
    s = nsenter.socket_in(ns, socket.AF_INET6, socket.SOCK_STREAM)
    with s:
        s.settimeout(5)
        s.connect((addr, port))
        assert s.getpeername()[:2] == (addr, port)
        s.sendall(b"GET")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _udp_ask(ns: str, addr: str, port: int) -> tuple[bytes, str]:
    s = nsenter.socket_in(ns, socket.AF_INET6, socket.SOCK_DGRAM)
    with s:
        s.settimeout(5)
        s.connect((addr, port))
        s.send(b"?")
        data, src = s.recvfrom(64)
        return data, src[0]


def test_ipv6_clusterip_serves_real_tcp_and_udp_and_refuses_when_empty(pods6):
    dp, client_ns = pods6
    web = frontend6(VIP6, 80, [be6(B1), be6(B2)], name="web6")
    dns = frontend6(VIP6, 53, [be6(B1, 5353, Protocol.UDP), be6(B2, 5353, Protocol.UDP)],
                    proto=Protocol.UDP, name="dns6")
    empty_tcp = frontend6(EMPTY6, 80, [], name="empty6")
    empty_udp = frontend6(EMPTY6, 53, [], proto=Protocol.UDP, name="empty6-dns")
    MapWriter(dp.maps).apply(state(web, dns, empty_tcp, empty_udp))

    seen = set()
    for _ in range(12):
        body = _tcp_get(client_ns, VIP6, 80)
        name = body[:2].decode()
        assert name in ("b1", "b2") and body == name.encode() * 2000, "the whole answer, from one backend"
        seen.add(name)
    assert seen == {"b1", "b2"}, "Maglev spreads twelve connections over both backends"

    data, src = _udp_ask(client_ns, VIP6, 53)
    assert data in (b"b1", b"b2") and src == VIP6, "the answer comes from the Service"

    with pytest.raises(ConnectionRefusedError):
        _tcp_get(client_ns, EMPTY6, 80)                 # the datapath's RST
    with pytest.raises(ConnectionRefusedError):
        _udp_ask(client_ns, EMPTY6, 53)                 # ICMPv6 port unreachable, as the kernel reads it
    assert stats.drops(dp.maps)["no_backend"] == 2
    assert stats.drops(dp.maps)["malformed"] == 0


def test_ipv6_hairpin_a_pod_reaches_itself_through_its_service(pods6):
    """b1, the only backend of a Service, connects to the Service's IPv6 clusterIP from its own
    namespace: the answer comes back whole (without hairpin SNAT b1 would answer itself from its
    own address and its socket, connected to the clusterIP, would drop it), and the flow's reply
    entry is addressed to the node's IPv6 hairpin address."""
    from ebpfsvc import abi

    dp, _ = pods6
    MapWriter(dp.maps).apply(state(frontend6(VIP6, 80, [be6(B1)], name="self6"),
                                   frontend6(VIP6, 53, [be6(B1, 5353, Protocol.UDP)], proto=Protocol.UDP,
                                             name="self6-dns")))
    b1_ns = f"{pods6[1].rsplit('-', 1)[0]}-b61"
    for _ in range(3):
        assert _tcp_get(b1_ns, VIP6, 80) == b"b1" * 2000
    data, src = _udp_ask(b1_ns, VIP6, 53)
    assert (data, src) == (b"b1", VIP6)
    replies = {abi.ip_of_be128(k.daddr) for k in dp.maps["ct6"].keys() if k.dir == abi.CT_DIR_REPLY}
    assert replies == {HAIRPIN6}
    assert stats.drops(dp.maps)["malformed"] == 0


def test_ipv6_node_client_reaches_a_clusterip_with_real_sockets(pods6, compiled):
    """A process in the node's own namespace connects to an IPv6 clusterIP (TCP and UDP): the agent's
    node-client path as hostpath sets it up (ebpfsvc0 routed for the clusterIP from the node's IPv6
    address, lb_node.c's from_host at its egress); the backends are the local pods, whose replies
    to the node address get the clusterIP back on their veths (from_pod)."""
    from ipaddress import IPv6Address, IPv6Network

    from ebpfsvc.datapath import hostpath

    dp, client_ns = pods6
    node = client_ns.rsplit("-", 1)[0] + "-n6"
    # lb_node.c as uplink.load compiles it, on the pods' maps; the node's IPv6 address is its SNAT one.
    node_dp = compiled.load(TEST_LIMITS, maps="ipv6-traffic", source=loader.NODE_SOURCE,
                            programs=loader.NODE_PROGRAMS, hairpin_addr=HAIRPIN, hairpin6=HAIRPIN6, snat6=HAIRPIN6)
    hostpath.setup(node_dp, IPv6Address(HAIRPIN6), netns=node)
    routed = hostpath.sync_routes(set(), {IPv6Network(f"{VIP6}/128")}, (None, IPv6Address(HAIRPIN6)), node)
    assert routed == {IPv6Network(f"{VIP6}/128")}
    MapWriter(dp.maps).apply(state(frontend6(VIP6, 80, [be6(B1), be6(B2)], name="web6"),
                                   frontend6(VIP6, 53, [be6(B1, 5353, Protocol.UDP)], proto=Protocol.UDP,
                                             name="dns6")))
    seen = set()
    for _ in range(12):
        body = _tcp_get(node, VIP6, 80)
        seen.add(body[:2].decode())
        assert body == body[:2] * 2000
    assert seen == {"b1", "b2"}
    assert _udp_ask(node, VIP6, 53) == (b"b1", VIP6)
    assert stats.drops(dp.maps)["malformed"] == 0 and stats.drops(dp.maps)["fib_lookup"] == 0
