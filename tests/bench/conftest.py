"""A three-namespace topology of the benchmark tests' own: client -- router -- server.

    client ns            router ns                         server ns
    eth0 198.18.1.2 ---- c0 198.18.1.1   s0 198.18.2.1 ---- eth0 198.18.2.11, .12, .13
    default via .1.1     ip_forward=1, baselines loaded here   default via .2.1
                         up0 198.18.3.1 (veth to nobody), default via .3.2

The router stands in for a node running kube-proxy: a packet from the client to a
ClusterIP (198.19.0.0/16, routed nowhere) is DNATed in its PREROUTING to one of
the three server addresses, which stand in for three pods.  Everything is made
with pyroute2 inside the new namespaces; nothing touches the root namespace.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest
from pyroute2 import NetNS, netns

from ebpfsvc.datapath import nsenter

BACKENDS = ("198.18.2.11", "198.18.2.12", "198.18.2.13")
CLIENT = "198.18.1.2"
ECHO_PORT = 8080
IPERF_PORT = 5201

_SYSCTLS = {"net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0}


@dataclass(frozen=True)
class Topology:
    client: str
    router: str
    server: str
    backends: tuple[str, ...] = BACKENDS


def _link_up(ns: NetNS, name: str, addresses: list[str], prefixlen: int = 24) -> None:
    idx = ns.link_lookup(ifname=name)[0]
    for address in addresses:
        ns.addr("add", index=idx, address=address, prefixlen=prefixlen)
    ns.link("set", index=idx, state="up")


def _build(t: Topology) -> None:
    for name in (t.client, t.router, t.server):
        netns.create(name)
        nsenter.write_sysctls(name, dict(_SYSCTLS))
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    nsenter.write_sysctls(t.router, {"net.ipv4.ip_forward": 1})
    with NetNS(t.client) as ns:
        ns.link("add", ifname="eth0", kind="veth", peer={"ifname": "c0", "net_ns_fd": t.router})
        _link_up(ns, "eth0", [CLIENT])
        ns.route("add", dst="default", gateway="198.18.1.1")
    with NetNS(t.server) as ns:
        ns.link("add", ifname="eth0", kind="veth", peer={"ifname": "s0", "net_ns_fd": t.router})
        _link_up(ns, "eth0", list(t.backends))
        ns.route("add", dst="default", gateway="198.18.2.1")
    with NetNS(t.router) as ns:
        _link_up(ns, "c0", ["198.18.1.1"])
        _link_up(ns, "s0", ["198.18.2.1"])
        # A node routes everything it has no better route for to its upstream,
        # ClusterIPs included: so a packet to a service without endpoints is
        # routed, reaches the FORWARD hook and is rejected there, as on a node.
        # Here the upstream is a veth whose peer, in the same namespace, has no
        # address: nobody answers behind it.
        ns.link("add", ifname="up0", kind="veth", peer={"ifname": "up1"})
        _link_up(ns, "up0", ["198.18.3.1"])
        _link_up(ns, "up1", [])
        ns.route("add", dst="default", gateway="198.18.3.2")
    for address in (CLIENT, *t.backends):
        assert ipaddress.IPv4Address(address) in ipaddress.IPv4Network("198.18.0.0/15")


@pytest.fixture
def topology(unique_prefix):
    t = Topology(client=f"{unique_prefix}c", router=f"{unique_prefix}r", server=f"{unique_prefix}s")
    try:
        _build(t)
        yield t
    finally:
        # Servers are stopped by their own fixtures / context managers first;
        # the veths go with their namespaces.
        for name in (t.client, t.router, t.server):
            if nsenter.exists(name):
                netns.remove(name)
