"""Which of a service port's endpoints this node may use: conditions, traffic policy, zone hints.

The model is kube-proxy's CategorizeEndpoints (pkg/proxy/topology.go):

- usable = ready endpoints (publishNotReadyAddresses makes every endpoint count as ready);
- "cluster" endpoints serve Cluster traffic policies: the usable ones, narrowed by topology hints
  as kube-proxy's topologyModeFromHints decides (v1.37.2), whatever the Service's annotation or
  trafficDistribution says (the EndpointSlice controller writes hints only when the Service asks,
  so the hints are the one source of truth): to the endpoints hinted for this node when every
  ready endpoint has node hints (PreferSameNode) and one is for this node; else to those hinted
  for this node's zone when every ready endpoint has zone hints and one is for this zone
  (PreferSameZone, PreferClose, topology-mode Auto); else all of them (hints must never
  black-hole a node or a zone);
- "local" endpoints serve Local traffic policies: the usable ones on this node, never narrowed
  by hints (Local already is the tightest topology);
- when a set is empty, endpoints that are serving but terminating fill it, so connections
  drain to Pods that are shutting down instead of failing outright (KEP-1669);
- otherwise those endpoints are the set's `draining` ones: no new connections, but their
  established ones carry on (kube-proxy leaves their conntrack entries alone);
- endpoints that are not ready (a failing readiness probe, or terminating and no longer
  serving) are the set's `not_ready` ones: never a new connection, but kube-proxy leaves
  their TCP conntrack entries alone too, so a readiness blip does not cut every connection.
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple

from ebpfsvc.k8s.endpointslice import Endpoint


class EndpointSet(NamedTuple):
    endpoints: tuple[Endpoint, ...] = ()
    terminating: bool = False      # filled from the serving-terminating fallback
    # Serving+terminating endpoints left out of `endpoints` because ready ones exist: they get
    # no new connections, but their established ones must go on until the pod is gone.
    draining: tuple[Endpoint, ...] = ()
    # Present but not ready (and not draining): their established TCP connections carry on.
    not_ready: tuple[Endpoint, ...] = ()


#: kube-proxy's topology modes (v1.ServiceTrafficDistribution* values); "" = no topology.
PREFER_SAME_NODE = "PreferSameNode"
PREFER_SAME_ZONE = "PreferSameZone"


class CategorizedEndpoints(NamedTuple):
    cluster: EndpointSet
    local: EndpointSet
    topology_mode: str = ""        # the hints that narrowed `cluster` (for display and tests)


def categorize_endpoints(endpoints: Iterable[Endpoint], *, node_name: str, zone: str,
                         publish_not_ready: bool = False) -> CategorizedEndpoints:
    endpoints = tuple(endpoints)
    if _plain(endpoints, publish_not_ready):
        # What the general path gives when every endpoint is usable, none terminating and none
        # hinted: all of them for Cluster, this node's for Local.  The usual service port.
        return CategorizedEndpoints(EndpointSet(endpoints),
                                    EndpointSet(tuple([ep for ep in endpoints if ep.node_name == node_name])))
    return _categorize(endpoints, node_name, zone, publish_not_ready)


def _categorize(endpoints: tuple[Endpoint, ...], node_name: str, zone: str,
                publish_not_ready: bool) -> CategorizedEndpoints:
    """categorize_endpoints() for any endpoints: kube-proxy's rules one by one."""

    def ready(ep: Endpoint) -> bool:
        return ep.ready or publish_not_ready

    mode = topology_mode_from_hints([ep for ep in endpoints if ready(ep)], node_name, zone)
    cluster = _select(endpoints, lambda ep: ready(ep) and _available(ep, mode, node_name, zone),
                      lambda ep: True, ready)
    local = _select(endpoints, lambda ep: ready(ep) and ep.node_name == node_name,
                    lambda ep: ep.node_name == node_name, ready)
    return CategorizedEndpoints(cluster, local, mode)


def _plain(endpoints: tuple[Endpoint, ...], publish_not_ready: bool) -> bool:
    """Every endpoint ready (or published not ready), not terminating, without topology hints."""
    for ep in endpoints:
        if not (ep.ready or publish_not_ready) or ep.terminating or ep.zone_hints or ep.node_hints:
            return False
    return True


def _select(endpoints: tuple[Endpoint, ...], usable: Callable[[Endpoint], bool],
            where: Callable[[Endpoint], bool], ready: Callable[[Endpoint], bool]) -> EndpointSet:
    chosen = tuple(ep for ep in endpoints if usable(ep))
    draining = tuple(ep for ep in endpoints if ep.serving and ep.terminating and where(ep))
    not_ready = tuple(ep for ep in endpoints
                      if not ready(ep) and not (ep.serving and ep.terminating) and where(ep))
    if chosen:
        return EndpointSet(chosen, draining=tuple(ep for ep in draining if ep not in chosen),
                           not_ready=not_ready)
    return EndpointSet(draining, terminating=bool(draining), not_ready=not_ready)


def topology_mode_from_hints(ready: list[Endpoint], node_name: str, zone: str) -> str:
    """kube-proxy's topologyModeFromHints over the ready endpoints: PreferSameNode when all have
    node hints and one is for this node, else PreferSameZone when all have zone hints and one is
    for this zone, else "". All or nothing per kind of hint: one endpoint without them means the
    EndpointSlice controller is mid-way through (re)assigning them, and a partial view would
    overload the hinted endpoints."""
    if not ready:
        return ""
    if all(ep.node_hints for ep in ready) and any(node_name in ep.node_hints for ep in ready):
        return PREFER_SAME_NODE
    if zone and all(ep.zone_hints for ep in ready) and any(zone in ep.zone_hints for ep in ready):
        return PREFER_SAME_ZONE
    return ""


def _available(ep: Endpoint, mode: str, node_name: str, zone: str) -> bool:
    # No fallback here: it happened when the mode was chosen (kube-proxy's availableForTopology).
    if mode == PREFER_SAME_NODE:
        return node_name in ep.node_hints
    if mode == PREFER_SAME_ZONE:
        return zone in ep.zone_hints
    return True
