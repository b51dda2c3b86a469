"""v1 Node -> the little the data plane needs: its zone (for topology hints), addresses, and
whether it is on its way out (being deleted, or tainted so: /healthz nodeEligible)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ebpfsvc.k8s.fields import parse_ip, read_meta

# The one zone label, as kube-proxy v1.37.2 reads it (pkg/proxy/config: v1.LabelTopologyZone only).
# The beta failure-domain.beta.kubernetes.io/zone is not a fallback: a node that has only that one
# has no zone for kube-proxy, which then ignores zone hints there (docs/semantics.md).
LABEL_ZONE = "topology.kubernetes.io/zone"
MAX_ADDRESSES = 100
MAX_TAINTS = 1000


@dataclass(frozen=True)
class Node:
    name: str
    zone: str = ""
    # (type, address) of either family; which ones serve NodePorts is the agent's --ip-families (nodeinfo.py)
    addresses: tuple[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address], ...] = ()
    deleting: bool = False                  # metadata.deletionTimestamp is set
    taints: tuple[str, ...] = ()            # spec.taints[].key, in order

    @property
    def key(self) -> tuple[str, str]:
        return ("", self.name)


def parse_node(obj: dict) -> Node:
    """Validate a v1 Node; raises Invalid naming the first bad field."""
    top, meta = read_meta(obj, "Node", ("v1",), namespaced=False)
    zone = meta.labels.get(LABEL_ZONE, "")
    addresses = []
    for a in top.obj("status").objects("addresses", MAX_ADDRESSES):
        if a.str("type") in ("Hostname", "InternalDNS", "ExternalDNS"):
            continue
        addresses.append((a.str("type"), parse_ip(a.str("address"), f"{a.path}.address")))
    taints = tuple(t.str("key") for t in top.obj("spec").objects("taints", MAX_TAINTS))
    deleting = bool(top.obj("metadata").str("deletionTimestamp"))
    return Node(meta.name, zone, tuple(addresses), deleting, taints)
