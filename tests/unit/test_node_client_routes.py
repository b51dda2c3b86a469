"""hostpath.NodeClientRoutes on a dual-stack node: the node-client device is routed for the ClusterIPs
of both families (a /32 or /128 each outside the service CIDRs), whether the state comes whole or as
a delta; the CIDRs of both families cover their ClusterIPs."""

from ipaddress import IPv4Network, IPv6Network, ip_address

from ebpfsvc.datapath.hostpath import NodeClientRoutes
from ebpfsvc.desired import LBDelta
from ebpfsvc.lbmodel import Frontend, FrontendKey, FrontendKind, LBState, ServicePortName


def cluster_ip(address: str, name: str) -> Frontend:
    return Frontend(FrontendKey(ip_address(address), 80), ServicePortName("default", name), FrontendKind.CLUSTER_IP)


def test_cluster_ips_of_both_families_are_routed_whole_or_by_delta():
    v4, v6 = cluster_ip("198.19.0.10", "web"), cluster_ip("2001:2:0:ff::10", "web")
    routes = NodeClientRoutes()
    first = LBState.of([v4, v6])
    routes.update(first)
    assert routes.take_wanted() == {IPv4Network("198.19.0.10/32"), IPv6Network("2001:2:0:ff::10/128")}

    more = cluster_ip("2001:2:0:ff::11", "web6")
    second = LBState({**first.frontends, more.key: more})
    routes.update(second, LBDelta(first, frozenset({more.key})))
    assert routes.dirty and IPv6Network("2001:2:0:ff::11/128") in routes.take_wanted()

    third = LBState({k: fe for k, fe in second.frontends.items() if k != v4.key})
    routes.update(third, LBDelta(second, frozenset({v4.key})))
    assert routes.dirty and routes.take_wanted() == {IPv6Network("2001:2:0:ff::10/128"),
                                                      IPv6Network("2001:2:0:ff::11/128")}


def test_service_cidrs_of_both_families_cover_their_cluster_ips():
    routes = NodeClientRoutes()
    routes.set_cidrs([IPv6Network("2001:2:0:ff::/108"), IPv4Network("198.19.0.0/16")])
    routes.update(LBState.of([cluster_ip("198.19.0.10", "web"), cluster_ip("2001:2:0:ff::10", "web"),
                              cluster_ip("2001:2:0:ee::1", "other")]))
    assert routes.take_wanted() == {IPv4Network("198.19.0.0/16"), IPv6Network("2001:2:0:ff::/108"),
                                    IPv6Network("2001:2:0:ee::1/128")}
