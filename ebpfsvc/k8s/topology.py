"""Which of a service port's endpoints this node may use: conditions, traffic policy, zone hints.

The model is kube-proxy's CategorizeEndpoints (pkg/proxy/topology.go):

- usable = ready endpoints (publishNotReadyAddresses makes every endpoint count as ready);
- "cluster" endpoints serve Cluster traffic policies: the usable ones, narrowed to this node's
  zone by topology hints when the Service asks for it and every usable endpoint carries hints,
  unless no endpoint is hinted for this zone (then all: hints must never black-hole a zone);
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

from dataclasses import dataclass
from typing import Callable, Iterable

from ebpfsvc.k8s.endpointmerge import Endpoint


@dataclass(frozen=True)
class EndpointSet:
    endpoints: tuple[Endpoint, ...] = ()
    terminating: bool = False      # filled from the serving-terminating fallback
    # Serving+terminating endpoints left out of `endpoints` because ready ones exist: they get
    # no new connections, but their established ones must go on until the pod is gone.
    draining: tuple[Endpoint, ...] = ()
    # Present but not ready (and not draining): their established TCP connections carry on.
    not_ready: tuple[Endpoint, ...] = ()


@dataclass(frozen=True)
class CategorizedEndpoints:
    cluster: EndpointSet
    local: EndpointSet
    topology_used: bool = False    # zone hints narrowed `cluster` (for display and tests)


def categorize_endpoints(endpoints: Iterable[Endpoint], *, node_name: str, zone: str,
                         topology_aware: bool = False,
                         publish_not_ready: bool = False) -> CategorizedEndpoints:
    endpoints = tuple(endpoints)

    def ready(ep: Endpoint) -> bool:
        return ep.ready or publish_not_ready

    use_hints = topology_aware and _can_use_hints([ep for ep in endpoints if ready(ep)], zone)
    cluster = _select(endpoints, lambda ep: ready(ep) and (not use_hints or zone in ep.zone_hints),
                      lambda ep: True, ready)
    local = _select(endpoints, lambda ep: ready(ep) and ep.node_name == node_name,
                    lambda ep: ep.node_name == node_name, ready)
    return CategorizedEndpoints(cluster, local, use_hints)


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


def _can_use_hints(usable: list[Endpoint], zone: str) -> bool:
    # All or nothing, as in kube-proxy: one endpoint without hints means the EndpointSlice
    # controller is mid-way through (re)assigning them, and a partial view would overload
    # the hinted endpoints.
    if not zone or not usable:
        return False
    if any(not ep.zone_hints for ep in usable):
        return False
    return any(zone in ep.zone_hints for ep in usable)
