"""Dual-stack Services in desired_state() (issue 14): one frontend set per family, each with its own family's
endpoints, node addresses, externalIPs, load balancer addresses and source ranges.

Objects go through ClusterState (validation included) as the agent's do; results are written as tables:

    "<address>:<port>/<protocol> <scope>": ["<backend name>", ...]
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_address

from ebpfsvc.config import NodeConfig
from ebpfsvc.desired import DesiredStateBuilder, build_desired_state
from ebpfsvc.k8s.endpointmerge import merge_endpoint_slices
from ebpfsvc.k8s.endpointslice import parse_endpoint_slice
from ebpfsvc.lbmodel import FrontendKind, LBState, Scope
from ebpfsvc.sources.base import Event, EventType
from ebpfsvc.tracker import ClusterState

V4_NODE = "198.18.0.11"
V6_NODE = "2001:2:0:0::11"
DUAL = NodeConfig("node-1", node_addresses=(V4_NODE, V6_NODE), ip_families=("IPv4", "IPv6"))
V4_ONLY = NodeConfig("node-1", node_addresses=(V4_NODE,))
V6_ONLY = NodeConfig("node-1", node_addresses=(V4_NODE, V6_NODE), ip_families=("IPv6",))
V6_CIP = "2001:2:0:ff::20"


def service(name="web", *, policy=None, families=None, cluster_ips=("198.19.1.20",), node_port=None,
            external_ips=(), ingress=(), source_ranges=(), created=None) -> dict:
    port = {"name": "http", "port": 80, "targetPort": 8080}
    spec = {"clusterIP": cluster_ips[0], "clusterIPs": list(cluster_ips), "ports": [port],
            "externalIPs": list(external_ips), "loadBalancerSourceRanges": list(source_ranges)}
    if policy:
        spec["ipFamilyPolicy"] = policy
    if families:
        spec["ipFamilies"] = list(families)
    if node_port:
        spec["type"], port["nodePort"] = "NodePort", node_port
    if ingress:
        spec["type"], port["nodePort"] = "LoadBalancer", node_port or 30090
    meta = {"name": name, "namespace": "default"}
    if created:
        meta["creationTimestamp"] = created
    obj = {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}
    if ingress:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in ingress]}}
    return obj


def endpoint_slice(service_name, address_type, *addresses, name=None, node="node-2") -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{service_name}-{address_type.lower()}", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": address_type, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "nodeName": node} for a in addresses]}


def state_of(node: NodeConfig, *objs) -> ClusterState:
    state = ClusterState(node)
    for obj in objs:
        state.on_event(Event(obj["kind"], EventType.ADDED, obj))
    return state


def build(node: NodeConfig, *objs):
    state = state_of(node, *objs)
    assert [str(p) for p in state.problems] == []
    return build_desired_state(state.snapshot(), node)


def table(lb: LBState) -> dict[str, list[str]]:
    return {f"{k.address}:{k.port}/{k.protocol.value} {k.scope.name.lower()}": [b.name for b in fe.backends]
            for k, fe in sorted(lb.frontends.items(), key=lambda kv: (kv[0].address.version, kv[0]))}


V4_EPS = ["198.18.2.10:8080/TCP", "198.18.2.11:8080/TCP"]
V6_EPS = ["[2001:2:0:2::10]:8080/TCP", "[2001:2:0:2::11]:8080/TCP"]
SLICES = (endpoint_slice("web", "IPv4", "198.18.2.10", "198.18.2.11"),
          endpoint_slice("web", "IPv6", "2001:2:0:2::10", "2001:2:0:2::11"))


def test_require_dual_stack_each_family_takes_its_own_endpoints_and_node_addresses():
    svc = service(policy="RequireDualStack", cluster_ips=("198.19.1.20", V6_CIP), node_port=30080)
    assert table(build(DUAL, svc, *SLICES).state) == {
        "198.18.0.11:30080/TCP external": V4_EPS,
        "198.18.0.11:30080/TCP internal": V4_EPS,
        "198.19.1.20:80/TCP internal": V4_EPS,
        "2001:2::11:30080/TCP external": V6_EPS,
        "2001:2::11:30080/TCP internal": V6_EPS,
        f"{V6_CIP}:80/TCP internal": V6_EPS,
    }


def test_prefer_dual_stack_with_only_ipv4_endpoints_rejects_on_its_ipv6_clusterip():
    # KEP-563 / kube-proxy: the families are separate proxies; no IPv6 endpoint means the IPv6
    # clusterIP has nothing to forward to (an empty frontend rejects), the IPv4 one is unaffected.
    svc = service(policy="PreferDualStack", families=("IPv4", "IPv6"), cluster_ips=("198.19.1.20", V6_CIP))
    assert table(build(DUAL, svc, SLICES[0]).state) == {
        "198.19.1.20:80/TCP internal": V4_EPS,
        f"{V6_CIP}:80/TCP internal": [],
    }


def test_prefer_dual_stack_in_a_single_stack_cluster_is_its_one_family():
    svc = service(policy="PreferDualStack", families=("IPv4", "IPv6"))
    assert table(build(V4_ONLY, svc, *SLICES).state) == {"198.19.1.20:80/TCP internal": V4_EPS}


def test_single_stack_ipv6_on_an_ipv6_node():
    # The node's IPv4 address is not a NodePort address of an IPv6-only cluster; IPv4 slices of a
    # single-stack IPv6 Service (there are none in practice) would not be used.
    svc = service(cluster_ips=(V6_CIP,), node_port=30081)
    state = build(V6_ONLY, svc, *SLICES).state
    assert table(state) == {
        "2001:2::11:30081/TCP external": V6_EPS,
        "2001:2::11:30081/TCP internal": V6_EPS,
        f"{V6_CIP}:80/TCP internal": V6_EPS,
    }
    assert {fe.kind for fe in state.frontends.values()} == {FrontendKind.CLUSTER_IP, FrontendKind.NODE_PORT}


def test_an_ipv4_service_on_a_dual_stack_node_is_served_as_before():
    svc = service(node_port=30082)
    assert table(build(DUAL, svc, *SLICES).state) == {
        "198.18.0.11:30082/TCP external": V4_EPS,
        "198.18.0.11:30082/TCP internal": V4_EPS,
        "198.19.1.20:80/TCP internal": V4_EPS,
    }


def test_external_and_load_balancer_addresses_and_source_ranges_go_by_family():
    svc = service(policy="RequireDualStack", cluster_ips=("198.19.1.20", V6_CIP),
                  external_ips=("198.18.100.1", "2001:2:0:100::1"), ingress=("198.18.200.1", "2001:2:0:200::1"),
                  source_ranges=("198.18.50.0/24", "2001:2:0:50::/64"))
    state = build(DUAL, svc, *SLICES).state
    by_kind = {(str(k.address), k.scope): fe for k, fe in state.frontends.items()
               if fe.kind in (FrontendKind.EXTERNAL_IP, FrontendKind.LOAD_BALANCER)}
    assert sorted(by_kind) == sorted((a, s) for a in ("198.18.100.1", "2001:2:0:100::1", "198.18.200.1",
                                                      "2001:2:0:200::1") for s in Scope)
    for (address, _), fe in by_kind.items():
        v6 = ip_address(address).version == 6
        assert [b.name for b in fe.backends] == (V6_EPS if v6 else V4_EPS)
        if fe.kind is FrontendKind.LOAD_BALANCER:
            assert fe.source_ranges == ((IPv6Network("2001:2:0:50::/64"),) if v6 else (IPv4Network("198.18.50.0/24"),))
        else:
            assert fe.source_ranges == ()     # loadBalancerSourceRanges guard LB addresses only (no opt-in)


def test_an_address_of_a_family_the_service_has_no_clusterip_of_is_not_served():
    # As kube-proxy's per-family proxiers: the IPv6 one never sees a Service without an IPv6 clusterIP.
    svc = service(external_ips=("198.18.100.1", "2001:2:0:100::1"), ingress=("2001:2:0:200::1",))
    state = build(DUAL, svc, *SLICES).state
    assert {str(k.address) for k in state.frontends} == {"198.19.1.20", "198.18.100.1", V4_NODE}


def test_mixed_families_and_foreign_clusterips_are_refused_per_object():
    mixed = endpoint_slice("web", "IPv4", "198.18.2.10", "2001:2:0:2::10")
    v6_in_v4 = service("v6", cluster_ips=(V6_CIP,))
    state = state_of(V4_ONLY, mixed, v6_in_v4)
    assert sorted(str(p) for p in state.problems) == [
        "EndpointSlice default/web-ipv4: endpoints[1].addresses[0]: 2001:2:0:2::10 is not an IPv4 address",
        f"Service default/v6: spec.clusterIP: {V6_CIP} is an IPv6 clusterIP, but this cluster serves IPv4 only "
        f"(--ip-families)",
    ]
    assert build_desired_state(state.snapshot(), V4_ONLY).state.frontends == {}


def test_conflicts_are_per_address_so_per_family():
    # Both Services share the IPv4 clusterIP by mistake and the IPv6 externalIP: the older one keeps
    # both, the newer one keeps its own IPv6 clusterIP.  Fields are named per family.
    older = service("a-older", policy="RequireDualStack", cluster_ips=("198.19.1.20", V6_CIP),
                    external_ips=("2001:2:0:100::1",), created="2026-01-01T00:00:00Z")
    newer = service("b-newer", policy="RequireDualStack", cluster_ips=("198.19.1.20", "2001:2:0:ff::21"),
                    external_ips=("2001:2:0:100::1",), created="2026-01-02T00:00:00Z")
    result = build(DUAL, older, newer)
    owners = {(str(k.address), k.scope): fe.service.name for k, fe in result.state.frontends.items()}
    assert owners[("198.19.1.20", Scope.INTERNAL)] == "a-older"
    assert owners[("2001:2:0:100::1", Scope.EXTERNAL)] == "a-older"
    assert owners[("2001:2:0:ff::21", Scope.INTERNAL)] == "b-newer"
    assert sorted(str(p) for p in result.conflicts) == [
        "Service default/b-newer: spec.clusterIP: 198.19.1.20:80/TCP is already served by default/a-older; "
        "not programmed",
        "Service default/b-newer: spec.externalIPs: 2001:2:0:100::1:80/TCP is already served by default/a-older; "
        "not programmed",
    ]
    clash = service("c-clash", policy="RequireDualStack", cluster_ips=("198.19.1.22", V6_CIP),
                    created="2026-01-03T00:00:00Z")
    assert [p.field for p in build(DUAL, older, clash).conflicts] == ["spec.clusterIPs[1]"]


def test_endpoint_merge_keeps_the_families_apart():
    # ::c612:20a is 198.18.2.10 as an IPv4-compatible IPv6 address: the same integer, another endpoint.
    v4 = parse_endpoint_slice(endpoint_slice("web", "IPv4", "198.18.2.10"))
    v6 = parse_endpoint_slice(endpoint_slice("web", "IPv6", "::c612:20a", "2001:2:0:2::10"))
    (eps,) = merge_endpoint_slices("default", "web", [v6, v4]).values()
    assert [str(e.address) for e in eps] == ["198.18.2.10", "::c612:20a", "2001:2:0:2::10"]


def test_the_builder_follows_a_service_going_dual_stack_and_back():
    builder = DesiredStateBuilder(DUAL)
    single = state_of(DUAL, service(), *SLICES).snapshot()
    dual = state_of(DUAL, service(policy="PreferDualStack", cluster_ips=("198.19.1.20", V6_CIP)), *SLICES).snapshot()
    for snapshot in (single, dual, single, dual):
        result = builder.build(snapshot)
        assert result.state == build_desired_state(snapshot, DUAL).state
    assert len(result.state.frontends) == 2
