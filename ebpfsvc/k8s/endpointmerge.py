"""Merge every EndpointSlice of a Service into one endpoint list per service port.

The model is kube-proxy's endpointslicecache: a Service's endpoints are spread
over many slices (100 endpoints each, plus overlap while the controller moves
endpoints between slices), and each slice carries, per Service port *name*,
the port number its endpoints listen on (that is where a named targetPort is
resolved).  So endpoints are grouped by ServicePortName (service, port name,
protocol), each with the port number of its own slice, and an address that
appears in two slices counts once: a ready copy wins over a not-ready one, then
a copy that is not terminating over a terminating one (kube-proxy v1.37.2 keeps
the non-terminating copy: the pod network may reuse the address of a pod still
terminating for a new, running pod), otherwise the first slice by name, so the
result does not depend on event order.

A dual-stack Service has IPv4 and IPv6 slices; their endpoints share the port's list, IPv4 ones
first, and never merge with each other (an address is keyed with its family): each frontend takes
those of its own family (ebpfsvc/desired.py).  FQDN slices have nothing to forward to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ebpfsvc import heap
from ebpfsvc.k8s.endpointslice import EndpointSlice
from ebpfsvc.lbmodel import IPAddress, ServicePortName


@dataclass(frozen=True)
class Endpoint:
    """One endpoint of one service port, with its resolved port (kube-proxy's Endpoint)."""

    address: IPAddress
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    zone_hints: frozenset[str] = frozenset()
    node_hints: frozenset[str] = frozenset()

    @property
    def sort_key(self) -> tuple[int, int, int]:
        return (self.address.version, int(self.address), self.port)


def merge_endpoint_slices(namespace: str, service_name: str,
                          slices: Iterable[EndpointSlice]) -> dict[ServicePortName, tuple[Endpoint, ...]]:
    """Endpoints per ServicePortName of one Service, deduplicated and sorted by (address, port)."""
    make = _make_endpoint
    merged: dict[ServicePortName, dict[tuple, Endpoint]] = {}
    for sl in sorted(slices, key=lambda s: s.name):
        if sl.address_type == "FQDN":
            continue
        for port in sl.ports:
            if port.port is None:
                continue        # "all ports" is not something a Service can forward to; kube-proxy skips it too
            spn = ServicePortName(namespace, service_name, port.name, port.protocol)
            by_addr = merged.setdefault(spn, {})
            for ep in sl.endpoints:
                # ints hash in C, an IPv4Address in Python; the version keeps ::a.b.c.d apart from a.b.c.d
                key = (ep.address.version, int(ep.address), port.port)
                if key in by_addr and _precedence(by_addr[key]) >= _precedence(ep):
                    continue
                by_addr[key] = make(ep.address, port.port, ep.ready, ep.serving, ep.terminating,
                                    ep.node_name, ep.zone, ep.zone_hints, ep.node_hints)
    # The keys are the endpoints' sort keys, and unique: sorting them sorts the endpoints.
    return {spn: tuple([eps[k] for k in sorted(eps)]) for spn, eps in merged.items()}


_make_endpoint = heap.maker(Endpoint)


def _precedence(ep) -> tuple[bool, bool]:
    """Which copy of a duplicated address wins: ready first, then not terminating."""
    return (ep.ready, not ep.terminating)
