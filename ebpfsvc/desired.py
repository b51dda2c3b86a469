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

Dual-stack (KEP-563) is two single-stack Services side by side, as kube-proxy runs one proxier per
family: per family of the Service's clusterIPs that this node serves (NodeConfig.ip_families), the
clusterIP, the NodePorts on the node addresses of that family, and the externalIPs and load balancer
addresses of that family, each with the endpoints of that family only (from the slices of its
addressType) and the loadBalancerSourceRanges of that family.  So a PreferDualStack Service with
IPv4 endpoints only serves its IPv4 clusterIP and rejects on its IPv6 one, and an externalIP of a
family the Service has no clusterIP of is not served.

Two Services claiming the same frontend (a duplicated NodePort or externalIP, a clusterIP typo)
cannot both be served: the oldest (creationTimestamp, then namespace/name: Service.seniority) keeps
it, so every node agrees, and the loser is reported by build_desired_state().  A Service whose
frontends cannot be computed (a bug meeting an odd object) costs that Service only: it is left out
and reported in DesiredState.failures.

desired_state() / build_desired_state() compute from nothing; the agent keeps a
DesiredStateBuilder, which gives exactly the same result from one snapshot to the next at the
cost of what changed in between, and says which frontends changed (LBDelta) for the map writer.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Iterable, Iterator, Mapping

from ebpfsvc import heap
from ebpfsvc.config import NodeConfig, family_name
from ebpfsvc.k8s.endpointslice import Endpoint
from ebpfsvc.k8s.fields import Problem
from ebpfsvc.k8s.service import Service, ServicePort, TrafficPolicy
from ebpfsvc.k8s.topology import EndpointSet, categorize_endpoints
from ebpfsvc.lbmodel import (LOCAL, NOT_READY, TERMINATING, BackendRows, Frontend, FrontendKey, FrontendKind,
                             IPAddress, LBState, Scope, ServicePortName, backend_names)
from ebpfsvc.tracker import ClusterSnapshot, ServiceKey, overlay_view

_new = tuple.__new__      # a NamedTuple made from its fields in order, without its __new__

# The field a frontend comes from, to name it when two Services collide.
_KIND_FIELD = {
    FrontendKind.CLUSTER_IP: "spec.clusterIP",
    FrontendKind.NODE_PORT: "spec.ports[{i}].nodePort",
    FrontendKind.EXTERNAL_IP: "spec.externalIPs",
    FrontendKind.LOAD_BALANCER: "status.loadBalancer.ingress",
}


@dataclass(frozen=True)
class LBDelta:
    """How a state differs from an earlier one: only the frontends at `keys` may differ from `base`'s
    (added, removed or changed).  MapWriter.apply(state, delta=...) uses it when `base` is the very
    state it applied last, and otherwise finds the difference itself."""

    base: LBState
    keys: frozenset[FrontendKey]


@dataclass(frozen=True)
class DesiredState:
    state: LBState
    conflicts: tuple[Problem, ...] = ()    # frontends not served because another Service holds them
    failures: tuple[Problem, ...] = ()     # Services left out because computing their frontends failed
    delta: LBDelta | None = field(default=None, compare=False)   # vs the builder's previous result


def desired_state(snapshot: ClusterSnapshot, node: NodeConfig) -> LBState:
    """Every frontend this node must serve, with its usable backends."""
    return build_desired_state(snapshot, node).state


def build_desired_state(snapshot: ClusterSnapshot, node: NodeConfig) -> DesiredState:
    """desired_state() plus the frontend conflicts it had to resolve (computed afresh)."""
    return DesiredStateBuilder(node).build(snapshot)


# One Service's contribution: the Service object and, per port, the inputs and the frontends built
# from them.  A skipped Service (headless, ExternalName, another proxy's) contributes no ports.
_PortResult = tuple[ServicePortName, tuple[Endpoint, ...], tuple[Frontend, ...]]
# A claim on a frontend key: (order, frontend, Service).  The order (Service.seniority, port index,
# position): the oldest Service's claim wins.
_Claim = tuple[tuple[tuple[str, str, str], int, int], Frontend, Service]


