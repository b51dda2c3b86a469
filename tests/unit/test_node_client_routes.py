"""hostpath.NodeClientRoutes on a dual-stack node: the node-client device is routed for IPv4
ClusterIPs only, and an IPv6 frontend changes nothing, whether the state comes whole or as a delta."""

from ipaddress import IPv4Network, ip_address

from ebpfsvc.datapath.hostpath import NodeClientRoutes
from ebpfsvc.desired import LBDelta
from ebpfsvc.lbmodel import Frontend, FrontendKey, FrontendKind, LBState, ServicePortName


def cluster_ip(address: str, name: str) -> Frontend:
    return Frontend(FrontendKey(ip_address(address), 80), ServicePortName("default", name), FrontendKind.CLUSTER_IP)


def test_ipv6_cluster_ips_are_not_routed_whole_or_by_delta():
    v4, v6 = cluster_ip("198.19.0.10", "web"), cluster_ip("2001:2:0:ff::10", "web")
    routes = NodeClientRoutes()
    first = LBState.of([v4, v6])
    routes.update(first)
    assert routes.take_wanted() == {IPv4Network("198.19.0.10/32")}

    more = cluster_ip("2001:2:0:ff::11", "web6")
    second = LBState({**first.frontends, more.key: more})
    routes.update(second, LBDelta(first, frozenset({more.key})))
    assert not routes.dirty, "an IPv6 ClusterIP added: nothing to route"

    third = LBState({k: fe for k, fe in second.frontends.items() if k != v4.key})
    routes.update(third, LBDelta(second, frozenset({v4.key})))
    assert routes.dirty and routes.take_wanted() == set()
