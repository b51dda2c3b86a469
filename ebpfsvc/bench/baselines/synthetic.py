"""Many real Services for the scaling benchmarks: synthetic_state(n, k, pool).

"Extra services" must cost what real ones cost: each gets its own ClusterIP and
k endpoints taken from a pool of real backend addresses (pods that answer), so
every rule, chain, map element and BPF map entry exists and would work if
traffic were sent to it.  Only the names and ClusterIPs are made up.

Where the measured ("probe") services sit matters for iptables, whose
KUBE-SERVICES chain is walked rule by rule: kube-proxy writes services in Go map
order, i.e. at random, so a probe is on average half-way down.  `probe_position`
puts the probes in the middle by default (the expected case); "last" gives the
worst case and "first" the best.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from ebpfsvc.lab.labfile import DEFAULT_SERVICE_CIDR
from ebpfsvc.lbmodel import Backend, Frontend, FrontendKey, LBState, Protocol, ServicePortName

SERVICE_CIDR = ipaddress.IPv4Network(DEFAULT_SERVICE_CIDR)
NAMESPACE = "bench"


def _backend(item: Backend | tuple[str, int]) -> Backend:
    if isinstance(item, Backend):
        return item
    address, port = item
    return Backend(ipaddress.IPv4Address(address), int(port))


def _cluster_ips(network: ipaddress.IPv4Network, taken: set[ipaddress.IPv4Address]):
    for address in network.hosts():
        if address not in taken:
            yield address


def synthetic_state(n_services: int, endpoints_per_service: int,
                    backend_pool: Sequence[Backend | tuple[str, int]], *,
                    probes: Iterable[Frontend] = (), probe_position: str = "middle",
                    port: int = 80, protocol: Protocol = Protocol.TCP,
                    service_cidr: str | ipaddress.IPv4Network = SERVICE_CIDR,
                    namespace: str = NAMESPACE) -> LBState:
    """An LBState with `n_services` ClusterIP service ports in total, probes included.

    Service i gets endpoints pool[i], pool[i+1], ... pool[i+k-1] (mod the pool
    size), so the load spreads over every backend and no two neighbours share
    the same set.  ClusterIPs come from `service_cidr` in order, skipping any
    address a probe uses.
    """
    pool = [_backend(b) for b in backend_pool]
    probes = list(probes)
    if endpoints_per_service < 1:
        raise ValueError("endpoints_per_service must be at least 1 (services without endpoints are not load)")
    if len(set(pool)) < endpoints_per_service:
        raise ValueError(f"backend pool has {len(set(pool))} distinct backends, "
                         f"fewer than endpoints_per_service={endpoints_per_service}")
    n_extra = n_services - len(probes)
    if n_extra < 0:
        raise ValueError(f"{len(probes)} probes do not fit in {n_services} services")
    network = ipaddress.IPv4Network(service_cidr)
    if n_extra > network.num_addresses - 2 - len(probes):
        raise ValueError(f"{network} has no room for {n_extra} ClusterIPs")

    taken = {fe.key.address for fe in probes}
    addresses = _cluster_ips(network, taken)
    width = len(str(max(n_extra - 1, 0)))
    extra: list[Frontend] = []
    for i in range(n_extra):
        backends = tuple(pool[(i + j) % len(pool)] for j in range(endpoints_per_service))
        spn = ServicePortName(namespace, f"svc-{i:0{width}d}", "", protocol)
        key = FrontendKey(next(addresses), port, protocol)
        extra.append(Frontend(key, spn, backends=backends))

    at = {"first": 0, "middle": len(extra) // 2, "last": len(extra)}.get(probe_position)
    if at is None:
        raise ValueError(f"probe_position must be first, middle or last, not {probe_position!r}")
    return LBState.of(extra[:at] + probes + extra[at:])