class DesiredStateBuilder:
    """desired_state() for one node, kept up to date from one snapshot to the next.

    A sync usually follows a change to one Service among thousands.  The builder remembers each
    Service's frontends and every claim on every frontend key, so a new snapshot costs what
    changed in it: the Services it names in `changed` (when it directly follows the snapshot the
    builder saw last, from the same ClusterState), else the Services whose objects or endpoints
    differ from the ones remembered.  A change of node context (this node's zone, any Node's zone,
    or `node` itself: the agent sets a new NodeConfig when its NodePort addresses change)
    recomputes everything.  build() returns exactly what a fresh computation returns
    (tests/unit/test_desired_incremental.py checks it over random change sequences), with an
    LBDelta naming the frontend keys that changed since the previous result; an unchanged
    snapshot returns the previous DesiredState object itself.
    """

    def __init__(self, node: NodeConfig):
        self.node = node
        self._snapshot: ClusterSnapshot | None = None
        self._context: tuple | None = None
        self._reset()

    def _reset(self) -> None:
        self._result: DesiredState | None = None
        self._services: dict[ServiceKey, tuple[Service, tuple[_PortResult, ...]]] = {}
        self._claims: dict[FrontendKey, list[_Claim]] = {}
        self._frontends: dict[FrontendKey, Frontend] = {}          # the winning claim per key
        # What results hand out (LBState.frontends): a base copy, never changed once handed out,
        # plus the keys changed since (tracker.Overlay): one change costs its keys, not a copy.
        self._frontends_base: dict[FrontendKey, Frontend] = {}
        self._frontends_since: set[FrontendKey] = set()
        self._conflicts: dict[FrontendKey, tuple[Problem, ...]] = {}
        self._failures: dict[ServiceKey, Problem] = {}

    @property
    def result(self) -> DesiredState | None:
        """The last build()'s result."""
        return self._result

    @property
    def snapshot(self) -> ClusterSnapshot | None:
        """The snapshot the last build() computed from."""
        return self._snapshot

    def build(self, snapshot: ClusterSnapshot) -> DesiredState:
        prev = self._snapshot
        if prev is not None and snapshot.nodes is prev.nodes and self._context[0] is self.node:
            context, zone = self._context, self._context[1]
        else:
            zone = node_zone(snapshot, self.node)
            context = (self.node, zone, tuple(sorted((name, n.zone) for name, n in snapshot.nodes.items())))
        if self._result is None or context != self._context:
            self._reset()
            todo: Iterable[ServiceKey] = snapshot.services
        elif (snapshot.origin is not None and snapshot.origin is prev.origin
              and snapshot.generation == prev.generation + 1):
            todo = snapshot.changed
        else:
            todo = self._differing(snapshot)
        self._snapshot, self._context = snapshot, context
        # Sorted, so a full build meets the claims in order and appends them (claim lists stay
        # sorted either way: the first claim of a key is the full computation's winner).
        todo = sorted(todo)
        touched: set[FrontendKey] = set()
        failures_touched = False
        # A full build makes the whole state at once: no cycle collection meanwhile (ebpfsvc.heap).
        with heap.bulk_for(len(todo)):
            for key in todo:
                try:
                    self._update_service(snapshot, zone, key, touched)
                except Exception as err:    # one Service's bad luck must not stop the others
                    self._drop_service(key, touched)
                    problem = Problem("Service", key[0], key[1], "", f"frontends cannot be computed "
                                      f"({type(err).__name__}: {err}); not programmed")
                    failures_touched |= self._failures.get(key) != problem
                    self._failures[key] = problem
                else:
                    failures_touched |= self._failures.pop(key, None) is not None
        changed: set[FrontendKey] = set()
        conflicts_touched = False
        for fkey in touched:
            claims = self._claims.get(fkey)
            old = self._frontends.get(fkey)
            if not claims:
                self._claims.pop(fkey, None)
                self._frontends.pop(fkey, None)
                conflicts_touched |= self._conflicts.pop(fkey, None) is not None
                if old is not None:
                    changed.add(fkey)
                continue
            holder = claims[0][1]
            if old is not holder:
                self._frontends[fkey] = holder
                changed.add(fkey)
            if len(claims) == 1 and fkey not in self._conflicts:
                continue                # (the usual frontend: one Service claims it, and did)
            (holder_order, _, _), *losers = claims
            problems = tuple(_conflict(svc, order[1], fe, holder)
                             for order, fe, svc in losers if order[0] != holder_order[0])
            if problems or fkey in self._conflicts:
                conflicts_touched |= self._conflicts.get(fkey) != problems
                if problems:
                    self._conflicts[fkey] = problems
                else:
                    del self._conflicts[fkey]
        last = self._result
        if last is not None and not changed and not conflicts_touched and not failures_touched:
            return last
        conflicts = (tuple(sorted({p for ps in self._conflicts.values() for p in ps}))
                     if conflicts_touched or last is None else last.conflicts)
        failures = tuple(sorted(self._failures.values()))
        state = LBState(self._frontends_view(changed)) if changed or last is None else last.state
        delta = LBDelta(last.state, frozenset(changed)) if last is not None else None
        self._result = DesiredState(state, conflicts, delta=delta, failures=failures)
        return self._result

    def _frontends_view(self, changed: set[FrontendKey]) -> Mapping[FrontendKey, Frontend]:
        self._frontends_since |= changed
        view, self._frontends_base = overlay_view(self._frontends_base, self._frontends, self._frontends_since)
        return view

    def _differing(self, snapshot: ClusterSnapshot) -> set[ServiceKey]:
        """Services whose object or endpoints differ from what the last build used (or that came or went)."""
        out = set(self._services.keys() - snapshot.services.keys())
        endpoints = snapshot.endpoints
        for key, svc in snapshot.services.items():
            known = self._services.get(key)
            if known is None or not (known[0] is svc or known[0] == svc):
                out.add(key)
                continue
            for spn, eps, _ in known[1]:
                now = endpoints.get(spn, ())
                if not (now is eps or now == eps):
                    out.add(key)
                    break
        return out

    def _update_service(self, snapshot: ClusterSnapshot, zone: str, key: ServiceKey,
                        touched: set[FrontendKey]) -> None:
        old = self._services.pop(key, None)
        old_ports = {r[0]: r for r in old[1]} if old is not None else {}
        if old is not None:
            for _, _, fes in old[1]:
                for fe in fes:
                    claims = self._claims.get(fe.key)
                    if claims:
                        claims[:] = [c for c in claims if c[2].key != key]
                    touched.add(fe.key)
        svc = snapshot.services.get(key)
        if svc is None:
            return
        ports: list[_PortResult] = []
        if not svc.skip_reason(self.node):
            same_svc = old is not None and old[0] is svc
            for i, port in enumerate(svc.ports):
                spn = ServicePortName(svc.namespace, svc.name, port.name, port.protocol)
                endpoints = snapshot.endpoints.get(spn, ())
                hit = old_ports.get(spn)
                if same_svc and hit is not None and (hit[1] is endpoints or hit[1] == endpoints):
                    fes = hit[2]
                else:
                    fes = tuple(_port_frontends(snapshot, self.node, zone, svc, port, spn, endpoints))
                    if hit is not None and hit[2] == fes:
                        fes = hit[2]        # equal: keep the old objects, so consumers compare by identity
                ports.append((spn, endpoints, fes))
                for j, fe in enumerate(fes):
                    claim = ((svc.seniority, i, j), fe, svc)
                    claims = self._claims.setdefault(fe.key, [])
                    if not claims or claims[-1][0] < claim[0]:
                        claims.append(claim)
                    else:
                        bisect.insort(claims, claim, key=lambda c: c[0])
                    touched.add(fe.key)
        self._services[key] = (svc, tuple(ports))

    def _drop_service(self, key: ServiceKey, touched: set[FrontendKey]) -> None:
        """Forget whatever a failed _update_service(key) left half-done: its claims and its ports."""
        self._services.pop(key, None)
        for fkey in touched:
            claims = self._claims.get(fkey)
            if claims:
                claims[:] = [c for c in claims if c[2].key != key]


