"""Desired state: a pure function from a cluster snapshot and this node's config to an LBState.

No I/O and no clock: the same snapshot gives the same LBState on every call and
(apart from node-local choices) on every node, so it is unit-tested without a
kernel and diffed by the map writer.

Per Service port it emits kube-proxy's rules, one frontend per address:port/protocol and scope:

    frontend                                  scope      backends
    clusterIP:port                            INTERNAL   per internalTrafficPolicy (Local: this node's)
    <node address>:nodePort,                  EXTERNAL   per externalTrafficPolicy (Local: this node's)
    externalIPs[]:port,                       INTERNAL   cluster-wide: kube-proxy short-circuits pod ->
    status.loadBalancer.ingress[].ip:port                external-address traffic, so a pod on a node
                                                         without a local endpoint is still served

Two Services claiming the same frontend (a duplicated externalIP, a clusterIP typo) cannot both
be served: the first by namespace/name keeps it, so every node agrees, and the loser is reported
by build_desired_state().
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterator

from ebpfsvc.config import NodeConfig
from ebpfsvc.k8s.endpointmerge import Endpoint
from ebpfsvc.k8s.fields import Problem
from ebpfsvc.k8s.service import Service, ServicePort, TrafficPolicy
from ebpfsvc.k8s.topology import EndpointSet, categorize_endpoints
from ebpfsvc.lbmodel import (Backend, Frontend, FrontendKey, FrontendKind, LBState, Scope,
                             ServicePortName)
from ebpfsvc.tracker import ClusterSnapshot

# The field a frontend comes from, to name it when two Services collide.
_KIND_FIELD = {
    FrontendKind.CLUSTER_IP: "spec.clusterIP",
    FrontendKind.NODE_PORT: "spec.ports[{i}].nodePort",
    FrontendKind.EXTERNAL_IP: "spec.externalIPs",
    FrontendKind.LOAD_BALANCER: "status.loadBalancer.ingress",
}


# The previous call's frontends per service port, with the inputs they were built from.  A sync
# usually follows a change to one Service among thousands; reusing the frontends of the others
# (same Service and endpoints objects, same node context) makes it proportional to the change.
# Only a cache: the result is exactly what a fresh computation would give, so the function stays pure.
_memo: tuple[object, dict[ServicePortName, tuple]] = (None, {})


@dataclass(frozen=True)
class DesiredState:
    state: LBState
    conflicts: tuple[Problem, ...] = ()    # frontends not served because another Service holds them


def desired_state(snapshot: ClusterSnapshot, node: NodeConfig) -> LBState:
    """Every frontend this node must serve, with its usable backends."""
    return build_desired_state(snapshot, node).state


def build_desired_state(snapshot: ClusterSnapshot, node: NodeConfig) -> DesiredState:
    """desired_state() plus the frontend conflicts it had to resolve."""
    global _memo
    zone = node_zone(snapshot, node)
    # Everything a service port's frontends depend on besides its Service and endpoints.
    context = (node, zone, tuple(sorted((name, n.zone) for name, n in snapshot.nodes.items())))
    previous = _memo[1] if _memo[0] == context else {}
    reused: dict[ServicePortName, tuple] = {}
    frontends: dict[FrontendKey, Frontend] = {}
    conflicts: list[Problem] = []
    for key in sorted(snapshot.services):
        svc = snapshot.services[key]
        if svc.skip_reason(node):
            continue
        for i, port in enumerate(svc.ports):
            spn = ServicePortName(svc.namespace, svc.name, port.name, port.protocol)
            endpoints = snapshot.endpoints.get(spn, ())
            hit = previous.get(spn)
            if hit and (hit[0] is svc or hit[0] == svc) and (hit[1] is endpoints or hit[1] == endpoints):
                port_frontends = hit[2]
            else:
                port_frontends = tuple(_port_frontends(snapshot, node, zone, svc, port, spn, endpoints))
            reused[spn] = (svc, endpoints, port_frontends)
            for fe in port_frontends:
                holder = frontends.get(fe.key)
                if holder is None:
                    frontends[fe.key] = fe
                elif holder.service.namespace != svc.namespace or holder.service.name != svc.name:
                    conflicts.append(_conflict(svc, i, fe, holder))
    _memo = (context, reused)     # one assignment: concurrent callers never see a half-built memo
    return DesiredState(LBState(frontends), tuple(sorted(set(conflicts))))


def node_zone(snapshot: ClusterSnapshot, node: NodeConfig) -> str:
    """This node's zone: configured, else the Node object's topology.kubernetes.io/zone label."""
    if node.zone:
        return node.zone
    me = snapshot.nodes.get(node.node_name)
    return me.zone if me else ""


def _port_frontends(snapshot: ClusterSnapshot, node: NodeConfig, zone: str, svc: Service, port: ServicePort,
                    spn: ServicePortName, endpoints: tuple[Endpoint, ...]) -> Iterator[Frontend]:
    sets = categorize_endpoints(endpoints, node_name=node.node_name, zone=zone,
                                topology_aware=svc.topology_aware,
                                publish_not_ready=svc.publish_not_ready_addresses)
    itp_local = svc.internal_traffic_policy is TrafficPolicy.LOCAL
    etp_local = svc.external_traffic_policy is TrafficPolicy.LOCAL
    # Each set becomes Backends once, however many frontends share it.
    cluster = _backends(snapshot, node, sets.cluster, port)
    local = _backends(snapshot, node, sets.local, port) if itp_local or etp_local else ()

    def frontend(addr, number, scope, kind, backends, local_only: bool, ranges=()) -> Frontend:
        return Frontend(
            key=FrontendKey(addr, number, port.protocol, scope),
            service=spn,
            kind=kind,
            backends=backends,
            algorithm=svc.algorithm or node.default_algorithm,
            affinity_timeout=svc.affinity_timeout,
            local_only=local_only,
            source_ranges=ranges,
            app_protocol=port.app_protocol,
        )

    yield frontend(svc.cluster_ip, port.port, Scope.INTERNAL, FrontendKind.CLUSTER_IP,
                   local if itp_local else cluster, itp_local)
    for addr, number, kind, ranges in _external_addresses(svc, port, node):
        yield frontend(addr, number, Scope.EXTERNAL, kind, local if etp_local else cluster, etp_local, ranges)
        yield frontend(addr, number, Scope.INTERNAL, kind, cluster, False, ranges)


def _external_addresses(svc: Service, port: ServicePort, node: NodeConfig
                        ) -> Iterator[tuple[ipaddress.IPv4Address, int, FrontendKind, tuple]]:
    if port.node_port:
        for addr in node.node_addresses:
            yield addr, port.node_port, FrontendKind.NODE_PORT, ()
    for addr in svc.external_ips:
        yield addr, port.port, FrontendKind.EXTERNAL_IP, ()
    for addr in svc.load_balancer_ips:
        # loadBalancerSourceRanges guard the load balancer's address only (kube-proxy's KUBE-FW chain).
        yield addr, port.port, FrontendKind.LOAD_BALANCER, svc.source_ranges


def _backends(snapshot: ClusterSnapshot, node: NodeConfig, chosen: EndpointSet,
              port: ServicePort) -> tuple[Backend, ...]:
    # Draining endpoints are listed as terminating backends: the writer keeps them out of the
    # Maglev table while others serve, but keeps them in the backends map, so the datapath
    # does not reset their established flows as flows to a removed backend.
    backends = []
    for ep, terminating in [*((ep, chosen.terminating) for ep in chosen.endpoints),
                            *((ep, True) for ep in chosen.draining)]:
        known = snapshot.nodes.get(ep.node_name)
        backends.append(Backend(
            address=ep.address,
            port=ep.port,
            protocol=port.protocol,
            terminating=terminating,
            local=bool(ep.node_name) and ep.node_name == node.node_name,
            node=ep.node_name,
            zone=ep.zone or (known.zone if known else ""),
        ))
    return tuple(sorted(backends, key=lambda b: b.name))


def _conflict(svc: Service, index: int, fe: Frontend, holder: Frontend) -> Problem:
    k = fe.key
    return Problem("Service", svc.namespace, svc.name, _KIND_FIELD[fe.kind].format(i=index),
                   f"{k.address}:{k.port}/{k.protocol.value} is already served by "
                   f"{holder.service.namespace}/{holder.service.name}; not programmed")

