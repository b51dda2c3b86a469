"""networking.k8s.io/v1 ServiceCIDR -> the ranges the cluster allocates ClusterIPs from.

A cluster can have several (kube-apiserver creates `kubernetes` from its
--service-cluster-ip-range; an administrator adds more as they fill up), each with
one range per IP family.  Two things follow from them:

- the IP families the cluster serves (cluster_ip_families): the agent serves those
  by default, so a dual-stack cluster needs no flag (AgentConfig.ip_families_auto);
- the ranges (`cidrs`), which the agent routes to its node-client device
  (ebpfsvc/datapath/hostpath.py), so a process on the node reaches every ClusterIP
  (those of a family the node has no address of are left out there).

The agent never refuses a clusterIP for lying outside them (the API server already
did that check).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable

from ebpfsvc.config import DEFAULT_IP_FAMILIES, family_name
from ebpfsvc.k8s.fields import Invalid, parse_cidr, read_meta

API_VERSIONS = ("networking.k8s.io/v1", "networking.k8s.io/v1beta1")
MAX_CIDRS = 2       # the API allows one per IP family
DEFAULT_NAME = "kubernetes"     # the one kube-apiserver makes from --service-cluster-ip-range


@dataclass(frozen=True)
class ServiceCIDR:
    name: str
    ranges: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()   # as spec.cidrs lists them

    @property
    def key(self) -> tuple[str, str]:
        return ("", self.name)

    @property
    def cidrs(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """The ranges the node-client device is routed for (hostpath.py), both families."""
        return self.ranges

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(family_name(r.version) for r in self.ranges)


def parse_service_cidr(obj: dict) -> ServiceCIDR:
    """Validate a ServiceCIDR; raises Invalid naming the first bad field."""
    top, meta = read_meta(obj, "ServiceCIDR", API_VERSIONS, namespaced=False)
    ranges = []
    for path, value in top.obj("spec").list("cidrs", MAX_CIDRS):
        net = parse_cidr(value, path)
        if net.prefixlen == 0:
            raise Invalid(path, f"{net} would route every address to the node-client device" if net.version == 4
                          else f"{net} is every IPv6 address, not a range of clusterIPs")
        ranges.append(net)
    return ServiceCIDR(meta.name, tuple(ranges))


def cluster_ip_families(service_cidrs: Iterable[ServiceCIDR]) -> tuple[str, ...]:
    """The IP families the cluster allocates clusterIPs of, the primary first: the order of the
    `kubernetes` ServiceCIDR (kube-apiserver's --service-cluster-ip-range, whose first range is the
    cluster's primary family), then any other family an added ServiceCIDR brings. () without any."""
    ordered = sorted(service_cidrs, key=lambda c: (c.name != DEFAULT_NAME, c.name))
    return tuple(dict.fromkeys(f for c in ordered for f in c.families))


def served_ip_families(service_cidrs: Iterable[ServiceCIDR]) -> tuple[str, ...]:
    """--ip-families auto: the cluster's families (cluster_ip_families), DEFAULT_IP_FAMILIES without
    any ServiceCIDR (an API before Kubernetes 1.33, a manifest directory with none)."""
    return cluster_ip_families(service_cidrs) or DEFAULT_IP_FAMILIES
