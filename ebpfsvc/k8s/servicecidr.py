"""networking.k8s.io/v1 ServiceCIDR -> the IPv4 ranges the cluster allocates ClusterIPs from.

A cluster can have several (kube-apiserver creates `kubernetes` from its
--service-cluster-ip-range; an administrator adds more as they fill up).  The
agent routes them to its node-client device (ebpfsvc/datapath/hostpath.py), so
a process on the node reaches every ClusterIP; it never refuses a clusterIP for
lying outside them (the API server already did that check).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ebpfsvc.k8s.fields import Invalid, parse_cidr, read_meta

API_VERSIONS = ("networking.k8s.io/v1", "networking.k8s.io/v1beta1")
MAX_CIDRS = 2       # the API allows one per IP family


@dataclass(frozen=True)
class ServiceCIDR:
    name: str
    cidrs: tuple[ipaddress.IPv4Network, ...] = ()     # IPv4 only: an IPv6 range has no ClusterIP of ours

    @property
    def key(self) -> tuple[str, str]:
        return ("", self.name)


def parse_service_cidr(obj: dict) -> ServiceCIDR:
    """Validate a ServiceCIDR; raises Invalid naming the first bad field."""
    top, meta = read_meta(obj, "ServiceCIDR", API_VERSIONS, namespaced=False)
    cidrs = []
    for path, value in top.obj("spec").list("cidrs", MAX_CIDRS):
        net = parse_cidr(value, path)
        if net.version == 4:
            if net.prefixlen == 0:
                raise Invalid(path, f"{net} would route every address to the node-client device")
            cidrs.append(net)
    return ServiceCIDR(meta.name, tuple(cidrs))
