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

from operator import itemgetter
from typing import Iterable

from ebpfsvc.k8s.endpointslice import Endpoint, EndpointSlice
from ebpfsvc.lbmodel import ServicePortName


def merge_endpoint_slices(namespace: str, service_name: str,
                          slices: Iterable[EndpointSlice]) -> dict[ServicePortName, tuple[Endpoint, ...]]:
    """Endpoints per ServicePortName of one Service, deduplicated and sorted by (address, port)."""
    slices = [sl for sl in slices if sl.address_type != "FQDN"]
    if len(slices) == 1:
        merged = _one_slice(namespace, service_name, slices[0])
        if merged is not None:
            return merged
    return _merge_general(namespace, service_name, slices)


def _merge_general(namespace: str, service_name: str,
                   slices: Iterable[EndpointSlice]) -> dict[ServicePortName, tuple[Endpoint, ...]]:
    """merge_endpoint_slices() of any slices but FQDN ones (it leaves those out): each address
    once per port, the winner by _precedence, then the first slice by name."""
    merged: dict[ServicePortName, dict[tuple, Endpoint]] = {}
    for sl in sorted(slices, key=lambda s: s.name):
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
                by_addr[key] = ep if ep.port == port.port else _with_port(ep, port.port)
    # The keys are the endpoints' sort keys, and unique: sorting them sorts the endpoints.
    return {spn: tuple([eps[k] for k in sorted(eps)]) for spn, eps in merged.items()}


def _one_slice(namespace: str, service_name: str, sl: EndpointSlice
               ) -> dict[ServicePortName, tuple[Endpoint, ...]] | None:
    """merge_endpoint_slices() of a Service with one slice whose addresses are distinct (most
    Services: a slice holds up to 100 endpoints), or None for the general path.  In one slice every
    address is of the slice's family and a port's endpoints share its number, so the merge's
    (family, address, port) order is the addresses' order and there is no duplicate to resolve:
    one int per endpoint to sort by.  A slice with one port (most) parsed its endpoints with that
    port's number (Endpoint.port): they are that service port's endpoints as they are, no new
    tuple each; otherwise each is made again with its port."""
    endpoints = sl.endpoints
    numbers = [int(ep[0]) for ep in endpoints]
    if len(set(numbers)) != len(numbers):
        return None
    ordered = tuple([endpoints[i] for i in sorted(range(len(numbers)), key=numbers.__getitem__)])
    merged = {}
    for port in sl.ports:
        if port.port is None:
            continue            # as in merge_endpoint_slices
        n = port.port
        carried = list(map(_PORT, ordered)).count(n) == len(ordered)     # (counted in C)
        merged[ServicePortName(namespace, service_name, port.name, port.protocol)] = (
            ordered if carried else tuple([_with_port(ep, n) for ep in ordered]))
    return merged


def _with_port(ep: Endpoint, port: int) -> Endpoint:
    """`ep` for the service port of number `port`: Endpoint._replace(port=port), made as one tuple
    (without its length check and text made again: the fields are the endpoint's)."""
    return tuple.__new__(Endpoint, (ep[0], port, ep[2], ep[3], ep[4], ep[5], ep[6], ep[7], ep[8], ep[9], ep[10]))


_PORT = itemgetter(1)       # Endpoint.port, in C


def _precedence(ep) -> tuple[bool, bool]:
    """Which copy of a duplicated address wins: ready first, then not terminating."""
    return (ep.ready, not ep.terminating)