def node_zone(snapshot: ClusterSnapshot, node: NodeConfig) -> str:
    """This node's zone: configured, else the Node object's topology.kubernetes.io/zone label."""
    if node.zone:
        return node.zone
    me = snapshot.nodes.get(node.node_name)
    return me.zone if me else ""


def _port_frontends(snapshot: ClusterSnapshot, node: NodeConfig, zone: str, svc: Service, port: ServicePort,
                    spn: ServicePortName, endpoints: tuple[Endpoint, ...]) -> Iterator[Frontend]:
    """Every frontend of one Service port: those of each family the Service has and the node serves."""
    for cluster_ip in svc.cluster_ips:
        if family_name(cluster_ip.version) in node.ip_families:
            yield from _family_frontends(snapshot, node, zone, svc, port, spn, cluster_ip,
                                         _of_family(endpoints, cluster_ip.version))


def _of_family(endpoints: tuple[Endpoint, ...], version: int) -> tuple[Endpoint, ...]:
    """The endpoints of one family: merge_endpoint_slices sorts IPv4 ones first, so a single-stack
    list (the usual case) is returned whole after two comparisons."""
    if not endpoints or (endpoints[0].address.version == version and endpoints[-1].address.version == version):
        return endpoints
    return tuple(ep for ep in endpoints if ep.address.version == version)


