"""What this node is and the cluster-wide limits it validates Services against.

The counterpart of kube-proxy's command line: which addresses serve NodePorts
(--nodeport-addresses, already resolved to addresses: ebpfsvc/nodeinfo.py), the
node's zone for topology hints, the NodePort range and, optionally, a service
CIDR (the API server's --service-node-port-range and --service-cluster-ip-range,
which a manifest cannot be checked against otherwise), and which
service-proxy-name we answer to.  Like kube-proxy, the agent needs no service
CIDR: without one every valid clusterIP is served.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from ebpfsvc.lbmodel import Algorithm


@dataclass(frozen=True)
class NodeConfig:
    node_name: str
    node_addresses: tuple[IPv4Address, ...] = ()    # NodePort addresses (kube-proxy --nodeport-addresses result)
    zone: str = ""                                    # topology.kubernetes.io/zone; "" = take it from the Node object
    service_cidr: IPv4Network | None = None           # set: clusterIPs outside it are refused
    nodeport_range: tuple[int, int] = (30000, 32767)
    proxy_name: str = ""     # service.kubernetes.io/service-proxy-name we answer to ("" = only unlabelled Services)
    default_algorithm: Algorithm = Algorithm.MAGLEV

    def __post_init__(self) -> None:
        # Accept strings and lists from callers (CLI, tests) but store the typed, hashable form.
        object.__setattr__(self, "node_addresses", tuple(IPv4Address(a) for a in self.node_addresses))
        if self.service_cidr is not None:
            object.__setattr__(self, "service_cidr", IPv4Network(self.service_cidr))
        object.__setattr__(self, "default_algorithm", Algorithm(self.default_algorithm))
        lo, hi = self.nodeport_range
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"nodeport_range {lo}-{hi} is not a port range")
        object.__setattr__(self, "nodeport_range", (int(lo), int(hi)))