def _family_frontends(snapshot: ClusterSnapshot, node: NodeConfig, zone: str, svc: Service, port: ServicePort,
                      spn: ServicePortName, cluster_ip, endpoints: tuple[Endpoint, ...]) -> Iterator[Frontend]:
    sets = categorize_endpoints(endpoints, node_name=node.node_name, zone=zone,
                                publish_not_ready=svc.publish_not_ready_addresses)
    itp_local = svc.internal_traffic_policy is TrafficPolicy.LOCAL
    etp_local = svc.external_traffic_policy is TrafficPolicy.LOCAL
    # A Local policy drops (local_only) only when endpoints exist elsewhere; with none anywhere the
    # frontend rejects like any Service without endpoints (kube-proxy's hasAnyEndpoints).
    has_endpoints = bool(sets.cluster.endpoints)
    # Each set becomes Backends once, however many frontends share it.
    cluster = _backends(snapshot, node, sets.cluster, port)
    local = _backends(snapshot, node, sets.local, port) if itp_local or etp_local else ()

    algorithm = svc.algorithm or node.default_algorithm

    def frontend(addr, number, scope, kind, backends, local_only: bool, ranges=()) -> Frontend:
        # Frontend(key, service, kind, backends, algorithm, affinity_timeout, local_only,
        # source_ranges, app_protocol), without NamedTuple's __new__, a Python call (a full sync
        # makes 10,000 of each; tests/unit/test_bulk_paths.py checks the fields are these).
        return _new(Frontend, (_new(FrontendKey, (addr, number, port.protocol, scope)), spn, kind, backends,
                               algorithm, svc.affinity_timeout, local_only, ranges, port.app_protocol))

    yield frontend(cluster_ip, port.port, Scope.INTERNAL, FrontendKind.CLUSTER_IP,
                   local if itp_local else cluster, itp_local and has_endpoints)
    for addr, number, kind, ranges in _external_addresses(svc, port, node, cluster_ip.version):
        yield frontend(addr, number, Scope.EXTERNAL, kind, local if etp_local else cluster,
                       etp_local and has_endpoints, ranges)
        yield frontend(addr, number, Scope.INTERNAL, kind, cluster, False, ranges)


def _external_addresses(svc: Service, port: ServicePort, node: NodeConfig, version: int
                        ) -> Iterator[tuple[IPAddress, int, FrontendKind, tuple]]:
    """The node's, the Service's external and its load balancer addresses of one family."""
    if port.node_port:
        for addr in node.node_addresses:
            if addr.version == version:
                yield addr, port.node_port, FrontendKind.NODE_PORT, ()
    if not (svc.external_ips or svc.load_balancer_ips):
        return                  # (most Services: no range to filter, nothing more to serve)
    # A source range of the other family could never match a packet of this one (kube-proxy keeps
    # those of its own family too).
    ranges = tuple(net for net in svc.source_ranges if net.version == version)
    for addr in svc.external_ips:
        if addr.version == version:
            yield addr, port.port, FrontendKind.EXTERNAL_IP, ranges if svc.external_ip_source_ranges else ()
    for addr in svc.load_balancer_ips:
        # loadBalancerSourceRanges guard the load balancer's address only (kube-proxy's KUBE-FW chain).
        if addr.version == version:
            yield addr, port.port, FrontendKind.LOAD_BALANCER, ranges


def _backends(snapshot: ClusterSnapshot, node: NodeConfig, chosen: EndpointSet,
              port: ServicePort) -> BackendRows:
    # Draining endpoints are listed as terminating backends and not-ready ones as not ready:
    # the writer keeps them out of the Maglev table (draining ones while others serve), but
    # keeps them in the backends map, so the datapath does not reset their established flows
    # as flows to a removed backend.  Rows, not a Backend per endpoint (lbmodel.BackendRows):
    # the endpoints of one set are distinct (merge_endpoint_slices) and of one family.
    eps = chosen.endpoints + chosen.draining + chosen.not_ready
    if not eps:
        return BackendRows.of(())
    base = TERMINATING if chosen.terminating else 0
    states = ((base,) * len(chosen.endpoints) + (TERMINATING,) * len(chosen.draining)
              + (NOT_READY,) * len(chosen.not_ready))
    me, nodes = node.node_name, snapshot.nodes
    # The endpoints' columns, at once (Endpoint's fields, in order).
    addresses, ports, _, _, _, node_names, zones, _, _, _, texts = zip(*eps)
    flags = [f | LOCAL if n == me and n else f for f, n in zip(states, node_names)]
    if nodes:
        # An endpoint without a zone of its own is in its Node's (topology.kubernetes.io/zone).
        zones = [z or _node_zone(nodes, n) for z, n in zip(zones, node_names)]
    names = backend_names(texts, ports, port.protocol, addresses[0].version)
    columns = (names, addresses, ports, flags, node_names, zones)
    if len(names) > 1:
        # Every column in name order: the order of the names' indices, picked from each (in C).
        in_order = itemgetter(*sorted(range(len(names)), key=names.__getitem__))
        columns = map(in_order, columns)
    names, addresses, ports, flags, node_names, zones = map(tuple, columns)
    return BackendRows(names, addresses, ports, (port.protocol,) * len(names), flags, node_names, zones,
                       addresses[0].version)


def _node_zone(nodes, name: str) -> str:
    known = nodes.get(name)
    return known.zone if known else ""


def _conflict(svc: Service, index: int, fe: Frontend, holder: Frontend) -> Problem:
    k = fe.key
    field = _KIND_FIELD[fe.kind].format(i=index)
    if fe.kind is FrontendKind.CLUSTER_IP and k.address != svc.cluster_ip:     # the secondary family's
        field = f"spec.clusterIPs[{svc.cluster_ips.index(k.address)}]"
    return Problem("Service", svc.namespace, svc.name, field,
                   f"{k.address}:{k.port}/{k.protocol.value} is already served by "
                   f"{holder.service.namespace}/{holder.service.name}; not programmed")

